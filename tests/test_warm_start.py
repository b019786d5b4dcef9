"""The planner's warm start (``SolveOptions.start``: a running plan's pipelines, as the re-planner
passes them, hexplan.executor.replan): the pipelines that still fit seed the search, which never
returns less than they are worth; those that no longer fit are dropped."""
from __future__ import annotations

from pathlib import Path

import pytest

import hexplan
from hexplan.solver import SolveOptions, solve
from hexplan.solver.optimizer import start_state
from hexplan.solver.problem import Problem

ROOT = Path(__file__).resolve().parent.parent

# hexplan.solve's plan for helix-42 with a 19 s limit (1018.5 tokens/s, docs/solver.md); the
# heuristic alone gets about 860 in 1 s.
HELIX42 = (
    (("v100-0", 1), ("a100-3", 1), ("a100-2", 1), ("a100-1", 1), ("a100-0", 1)),
    (("t4x4-0", 4), ("t4x2-0", 2), ("t4x4-1", 4), ("v100-1", 1)),
    (("l4x2-0", 2), ("t4x2-1", 2), ("t4x2-2", 2), ("t4x4-2", 4)),
    (("t4x2-3", 2), ("t4x2-4", 2), ("v100-2", 1), ("v100-3", 1), ("v100-4", 1), ("t4x4-3", 4)),
    (("l4x2-1", 2), ("l4x2-2", 2), ("l4x2-3", 2), ("t4x2-5", 2)),
    (("l4-0", 1), ("l4-1", 1), ("l4-2", 1), ("l4-3", 1), ("l4-4", 1), ("l4-5", 1), ("t4-0", 1), ("v100-5", 1)),
    (("l4-6", 1), ("l4-7", 1), ("t4-1", 1), ("t4-2", 1), ("t4-3", 1), ("t4-4", 1), ("t4-5", 1), ("t4-6", 1),
     ("t4-7", 1), ("t4-8", 1), ("t4-9", 1)),
)


@pytest.fixture(scope="module")
def helix42():
    return hexplan.load_cluster(ROOT / "cluster_specs" / "helix-42.yaml"), hexplan.load_model("llama-2-70b")


def test_the_search_starts_from_the_running_plan(helix42):
    cluster, model = helix42
    cold = solve(cluster, model, SolveOptions(time_limit=1, backend="none"))
    warm = solve(cluster, model, SolveOptions(time_limit=1, backend="none", start=HELIX42))
    assert warm.throughput >= 1018.0 > cold.throughput + 50   # 1018.5 against about 860
    hexplan.validate_plan(warm, cluster)


def test_pipelines_that_no_longer_fit_are_dropped(helix42):
    cluster, model = helix42
    # a100-0 gone (as after a node left): the first pipeline cannot be placed, the rest can
    left = tuple(n.name for n in cluster.nodes if n.name != "a100-0")
    problem = Problem(cluster, model, SolveOptions(nodes=left))
    st = start_state(problem, HELIX42 + ((("l4-0", 1),),))   # l4-0 is taken by then: dropped
    assert st.pipes == [list(p) for p in HELIX42[1:]]
    assert all(v >= 0 for v in st.free().values())
    # unknown nodes and TP degrees a node cannot take are dropped, not errors
    assert start_state(problem, ((("nope", 1),), (("v100-0", 8),))).pipes == []
    plan = solve(cluster, model, SolveOptions(time_limit=1, backend="none", nodes=left, start=HELIX42))
    assert all(s.node != "a100-0" for p in plan.pipelines for s in p.stages)
    hexplan.validate_plan(plan, cluster)
