"""Interleaved steps on a slow link: a 2-stage pipeline with and without --interleave.

    python bench/interleave_bench.py [--link 5,100] [--requests 32] [--repeat 3] [--parts 2]

The 134M-parameter model and the request mix of bench/executor_bench.py (prompts 16-256,
outputs 16-128, all at t = 0), served by `hexplan launch` as two pipeline stages of 6 layers
(one worker each, one thread each) whose stage-to-stage link is slowed in the workers' sending
thread (HEXPLAN_LINK_DELAY=LATENCY_MS,MBPS: each message holds the link for bytes / bandwidth,
one at a time, then waits the latency). One micro-batch of 16 per pipeline by default (--concurrency
32: two, which already keeps both stages busy), chunked prefill.
Each configuration runs --repeat times in turn; the table gives the median run's tokens/s and
P90 latency. Results: docs/executor-benchmark.md, "Interleaving".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import executor_bench as eb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--link", default="5,100", help="LATENCY_MS,MBPS of the stage-to-stage link (default 5,100)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", type=int, default=2, help="parts per step with interleaving (default 2)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="requests in flight: 16 = one micro-batch of 16 (default), 32 = two")
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    a = ap.parse_args()
    from hexplan.executor.worker import parse_link_delay
    parse_link_delay(a.link)                      # a bad value fails here, not in a worker
    os.environ["HEXPLAN_LINK_DELAY"] = a.link     # inherited by the node executor and its workers
    tmp = tempfile.TemporaryDirectory(prefix="hexplan-interleave-")
    try:
        ckpt = eb.benchmark_checkpoint(a.checkpoint, tmp.name)
        reqs = eb.make_workload(a.requests, (16, 256), (16, 128), eb.MODEL["vocab_size"], 0, None)
        workload = {"prompt_tokens": round(statistics.mean(len(r["prompt"]) for r in reqs)),
                    "output_tokens": round(statistics.mean(r["output_len"] for r in reqs)),
                    "batch_size": 16, "concurrency": a.concurrency}
        stages = [(1, 0, 6), (1, 6, 12)]
        runs: dict = {1: [], a.parts: []}
        for rep in range(a.repeat):
            for parts in runs:
                eb.log(f"interleave {parts}, run {rep + 1}/{a.repeat}, link {a.link}")
                r = eb.run_executor(f"c{parts}", ckpt, stages, reqs, 1, workload, interleave=parts)
                eb.log(f"  {r['tokens_per_s']:.1f} tokens/s, P90 latency {r['latency_p90_s']:.1f} s")
                runs[parts].append(r)
    finally:
        tmp.cleanup()
    print(f"\n2 stages x 1 worker, link {a.link} (ms, Mbps) injected, {a.requests} requests, concurrency "
          f"{a.concurrency}; median of {a.repeat} runs\n")
    print("| interleave | tokens/s (runs) | median | vs off | P90 latency s | P50 latency s |")
    print("|---|---|---|---|---|---|")
    base = None
    for parts, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        med = rs[(len(rs) - 1) // 2]
        base = base or med["tokens_per_s"]
        runs_s = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[parts])
        print(f"| {'off' if parts == 1 else parts} | {runs_s} | {med['tokens_per_s']:.1f} | "
              f"{med['tokens_per_s'] / base:.2f}x | {med['latency_p90_s']:.1f} | {med['latency_p50_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
