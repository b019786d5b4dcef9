"""``solve(cluster, model, options) -> Plan``: heuristic, MILP, polish, routing, report.

1. A greedy construction with local search (solver/hexplan/solver/heuristic.py) gives a plan in about a second.
2. The placement MILP (solver/hexplan/solver/formulation.py) starts from it (warm start) and improves it until
   it is proven optimal or the time limit is near; its dual bound is the upper bound reported
   (with the compute-only bound of solver/hexplan/solver/bounds.py when that is tighter).
3. The MILP's pipelines get exact integer layers and a last local search; stages whose removal
   costs no throughput are then dropped, freeing their GPUs.
4. Max-flow over the placed graph (solver/hexplan/solver/routing.py) gives the routing weights.
Pure function: no IO, no printing; ``progress(event, **info)`` reports what happens.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import replace

from hexplan.cluster import Cluster
from hexplan.errors import InfeasibleError, SpecError
from hexplan.models import ModelSpec
from hexplan.plan import Plan

from . import formulation, milp
from .assemble import assemble_plan
from .bounds import compute_bound, max_pipelines
from .heuristic import State, heuristic_solve, local_search, prune, total_value
from .latency import min_latency
from .layers import ChainEvaluator, resolve_sharing
from .problem import OBJECTIVES, TP_DEGREES, Problem, SolveOptions

INTEGER_LAYER_LIMIT = 150   # use the integer-layer MILP when candidates x pipelines <= this
BACKENDS = ("highs", "cbc", "none")
EARLY_STOP_GAP = 0.005


def _check_options(o: SolveOptions) -> None:
    if o.objective not in OBJECTIVES:
        raise SpecError(f"unknown objective {o.objective!r}; use one of {', '.join(OBJECTIVES)}", field="objective")
    if o.backend not in BACKENDS:
        raise SpecError(f"unknown solver backend {o.backend!r}; use one of {', '.join(BACKENDS)}", field="solver")
    if not (isinstance(o.time_limit, (int, float)) and o.time_limit > 0 and math.isfinite(o.time_limit)):
        raise SpecError(f"must be a positive number of seconds, got {o.time_limit!r}", field="time_limit")
    degs = o.tp_degrees
    if (not isinstance(degs, tuple) or not degs or len(set(degs)) != len(degs)
            or any(isinstance(d, bool) or d not in TP_DEGREES for d in degs)):
        raise SpecError(f"must be a non-empty tuple of distinct degrees from {TP_DEGREES}, got {degs!r}",
                        field="tp_degrees")
    if o.nodes is not None and (not isinstance(o.nodes, tuple) or not all(isinstance(n, str) for n in o.nodes)):
        raise SpecError(f"must be a tuple of node names or None, got {o.nodes!r}", field="nodes")
    for f in ("slo_tpot_ms", "slo_ttft_ms"):
        v = getattr(o, f)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise SpecError(f"must be a positive number of milliseconds, got {v!r}", field=f)


def _memory_message(problem: Problem) -> str:
    m, w = problem.model, problem.workload
    kv = w.concurrency * w.context * m.kv_bytes_per_token_per_layer * m.num_layers
    weights = m.num_layers * m.layer_bytes + m.embedding_bytes + m.head_bytes
    usable = sum(n.count * problem.cost(n.name, 1).usable_memory for n in problem.nodes)
    total = sum(n.count * n.gpu.memory for n in problem.nodes)
    gpus = sum(n.count for n in problem.nodes)
    where, has = f"cluster {problem.cluster.name!r}", "the cluster has"
    if len(problem.nodes) < len(problem.cluster.nodes):
        where += f" restricted to node(s) {', '.join(n.name for n in problem.nodes) or 'none'}"
        has = "those have"
    return (f"{m.name} does not fit in {where}: one copy needs "
            f"{(weights + kv) / 1e9:.1f} GB ({weights / 1e9:.1f} GB of weights + {kv / 1e9:.1f} GB of KV cache "
            f"for {w.concurrency} sequences of {w.context} tokens), {has} "
            f"{usable / 1e9:.1f} GB usable of {total / 1e9:.1f} GB on {gpus} GPUs "
            f"(lower --concurrency or the context, or add GPUs)")


def solve(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions(), progress=None) -> Plan:
    _check_options(options)
    t0 = time.perf_counter()
    deadline = t0 + options.time_limit
    report = progress or (lambda *a, **k: None)

    def emit(event, **info):
        report(event, elapsed=time.perf_counter() - t0, **info)

    problem = Problem(cluster, model, options)
    if max_pipelines(problem) == 0:
        raise InfeasibleError(_memory_message(problem))
    info: dict = {}

    # Latency objective: the fastest pipeline first, then as much throughput as fits under it.
    if options.objective == "latency":
        emit("latency", message="searching for the minimum-latency pipeline")
        r = min_latency(problem, "tpot", max(1.0, options.time_limit * 0.3), options.seed, _mip_backend(options))
        if r is None:
            raise InfeasibleError(_memory_message(problem))
        best_tpot = r[0]
        info["min_tpot_ms"] = best_tpot * 1e3
        if r[3] is not None:
            info["tpot_lower_bound_ms"] = r[3] * 1e3
        emit("latency", tpot_ms=best_tpot * 1e3)
        slo = best_tpot * 1e3 * (1 + 1e-6)
        if options.slo_tpot_ms is not None:
            slo = min(slo, options.slo_tpot_ms)
        problem = Problem(cluster, model, replace(options, slo_tpot_ms=slo))

    ev = ChainEvaluator(problem)
    budget = options.time_limit
    h_deadline = min(deadline, t0 + max(0.5, 0.25 * budget))
    state = heuristic_solve(problem, ev, h_deadline, options.seed,
                            progress=lambda ev_, **k: emit("heuristic", **k))
    if total_value(ev, state) <= 0 and (problem.slo_tpot or problem.slo_ttft):
        state = _seed_with_fastest(problem, ev, options, deadline)
    h_value = total_value(ev, state)
    info["heuristic_tokens_per_s"] = h_value
    emit("heuristic", throughput=h_value, done=True)
    if h_value <= 0:
        _raise_unmeetable(problem, options)

    bound = compute_bound(problem)
    milp_status = "skipped"
    # Like Helix, stop early once a plan is within 0.5% of the compute-only bound.
    if options.backend != "none" and h_value < bound * (1 - EARLY_STOP_GAP) and time.perf_counter() < deadline - 0.2:
        K = max_pipelines(problem)
        if options.max_pipelines:
            K = min(K, options.max_pipelines)
        n_cands = len(problem.all_slots())
        integer = n_cands * K <= INTEGER_LAYER_LIMIT
        form = formulation.build(problem, K, bound, integer_layers=integer)
        warm = formulation.warm_start(form, problem, [ev(p) for p in state.pipes])
        emit("milp", message=f"{'integer' if integer else 'fractional'}-layer MILP: "
                             f"{form.model.num_vars} variables, {len(form.model.rows)} rows ({options.backend})")
        remaining = deadline - time.perf_counter() - max(0.2, 0.05 * budget)
        res = milp.solve(form.model, options.backend, max(0.2, remaining), options.seed, warm,
                         on_incumbent=lambda obj, bd, t: emit("milp", incumbent=obj, bound=bd))
        milp_status = res.status
        info["milp_seconds"] = res.seconds
        if res.bound is not None and res.status != "infeasible":
            bound = min(bound, res.bound)
        if res.values is not None:
            pipes = formulation.decode(form, res.values)
            cand = State(problem, pipes)
            if total_value(ev, cand) > 0:
                cand = local_search(ev, cand, random.Random(options.seed), deadline)
                if total_value(ev, cand) > total_value(ev, state) + 1e-9:
                    state = cand
        emit("milp", status=res.status, throughput=total_value(ev, state), bound=bound)
    info["milp_status"] = milp_status
    state = prune(ev, state)

    plan = build_plan(problem, ev, state, options, bound, milp_status, info, time.perf_counter() - t0)
    emit("done", throughput=plan.throughput, bound=bound)
    return plan


def _mip_backend(options: SolveOptions) -> str:
    return "highs" if options.backend == "none" else options.backend


def _seed_with_fastest(problem: Problem, ev: ChainEvaluator, options: SolveOptions, deadline: float) -> State:
    """Under a tight SLO: start from the lowest-latency pipeline and grow from there."""
    r = min_latency(problem, "tpot" if problem.slo_tpot else "ttft", 5.0, options.seed, _mip_backend(options))
    if r is None:
        return State(problem, [])
    st = State(problem, [list(r[1])])
    return local_search(ev, st, random.Random(options.seed), deadline)


def _raise_unmeetable(problem: Problem, options: SolveOptions):
    parts = []
    if problem.slo_tpot:
        r = min_latency(problem, "tpot", 5.0, options.seed, _mip_backend(options))
        best = f"{r[0] * 1e3:.2f} ms" if r else "none (the model does not fit)"
        parts.append(f"no placement meets the TPOT SLO of {problem.slo_tpot * 1e3:g} ms; the best achievable is {best}")
    if problem.slo_ttft:
        r = min_latency(problem, "ttft", 5.0, options.seed, _mip_backend(options))
        best = f"{r[0] * 1e3:.1f} ms" if r else "none (the model does not fit)"
        parts.append(f"no placement meets the TTFT SLO of {problem.slo_ttft * 1e3:g} ms; the best achievable is {best}")
    if not parts:
        raise InfeasibleError(_memory_message(problem))
    raise InfeasibleError("; ".join(parts) + " (with one pipeline at a time; the SLOs together may be stricter)")


def build_plan(problem: Problem, ev: ChainEvaluator, state: State, options: SolveOptions, bound: float,
               milp_status: str, info: dict, seconds: float) -> Plan:
    chains = [c for c in (ev(p) for p in state.pipes) if c is not None and c.throughput > 0]
    chains = resolve_sharing(problem, chains)
    chains = sorted([c for c in chains if c.throughput > 0], key=lambda c: -c.throughput)
    plan = assemble_plan(problem, chains, bound, {})
    gap = plan.predicted["gap"]
    status = "optimal" if milp_status == "optimal" and gap <= 1e-4 else (
        "time_limit" if milp_status == "time_limit" else "feasible")
    return replace(plan, solver={"name": "hexplan", "backend": options.backend, "status": status,
                                 "seconds": seconds, "time_limit": options.time_limit, "seed": options.seed,
                                 **info})
