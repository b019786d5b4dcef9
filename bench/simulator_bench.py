"""Simulator speed: one hour of traffic at 10 requests/s on the helix-24 plan, in wall seconds.

    python bench/simulator_bench.py                      # solves the plan first (about 30 s, not timed)
    python bench/simulator_bench.py --plan helix-24-llama-2-70b.plan.yaml

The plan is what `hexplan solve cluster_specs/helix-24.yaml --model llama-2-70b` produces.
Target: under 30 s per simulated hour on the 2-core development machine. Each case runs
--repeat times and reports the median; results go in docs/simulator.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hexplan  # noqa: E402
from hexplan.simulator import WorkloadSpec, load_trace, simulate  # noqa: E402

TARGET_S = 30.0


def plan_or_solve(cluster, plan_file: str | None, **solve_kw):
    """The plan in ``plan_file``, else llama-2-70b solved on ``cluster`` now (with a summary line)."""
    if plan_file:
        return hexplan.load_plan(plan_file)
    t = time.perf_counter()
    plan = hexplan.solve(cluster, "llama-2-70b", **solve_kw)
    print(f"solved {cluster.name} in {time.perf_counter() - t:.1f} s: {plan.throughput:.1f} tokens/s predicted, "
          f"{len(plan.pipelines)} pipeline(s), {sum(len(p.stages) for p in plan.pipelines)} stages")
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", help="plan file (default: solve helix-24 for llama-2-70b now)")
    ap.add_argument("--cluster", default=str(ROOT / "cluster_specs" / "helix-24.yaml"))
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cluster = hexplan.load_cluster(a.cluster)
    plan = plan_or_solve(cluster, a.plan)
    trace = load_trace(ROOT / "bench" / "traces" / "conversation_sample.jsonl")
    cases = [("plan's lengths (512/128)", WorkloadSpec(rate=a.rate, duration=a.duration)),
             ("sample trace lengths", WorkloadSpec(rate=a.rate, duration=a.duration, prompt_len="trace",
                                                   output_len="trace", trace=trace))]
    print(f"{'case':<26} {'wall s':>7} {'steps':>8} {'steps/s':>9} {'arrived':>8} {'completed':>9} "
          f"{'tokens/s':>9} {'target':>7}")
    ok = True
    for name, spec in cases:
        walls, res = [], None
        for _ in range(a.repeat):
            t = time.perf_counter()
            res = simulate(plan, cluster, spec, seed=0)
            walls.append(time.perf_counter() - t)
        wall = statistics.median(walls)
        ok &= wall < TARGET_S
        print(f"{name:<26} {wall:>7.2f} {res.steps:>8} {res.steps / wall:>9,.0f} {res.requests_arrived:>8} "
              f"{res.requests_completed:>9} {res.throughput_tokens_per_s:>9.1f} {'< 30 s' if wall < TARGET_S else 'MISSED':>7}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
