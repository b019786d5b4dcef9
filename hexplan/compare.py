"""``hexplan compare``: every planner on one cluster, predicted and simulated side by side.

Each planner (hexplan.solver.baselines) makes a plan; the simulator replays the same traffic
against each; rows carry predicted and simulated throughput, latency percentiles, solve time and
the ratio to hexplan's plan. A planner that finds no feasible plan gets nulls and its reason.

Budget mode compares the cluster with homogeneous clusters of the same list price per hour
(HexGen's "same budget" comparison): for each GPU type, as many GPUs as the budget buys, in
nodes of up to 8, on the cluster's default network.

No IO here: the CLI reads files and prints.
"""
from __future__ import annotations

import math
import time

from .cluster import Cluster, Node
from .errors import InfeasibleError, SpecError
from .gpus import CATALOG
from .models import ModelSpec
from .simulator import WorkloadSpec, simulate

OFFLINE_DURATION_S = 300.0
OFFLINE_OVERLOAD = 2.0


def _row(planner, plan=None, secs=None, reason=None, cluster=None):
    row = {"planner": planner, "predicted_throughput": None, "simulated_throughput": None,
           "p50_latency_s": None, "p90_latency_s": None, "solve_seconds": secs, "ratio": None,
           "gpus": None, "pipelines": None}
    if cluster is not None:
        row["cluster"] = cluster.name
        row["price_per_hour"] = round(cluster.price_per_hour, 4)
    if reason is not None:
        row["reason"] = reason
    if plan is not None:
        row["predicted_throughput"] = plan.throughput
        row["gpus"] = plan.num_gpus
        row["pipelines"] = len(plan.pipelines)
    return row


def _plan_all(cluster: Cluster, model: ModelSpec, options, planners, progress, label=None):
    from hexplan.solver.baselines import plan_with

    out = []
    for name in planners:
        progress(f"planning with {label or name}")
        t0 = time.perf_counter()
        try:
            plan = plan_with(name, cluster, model, options)
            out.append((label or name, plan, time.perf_counter() - t0, None, cluster))
        except InfeasibleError as e:
            out.append((label or name, None, time.perf_counter() - t0, str(e), cluster))
    return out


def budget_clusters(cluster: Cluster, budget_per_hour: float) -> list[Cluster]:
    """Homogeneous clusters of each catalog GPU type that ``budget_per_hour`` buys."""
    if not (budget_per_hour > 0 and math.isfinite(budget_per_hour)):
        raise SpecError(f"must be a positive number, got {budget_per_hour!r}", field="--budget-per-hour")
    out = []
    for gpu in CATALOG.values():
        if gpu.name == "cpu" or gpu.price_per_hour <= 0:
            continue
        n = int(budget_per_hour // gpu.price_per_hour)
        if n < 1:
            continue
        nodes, i = [], 0
        while n > 0:
            c = min(8, n)
            nodes.append(Node(f"{gpu.name.lower()}-{i}", gpu, c, "", gpu.interconnect))
            n -= c
            i += 1
        out.append(Cluster(f"{gpu.name}x{sum(x.count for x in nodes)}", tuple(nodes), cluster.default_link))
    return out


def compare(cluster: Cluster, model: ModelSpec, options, workload: WorkloadSpec | None = None, seed: int = 0,
            planners=None, budget_per_hour: float | None = None, progress=None) -> list[dict]:
    """Rows, hexplan first. ``workload`` None: offline, i.e. Poisson traffic at twice the best
    predicted request rate for 300 s (every plan saturates; throughput is its capacity)."""
    from hexplan.solver.baselines import BASELINES

    progress = progress or (lambda msg: None)
    names = list(planners or BASELINES)
    for n in names:
        if n not in BASELINES:
            raise SpecError(f"unknown planner {n!r}; known: {', '.join(BASELINES)}", field="--planners")
    if "hexplan" in names:
        names.remove("hexplan")
    names.insert(0, "hexplan")
    results = _plan_all(cluster, model, options, names, progress)
    if budget_per_hour is not None:
        for bc in budget_clusters(cluster, budget_per_hour):
            results += _plan_all(bc, model, options, ["hexplan"], progress, label=f"budget {bc.name}")
    best_rate = max((p.throughput for _, p, _, _, _ in results if p is not None), default=0.0)
    if workload is None:
        rate = OFFLINE_OVERLOAD * best_rate / max(1, options.workload.output_tokens)
        workload = WorkloadSpec(rate=max(rate, 1e-3), duration=OFFLINE_DURATION_S)
    rows = []
    for name, plan, secs, reason, cl in results:
        row = _row(name, plan, secs, reason, cl if budget_per_hour is not None else None)
        if plan is not None:
            progress(f"simulating {name}")
            res = simulate(plan, cl, workload, seed)
            row["simulated_throughput"] = res.throughput_tokens_per_s
            row["p50_latency_s"] = res.e2e_s.p50 if res.requests_completed else None
            row["p90_latency_s"] = res.e2e_s.p90 if res.requests_completed else None
            row["p50_ttft_s"] = res.ttft_s.p50 if res.requests_completed else None
            row["requests_completed"] = res.requests_completed
        rows.append(row)
    base = rows[0]["predicted_throughput"] if rows and rows[0]["planner"] == "hexplan" else None
    base_sim = rows[0]["simulated_throughput"] if rows else None
    for row in rows:
        if base and row["predicted_throughput"] is not None:
            row["ratio"] = row["predicted_throughput"] / base
        if base_sim and row["simulated_throughput"] is not None:
            row["simulated_ratio"] = row["simulated_throughput"] / base_sim
    return rows
