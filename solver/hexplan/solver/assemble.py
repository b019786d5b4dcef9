"""Write a plan from placed chains: GPU indices, final metrics, max-flow routing, predictions.

Every planner in ``hexplan.solver`` (the optimizer and the baselines of solver/hexplan/solver/baselines.py)
ends here, so the figures a plan carries (per-pipeline throughput, TPOT, TTFT, routing weights,
``predicted``, ``assumptions``, the nodes used) come from one place and agree with the
independent validator (hexplan/validate.py).
"""
from __future__ import annotations

from dataclasses import replace

from hexplan.cluster import cluster_to_dict
from hexplan.evaluate import evaluate_plan_pipelines, hop_shares, pipeline_overheads, stage_shifts
from hexplan.plan import Pipeline, Plan, Stage

from .problem import Problem
from .routing import route


def assemble_plan(problem: Problem, chains, bound: float, solver: dict) -> Plan:
    """Plan of ``chains`` (each with ``.slots``, ordered ``(node, tp)``, and ``.layers``, one count
    per slot, summing to L), kept in the given order. ``bound`` is an upper bound on throughput
    (raised to the plan's own throughput if rounding put it below); ``solver`` is the report.

    Physical GPU indices: per node, widest groups first, contiguous (hence aligned) ranges. The
    metrics count links shared among pipelines; max-flow over the placed graph gives the routing
    weights and the predicted throughput.
    """
    cl = problem.cluster
    next_gpu: dict = {}
    demands = sorted(((s[0], s[1], pi, si) for pi, c in enumerate(chains) for si, s in enumerate(c.slots)),
                     key=lambda x: (x[0], -x[1], x[2], x[3]))
    gpus_of: dict = {}
    for node, tp, pi, si in demands:
        start = next_gpu.get(node, 0)
        gpus_of[pi, si] = tuple(range(start, start + tp))
        next_gpu[node] = start + tp
    pipelines = []
    for pi, c in enumerate(chains):
        stages, a = [], 0
        for si, ((node, tp), l) in enumerate(zip(c.slots, c.layers)):
            stages.append(Stage(node, gpus_of[pi, si], tp, (a, a + l), cl.node(node).gpu.name))
            a += l
        pipelines.append(Pipeline(tuple(stages)))
    pipelines, predicted = route_and_predict(cl, problem.costs, pipelines, bound)
    o = problem.options  # for the latency objective, the solver's problem carries the TPOT it reached
    assumptions = {"objective": o.objective, "slo_tpot_ms": o.slo_tpot_ms, "slo_ttft_ms": o.slo_ttft_ms,
                   "workload": problem.workload.to_dict(), "cost_params": o.params.to_dict()}
    # the nodes used, their network and GPU types as a cluster spec: the plan alone can be simulated
    cluster_info = cluster_to_dict(cl, {s.node for p in pipelines for s in p.stages}, problem.model.name)
    return Plan(problem.model, tuple(pipelines), predicted, dict(solver), assumptions, cluster_info)


def route_and_predict(cl, costs, pipelines, bound: float) -> tuple[list[Pipeline], dict]:
    """Final metrics of placed ``pipelines`` (Stages with GPUs, layers and any Shift Parallelism),
    with shared links, then max-flow routing: (the pipelines with their weights and figures, the
    plan's ``predicted`` section). ``bound`` is raised to the throughput if rounding put it below."""
    metrics = evaluate_plan_pipelines(cl, costs, pipelines)
    shares = hop_shares(cl, [[s.node for s in p.stages] for p in pipelines])
    graph = []
    for p, m in zip(pipelines, metrics):
        ov = pipeline_overheads(cl, costs, [s.node for s in p.stages], [s.tp for s in p.stages], shares,
                                stage_shifts(p))
        hop_caps = [c for c, what in ov.limits if what.startswith("link ")]
        coord_caps = [c for c, what in ov.limits if what.startswith("coordinator")]
        graph.append((list(m.stage_capacity), hop_caps, min(coord_caps + [costs.workload.concurrency / m.round_s])))
    total, flows = route(graph)
    weights = [f / total if total > 0 else 0.0 for f in flows]
    pipelines = [replace(p, weight=w_, throughput_tokens_per_s=f, decode_ms_per_token=m.tpot_s * 1e3,
                         ttft_ms=m.ttft_s * 1e3) for p, w_, f, m in zip(pipelines, weights, flows, metrics)]
    bound = max(bound, total)  # numerical safety: a bound below a feasible plan is a rounding artefact
    predicted = {
        "throughput_tokens_per_s": total,
        "upper_bound_tokens_per_s": bound,
        "gap": 1 - total / bound if bound > 0 else 0.0,
        "requests_per_s": total / costs.workload.output_tokens,
        "decode_ms_per_token": sum(w_ * m.tpot_s for w_, m in zip(weights, metrics)) * 1e3,
        "ttft_ms": sum(w_ * m.ttft_s for w_, m in zip(weights, metrics)) * 1e3,
    }
    return pipelines, predicted
