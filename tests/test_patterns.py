"""Column generation over node kinds (solver/hexplan/solver/patterns.py) against the exhaustive
search of tests/bruteforce.py on the tiny clusters of tests/test_optimizer.py.

* the pattern bound is never below the exhaustive optimum (it is a true relaxation);
* every pattern's upper value is at least the exact value of a pipeline of that pattern;
* the integer patterns, mapped onto nodes, are a valid plan (hexplan/validate.py) whose
  throughput is at most the optimum and at most the bound;
* the master LP gives the same value with HiGHS and GLOP, and the integer choice the same with
  CP-SAT and HiGHS.
"""
from __future__ import annotations

import pytest

import hexplan
from hexplan.solver.assemble import assemble_plan
from hexplan.solver.problem import Problem, SolveOptions

from hexplan.solver import patterns  # noqa: E402

# OR-Tools is optional (the `ortools` extra, which pip cannot install beside the executor's
# protobuf): without it the master LP and the integer choice run on HiGHS, and only the test
# comparing the two backends is skipped.
needs_ortools = pytest.mark.skipif(not patterns.ortools_available(), reason="OR-Tools is not installed")

from test_optimizer import CASES, brute_optimum, case_cluster  # noqa: E402

REL = 1e-6
# brute force is slow on a few cases; these cover one node with TP splits, regions, several
# pipelines, GQA and asymmetric link rules
NAMES = ["one-node-4gpu", "mixed-3-nodes", "slow-link", "two-regions", "two-regions-3-pipelines",
         "four-plus-one", "five-singles", "gqa-3-pipelines", "big-plus-4-fast"]


def problem_of(name: str) -> Problem:
    model, _ = CASES[name]
    return Problem(case_cluster(name), model, SolveOptions())


@pytest.mark.parametrize("name", NAMES)
def test_bound_is_valid_and_plan_is_valid(name):
    pb = problem_of(name)
    best = brute_optimum(name)
    chains, res = patterns.pattern_plan(pb, time_limit=4.0)
    assert res.bound >= best.throughput * (1 - REL), (
        f"{name}: pattern bound {res.bound:.6g} below the optimum {best.describe()}\n" + "\n".join(res.log))
    plan = assemble_plan(pb, chains, res.bound, {"name": "patterns"})
    assert hexplan.validate_plan(plan, case_cluster(name)) == []
    assert plan.throughput <= best.throughput * (1 + REL)
    assert plan.throughput <= res.bound * (1 + REL)
    # every pattern the optimum uses is valued at least at its pipeline's throughput
    ctx = res.context
    tid = {(t.kind, t.tp): t.idx for t in ctx.types}
    for p in best.pipelines:
        cnt: dict = {}
        for node, tp in p.slots:
            j = tid[(ctx.kind_of[node], tp)]
            cnt[j] = cnt.get(j, 0) + 1
        pat = tuple(sorted(cnt.items()))
        assert ctx.upper_value(pat) >= p.throughput * (1 - REL), (name, pat, p)


def test_bound_every_iteration_is_valid():
    """The bound reported after each iteration (not only the last) is valid: stop early."""
    for name in ("five-singles", "two-regions-3-pipelines"):
        best = brute_optimum(name)
        res = patterns.pattern_bound(problem_of(name), time_limit=2.0, max_iter=1)
        assert res.bound >= best.throughput * (1 - REL), (name, res.log)


@needs_ortools
def test_lp_backends_agree_and_int_backends_agree():
    pb = problem_of("five-singles")
    a = patterns.pattern_bound(pb, time_limit=2.0, lp_backend="highs")
    b = patterns.pattern_bound(pb, time_limit=2.0, lp_backend="glop")
    assert a.lp_value == pytest.approx(b.lp_value, rel=1e-6)
    c1, _ = patterns.pattern_plan(pb, 2.0, int_backend="cpsat", result=a)
    c2, _ = patterns.pattern_plan(pb, 2.0, int_backend="highs", result=a)
    assert patterns.chains_value(c1) == pytest.approx(patterns.chains_value(c2), rel=1e-6)


def test_identical_nodes_share_a_kind():
    cl = hexplan.loads_cluster("""
nodes:
  - {name: c, gpu: A100-80G, count: 1}
  - {name: a0, gpu: L4, count: 1, region: r}
  - {name: a1, gpu: L4, count: 1, region: r}
  - {name: b0, gpu: L4, count: 1, region: s}
  - {name: n0, gpu: L4, count: 1, region: r}
network:
  links:
    - {between: [n0, c], bandwidth: 10Gbps, latency: 0.1ms}
""")
    ctx = patterns.Patterns(Problem(cl, hexplan.load_model("llama-2-7b"), SolveOptions()))
    groups = sorted(sorted(k.nodes) for k in ctx.kinds)
    # the coordinator and a node named in a link rule are kinds of their own; regions split kinds
    assert groups == [["a0", "a1"], ["b0"], ["c"], ["n0"]]


def test_cluster_generator_is_seeded_and_valid():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from cluster_gen import generate

    for gpus, seed in ((8, 0), (64, 1), (1024, 3)):
        text = generate(gpus, seed)
        assert text == generate(gpus, seed)
        cl = hexplan.loads_cluster(text)
        assert cl.total_gpus == gpus
        assert 2 <= len(cl.regions) <= 4
    assert generate(64, 1) != generate(64, 2)


@pytest.mark.parametrize("name", ["five-singles", "two-regions-3-pipelines"])
def test_bound_is_valid_under_a_tpot_slo(name):
    """SLOs are honoured by the relaxation (each term minimised on its own)."""
    from test_optimizer import brute, brute_min_tpot

    model, _ = CASES[name]
    tpot, _ = brute_min_tpot(name)
    slo_s = tpot * 1.3
    best = brute(name).solve(slo_tpot_s=slo_s)
    pb = Problem(case_cluster(name), model, SolveOptions(slo_tpot_ms=slo_s * 1e3))
    chains, res = patterns.pattern_plan(pb, time_limit=3.0)
    assert res.bound >= best.throughput * (1 - REL), (name, res.bound, best.describe())
    assert sum(c.throughput for c in chains) <= best.throughput * (1 + REL)


@pytest.mark.parametrize("name", ["four-plus-one", "gqa-3-pipelines"])
def test_bound_is_valid_with_interleaving(name):
    from hexplan.costmodel import Workload

    from bruteforce import BruteForce

    model, _ = CASES[name]
    w = Workload(interleave=2)
    best = BruteForce(case_cluster(name), model, w).solve()
    pb = Problem(case_cluster(name), model, SolveOptions(workload=w))
    chains, res = patterns.pattern_plan(pb, time_limit=3.0)
    assert res.bound >= best.throughput * (1 - REL), (name, res.bound, best.describe())
    plan = assemble_plan(pb, chains, res.bound, {"name": "patterns"})
    assert hexplan.validate_plan(plan, case_cluster(name)) == []


def test_start_columns_from_a_plan_bound_the_lp_from_below():
    """Columns from a known plan (the optimum's pipelines): the master LP is at least that
    plan's throughput from the first iteration, and the bound stays valid."""
    for name in ("five-singles", "two-regions-3-pipelines"):
        best = brute_optimum(name)
        res = patterns.pattern_bound(problem_of(name), time_limit=2.0, max_iter=1,
                                     start=[list(p.slots) for p in best.pipelines])
        assert res.lp_value >= best.throughput * (1 - REL), (name, res.log)
        assert res.bound >= best.throughput * (1 - REL), (name, res.log)


def test_resource_row_only_tightens_the_lagrangian_bound():
    """The third row (classes' least cost, Farley) can only lower the bound, never below z."""
    import random
    rng = random.Random(3)
    for _ in range(50):
        z, P = rng.uniform(100, 1000), rng.randint(1, 20)
        iv = []
        for _ in range(rng.randint(1, 30)):
            t = rng.uniform(1, 300)
            r = rng.uniform(0.01, 0.3) * t
            iv.append((r, t, rng.uniform(0.5, 1.0) * (t - r) + 1e-3))
        two = patterns.lagrangian_bound(z, P, [(r, t) for r, t, _ in iv], 1e9)
        three = patterns.lagrangian_bound(z, P, iv, 1e9)
        assert z * (1 - 1e-9) <= three <= two * (1 + 1e-9)


@needs_ortools
def test_pdlp_master_gives_a_valid_bound():
    """PDLP's duals are approximate: the bound uses the dual objective pi.G + mu P, valid for
    any duals >= 0, so it stays above the optimum."""
    for name in ("five-singles", "two-regions-3-pipelines"):
        best = brute_optimum(name)
        res = patterns.pattern_bound(problem_of(name), time_limit=2.0, lp_backend="pdlp")
        assert res.bound >= best.throughput * (1 - REL), (name, res.log)
