"""What the baselines that place layers themselves share (solver/hexplan/solver/baselines_grid.py,
solver/hexplan/solver/baselines_swarm.py): fixed chains, even layer splits, SLO filtering, and the last step,
which hands the chains to solver/hexplan/solver/assemble.py so their figures come from the same code as the
optimizer's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from hexplan.cluster import Cluster
from hexplan.errors import InfeasibleError
from hexplan.evaluate import PipelineMetrics, evaluate_pipeline
from hexplan.models import ModelSpec
from hexplan.plan import Plan

from .assemble import assemble_plan
from .bounds import compute_bound
from .optimizer import check_options as _check_options
from .problem import Problem, SolveOptions


@dataclass(frozen=True)
class FixedChain:
    """One pipeline whose stages and layer counts a baseline has fixed."""

    slots: tuple            # ordered (node, tp)
    layers: tuple[int, ...]  # layers per stage, summing to L


def make_problem(cluster: Cluster, model: ModelSpec, options: SolveOptions) -> Problem:
    _check_options(options)
    return Problem(cluster, model, options)


def even_layers(L: int, k: int) -> list[int]:
    """k stages of L // k layers; the first L mod k stages get one more."""
    q, r = divmod(L, k)
    return [q + 1] * r + [q] * (k - r)


def fits_every_stage(problem: Problem, slot, layers) -> bool:
    """Whether ``slot`` can hold any stage of this split, wherever it stands (the first stage
    also holds the embedding, the last the final norm and LM head)."""
    c, k = problem.cost(*slot), len(layers)
    return all(c.max_layers(first=(i == 0), last=(i == k - 1)) >= l for i, l in enumerate(layers))


def fastest_first(problem: Problem, slots) -> list:
    """Slots by layer rate, fastest first; ties keep the cluster's order (a stable sort)."""
    rank = {n.name: i for i, n in enumerate(problem.cluster.nodes)}
    return sorted(slots, key=lambda s: (-problem.rate(s), rank[s[0]], -s[1]))


def tp1_slots(problem: Problem) -> list:
    """Every GPU as a TP-1 group (of the nodes and degrees the options allow)."""
    return [s for s in problem.all_slots() if s[1] == 1]


def chain_metrics(problem: Problem, chain: FixedChain) -> PipelineMetrics:
    return evaluate_pipeline(problem.cluster, problem.costs, [s[0] for s in chain.slots],
                             [s[1] for s in chain.slots], list(chain.layers))


def meets_slos(problem: Problem, chain: FixedChain) -> bool:
    m = chain_metrics(problem, chain)
    assert m.fits, f"a baseline built a chain that does not fit in memory: {chain}"
    return (not (problem.slo_tpot and m.tpot_s > problem.slo_tpot * (1 + 1e-9))
            and not (problem.slo_ttft and m.ttft_s > problem.slo_ttft * (1 + 1e-9)))


def finish(problem: Problem, name: str, chains, detail: dict, t0: float) -> Plan | None:
    """The plan of ``chains`` as baseline ``name`` (None when no chain is left): chains that miss
    an SLO are dropped, ``max_pipelines`` keeps the first ones. The upper bound reported is the
    cluster's compute-only bound (solver/hexplan/solver/bounds.py), valid for any plan on it."""
    keep = [c for c in chains if meets_slos(problem, c)]
    if problem.options.max_pipelines:
        keep = keep[:problem.options.max_pipelines]
    if not keep:
        return None
    report = {"name": name, "backend": "none", "status": "feasible", "seconds": time.perf_counter() - t0,
              "baseline_detail": detail}
    return assemble_plan(problem, keep, compute_bound(problem), report)


def better(plan: Plan, than: Plan | None, objective: str) -> bool:
    """Throughput objective: more tokens/s; latency objective: lower routing-weighted TPOT
    (then more tokens/s). Ties keep the incumbent."""
    if than is None:
        return True
    if objective == "latency":
        a, b = plan.predicted["decode_ms_per_token"], than.predicted["decode_ms_per_token"]
        if abs(a - b) > 1e-9 * max(a, b):
            return a < b
    return plan.throughput > than.throughput * (1 + 1e-9)


def infeasible(name: str, reason: str) -> InfeasibleError:
    return InfeasibleError(f"baseline {name}: {reason}")
