"""fcfs against FastServe's skip-join MLFQ (``--policy mlfq``) on the HexGen case plan, with the
sample trace's long-tailed lengths, at 70% and 90% of the fcfs saturation rate.

    python bench/mlfq_bench.py                        # solves the plan first (time_limit 5 s, not timed)
    python bench/mlfq_bench.py --plan hexgen.plan.yaml --duration 3600 --seeds 0,1,2

The plan is ``hexplan.solve(load_cluster('cluster_specs/hexgen-case.yaml'), 'llama-2-70b',
time_limit=5)``. Lengths: a random line of bench/traces/conversation_sample.jsonl per request
(prompt and output together), Poisson arrivals. Saturation: the requests/s fcfs completes under
heavy overload (--overload requests/s offered, first seed). Each seed draws other arrivals and
lengths; both policies see the same ones. Prints a markdown table (docs/simulator.md,
"Scheduling policies: fcfs and mlfq").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hexplan  # noqa: E402
from hexplan.simulator import WorkloadSpec, load_trace, simulate  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from simulator_bench import plan_or_solve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", help="plan file (default: solve the HexGen case now)")
    ap.add_argument("--cluster", default=str(ROOT / "cluster_specs" / "hexgen-case.yaml"))
    ap.add_argument("--trace", default=str(ROOT / "bench" / "traces" / "conversation_sample.jsonl"))
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds of traffic per run (default 3600)")
    ap.add_argument("--overload", type=float, default=10.0, help="requests/s offered to find the saturation (default 10)")
    ap.add_argument("--loads", default="0.7,0.9", help="shares of the saturation rate (default 0.7,0.9)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a = ap.parse_args()
    cluster = hexplan.load_cluster(a.cluster)
    plan = plan_or_solve(cluster, a.plan, time_limit=5)
    trace = load_trace(a.trace)

    def spec(rate: float) -> WorkloadSpec:
        return WorkloadSpec(rate=rate, duration=a.duration, prompt_len="trace", output_len="trace", trace=trace)

    seeds = [int(x) for x in a.seeds.split(",")]
    sat = simulate(plan, cluster, spec(a.overload), seeds[0], policy="fcfs")
    print(f"saturation (fcfs, {a.overload:g} requests/s offered, {a.duration:g} s): {sat.requests_per_s:.4f} requests/s, "
          f"{sat.throughput_tokens_per_s:.1f} tokens/s (plan predicts {sat.predicted_throughput_tokens_per_s:.1f} "
          f"at its own 512/128)")
    print()
    print("| load | seed | policy | requests/s | throughput tokens/s | P50 e2e s | P90 e2e s | P50 TTFT s | P90 TTFT s "
          "| mean JCT s | completed / arrived in window | preemptions | kv_offloads | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for load in (float(x) for x in a.loads.split(",")):
        rate = load * sat.requests_per_s
        for seed in seeds:
            for policy in ("fcfs", "mlfq"):
                t = time.perf_counter()
                r = simulate(plan, cluster, spec(rate), seed, policy=policy)
                wall = time.perf_counter() - t
                pre = r.scheduler.get("preemptions", "-")
                print(f"| {load:.0%} ({rate:.3f}/s) | {seed} | {policy} | {r.requests_per_s:.3f} | {r.throughput_tokens_per_s:.1f} "
                      f"| {r.e2e_s.p50:.1f} | {r.e2e_s.p90:.1f} | {r.ttft_s.p50:.2f} | {r.ttft_s.p90:.2f} "
                      f"| {r.e2e_s.mean:.1f} | {r.requests_completed} / {r.arrivals_in_window} | {pre} | {r.kv_offloads} "
                      f"| {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
