"""Shift Parallelism as a post-pass over a solved plan: ``shift_plan(plan, cluster) -> Plan``.

A stage of TP degree d >= 2 may run shifted (``shift: {sp: S}``, S > 1 dividing d): small
steps in TP mode over its d GPUs, large ones in SP mode as S groups of d / S (docs/cost-model.md,
section 14). Each GPU then holds SP mode's weight shards of its layers (S times TP mode's; TP
mode reads views of them), so the stage needs more memory; in exchange, prompts (and decode steps above the threshold) skip most of the d-way
all-reduces.

The pass does not change the placement (nodes, GPUs, TP degrees, layers). Data: the plan, its
cluster, and the workload, cost parameters, objective and SLOs recorded in the plan's
``assumptions`` (what ``hexplan validate`` checks it against). For each pipeline, for each stage
with d >= 2 in order, for each S in the divisors of d above 1 whose SP-mode groups the model
can split (``ModelSpec.tp_degree_ok(d / S)``), the pipeline is evaluated with the stage shifted
(``hexplan.evaluate.evaluate_pipeline``, SP mode's weight shards counted); the best S is kept when

  (1) the pipeline still fits in memory (``fits``), and meets the plan's SLOs when it has any;
  (2) objective "throughput": the pipeline's throughput T rises by more than ``margin`` (x T);
      objective "latency": its TPOT does not rise, its T does not fall, and its TTFT falls or
      its T rises by more than ``margin``.

Pipelines only share inter-node links, which shifting does not touch, so (2) per pipeline
improves the plan; the plan is then re-routed (max-flow) and re-predicted, and the result is
returned only if the whole plan's objective is no worse than the input's (throughput; for
"latency" the weighted TPOT as well), else the input plan is returned unchanged. Pure: no IO.
"""
from __future__ import annotations

from dataclasses import replace

from hexplan.cluster import Cluster
from hexplan.evaluate import CostCache, evaluate_pipeline, hop_shares
from hexplan.plan import Plan
from hexplan.validate import plan_assumptions

from .assemble import route_and_predict

SHIFT_MARGIN = 0.02   # relative gain a shift must bring: smaller ones are within the model's error


def shift_candidates(model, tp: int) -> list[int]:
    """SP degrees a stage of TP ``tp`` may shift to: divisors S > 1 of tp whose SP-mode groups of
    tp / S GPUs the model can split."""
    return [s for s in range(2, tp + 1) if tp % s == 0 and model.tp_degree_ok(tp // s) is None]


def shift_plan(plan: Plan, cluster: Cluster, margin: float = SHIFT_MARGIN) -> Plan:
    """``plan`` with the stages whose shift improves its objective shifted (module docstring)."""
    asm = plan_assumptions(plan)
    objective = (plan.assumptions or {}).get("objective", "throughput")
    costs = CostCache(plan.model, asm.workload, asm.params)
    shares = hop_shares(cluster, [[s.node for s in p.stages] for p in plan.pipelines])

    def metrics(stages):
        return evaluate_pipeline(cluster, costs, [s.node for s in stages], [s.tp for s in stages],
                                 [s.num_layers for s in stages], shares, [s.shift_sp for s in stages])

    def acceptable(m) -> bool:
        if not m.fits or m.throughput <= 0:
            return False
        if asm.slo_tpot_s and m.tpot_s > asm.slo_tpot_s * (1 + 1e-6):
            return False
        return not (asm.slo_ttft_s and m.ttft_s > asm.slo_ttft_s * (1 + 1e-6))

    def better(new, old) -> bool:
        if not acceptable(new):
            return False
        if objective == "latency":
            return (new.tpot_s <= old.tpot_s * (1 + 1e-9) and new.throughput >= old.throughput * (1 - 1e-9)
                    and (new.ttft_s < old.ttft_s * (1 - margin) or new.throughput > old.throughput * (1 + margin)))
        return new.throughput > old.throughput * (1 + margin)

    changed = 0
    pipelines = []
    for p in plan.pipelines:
        stages = list(p.stages)
        best = metrics(stages)
        for i, s in enumerate(stages):
            if s.tp < 2 or s.shifted:
                continue
            for sp in shift_candidates(plan.model, s.tp):
                trial = stages[:i] + [replace(s, shift_sp=sp)] + stages[i + 1:]
                m = metrics(trial)
                if better(m, best):
                    stages, best = trial, m
        changed += sum(a.shift_sp != b.shift_sp for a, b in zip(stages, p.stages))
        pipelines.append(replace(p, stages=tuple(stages)))
    if not changed:
        return plan

    old_bound = float(plan.predicted.get("upper_bound_tokens_per_s") or 0.0)
    routed, predicted = route_and_predict(cluster, costs, pipelines, old_bound)
    before = plan.throughput
    if predicted["throughput_tokens_per_s"] < before * (1 - 1e-9):
        return plan
    if objective == "latency" and predicted["decode_ms_per_token"] > \
            float(plan.predicted.get("decode_ms_per_token") or float("inf")) * (1 + 1e-9):
        return plan
    solver = dict(plan.solver or {})
    solver["shifted_stages"] = changed
    solver["unshifted_tokens_per_s"] = before
    if predicted["upper_bound_tokens_per_s"] > old_bound:
        solver["bound_note"] = "the upper bound is the unshifted plan's; shifted stages exceed it"
    return replace(plan, pipelines=tuple(routed), predicted={**plan.predicted, **predicted}, solver=solver)
