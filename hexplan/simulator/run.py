"""``simulate(plan, cluster, workload) -> SimResult`` and the rate sweep built on it.

Pure functions of their inputs and the seed: no printing, no files (the CLI reads the plan,
cluster and trace files and renders the results). The cluster may be left out (None): a plan
records the nodes it uses and their network, and the cluster is rebuilt from that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..cluster import Cluster, load_cluster
from ..errors import SpecError
from ..evaluate import CostCache, evaluate_plan_pipelines
from ..plan import Plan, load_plan, plan_cluster
from ..dispatch import Dispatcher
from ..validate import describe_problems, plan_assumptions, validate_plan
from .engine import POLICIES, Engine, EngineOptions
from .metrics import SimResult, Slo, summarise
from .workload import RequestStream, WorkloadSpec, mean_output_tokens


def _inputs(plan: Plan | str, cluster: Cluster | str | None) -> tuple[Plan, Cluster]:
    """Objects from file paths; no cluster means the plan's own (hexplan.plan.plan_cluster)."""
    plan = load_plan(plan) if not isinstance(plan, Plan) else plan
    if cluster is None:
        return plan, plan_cluster(plan)
    return plan, load_cluster(cluster) if not isinstance(cluster, Cluster) else cluster


def simulate(plan: Plan | str, cluster: Cluster | str | None, workload_spec: WorkloadSpec, seed: int = 0, *,
             slo: Slo | None = None, prefill_budget: int | None = None, loops: int | None = None,
             prefill_chunk: int | None = None, routing: str = "delay", policy: str = "fcfs",
             mlfq_levels: int | None = None, mlfq_quantum_s: float | None = None,
             mlfq_promote_s: float | None = None, offload_bandwidth: float | None = None,
             interleave: int | None = None, keep_samples: bool = True,
             shift_threshold: int | None = None) -> SimResult:
    """Replay ``workload_spec`` against ``plan`` on ``cluster`` (objects or file paths; a None
    cluster is rebuilt from the plan's ``cluster`` section).

    ``slo`` defaults to the plan's own SLOs (``assumptions.slo_*``) where it has them.
    The scheduler, as the gateway runs it: ``loops`` micro-batch loops per pipeline (default
    Workload.micro_batches), ``prefill_chunk`` prompt tokens per step while a loop has sequences
    decoding (default Workload.prefill_chunk) and ``prefill_budget`` when it has none (default
    the workload's prompt length; the first prompt of such a step always goes whole), and
    ``routing``: "delay" (shortest expected delay, hexplan.dispatch) or "weights" (random by weight).
    ``policy``: "fcfs" (first come first served; a request keeps its batch slot until it
    finishes) or "mlfq" (FastServe's skip-join multi-level feedback queue with preemption and
    KV offload; ``mlfq_levels`` queues, default 5, top quantum ``mlfq_quantum_s``, default one
    decode step of the pipeline, promotion after ``mlfq_promote_s`` of waiting, default 100x the
    last quantum, swaps over ``offload_bandwidth`` bytes/s, default 16e9; docs/simulator.md).
    ``interleave``: parts each step is cut into (Liger-style overlap, as the executor's
    ``--interleave``); default the plan's own (``assumptions.workload.interleave``, else 1).
    ``shift_threshold``: step tokens above which a shifted stage (Shift Parallelism) runs in SP
    mode, as the executor's ``--shift-threshold``; default the plan's
    (``assumptions.cost_params.shift_threshold``), else each stage's cost-model crossover.
    Raises SpecError when the plan does not fit the cluster or an input is out of range.
    """
    plan, cluster = _inputs(plan, cluster)
    setup = _setup(plan, cluster, workload_spec, slo, prefill_budget, loops, prefill_chunk, routing,
                   _Policy(policy, mlfq_levels, mlfq_quantum_s, mlfq_promote_s, offload_bandwidth), interleave,
                   shift_threshold)
    return _run(setup, workload_spec, seed, keep_samples)


@dataclass(frozen=True)
class _Policy:
    name: str = "fcfs"
    levels: int | None = None
    quantum_s: float | None = None
    promote_s: float | None = None
    offload_bandwidth: float | None = None

    def options(self) -> dict:
        if self.name not in POLICIES:
            raise SpecError(f"must be 'fcfs' or 'mlfq', got {self.name!r}", field="policy")
        v = self.levels
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpecError(f"must be an integer >= 1, got {v!r}", field="mlfq_levels")
        for name in ("quantum_s", "promote_s", "offload_bandwidth"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise SpecError(f"must be a positive number, got {v!r}",
                                field=name if name == "offload_bandwidth" else "mlfq_" + name)
        out = {"policy": self.name, "mlfq_quantum_s": self.quantum_s, "mlfq_promote_s": self.promote_s}
        if self.levels is not None:
            out["mlfq_levels"] = self.levels
        if self.offload_bandwidth is not None:
            out["offload_bandwidth"] = float(self.offload_bandwidth)
        return out


@dataclass(frozen=True)
class _Setup:
    plan: Plan
    engine: Engine
    prompt: int
    output: int
    slo: Slo
    predicted: float

    def capacity_rate(self, spec: WorkloadSpec) -> float:
        """Requests/s the plan is predicted to sustain: predicted output tokens/s over the mean
        output length of ``spec`` (the plan's own when the spec leaves it)."""
        return self.predicted / mean_output_tokens(spec, self.prompt, self.output)


def _setup(plan, cluster, spec, slo, prefill_budget, loops, prefill_chunk=None, routing="delay",
           policy: _Policy = _Policy(), interleave: int | None = None,
           shift_threshold: int | None = None) -> _Setup:
    if not isinstance(spec, WorkloadSpec):
        raise SpecError(f"expected a WorkloadSpec, got {type(spec).__name__}", field="workload_spec")
    if routing not in ("delay", "weights"):
        raise SpecError(f"must be 'delay' or 'weights', got {routing!r}", field="routing")
    policy_options = policy.options()
    for name, v, lo in (("prefill_budget", prefill_budget, 1), ("loops", loops, 1),
                        ("prefill_chunk", prefill_chunk, 1), ("interleave", interleave, 1),
                        ("shift_threshold", shift_threshold, 0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise SpecError(f"must be an integer >= {lo}, got {v!r}", field=name)
    problems = validate_plan(plan, cluster, check_predictions=False)
    if problems:
        raise SpecError(describe_problems(plan, cluster, problems), field="plan")
    if sum(max(0.0, p.weight) for p in plan.pipelines) <= 0:
        raise SpecError("every pipeline has routing weight 0: no request could be served", field="plan")
    asm = plan_assumptions(plan)
    if slo is None:
        slo = Slo(ttft_s=asm.slo_ttft_s, tpot_s=asm.slo_tpot_s)
    overridden = interleave is not None and interleave != asm.workload.interleave
    if overridden:   # the plan run with another interleave than it was solved for
        asm = replace(asm, workload=replace(asm.workload, interleave=interleave))
    if shift_threshold is not None and shift_threshold != asm.params.shift_threshold:
        asm = replace(asm, params=replace(asm.params, shift_threshold=shift_threshold))
        overridden = overridden or any(s.shifted for p in plan.pipelines for s in p.stages)
    metrics = evaluate_plan_pipelines(cluster, CostCache(plan.model, asm.workload, asm.params), plan.pipelines)
    predicted = (0.0 if overridden else plan.throughput) or sum(m.throughput for m in metrics)
    dispatcher = Dispatcher.for_plan(plan, asm.workload.output_tokens, metrics)
    engine = Engine(plan, cluster, asm.workload, asm.params,
                    EngineOptions(prefill_budget, prefill_chunk, loops, routing, **policy_options), dispatcher)
    return _Setup(plan, engine, asm.workload.prompt_tokens, asm.workload.output_tokens, slo, predicted)


# ``hexplan simulate`` without --rate or --workload: Poisson arrivals at this share of the plan's
# predicted capacity: busy enough to show queueing, yet below saturation, which the simulator
# often reaches at 85-95% of the prediction (docs/simulator.md, "Default traffic").
DEFAULT_LOAD = 0.8


def capacity_rate(plan: Plan | str, cluster: Cluster | str | None, workload_spec: WorkloadSpec,
                  interleave: int | None = None, shift_threshold: int | None = None) -> float:
    """Requests/s the plan is predicted to sustain: its predicted output tokens/s (the figure the
    report compares against, recomputed for another ``interleave``) over the mean output length
    of ``workload_spec`` (the plan's own when the spec leaves it). ``hexplan simulate`` without
    a rate runs at DEFAULT_LOAD of it."""
    plan, cluster = _inputs(plan, cluster)
    return _setup(plan, cluster, workload_spec, None, None, None, interleave=interleave,
                  shift_threshold=shift_threshold).capacity_rate(workload_spec)


def _run(s: _Setup, spec: WorkloadSpec, seed: int, keep_samples: bool) -> SimResult:
    stream = RequestStream(spec, s.prompt, s.output, s.plan.model.max_position_embeddings, seed)
    horizon = spec.horizon
    window = (spec.warmup_s, horizon if horizon > 0 else math.inf)
    stats = s.engine.run(stream, window, seed)
    return summarise(stats, slo=s.slo, weights=[p.weight for p in s.plan.pipelines], predicted=s.predicted,
                     workload=spec.describe(s.prompt, s.output), seed=seed, keep_samples=keep_samples)


# ---- the highest rate that meets the SLO -----------------------------------------------------

@dataclass(frozen=True)
class Probe:
    rate: float
    result: SimResult
    ok: bool
    why: str          # what failed ("" when ok)


@dataclass(frozen=True)
class Sweep:
    best_rate: float | None         # highest probed rate that met the SLO (None: none did)
    percentile: int
    probes: tuple[Probe, ...]

    @property
    def best(self) -> Probe | None:
        ok = [p for p in self.probes if p.ok]
        return max(ok, key=lambda p: p.rate) if ok else None

    def to_dict(self) -> dict:
        return {"best_rate_per_s": self.best_rate, "percentile": self.percentile,
                "probes": [{"rate_per_s": p.rate, "ok": p.ok, "why": p.why, **p.result.to_dict()}
                           for p in self.probes]}


STABLE_SHARE = 0.9   # a probe must complete this share of the requests that arrived in its window


def meets(result: SimResult, slo: Slo, percentile: int = 90) -> tuple[bool, str]:
    """The SLO holds at the given percentile, and the run kept up with its arrivals."""
    why = []
    for name, target, stats in (("TTFT", slo.ttft_s, result.ttft_s), ("TPOT", slo.tpot_s, result.tpot_s),
                                ("E2E", slo.e2e_s, result.e2e_s)):
        v = stats.pct(percentile)
        if target is not None and not (v <= target):
            why.append(f"P{percentile} {name} {v:.3g} s > {target:.3g} s" if not math.isnan(v)
                       else f"no {name} measured")
    if result.requests_completed < STABLE_SHARE * result.arrivals_in_window:
        why.append(f"overloaded: completed {result.requests_completed} of {result.arrivals_in_window} arrivals")
    return not why, "; ".join(why)


def sweep_rate(plan: Plan | str, cluster: Cluster | str | None, workload_spec: WorkloadSpec, slo: Slo, seed: int = 0, *,
               percentile: int = 90, start_rate: float | None = None, max_probes: int = 12,
               tolerance: float = 0.02, on_probe=None, prefill_budget: int | None = None,
               loops: int | None = None, prefill_chunk: int | None = None, routing: str = "delay",
               policy: str = "fcfs", mlfq_levels: int | None = None, mlfq_quantum_s: float | None = None,
               mlfq_promote_s: float | None = None, offload_bandwidth: float | None = None,
               interleave: int | None = None, shift_threshold: int | None = None) -> Sweep:
    """Binary search for the highest Poisson/gamma request rate whose run meets ``slo``.

    Starts at ``start_rate`` (default: the plan's predicted tokens/s over the mean output
    length), grows by 1.5x while probes pass, then bisects until the bracket is within
    ``tolerance`` of its upper end or ``max_probes`` runs. ``on_probe(probe)`` sees each run.
    The scheduler options (``policy``, ``interleave``, ``shift_threshold`` and the rest) are simulate()'s.
    """
    plan, cluster = _inputs(plan, cluster)
    if not slo:
        raise SpecError("a rate sweep needs an objective: a TTFT, TPOT or end-to-end SLO", field="slo")
    if percentile not in (50, 90, 99):
        raise SpecError(f"must be 50, 90 or 99, got {percentile!r}", field="percentile")
    if workload_spec.arrival == "trace":
        raise SpecError("a rate sweep draws arrivals at each rate: use poisson or gamma arrivals "
                        "(a trace can still supply the lengths)", field="arrival")
    s = _setup(plan, cluster, workload_spec, slo, prefill_budget, loops, prefill_chunk, routing,
               _Policy(policy, mlfq_levels, mlfq_quantum_s, mlfq_promote_s, offload_bandwidth), interleave,
               shift_threshold)
    if start_rate is None:
        start_rate = max(s.capacity_rate(workload_spec), 1e-6)
    probes: list[Probe] = []

    def probe(rate: float) -> bool:
        res = _run(s, replace(workload_spec, rate=rate), seed, keep_samples=False)
        ok, why = meets(res, slo, percentile)
        p = Probe(rate, res, ok, why)
        probes.append(p)
        if on_probe:
            on_probe(p)
        return ok

    lo, hi = 0.0, start_rate
    while len(probes) < max_probes and probe(hi):
        lo, hi = hi, hi * 1.5
    while len(probes) < max_probes and hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return Sweep(lo if lo > 0 else None, percentile, tuple(probes))
