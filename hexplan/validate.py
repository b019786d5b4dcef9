"""Independent plan checker: every plan any planner emits must pass it.

It re-derives everything from the cluster, the model and the cost model, and never calls
solver code: coverage and contiguity of layer ranges, TP groups inside one node with a degree
the model can split (and, for a shifted stage, SP-mode groups of tp / sp it can split too), each
GPU used at most once, memory per GPU (SP mode's weight shards on a shifted stage), SLOs, and the predicted
throughput recomputed (sum over disjoint pipelines of their bottleneck) and compared.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cluster import Cluster
from .costmodel import CostParams, Workload
from .errors import HexplanError, SpecError
from .evaluate import CostCache, evaluate_plan_pipelines
from .plan import Plan

TP_DEGREES = (1, 2, 4, 8)


class PlanInvalid(HexplanError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Assumptions:
    workload: Workload
    params: CostParams
    slo_tpot_s: float | None
    slo_ttft_s: float | None


def plan_assumptions(plan: Plan) -> Assumptions:
    """The workload, cost parameters and SLOs a plan was made under (defaults where absent)."""
    a = plan.assumptions or {}

    def section(key):
        v = a.get(key) or {}
        if not isinstance(v, dict):
            raise SpecError("expected a mapping", field=f"assumptions.{key}")
        return v

    def number(key, v, positive=True):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise SpecError(f"must be a number, got {v!r}", field=key)
        if positive and v <= 0:
            raise SpecError(f"must be positive, got {v!r}", field=key)
        return v

    wd = section("workload")
    for k, v in wd.items():
        if k not in Workload.__dataclass_fields__:
            raise SpecError("unknown workload field", field=f"assumptions.workload.{k}")
    try:
        workload = Workload(**wd)
    except SpecError as e:
        raise SpecError(e.message, field=f"assumptions.workload.{e.field}") from None
    pd = section("cost_params")
    vals = {}
    for k, v in pd.items():
        if k not in CostParams.__dataclass_fields__:
            raise SpecError("unknown cost parameter", field=f"assumptions.cost_params.{k}")
        vals[k] = float(number(f"assumptions.cost_params.{k}", v,
                               positive=(k not in ("memory_headroom", "contention", "shift_threshold"))))
    if not 0 <= vals.get("memory_headroom", 0.0) < 1:
        raise SpecError("must be in [0, 1)", field="assumptions.cost_params.memory_headroom")
    if not 0 <= vals.get("contention", 0.0) <= 1:
        raise SpecError("must be in [0, 1]", field="assumptions.cost_params.contention")
    if vals.get("shift_threshold", 0.0) < 0:
        raise SpecError("must be a number of tokens >= 0", field="assumptions.cost_params.shift_threshold")
    params = CostParams(**vals)
    slo = {}
    for k in ("slo_tpot_ms", "slo_ttft_ms"):
        v = a.get(k)
        slo[k] = number(f"assumptions.{k}", v) / 1e3 if v is not None else None
    return Assumptions(workload, params, slo["slo_tpot_ms"], slo["slo_ttft_ms"])


def validate_plan(plan: Plan, cluster: Cluster, check_predictions: bool = True) -> list[str]:
    """Return the list of problems (empty when the plan is valid)."""
    problems: list[str] = []
    model = plan.model
    L = model.num_layers
    nodes = {n.name: n for n in cluster.nodes}
    used: dict = {}
    structural_ok = True
    for pi, p in enumerate(plan.pipelines):
        if not p.stages:
            problems.append(f"pipeline {pi}: no stages")
            structural_ok = False
            continue
        expect = 0
        for si, s in enumerate(p.stages):
            where = f"pipeline {pi} stage {si}"
            node = nodes.get(s.node)
            if node is None:
                problems.append(f"{where}: unknown node {s.node!r}")
                structural_ok = False
                continue
            if s.gpu and s.gpu != node.gpu.name:
                problems.append(f"{where}: says GPU {s.gpu} but node {s.node} has {node.gpu.name}")
            if s.tp not in TP_DEGREES:
                problems.append(f"{where}: TP degree {s.tp} is not one of {TP_DEGREES}")
            if len(s.gpus) != s.tp:
                problems.append(f"{where}: TP {s.tp} but {len(s.gpus)} GPUs listed")
            if len(set(s.gpus)) != len(s.gpus):
                problems.append(f"{where}: a GPU is listed twice")
            for g in s.gpus:
                if not 0 <= g < node.count:
                    problems.append(f"{where}: GPU index {g} outside node {s.node} (0..{node.count - 1})")
                elif (s.node, g) in used:
                    problems.append(f"{where}: GPU {s.node}:{g} already used by {used[(s.node, g)]}")
                else:
                    used[(s.node, g)] = where
            reason = model.tp_degree_ok(s.tp)
            if reason:
                problems.append(f"{where}: {reason}")
            elif s.shift_sp > 1:
                if s.tp % s.shift_sp:
                    problems.append(f"{where}: shift sp {s.shift_sp} does not divide TP {s.tp}")
                else:
                    reason = model.tp_degree_ok(s.tp // s.shift_sp)
                    if reason:
                        problems.append(f"{where}: shift sp {s.shift_sp} leaves TP groups of "
                                        f"{s.tp // s.shift_sp} in SP mode: {reason}")
            a, b = s.layers
            if a != expect:
                problems.append(f"{where}: layers start at {a}, expected {expect} (ranges must be contiguous)")
                structural_ok = False
            if b <= a:
                problems.append(f"{where}: empty or reversed layer range [{a}, {b})")
                structural_ok = False
            expect = b
        if expect != L:
            problems.append(f"pipeline {pi}: layers end at {expect}, model has {L}")
            structural_ok = False
    if not structural_ok or problems:
        return problems

    asm = plan_assumptions(plan)
    costs = CostCache(model, asm.workload, asm.params)
    metrics = evaluate_plan_pipelines(cluster, costs, plan.pipelines)
    for pi, (p, m) in enumerate(zip(plan.pipelines, metrics)):
        for si, (used_b, lim) in enumerate(zip(m.memory_per_gpu, m.memory_limit)):
            if used_b > lim * (1 + 1e-9):
                s = p.stages[si]
                why = ""
                if s.shifted:
                    t = s.tp // s.shift_sp
                    why = (f" (shift sp {s.shift_sp} holds the TP-{t} weight shards of SP mode for its "
                           f"{s.num_layers} layers, {s.shift_sp}x those of an unshifted TP-{s.tp} stage; drop the "
                           f"shift or give the stage fewer layers)")
                problems.append(f"pipeline {pi} stage {si}: needs {used_b / 1e9:.2f} GB per GPU, "
                                f"only {lim / 1e9:.2f} GB usable{why}")
        if p.weight > 0 and asm.slo_tpot_s and m.tpot_s > asm.slo_tpot_s * (1 + 1e-6):
            problems.append(f"pipeline {pi}: TPOT {m.tpot_s * 1e3:.2f} ms exceeds SLO {asm.slo_tpot_s * 1e3:.2f} ms")
        if p.weight > 0 and asm.slo_ttft_s and m.ttft_s > asm.slo_ttft_s * (1 + 1e-6):
            problems.append(f"pipeline {pi}: TTFT {m.ttft_s * 1e3:.1f} ms exceeds SLO {asm.slo_ttft_s * 1e3:.1f} ms")
    if problems or not check_predictions:
        return problems

    weights = [p.weight for p in plan.pipelines]
    if any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-3:
        problems.append(f"routing weights must be non-negative and sum to 1, got {sum(weights):.6f}")
    total = sum(m.throughput for m in metrics)
    pred = plan.predicted.get("throughput_tokens_per_s")
    if pred is not None and abs(pred - total) > 1e-3 * max(1.0, total):
        problems.append(f"predicted throughput {pred:.6g} tokens/s, recomputed {total:.6g}")
    for pi, (p, m) in enumerate(zip(plan.pipelines, metrics)):
        if p.throughput_tokens_per_s is not None and abs(p.throughput_tokens_per_s - m.throughput) > 1e-3 * max(1.0, m.throughput):
            problems.append(f"pipeline {pi}: recorded {p.throughput_tokens_per_s:.6g} tokens/s, recomputed {m.throughput:.6g}")
        if total > 0 and abs(p.weight - m.throughput / total) > 1e-3:
            problems.append(f"pipeline {pi}: weight {p.weight:.4f} but its share of the flow is {m.throughput / total:.4f}")
    ub = plan.predicted.get("upper_bound_tokens_per_s")
    if ub is not None and pred is not None and pred > ub * (1 + 1e-6):
        problems.append(f"throughput {pred:.6g} exceeds the reported upper bound {ub:.6g}")
    return problems


SHOWN_PROBLEMS = 3


def describe_problems(plan: Plan, cluster: Cluster, problems: list[str], shown: int = SHOWN_PROBLEMS) -> str:
    """One short line for a plan checked against a cluster it does not fit.

    A plan checked against the wrong cluster has a problem for every stage; the first few and
    the count say enough. When the cluster is not the one the plan was made for (the plan's
    ``cluster.name``), that is most likely the whole story, so the line starts with it.
    """
    made_for = (plan.cluster or {}).get("name")
    n = len(problems)
    listed = "; ".join(problems[:shown]) + (f"; ... and {n - shown} more" if n > shown else "")
    counted = f"{n} problem{'s' if n != 1 else ''}: {listed}"
    if isinstance(made_for, str) and made_for and made_for != cluster.name:
        return f"does not match cluster {cluster.name!r}: the plan was made for {made_for!r} ({counted})"
    return f"does not fit cluster {cluster.name!r} ({counted})"


def check_plan(plan: Plan, cluster: Cluster, check_predictions: bool = True) -> None:
    problems = validate_plan(plan, cluster, check_predictions)
    if problems:
        raise PlanInvalid(problems)


def shared_host_notes(plan: Plan, cluster: Cluster) -> list[str]:
    """One line per machine (``hosts:``) the plan puts more workers on than it has cores: each
    worker gets max(1, cores // workers) threads (`hexplan launch`), so there the workers' threads
    exceed the cores whenever they all compute. The plan's predictions rate its stages there at
    their slowdown with all of them computing, but the planner placed the layers as if each stage
    had its GPUs to itself; the simulator slows stages while they compute at once
    (docs/cluster-format.md, "Shared machines"). Not a problem with the plan: a note on how it
    was made."""
    notes = []
    for name, w in cluster.workers_by_host(s for p in plan.pipelines for s in p.stages).items():
        host = cluster.host(name)
        if host is not None and w > host.cores:
            notes.append(f"host {name!r} runs {w} workers on {host.cores} cores (1 thread each): the predictions "
                         f"slow its stages as if all computed at once, but the layers were placed as if each "
                         f"had the cores to itself; `hexplan simulate` slows stages while they compute at once "
                         f"there (docs/cluster-format.md, \"Shared machines\")")
    return notes
