"""How steady is this host? The executor benchmark's matmul calibration (executor_bench.calibrate,
the GFLOPS the fidelity bench records before each plan), taken second by second, beside the CPU
time the hypervisor stole from this guest in the same second (/proc/stat's `steal`).

    python bench/host_noise_bench.py [--seconds 40] [--threads 2] [--json out.json]

On a shared VM the benchmarks here move from minute to minute (docs/fidelity.md). Whether the
guest can see why decides what a benchmark can do about it: where the slow seconds are stolen
ones, the steal counter could flag or correct them; where steal stays near 0 while the matmul
still moves, the host's noise (other tenants on the same cores, caches and memory bandwidth) is
invisible from inside, and only repeated runs and medians help. One table row per second
(GFLOPS, steal %), then the spread: min, median and max, the coefficient of
variation, and the correlation of the matmul rate with steal. Progress and the summary on
stderr and stdout as the other benches; --json keeps every second. Linux only for steal (other
systems print '-').
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_bench import calibrate  # noqa: E402


def cpu_times() -> tuple[int, int] | None:
    """(all jiffies, steal jiffies) of the whole machine, or None where /proc/stat is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    return sum(values), values[7] if len(values) > 7 else 0


def sample(seconds: int, threads: int) -> list[dict]:
    rows = []
    for i in range(seconds):
        c0 = cpu_times()
        gflops = calibrate(threads, 1.0)
        c1 = cpu_times()
        steal = (100.0 * (c1[1] - c0[1]) / max(1, c1[0] - c0[0])) if c0 and c1 else None
        rows.append({"second": i, "gflops": gflops, "steal_pct": steal})
        print(f"[{i + 1}/{seconds}] {gflops:.0f} GFLOPS, steal " + ("-" if steal is None else f"{steal:.1f}%"),
              file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    g = [r["gflops"] for r in rows]
    s = [r["steal_pct"] for r in rows if r["steal_pct"] is not None]
    out = {"seconds": len(rows), "gflops_min": min(g), "gflops_median": statistics.median(g), "gflops_max": max(g),
           "gflops_cv": statistics.pstdev(g) / statistics.mean(g), "steal_pct_mean": statistics.mean(s) if s else None,
           "steal_pct_max": max(s) if s else None, "corr_gflops_steal": None}
    if len(s) == len(g) > 2 and statistics.pstdev(s) > 0 and statistics.pstdev(g) > 0:
        out["corr_gflops_steal"] = statistics.correlation(g, s)
    return out


def table(rows: list[dict], summ: dict) -> str:
    lines = ["| second | GFLOPS | steal % |", "|---|---|---|"]
    lines += [f"| {r['second']} | {r['gflops']:.0f} | "
              + ("-" if r["steal_pct"] is None else f"{r['steal_pct']:.1f}") + " |" for r in rows]
    corr = summ["corr_gflops_steal"]
    lines.append(f"\nGFLOPS over {summ['seconds']} s: min {summ['gflops_min']:.0f}, median {summ['gflops_median']:.0f}, "
                 f"max {summ['gflops_max']:.0f} (max/min {summ['gflops_max'] / summ['gflops_min']:.2f}, "
                 f"CV {summ['gflops_cv']:.1%}); steal "
                 + ("- (no /proc/stat)" if summ["steal_pct_mean"] is None else
                    f"mean {summ['steal_pct_mean']:.1f}%, max {summ['steal_pct_max']:.1f}%")
                 + "; correlation of GFLOPS with steal " + ("-" if corr is None else f"{corr:+.2f}"))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=40, help="one-second samples to take (default 40)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the matmul (default 2)")
    ap.add_argument("--json", help="write every second and the summary here")
    args = ap.parse_args()
    if args.seconds < 1:
        ap.error(f"--seconds: {args.seconds}; give 1 or more")
    if args.threads < 1:
        ap.error(f"--threads: {args.threads}; give 1 or more")
    rows = sample(args.seconds, args.threads)
    summ = summary(rows)
    print(table(rows, summ))
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows, "summary": summ}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
