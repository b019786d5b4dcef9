"""Interleaving (Liger-style compute/communication overlap): predicted and simulated throughput.

    python bench/overlap_bench.py [--time-limit 60] [--duration 600] [--interleave 1,2,4] [--only NAME]

For each cluster, hexplan solves the model once per interleave N (``Workload.interleave``, as
``hexplan solve --interleave N``) and the simulator saturates each plan (Poisson arrivals at twice
its predicted request rate, the plan's 512/128 lengths, as bench/compare_bench.py's offline runs).
Two rows per N > 1: the plan solved for N, and the plan solved for N = 1 served with N
(``hexplan simulate --interleave N``), which separates what re-planning buys from what the
setting costs. The inline slow-TP cluster adds a hand-written plan that keeps TP 4 (the
planner avoids slow TP groups), the case the overlap is for. Columns: predicted and simulated output tokens/s, their ratio, the binding limit
of the slowest pipeline, and each throughput against N = 1's. docs/results.md, "Interleaving".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hexplan  # noqa: E402
import hexplan.plan  # noqa: E402
from hexplan.costmodel import Workload  # noqa: E402
from hexplan.evaluate import CostCache, evaluate_plan_pipelines  # noqa: E402
from hexplan.simulator import WorkloadSpec, simulate  # noqa: E402
from hexplan.validate import plan_assumptions  # noqa: E402

# A TP cluster whose all-reduces are slow: 4 A10G per node without peer-to-peer, the all-reduce
# through host memory at about 1 GB/s per GPU. Not one of cluster_specs/: the case interleaving is for.
SLOW_TP = """name: slow-tp
nodes:
  - {name: n0, gpu: A10G, count: 4, interconnect: 1GB/s}
  - {name: n1, gpu: A10G, count: 4, interconnect: 1GB/s}
network:
  default: {bandwidth: 10Gbps, latency: 1ms}
"""

TP4_BY_HAND = {"model": "llama-2-13b", "pipelines": [
    {"weight": 0.5, "stages": [{"node": n, "gpus": [0, 1, 2, 3], "tp": 4, "layers": [0, 40]}]} for n in ("n0", "n1")]}

CASES = [   # name, cluster file (or inline YAML), model, hand-written plans
    ("hexgen-case", "hexgen-case.yaml", "llama-2-70b", {}),
    ("helix-24", "helix-24.yaml", "llama-2-70b", {}),
    ("two-regions", "two-regions.yaml", "llama-2-70b", {}),
    ("slow-tp (inline)", SLOW_TP, "llama-2-13b", {"TP 4 per node, by hand": TP4_BY_HAND}),
]


def load(spec: str):
    return hexplan.loads_cluster(spec) if "\n" in spec else hexplan.load_cluster(ROOT / "cluster_specs" / spec)


def predict(plan, cluster, interleave: int):
    """(throughput, binding limit of the slowest pipeline) of a plan run with this interleave."""
    asm = plan_assumptions(plan)
    w = Workload(**{**asm.workload.to_dict(), "interleave": interleave})
    ms = evaluate_plan_pipelines(cluster, CostCache(plan.model, w, asm.params), plan.pipelines)
    return sum(m.throughput for m in ms), min(ms, key=lambda m: m.throughput).bottleneck


def run_case(name, spec, model, by_hand, args) -> list[dict]:
    cluster = load(spec)
    rows, plans = [], {}
    hand = {what: hexplan.plan.plan_from_dict(d) for what, d in by_hand.items()}
    for n in args.interleave:
        print(f"# {name} {model}: solving with interleave {n}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        plans[n] = hexplan.solve(cluster, model, time_limit=args.time_limit, seed=args.seed,
                                 workload=Workload(interleave=n))
        secs = time.perf_counter() - t0
        runs = [("solved for N", plans[n], secs)]
        if n != 1 and 1 in plans:
            runs.append(("solved for N = 1", plans[1], None))
        runs += [(what, plan, None) for what, plan in hand.items()]
        for what, plan, secs in runs:
            # The solver's prediction for its own plans, the same cost model's for the others
            pred, binding = predict(plan, cluster, n)
            spec_ = WorkloadSpec(rate=2.0 * pred / 128, duration=args.duration)
            res = simulate(plan, cluster, spec_, args.seed, interleave=n)
            rows.append({"cluster": name, "model": model, "interleave": n, "plan": what, "predicted": pred,
                         "simulated": res.throughput_tokens_per_s, "bottleneck": binding,
                         "shape": " + ".join(f"{len(p.stages)}" for p in plan.pipelines), "solve_s": secs})
    for r in rows:   # against the same plan kind (the N = 1 plan for solved plans) at N = 1
        kind = "solved for N" if r["plan"].startswith("solved") else r["plan"]
        base = next((b for b in rows if b["interleave"] == 1 and b["plan"] == kind), None)
        r["pred_vs_1"] = r["predicted"] / base["predicted"] if base else None
        r["sim_vs_1"] = r["simulated"] / base["simulated"] if base else None
    return rows


def table(rows) -> str:
    head = ("cluster", "model", "N", "plan", "stages per pipeline", "predicted tok/s", "simulated tok/s",
            "sim / pred", "predicted vs N=1", "simulated vs N=1", "binding (slowest pipeline)", "solve s")
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([r["cluster"], r["model"], str(r["interleave"]), r["plan"], r["shape"],
                                      f(r["predicted"], ".1f"), f(r["simulated"], ".1f"),
                                      f(r["simulated"] / r["predicted"], ".3f"), f(r["pred_vs_1"], ".2f"),
                                      f(r["sim_vs_1"], ".2f"), r["bottleneck"], f(r["solve_s"], ".1f")]) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0, help="solver seconds per plan (default 60; helix-24 at N = 2 needs about 45)")
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds per run (default 600)")
    ap.add_argument("--interleave", default="1,2,4", help="comma-separated N values (default 1,2,4)")
    ap.add_argument("--only", action="append", help="cluster names to run (default all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.interleave = sorted({int(x) for x in args.interleave.split(",")})
    t0 = time.perf_counter()
    rows = []
    for name, spec, model, by_hand in CASES:
        if args.only and name not in args.only:
            continue
        rows += run_case(name, spec, model, by_hand, args)
    print(table(rows))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
