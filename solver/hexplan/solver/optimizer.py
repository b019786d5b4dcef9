"""``solve(cluster, model, options) -> Plan``: heuristic, MILP, polish, routing, report.

1. A greedy construction with local search (solver/hexplan/solver/heuristic.py) gives a plan in about a second.
1b. Column generation over node kinds (solver/hexplan/solver/patterns.py, throughput objective):
   a valid bound and integer patterns mapped onto nodes, started from the heuristic's pipelines.
2. The placement MILP (solver/hexplan/solver/formulation.py) starts from it (warm start) and improves it until
   it is proven optimal or the time limit is near; the bound reported is the least of its dual
   bound, the column generation's and the compute-only bound (solver/hexplan/solver/bounds.py).
3. The MILP's pipelines get exact integer layers and a last local search; stages whose removal
   costs no throughput are then dropped, freeing their GPUs.
4. Max-flow over the placed graph (solver/hexplan/solver/routing.py) gives the routing weights.
Pure function: no IO, no printing; ``progress(event, **info)`` reports what happens.
"""
from __future__ import annotations

import math
import random
import threading
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
HEARTBEAT_S = 2.5           # seconds between heartbeat events (the issue asks for <= 5 s)
BACKENDS = ("highs", "cbc", "ortools", "none")   # the MILPs' solver; ortools: SCIP through OR-Tools
EARLY_STOP_GAP = 0.005
PATTERN_SHARE = 0.9         # of the time left after the heuristic, at most, for column generation
HEURISTIC_SHARE = 0.25      # of the time limit, at most, for the heuristic (0.15 when patterns run)
MILP_SIZE_LIMIT = 10_000    # candidates x pipelines above which the MILP is skipped (throughput objective)
EXACT_SHARE = 0.3           # of the column generation's time left at convergence, for its exact pass
                            # (all of it where the MILP is skipped: patterns.pattern_bound)


def check_options(o: SolveOptions) -> None:
    """SpecError (naming the option's field) for options solve() cannot run with."""
    if o.objective not in OBJECTIVES:
        raise SpecError(f"unknown objective {o.objective!r}; use one of {', '.join(OBJECTIVES)}", field="objective")
    if o.backend not in BACKENDS:
        raise SpecError(f"unknown solver backend {o.backend!r}; use one of {', '.join(BACKENDS)}", field="solver")
    from .patterns import INT_BACKENDS, LP_BACKENDS, ortools_available
    if o.lp_backend is not None and o.lp_backend not in LP_BACKENDS:
        raise SpecError(f"unknown LP backend {o.lp_backend!r}; use one of {', '.join(LP_BACKENDS)}",
                        field="lp_backend")
    if o.int_backend is not None and o.int_backend not in INT_BACKENDS:
        raise SpecError(f"unknown integer backend {o.int_backend!r}; use one of {', '.join(INT_BACKENDS)}",
                        field="int_backend")
    for fld, val, needs in (("solver", o.backend, ("ortools",)), ("lp_backend", o.lp_backend, ("glop", "pdlp")),
                            ("int_backend", o.int_backend, ("cpsat",))):
        if val in needs and not ortools_available():
            raise SpecError(f"{val} needs OR-Tools, which is not installed here: pip install 'hexplan[ortools]'",
                            field=fld)
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


class Heartbeat:
    """Emits ``heartbeat`` (phase, incumbent, bound) every ``interval`` seconds from a daemon
    thread while the solve runs, so a caller is never left without news for long: HiGHS and
    CBC release the GIL while they search, the heuristic is Python and yields it."""

    def __init__(self, emit, interval: float = HEARTBEAT_S):
        self.emit, self.interval = emit, interval
        self.state = {"phase": "heuristic", "incumbent": 0.0, "bound": None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hexplan-heartbeat", daemon=True)

    def update(self, **kw) -> None:
        for k, v in kw.items():
            if k in ("incumbent", "bound") and v is None:
                continue     # nothing new: keep what is known
            if k == "incumbent":
                v = max(v, self.state.get("incumbent") or 0.0)
            if k == "bound" and self.state.get("bound") is not None:
                v = min(v, self.state["bound"])
            self.state[k] = v

    def _run(self):
        while not self._stop.wait(self.interval):
            self.emit("heartbeat", **dict(self.state))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=1.0)
        return False


def solve(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions(), progress=None) -> Plan:
    check_options(options)
    t0 = time.perf_counter()
    report = progress or (lambda *a, **k: None)
    lock = threading.Lock()

    def emit(event, **info):
        with lock:
            report(event, elapsed=time.perf_counter() - t0, **info)

    if progress is None:
        return _solve(cluster, model, options, emit, t0, None)
    with Heartbeat(emit) as hb:
        return _solve(cluster, model, options, emit, t0, hb)


def _solve(cluster, model, options, emit, t0, hb) -> Plan:
    deadline = t0 + options.time_limit
    beat = hb.update if hb is not None else (lambda **k: None)

    problem = Problem(cluster, model, options)
    if max_pipelines(problem) == 0:
        raise InfeasibleError(_memory_message(problem))
    info: dict = {}
    beat(phase="heuristic", bound=compute_bound(problem))

    # Latency objective: the fastest pipeline first, then as much throughput as fits under it.
    if options.objective == "latency":
        beat(phase="latency")
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
    beat(phase="heuristic")
    budget = options.time_limit
    h_share = HEURISTIC_SHARE
    K_all = max_pipelines(problem) if options.max_pipelines is None else min(max_pipelines(problem),
                                                                             options.max_pipelines)
    if options.objective == "throughput" and options.backend != "none":
        # the column generation needs the time more (and the most where the MILP is skipped)
        h_share = min(h_share, 0.15 if len(problem.all_slots()) * K_all <= MILP_SIZE_LIMIT else 0.1)
    h_deadline = min(deadline, t0 + max(0.5, h_share * budget))
    def on_heuristic(ev_, **k):
        beat(incumbent=k.get("throughput"))
        emit("heuristic", **k)
    state = heuristic_solve(problem, ev, h_deadline, options.seed, progress=on_heuristic)
    if options.start:
        start = start_state(problem, options.start)
        info["start_tokens_per_s"] = total_value(ev, start)
        if info["start_tokens_per_s"] > total_value(ev, state) + 1e-9:
            state = start
            emit("heuristic", message=f"the start plan's pipelines ({info['start_tokens_per_s']:.1f} tokens/s) "
                                      "beat the heuristic's: searching from them")
    if total_value(ev, state) <= 0 and (problem.slo_tpot or problem.slo_ttft):
        state = _seed_with_fastest(problem, ev, options, deadline)
    h_value = total_value(ev, state)
    info["heuristic_tokens_per_s"] = h_value
    emit("heuristic", throughput=h_value, done=True)
    if h_value <= 0:
        _raise_unmeetable(problem, options)

    bound = compute_bound(problem)
    bound_source = "compute"
    beat(incumbent=h_value, bound=bound)
    milp_status = "skipped"
    # Column generation over node kinds (patterns.py): a valid bound, usually far tighter than
    # the MILP's root relaxation on clusters of many identical nodes, and integer patterns mapped
    # onto nodes as a second candidate plan. Up to PATTERN_SHARE of the time left.
    # On large clusters the placement MILP grows with candidates x pipelines (7.8 GB at 1024 GPUs)
    # and adds little: above MILP_SIZE_LIMIT the column generation gets the time instead.
    K = max_pipelines(problem)
    if options.max_pipelines:
        K = min(K, options.max_pipelines)
    milp_fits = len(problem.all_slots()) * K <= MILP_SIZE_LIMIT
    if (options.backend != "none" and options.objective == "throughput" and h_value < bound * (1 - EARLY_STOP_GAP)
            and time.perf_counter() < deadline - 1.0):
        beat(phase="patterns")
        share = PATTERN_SHARE if milp_fits else 0.88   # the rest: polish, routing, the plan
        state, bound, bound_source = _patterns(problem, ev, state, bound, bound_source, options,
                                               share * (deadline - time.perf_counter()), deadline, emit, beat,
                                               exact_share=EXACT_SHARE if milp_fits else 1.0)
        h_value = max(h_value, total_value(ev, state))
    if not milp_fits and options.objective == "throughput":
        info["milp_skipped"] = f"{len(problem.all_slots())} candidates x {K} pipelines > {MILP_SIZE_LIMIT}"
    # Like Helix, stop early once a plan is within 0.5% of the compute-only bound.
    if options.backend != "none" and total_value(ev, state) < bound * (1 - EARLY_STOP_GAP) \
            and time.perf_counter() < deadline - 0.2 and (milp_fits or options.objective != "throughput"):
        beat(phase="milp")
        n_cands = len(problem.all_slots())
        integer = n_cands * K <= INTEGER_LAYER_LIMIT
        form = formulation.build(problem, K, bound, integer_layers=integer)
        warm = formulation.warm_start(form, problem, [ev(p) for p in state.pipes])
        emit("milp", message=f"{'integer' if integer else 'fractional'}-layer MILP: "
                             f"{form.model.num_vars} variables, {len(form.model.rows)} rows ({options.backend})")
        reserve = max(0.2, 0.05 * budget)
        lp_bound = None
        if options.backend == "cbc":
            # CBC reports a bound only when it proves optimality: solve the LP relaxation
            # first (a valid bound: every plan is a point of the MILP, hence of its LP).
            lp_limit = max(1.0, 0.1 * (deadline - time.perf_counter()))
            lp = milp.solve(milp.relaxed(form.model), "cbc", lp_limit, options.seed)
            if lp.status == "optimal" and lp.objective is not None:
                lp_bound = lp.objective
                if lp_bound < bound:
                    bound, bound_source = lp_bound, "lp_relaxation"
                    beat(bound=bound)
        remaining = deadline - time.perf_counter() - reserve

        def on_inc(obj, bd, t):
            beat(milp_incumbent=obj, bound=bd if bd is not None and math.isfinite(bd) else None)
            emit("milp", incumbent=obj, bound=bd)
        res = milp.solve(form.model, options.backend, max(0.2, remaining), options.seed, warm,
                         on_incumbent=on_inc, on_bound=lambda bd, inc: beat(bound=bd, milp_incumbent=inc))
        milp_status = res.status
        info["milp_seconds"] = res.seconds
        if res.bound is not None and res.status != "infeasible" and res.bound < bound:
            bound, bound_source = res.bound, "milp"
        beat(phase="polish", bound=bound)
        if res.values is not None:
            pipes = formulation.decode(form, res.values)
            cand = State(problem, pipes)
            if total_value(ev, cand) > 0:
                cand = local_search(ev, cand, random.Random(options.seed), deadline)
                if total_value(ev, cand) > total_value(ev, state) + 1e-9:
                    state = cand
        emit("milp", status=res.status, throughput=total_value(ev, state), bound=bound)
    info["milp_status"] = milp_status
    info["bound_source"] = bound_source
    state = prune(ev, state)

    plan = build_plan(problem, ev, state, options, bound, milp_status, info, time.perf_counter() - t0)
    if options.shift:   # Shift Parallelism post-pass over the placement (solver/hexplan/solver/shift.py)
        from .shift import shift_plan
        plan = shift_plan(plan, problem.cluster)
    emit("done", throughput=plan.throughput, bound=bound)
    return plan


def start_state(problem: Problem, start) -> State:
    """The pipelines of ``start`` (``SolveOptions.start``) that this problem can place: every
    stage's node among the usable ones with its TP degree allowed, and GPUs left for it on the
    node (in the order given: a pipeline that no longer fits is dropped whole)."""
    free = {n.name: n.count for n in problem.nodes}
    pipes = []
    for p in start:
        p = [(str(node), int(tp)) for node, tp in p]
        need: dict = {}
        for node, tp in p:
            need[node] = need.get(node, 0) + tp
        if p and all(node in free and tp in problem.allowed_tp[node] for node, tp in p) \
                and all(free[n] >= k for n, k in need.items()):
            for n, k in need.items():
                free[n] -= k
            pipes.append(p)
    return State(problem, pipes)


def _patterns(problem, ev, state, bound, bound_source, options, budget, deadline, emit, beat, exact_share=0.3):
    """(state, bound, bound source) after column generation (patterns.pattern_plan): the
    better of ``state`` and the patterns' plan (polished by the local search), the smaller bound."""
    from .patterns import pattern_plan

    try:
        chains, res = pattern_plan(problem, max(0.5, budget), lp_backend=lp_backend(options),
                                   int_backend=options.int_backend, progress=lambda m: emit("patterns", message=m),
                                   bound_share=0.8, start=[list(p) for p in state.pipes], exact_share=exact_share)
    except Exception as e:   # the MILP still runs; say why this phase gave nothing
        emit("patterns", message=f"column generation failed ({type(e).__name__}: {e}); going on without it")
        return state, bound, bound_source
    if res.bound is not None and math.isfinite(res.bound) and res.bound < bound:
        bound, bound_source = res.bound, "patterns"
    beat(bound=bound)
    if chains:
        cand = State(problem, [list(c.slots) for c in chains])
        if total_value(ev, cand) > 0:
            cand = local_search(ev, cand, random.Random(options.seed), deadline)
            if total_value(ev, cand) > total_value(ev, state) + 1e-9:
                state = cand
    value = total_value(ev, state)
    beat(incumbent=value)
    emit("patterns", throughput=value, bound=bound)
    return state, bound, bound_source


def lp_backend(options: SolveOptions) -> str:
    """The column generation's master-LP backend: as asked, else GLOP with --solver ortools."""
    if options.lp_backend is not None:
        return options.lp_backend
    return "glop" if options.backend == "ortools" else "highs"


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
    if options.objective == "throughput" and options.backend != "none":
        info.setdefault("lp_backend", lp_backend(options))
    return replace(plan, solver={"name": "hexplan", "backend": options.backend, "status": status,
                                 "seconds": seconds, "time_limit": options.time_limit, "seed": options.seed,
                                 **info})
