"""Solver benchmark: solve time, throughput and upper bound on the reference clusters.

    python bench/solver_bench.py [--only NAME] [--time-scale 1.0] [--json out.json]

Targets (docs/solver-benchmark.md): HexGen case < 5 s with an asymmetric plan; Helix-like
24 nodes (llama-2-70b) < 60 s with throughput >= 95% of the reported upper bound; the same 24
nodes in 3 regions; a 128-GPU synthetic cluster < 120 s.
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

CASES = [
    # name, cluster file, model, time limit (s), target seconds, target ratio
    ("hexgen-case", "hexgen-case.yaml", "llama-2-70b", 5, 5, None),
    ("helix-24", "helix-24.yaml", "llama-2-70b", 60, 60, 0.95),
    ("helix-24-3regions", "helix-24-3regions.yaml", "llama-2-70b", 60, 60, None),
    ("synthetic-128", "synthetic-128.yaml", "llama-2-70b", 90, 120, None),
]


def is_asymmetric(plan) -> bool:
    stages = [s for p in plan.pipelines for s in p.stages]
    return len({s.tp for s in stages}) > 1 or len({s.num_layers for s in stages}) > 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only these cases")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for name, file, model, limit, target_s, target_ratio in CASES:
        if args.only and name not in args.only:
            continue
        cluster = hexplan.load_cluster(ROOT / "cluster_specs" / file)
        t0 = time.perf_counter()
        plan = hexplan.solve(cluster, model, time_limit=limit * args.time_scale, seed=args.seed)
        secs = time.perf_counter() - t0
        problems = hexplan.validate_plan(plan, cluster)
        tp, ub = plan.throughput, plan.predicted["upper_bound_tokens_per_s"]
        row = {"cluster": name, "model": model, "gpus": cluster.total_gpus, "solve_s": secs,
               "throughput": tp, "upper_bound": ub, "ratio": tp / ub if ub else 0.0,
               "pipelines": len(plan.pipelines), "asymmetric": is_asymmetric(plan),
               "status": plan.solver["status"], "valid": not problems,
               "target": (f"<{target_s}s" + (f", >={target_ratio:.0%}" if target_ratio else "")
                          + (", asymmetric" if name == "hexgen-case" else "")),
               "met": secs < target_s and (target_ratio is None or tp / ub >= target_ratio)
                      and (name != "hexgen-case" or is_asymmetric(plan)) and not problems}
        rows.append(row)
        print(f"# {name}: {secs:.1f}s, {tp:.1f} / {ub:.1f} tokens/s", file=sys.stderr, flush=True)
    header = ("cluster", "GPUs", "solve s", "tokens/s", "upper bound", "ratio", "pipelines", "asym", "status", "target", "met")
    table = [(r["cluster"], r["gpus"], f"{r['solve_s']:.1f}", f"{r['throughput']:.1f}", f"{r['upper_bound']:.1f}",
              f"{r['ratio']:.1%}", r["pipelines"], "yes" if r["asymmetric"] else "no", r["status"], r["target"],
              "yes" if r["met"] else "NO") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
