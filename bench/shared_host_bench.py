"""Shared-host bench: N one-stage replicas of the benchmark model on this machine's cores, served
by `hexplan launch`, against the simulator with the machine declared as one shared host and
without it.

    python bench/shared_host_bench.py --checkpoint /tmp/fid/llama-134m [--replicas 3] [--requests 96]

What `hexplan solve cluster_specs/local-cpu.yaml` plans for a model that fits one CPU worker is
three such replicas (cpu0's two "GPUs" and cpu1's one), each worker with max(1, cores // 3)
threads: on a 2-core machine three 1-thread processes. No two of them exceed the cores, all three
do. The simulator's shared host (hexplan.simulator.engine, "Shared hosts") once slowed stages pair
by pair and left this plan unslowed; it now slows each overlap by the set running at that moment.

One saturated load: ``--requests`` requests of 16-256 prompt and 16-128 output tokens arriving
5 ms apart (bench/fidelity_bench.py's trace), the profile measured just before with `hexplan
profile --served` at 1 thread (one run, about a minute). Prints measured tokens/s, P50 TTFT and
P50 TPOT beside the simulator's with and without the host, and the cost model's prediction
for the same plan with and without it (without, it rates each stage on its own; with, each at
its slowdown with every stage on the host computing). About 3 minutes; keep the machine
otherwise idle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_bench as fb  # noqa: E402
from executor_bench import MODEL, benchmark_checkpoint, calibrate, log, make_workload, replay  # noqa: E402

from hexplan.plan import plan_from_dict  # noqa: E402

NODES = (("cpu0", 0), ("cpu0", 1), ("cpu1", 0))   # cluster_specs/local-cpu.yaml's three "GPUs"


def replicas_plan(ckpt: str, n: int, workload: dict):
    """``n`` one-stage pipelines of every layer, one per GPU of local-cpu.yaml, equal weights."""
    if not 1 <= n <= len(NODES):
        raise ValueError(f"--replicas must be 1-{len(NODES)} (local-cpu.yaml has {len(NODES)} GPUs), got {n}")
    layers = MODEL["num_hidden_layers"]
    pipes = [{"weight": 1.0 / n, "stages": [{"node": node, "gpus": [g], "tp": 1, "layers": [0, layers]}]}
             for node, g in NODES[:n]]
    return plan_from_dict({"model": ckpt, "pipelines": pipes, "assumptions": {"workload": workload}})


def predicted(plan, cluster) -> float:
    """The planner's throughput for ``plan``: the cost model's, summed over its pipelines."""
    asm = fb.plan_assumptions(plan)
    cache = fb.CostCache(plan.model, asm.workload, asm.params)
    return sum(m.throughput for m in fb.evaluate_plan_pipelines(cluster, cache, plan.pipelines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="the benchmark checkpoint (created here if missing)")
    ap.add_argument("--replicas", type=int, default=3, help="one-stage replicas, 1-3 (default 3)")
    ap.add_argument("--requests", type=int, default=96, help="saturated requests (default 96)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every figure here")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="hexplan-shared-") as tmp:
        ckpt = benchmark_checkpoint(args.checkpoint, tmp)
        name = Path(ckpt).name
        reqs = make_workload(args.requests, fb.PROMPT_RANGE, fb.OUTPUT_RANGE, MODEL["vocab_size"], args.seed, None)
        for i, r in enumerate(reqs):
            r["arrival"] = i * fb.SAT_SPACING_S
        w = fb.plan_workload(reqs, [None])
        workload = {"prompt_tokens": w["prompt_tokens"], "output_tokens": w["output_tokens"],
                    "batch_size": 16, "concurrency": 16}
        plan = replicas_plan(ckpt, args.replicas, workload)
        threads = max(1, cores // args.replicas)
        context = round(w["prompt_tokens"] + (w["output_tokens"] + 1) / 2)
        tables = fb.get_profile(ckpt, threads, context, tmp, None, runs=1)
        res: dict = {"replicas": args.replicas, "threads": threads, "cores": cores, "requests": args.requests,
                     "profile": tables}
        for key, host in (("sim_shared_host", {"cores": cores, "contention": 0.0}), ("sim_no_host", None)):
            cluster = fb.make_cluster(fb.base_cluster_dict(name, tables, host))
            res[key] = {k: v for k, v in fb.simulate_trace(plan, cluster, reqs).items() if k != "per_request"}
        res["predicted_tokens_per_s"] = predicted(plan, fb.make_cluster(fb.base_cluster_dict(name, tables)))
        res["predicted_shared_host_tokens_per_s"] = predicted(
            plan, fb.make_cluster(fb.base_cluster_dict(name, tables, {"cores": cores, "contention": 0.0})))
        from hexplan.executor.client import generate
        from hexplan.executor.launch import Launch
        torch.set_num_threads(1)
        log(f"launching {args.replicas} replica(s) x {threads} thread(s)")
        with Launch(plan, ckpt, listen="127.0.0.1:0", threads=threads) as launch:
            generate(launch.address, token_ids=list(range(1, 9)), max_new_tokens=4, timeout=300)   # warm-up
            res["gflops_before"] = calibrate(cores, 0.5)
            recs = replay(launch.address, reqs, f"{args.replicas} replicas", [0.0])
            res["gflops_after"] = calibrate(cores, 0.5)
        res["meas"] = fb.measured_cell(recs)
    m = res["meas"]
    print(f"\n{args.replicas} one-stage replica(s) x {threads} thread(s) on {cores} cores, {args.requests} requests "
          f"5 ms apart; matmul {res['gflops_before']:.0f} / {res['gflops_after']:.0f} GFLOPS before / after\n")
    print("| source | tok/s | TTFT P50 s | TPOT P50 ms | tok/s vs measured |")
    print("|---|---|---|---|---|")
    print(f"| measured | {m['tokens_per_s']:.1f} | {m['ttft_p50_s']:.2f} | {m['tpot_p50_s'] * 1e3:.0f} | |")
    for key, label in (("sim_shared_host", "simulator, one shared host"), ("sim_no_host", "simulator, no host")):
        s = res[key]
        print(f"| {label} | {s['tokens_per_s']:.1f} | {s['ttft_p50_s']:.2f} | {s['tpot_p50_s'] * 1e3:.0f} | "
              f"{fb.err(s['tokens_per_s'], m['tokens_per_s']) * 100:+.0f}% |")
    for key, label in (("predicted_shared_host_tokens_per_s", "cost model, one shared host"),
                       ("predicted_tokens_per_s", "cost model, no host")):
        p = res[key]
        print(f"| {label} | {p:.1f} | | | {fb.err(p, m['tokens_per_s']) * 100:+.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
