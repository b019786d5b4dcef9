"""The gateway's mlfq policy against fcfs, on this machine, at a small scale.

    python bench/mlfq_executor_bench.py [--requests 48] [--load 0.8] [--repeat 2]

The 134M-parameter model of bench/executor_bench.py on one stage (one worker, 2 threads), a
short/long mix like FastServe's (9 in 10 requests ask for 16 tokens, 1 in 10 for 192; prompts of
32-96 tokens), Poisson arrivals at --load times the rate fcfs serves (measured first with every
request at t = 0), and the plan's schedule: micro-batches of 4, at most 4 requests holding KV
(mlfq offloads the rest to host memory). The table: throughput, P50/P90 end-to-end latency, P50
TTFT and mean job completion time (= mean latency) per policy, median of --repeat runs.
Results: docs/executor-benchmark.md, "mlfq".
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import executor_bench as eb  # noqa: E402


def workload(n: int, rate: float | None, seed: int, vocab: int) -> list:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if rate and i:
            t += rng.expovariate(rate)
        out.append({"id": i, "arrival": t if rate else 0.0, "prompt": [rng.randrange(vocab) for _ in range(rng.randint(32, 96))],
                    "output_len": 192 if rng.random() < 0.1 else 16})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--load", type=float, default=0.8, help="share of fcfs's saturated request rate (default 0.8)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quantum-ms", type=float, default=None, help="mlfq's top quantum (default: the gateway's, 50 ms)")
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="hexplan-mlfq-")
    try:
        ckpt = eb.benchmark_checkpoint(a.checkpoint, tmp.name)
        vocab = eb.MODEL["vocab_size"]
        plan_w = {"prompt_tokens": 64, "output_tokens": 34, "batch_size": 4, "concurrency": 4}
        stages = [(1, 0, eb.MODEL["num_hidden_layers"])]
        eb.log("saturation: fcfs with every request at t = 0")
        sat = eb.run_executor("fcfs", ckpt, stages, workload(a.requests, None, 0, vocab), 2, plan_w)
        rate = a.load * sat["requests"] / sat["wall_s"]
        eb.log(f"fcfs serves {sat['requests'] / sat['wall_s']:.2f} requests/s; offering {rate:.2f} ({a.load:.0%})")
        runs: dict = {"fcfs": [], "mlfq": []}
        q = a.quantum_ms / 1e3 if a.quantum_ms else None
        for rep in range(a.repeat):
            reqs = workload(a.requests, rate, rep + 1, vocab)
            for policy in runs:
                eb.log(f"{policy}, run {rep + 1}/{a.repeat}")
                r = eb.run_executor(policy, ckpt, stages, reqs, 2, plan_w, policy=policy, mlfq_quantum_s=q)
                r["jct_s"] = statistics.mean(x["latency"] for x in r["per_request"])
                eb.log(f"  {r['tokens_per_s']:.1f} tokens/s, P50 {r['latency_p50_s']:.2f} s, P90 {r['latency_p90_s']:.2f} s, "
                       f"mean JCT {r['jct_s']:.2f} s")
                runs[policy].append(r)
    finally:
        tmp.cleanup()
    print(f"\n1 stage, 134M model, {a.requests} requests (9 in 10: 16 tokens, 1 in 10: 192), Poisson at "
          f"{rate:.2f} requests/s ({a.load:.0%} of fcfs's {sat['requests'] / sat['wall_s']:.2f}); median of {a.repeat} runs\n")
    print("| policy | tokens/s | P50 e2e s | P90 e2e s | P50 TTFT s | mean JCT s | JCT of each run |")
    print("|---|---|---|---|---|---|---|")
    for policy, rs in runs.items():
        med = sorted(rs, key=lambda r: r["jct_s"])[(len(rs) - 1) // 2]
        each = ", ".join(f"{r['jct_s']:.2f}" for r in rs)
        print(f"| {policy} | {med['tokens_per_s']:.1f} | {med['latency_p50_s']:.2f} | {med['latency_p90_s']:.2f} | "
              f"{med['ttft_p50_s']:.2f} | {med['jct_s']:.2f} | {each} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
