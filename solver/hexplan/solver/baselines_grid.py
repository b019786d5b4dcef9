"""Baselines with identical stages: "symmetric" (pp x tp, vLLM-style) and "uniform" (naive PP).

Both cut the model into k stages of even size (L // k layers, the first L mod k stages one
more), give every stage a group of the same TP degree d inside one node, and build as many
pipelines of k stages as the groups allow. A group qualifies when it holds any stage of the split
wherever it stands (the heaviest position, with the embedding or the LM head), so stages are
interchangeable as in a homogeneous deployment. Qualified groups are sorted fastest first and cut
into consecutive runs of k: for a sum of pipeline minima with fixed pipeline sizes that grouping
is optimal (an exchange argument), and the left-over groups are the slowest. Inside a pipeline
the stages follow the network-cheapest order of solver/hexplan/solver/layers.py (order_slots).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from hexplan.cluster import Cluster
from hexplan.models import ModelSpec
from hexplan.plan import Plan

from .baselines_common import (FixedChain, better, even_layers, fastest_first, finish, fits_every_stage,
                               infeasible, make_problem, tp1_slots)
from .layers import order_slots
from .problem import TP_DEGREES, Problem, SolveOptions


def grid_chains(problem: Problem, groups, k: int) -> list[FixedChain]:
    """As many pipelines of k even stages as the qualified ``groups`` allow (fastest first)."""
    layers = tuple(even_layers(problem.L, k))
    ok = fastest_first(problem, [g for g in groups if fits_every_stage(problem, g, layers)])
    return [FixedChain(tuple(order_slots(problem, ok[i * k:(i + 1) * k])), layers)
            for i in range(len(ok) // k)]


def _detail(chains: list[FixedChain], tp: int) -> dict:
    layers = chains[0].layers
    return {"tp": tp, "stages": len(layers), "pipelines": len(chains),
            "layers_per_stage": [max(layers), min(layers)] if max(layers) != min(layers) else layers[0]}


def _no_groups(problem: Problem, d: int) -> str:
    if d not in problem.options.tp_degrees:
        return f"TP {d} is not among the allowed degrees {problem.options.tp_degrees}"
    reason = problem.model.tp_degree_ok(d)
    if reason:
        return reason
    most = max((n.count for n in problem.nodes), default=0)
    if most < d:
        return f"no node has {d} GPUs (the largest has {most})"
    return f"no TP-{d} group holds a single layer"


def _no_split(problem: Problem, groups, d: int) -> str:
    most = max(problem.max_layers(g) for g in groups)
    return (f"{len(groups)} TP-{d} group(s) holding at most {most} layers each: no stage count k has k of them "
            f"that hold {problem.L}/k layers (k >= {math.ceil(problem.L / max(most, 1))} needed)")


def symmetric_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """pp x tp with identical stages, as vLLM-style deployments do (``--tensor-parallel-size d
    --pipeline-parallel-size k``, layers split evenly); the baseline HexGen calls "symmetric".

    Every TP degree d in {1, 2, 4, 8} and every stage count k is tried (groups of d GPUs inside
    one node, see the module docstring); the best plan by predicted throughput (or TPOT, for the
    latency objective) is kept. ``baseline_detail`` records the choice and, per degree, the best
    throughput or why no plan exists.
    """
    t0 = time.perf_counter()
    problem = make_problem(cluster, model, options)
    best, per_tp = None, {}
    for d in TP_DEGREES:
        groups = [s for s in problem.all_slots() if s[1] == d]
        if not groups:
            per_tp[f"tp{d}"] = _no_groups(problem, d)
            continue
        best_d, built = None, False
        for k in range(1, min(problem.L, len(groups)) + 1):
            chains = grid_chains(problem, groups, k)
            built = built or bool(chains)
            plan = finish(problem, "symmetric", chains, _detail(chains, d), t0) if chains else None
            if plan is not None and better(plan, best_d, options.objective):
                best_d = plan
        if best_d is None:
            per_tp[f"tp{d}"] = "no plan meets the SLOs" if built else _no_split(problem, groups, d)
            continue
        per_tp[f"tp{d}"] = best_d.throughput
        if better(best_d, best, options.objective):
            best = best_d
    if best is None:
        raise infeasible("symmetric", "; ".join(f"TP {d[2:]}: {r}" for d, r in per_tp.items()))
    detail = {**best.solver["baseline_detail"], "per_tp": per_tp}
    return replace(best, solver={**best.solver, "seconds": time.perf_counter() - t0, "baseline_detail": detail})


def uniform_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """Naive even pipeline parallelism: every GPU its own stage (TP 1), every stage the same
    number of layers (HexGen's "PP" and Helix's "separate pipelines" comparison points, before
    any balancing). The stage count k is the one with the most pipelines that fit in memory,
    then the most GPUs used (P x k); predictions play no part in the choice.
    """
    t0 = time.perf_counter()
    problem = make_problem(cluster, model, options)
    gpus = tp1_slots(problem)
    if not gpus:
        raise infeasible("uniform", "no GPU can hold a layer at TP 1")
    best_k, best_key = None, (0, 0)
    for k in range(1, min(problem.L, len(gpus)) + 1):
        layers = even_layers(problem.L, k)
        p = sum(fits_every_stage(problem, g, layers) for g in gpus) // k
        if p and (p, p * k) > best_key:
            best_k, best_key = k, (p, p * k)
    if best_k is None:
        raise infeasible("uniform", _no_split(problem, gpus, 1))
    chains = grid_chains(problem, gpus, best_k)
    plan = finish(problem, "uniform", chains, _detail(chains, 1), t0)
    if plan is None:
        raise infeasible("uniform", f"none of its {len(chains)} pipeline(s) of {best_k} stages meets the SLOs")
    return plan
