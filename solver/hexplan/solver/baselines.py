"""Baseline planners: how other systems would place the model on the same cluster, written as
hexplan plans, so that the validator, ``hexplan show``, the simulator and the executor take them
as they take the optimizer's.

    BASELINES[name](cluster, model, options) -> Plan
    plan_with(name, cluster, model, options) -> Plan    # InfeasibleError(reason) when none fits

    name         mechanism                                              after
    hexplan      the optimizer (solver/hexplan/solver/optimizer.py)                    -
    homogeneous  the optimizer on the nodes of one GPU type, best type  HexGen's, Helix's comparison point
    symmetric    pp x tp, identical stages, even layers, best (d, k)    vLLM-style deployments
    uniform      TP 1, even layers, the most pipelines that fit         naive pipeline parallelism
    petals       least-covered block windows, greedy disjoint chains    Petals
    swarm        equal stages, servers balanced by throughput, paired   SWARM parallelism
    helix        pipeline-only placement (TP 1), max-flow routing       Helix

Each docstring states the mechanism and the source; docs/baselines.md adds how each maps onto
the plan format and what is simplified. Baselines that fix layers themselves
(solver/hexplan/solver/baselines_grid.py, solver/hexplan/solver/baselines_swarm.py) hand their chains to
solver/hexplan/solver/assemble.py, the optimizer's own last step, so predictions, routing weights and
per-pipeline figures come from one place. Every plan records ``solver.name`` (the baseline) and
``solver.baseline_detail`` (what it chose). Pure functions of (cluster, model, options).
"""
from __future__ import annotations

import time
from dataclasses import replace

from hexplan.cluster import Cluster
from hexplan.errors import InfeasibleError, SpecError
from hexplan.models import ModelSpec
from hexplan.plan import Plan

from .baselines_common import better, infeasible, make_problem
from .baselines_grid import symmetric_plan, uniform_plan
from .baselines_swarm import petals_plan, swarm_plan
from .optimizer import solve
from .problem import SolveOptions


def _as(plan: Plan, name: str, t0: float, detail: dict) -> Plan:
    return replace(plan, solver={**plan.solver, "name": name, "seconds": time.perf_counter() - t0,
                                 "baseline_detail": detail})


def hexplan_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """The optimizer itself (solver/hexplan/solver/optimizer.py), for the comparison table."""
    try:
        return solve(cluster, model, options)
    except InfeasibleError as e:
        raise infeasible("hexplan", str(e)) from None


def homogeneous_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """The best plan that uses the GPUs of one type only: the "homogeneous deployment" HexGen
    and Helix compare against. For each GPU type present, the optimizer runs with only that
    type's nodes usable (``SolveOptions.nodes``), each type with an equal share of the time
    limit; the best plan is kept. The coordinator stays the cluster's (the gateway machine is
    part of the deployment), so the plan's figures are those of this cluster and validate
    against it. ``baseline_detail``: the type chosen and every type's result.
    """
    t0 = time.perf_counter()
    problem = make_problem(cluster, model, options)
    types = list(dict.fromkeys(n.gpu.name for n in problem.nodes))
    if not types:
        raise infeasible("homogeneous", "no node to place on")
    best, best_type, per_type = None, None, {}
    for t in types:
        nodes = tuple(n.name for n in problem.nodes if n.gpu.name == t)
        try:
            plan = solve(cluster, model, replace(options, nodes=nodes, time_limit=options.time_limit / len(types)))
        except InfeasibleError as e:
            per_type[t] = f"infeasible: {e}"
            continue
        per_type[t] = plan.throughput
        if better(plan, best, options.objective):
            best, best_type = plan, t
    if best is None:
        raise infeasible("homogeneous", "no GPU type can hold the model on its own: "
                         + "; ".join(f"{t}: {r[len('infeasible: '):]}" for t, r in per_type.items()))
    return _as(best, "homogeneous", t0, {"gpu_type": best_type, "per_type": per_type})


def helix_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """Helix (Mei et al., ASPLOS 2025): pipeline-only placement, every GPU a TP-1 stage holding a
    range of layers, with max-flow routing. Here: the optimizer with TP 1 as the only degree
    (``SolveOptions.tp_degrees = (1,)``), whose MILP (per-group layer rates, like Helix's
    per-node layer ranges) and max-flow routing follow Helix; the options' TP degrees are
    replaced. Helix lets a node feed several successors; hexplan's pipelines are disjoint.
    """
    t0 = time.perf_counter()
    try:
        plan = solve(cluster, model, replace(options, tp_degrees=(1,)))
    except InfeasibleError as e:
        raise infeasible("helix", f"with TP 1 only: {e}") from None
    return _as(plan, "helix", t0, {"tp_degrees": [1]})


BASELINES = {
    "hexplan": hexplan_plan,
    "homogeneous": homogeneous_plan,
    "symmetric": symmetric_plan,
    "uniform": uniform_plan,
    "petals": petals_plan,
    "swarm": swarm_plan,
    "helix": helix_plan,
}


def plan_with(name: str, cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """The plan baseline ``name`` makes; InfeasibleError (with the reason) when it finds none,
    SpecError for an unknown name or bad options."""
    fn = BASELINES.get(name)
    if fn is None:
        raise SpecError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}", field="baseline")
    return fn(cluster, model, options)
