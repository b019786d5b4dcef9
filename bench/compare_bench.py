"""Planner comparison benchmark: every planner on the reference clusters, predicted and simulated.

    python bench/compare_bench.py [--only NAME] [--time-limit 30] [--duration 600] [--json out.json]

Cases (docs/results.md):
- HexGen's case (4 A6000 + 2 A5000 + 2 A4000), llama-2-70b: hexplan's asymmetric plan against the
  symmetric ones (HexGen's PP 8 and PP 2 x TP 4, written by hand) and every baseline; peak request
  rate under an SLO (binary search in the simulator).
- Helix's 24-node cluster and its 3-region variant, llama-2-70b and llama-30b, offline (saturating)
  and online (Poisson at half of hexplan's predicted request rate).
- Helix's 42-node cluster, llama-2-70b, offline.
Each planner plans once per cluster and model; the same plan is simulated under each workload.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hexplan  # noqa: E402
from hexplan.errors import InfeasibleError  # noqa: E402
from hexplan.plan import plan_from_dict  # noqa: E402
from hexplan.simulator import Slo, WorkloadSpec, simulate, sweep_rate  # noqa: E402
from hexplan.solver import SolveOptions  # noqa: E402
from hexplan.solver.baselines import BASELINES, plan_with  # noqa: E402

CASES = [
    ("hexgen-case", "hexgen-case.yaml", "llama-2-70b", ("offline",)),
    ("helix-24", "helix-24.yaml", "llama-2-70b", ("offline", "online")),
    ("helix-24", "helix-24.yaml", "llama-30b", ("offline", "online")),
    ("helix-24-3regions", "helix-24-3regions.yaml", "llama-2-70b", ("offline", "online")),
    ("helix-24-3regions", "helix-24-3regions.yaml", "llama-30b", ("offline", "online")),
    ("helix-42", "helix-42.yaml", "llama-2-70b", ("offline",)),
]


def hexgen_symmetric(cluster, model):
    """HexGen's symmetric baselines on its case cluster, written as plans (may not fit)."""
    out = {}
    pp8 = {"model": model.name, "pipelines": [{"weight": 1.0, "stages": [
        {"node": n, "gpus": [g], "tp": 1, "layers": [10 * i, 10 * i + 10]}
        for i, (n, g) in enumerate([("n0", 0), ("n0", 1), ("n0", 2), ("n0", 3), ("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)])]}]}
    out["HexGen PP 8 (even layers)"] = pp8
    # PP 2 x TP 4: the second TP-4 group would span n1 and n2; TP never crosses machines here.
    out["HexGen PP 2 x TP 4"] = None
    rows = []
    for name, d in out.items():
        if d is None:
            rows.append((name, None, "a TP-4 group over the A5000 and A4000 machines would span two nodes; "
                                     "TP stays inside a node (as in HexGen's runtime, TP over Ethernet is not used)"))
            continue
        plan = plan_from_dict(d)
        problems = hexplan.validate_plan(plan, cluster, check_predictions=False)
        rows.append((name, None, "; ".join(problems)) if problems else (name, plan, None))
    return rows


def run_case(name, file, model_name, workloads, args):
    cluster = hexplan.load_cluster(ROOT / "cluster_specs" / file)
    model = hexplan.load_model(model_name)
    opts = SolveOptions(time_limit=args.time_limit, seed=args.seed)
    plans = []
    for planner in BASELINES:
        print(f"# {name} {model_name}: planning with {planner}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            plans.append((planner, plan_with(planner, cluster, model, opts), time.perf_counter() - t0, None))
        except InfeasibleError as e:
            plans.append((planner, None, time.perf_counter() - t0, str(e)))
    if name == "hexgen-case":
        plans += [(n, p, 0.0, why) for n, p, why in hexgen_symmetric(cluster, model)]
    hex_pred = plans[0][1].throughput
    out = []
    for wl in workloads:
        if wl == "offline":
            spec = WorkloadSpec(rate=2.0 * hex_pred / opts.workload.output_tokens, duration=args.duration)
        else:
            spec = WorkloadSpec(rate=0.5 * hex_pred / opts.workload.output_tokens, duration=args.duration)
        rows = []
        for planner, plan, secs, why in plans:
            row = {"cluster": name, "model": model_name, "workload": wl, "rate": spec.rate, "planner": planner,
                   "solve_seconds": secs, "predicted_throughput": None, "simulated_throughput": None,
                   "p50_latency_s": None, "p90_latency_s": None, "p90_ttft_s": None, "gpus": None, "reason": why}
            if plan is not None:
                print(f"# {name} {model_name} {wl}: simulating {planner}", file=sys.stderr, flush=True)
                res = simulate(plan, cluster, spec, args.seed)
                row.update(predicted_throughput=plan.throughput if plan.predicted else None,
                           simulated_throughput=res.throughput_tokens_per_s, p50_latency_s=res.e2e_s.p50,
                           p90_latency_s=res.e2e_s.p90, p90_ttft_s=res.ttft_s.p90, gpus=plan.num_gpus)
            rows.append(row)
        base = rows[0]["simulated_throughput"]
        for r in rows:
            r["simulated_ratio"] = r["simulated_throughput"] / base if r["simulated_throughput"] and base else None
        out += rows
    if name == "hexgen-case" and args.sweep:
        slo = Slo(ttft_s=None, tpot_s=None, e2e_s=args.slo_e2e_s)
        for planner, plan, _, _ in plans:
            if plan is None:
                continue
            print(f"# {name}: peak rate of {planner}", file=sys.stderr, flush=True)
            sw = sweep_rate(plan, cluster, WorkloadSpec(rate=1.0, duration=args.duration), slo, args.seed)
            best = sw.best
            out.append({"cluster": name, "model": model_name, "workload": f"peak rate, P90 e2e <= {args.slo_e2e_s:g} s",
                        "planner": planner, "peak_rate": best.rate if best else 0.0})
    return out


def table(rows) -> str:
    head = ("planner", "predicted tok/s", "simulated tok/s", "vs hexplan", "P50 e2e s", "P90 e2e s", "P90 TTFT s",
            "GPUs", "solve s", "note")
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["planner"], f(r["predicted_throughput"], ".1f"), f(r["simulated_throughput"], ".1f"),
                                         f(r.get("simulated_ratio"), ".2f"), f(r["p50_latency_s"], ".1f"),
                                         f(r["p90_latency_s"], ".1f"), f(r["p90_ttft_s"], ".1f"), str(r["gpus"] or "-"),
                                         f(r["solve_seconds"], ".1f"), (r["reason"] or "")[:90]]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="cluster names to run (default all)")
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per planner (default 30)")
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds per run (default 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also search HexGen-case peak rates (slower)")
    ap.add_argument("--slo-e2e-s", type=float, default=120.0, help="P90 end-to-end SLO for --sweep (default 120 s)")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    all_rows = []
    for name, file, model, workloads in CASES:
        if args.only and name not in args.only:
            continue
        rows = run_case(name, file, model, workloads, args)
        all_rows += rows
        for wl in workloads:
            sel = [r for r in rows if r["workload"] == wl]
            print(f"\n### {name}, {model}, {wl} ({sel[0]['rate']:.2f} requests/s)\n")
            print(table(sel), flush=True)
        peaks = [r for r in rows if "peak_rate" in r]
        if peaks:
            print(f"\n### {name}, {model}, {peaks[0]['workload']}\n")
            for r in peaks:
                print(f"- {r['planner']}: {r['peak_rate']:.2f} requests/s")
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
