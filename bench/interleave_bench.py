"""Interleaving on a slow link: a 2-stage pipeline, or a TP-2 stage, with and without it.

    python bench/interleave_bench.py --mode pp|tp [--task generate|prefill] [--link MS,MBPS] [--requests 32]
                                     [--repeat 3] [--parts 2] [--pieces 4]

The 134M-parameter model of bench/executor_bench.py, served by `hexplan launch`, all requests at
t = 0. --task generate (default): its request mix (prompts 16-256, outputs 16-128); tokens/s
counts generated tokens. --task prefill: prefill-only requests (Inference.Prefill: scoring,
Liger's "discriminative" tasks) with prompts of 64-256 tokens and steps of up to 512 prompt
tokens (the plan's prompt length); tokens/s counts prompt tokens.

--mode pp: two pipeline stages of 6 layers (one worker each, one thread each) whose
stage-to-stage link is slowed in the workers' sending thread (HEXPLAN_LINK_DELAY=LATENCY_MS,MBPS:
each message holds the link for bytes / bandwidth, one at a time, then waits the latency).
Configurations: off, and --interleave PARTS (each step cut in parts at the first stage, part i
sent on while part i + 1 computes).

--mode tp: one stage of all 12 layers on a TP group of 2 workers (one thread each) whose
all-reduces are slowed (HEXPLAN_TP_LINK_DELAY=LATENCY_MS,MBPS: each all-reduce holds the rank's
link for the ring's 2 (p-1)/p x bytes, then waits the latency; the real gloo all-reduce runs
too). Configurations: off; --interleave PARTS (parts run layer by layer in turn, each part's
all-reduce asynchronous under the next part's compute); --matmul-pieces PIECES (each
row-parallel product in slices, each slice's all-reduce under the next slice's product); both.

One micro-batch of 16 per pipeline by default (--concurrency 32: two), chunked prefill. Each
configuration runs --repeat times in turn; the table gives the median run's tokens/s and P90
latency. In tp mode it also prints what the cost model (docs/cost-model.md, section 13, with
the catalog's "cpu" device) predicts for one layer of such a step with and without the parts
(--predict-only: just that). Results: docs/executor-benchmark.md, "Interleaving".
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
    ap.add_argument("--mode", choices=("pp", "tp"), default="pp",
                    help="pp: 2 pipeline stages, slow stage-to-stage link; tp: one TP-2 stage, slow all-reduces")
    ap.add_argument("--task", choices=("generate", "prefill"), default="generate",
                    help="generate: generative requests; prefill: prefill-only (scoring) requests")
    ap.add_argument("--link", help="LATENCY_MS,MBPS of the slowed link (default: 5,100 for pp, 1,1000 for tp)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", type=int, default=2, help="parts per step with interleaving (default 2)")
    ap.add_argument("--pieces", type=int, default=4, help="tp: slices per row-parallel product (default 4)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="requests in flight: 16 = one micro-batch of 16 (default), 32 = two")
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--predict-only", action="store_true", help="tp: print the cost model's prediction and stop")
    a = ap.parse_args()
    from hexplan.executor.distributed import parse_link_delay
    link = a.link or ("5,100" if a.mode == "pp" else "1,1000")
    var = "HEXPLAN_LINK_DELAY" if a.mode == "pp" else "HEXPLAN_TP_LINK_DELAY"
    try:
        parse_link_delay(link, "--link")          # a bad value fails here, not in a worker
    except ValueError as e:
        ap.error(str(e))
    os.environ[var] = link                        # inherited by the node executor and its workers
    if a.mode == "tp" and a.predict_only:
        print(predict_tp(link, a.parts))
        return 0
    if a.mode == "pp":
        stages = [(1, 0, 6), (1, 6, 12)]
        configs = {"off": (1, 1), f"interleave {a.parts}": (a.parts, 1)}
    else:
        stages = [(2, 0, 12)]
        configs = {"off": (1, 1), f"interleave {a.parts}": (a.parts, 1), f"pieces {a.pieces}": (1, a.pieces),
                   f"interleave {a.parts} + pieces {a.pieces}": (a.parts, a.pieces)}
    tmp = tempfile.TemporaryDirectory(prefix="hexplan-interleave-")
    try:
        ckpt = eb.benchmark_checkpoint(a.checkpoint, tmp.name)
        if a.task == "generate":
            reqs = eb.make_workload(a.requests, (16, 256), (16, 128), eb.MODEL["vocab_size"], 0, None)
            workload = {"prompt_tokens": round(statistics.mean(len(r["prompt"]) for r in reqs)),
                        "output_tokens": round(statistics.mean(r["output_len"] for r in reqs)),
                        "batch_size": 16, "concurrency": a.concurrency}
        else:
            reqs = eb.make_workload(a.requests, (64, 256), (1, 1), eb.MODEL["vocab_size"], 0, None)
            workload = {"prompt_tokens": 512, "output_tokens": 1, "batch_size": 16, "concurrency": a.concurrency}
        runs: dict = {name: [] for name in configs}
        for rep in range(a.repeat):
            for name, (parts, pieces) in configs.items():
                eb.log(f"{name}, run {rep + 1}/{a.repeat}, {var}={link}")
                if a.task == "generate":
                    r = eb.run_executor(name.replace(" ", ""), ckpt, stages, reqs, 1, workload, interleave=parts,
                                        matmul_pieces=pieces)
                else:
                    r = run_prefill(ckpt, stages, reqs, workload, parts, pieces)
                eb.log(f"  {r['tokens_per_s']:.1f} tokens/s, P90 latency {r['latency_p90_s']:.1f} s")
                runs[name].append(r)
    finally:
        tmp.cleanup()
    shape = "2 stages x 1 worker" if a.mode == "pp" else "1 stage, TP 2 (2 workers)"
    print(f"\n{shape}, 1 thread per worker, {var}={link} (ms, Mbps), {a.requests} {a.task} requests, "
          f"concurrency {a.concurrency}; median of {a.repeat} runs\n")
    print("| configuration | tokens/s (runs) | median | vs off | P90 latency s | P50 latency s |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, rs in runs.items():
        med = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]
        base = base or med["tokens_per_s"]
        runs_s = ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs)
        print(f"| {name} | {runs_s} | {med['tokens_per_s']:.1f} | {med['tokens_per_s'] / base:.2f}x | "
              f"{med['latency_p90_s']:.1f} | {med['latency_p50_s']:.1f} |")
    if a.mode == "tp":
        print("\n" + predict_tp(link, a.parts))
    return 0


def predict_tp(link: str, parts: int) -> str:
    """The cost model's layer time of this benchmark's TP-2 steps (the model of
    bench/executor_bench.py on the catalog's "cpu" device) with and without ``parts``, on the
    slowed link: the all-reduce's latency as the ring's 2 alpha terms, its bandwidth as the
    interconnect's."""
    import dataclasses

    from hexplan.costmodel import CostParams, decode_layer_split, prefill_layer_split
    from hexplan.executor.distributed import parse_link_delay
    from hexplan.gpus import CATALOG
    from hexplan.models import model_from_hf_config

    latency, bandwidth = parse_link_delay(link, "--link")
    model = model_from_hf_config({**eb.MODEL, "model_type": "llama", "max_position_embeddings": 2048,
                                  "torch_dtype": "float32"}, "bench-134m")
    cpu, params = CATALOG["cpu"], dataclasses.replace(CostParams(), allreduce_alpha=latency / 2)
    steps = {"decode step of 16 (context 150)": lambda n: decode_layer_split(model, cpu, 2, 16, 150, bandwidth,
                                                                             params, n),
             "prefill step of 512 tokens": lambda n: prefill_layer_split(model, cpu, 2, 512, bandwidth, params, n)}
    out = [f"cost model, one layer on TP 2, device 'cpu' ({cpu.memory_bandwidth / 1e9:.0f} GB/s, "
           f"{cpu.flops / 1e12:.1f} TFLOPS), link {link}, contention {params.contention}:", "",
           f"| step | off ms (compute + all-reduce) | interleave {parts} ms (hidden) | predicted speed-up |",
           "|---|---|---|---|"]
    for name, f in steps.items():
        one, split = f(1), f(parts)
        out.append(f"| {name} | {one.total * 1e3:.2f} ({one.compute * 1e3:.2f} + {one.comm * 1e3:.2f}) | "
                   f"{split.total * 1e3:.2f} ({split.hidden * 1e3:.2f}) | {one.total / split.total:.2f}x |")
    return "\n".join(out)


def run_prefill(ckpt: str, stages, reqs: list, workload: dict, parts: int, pieces: int) -> dict:
    """Every request as a prefill-only call at t = 0; prompt tokens/s and latency percentiles."""
    import time
    from concurrent import futures

    import torch

    from hexplan.executor.client import prefill
    from hexplan.executor.launch import Launch

    torch.set_num_threads(1)
    with Launch(eb.make_plan(ckpt, stages, workload), ckpt, threads=1, interleave=parts, matmul_pieces=pieces) as L:
        prefill(L.address, token_ids=[1, 2, 3, 4], timeout=300)          # warm-up

        def one(r):
            t = time.perf_counter()
            out = prefill(L.address, token_ids=r["prompt"], timeout=3600)
            if out["prompt_tokens"] != len(r["prompt"]):
                raise RuntimeError(f"request {r['id']}: {out['prompt_tokens']} prompt tokens")
            return time.perf_counter() - t
        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(len(reqs)) as pool:
            lat = sorted(pool.map(one, reqs))
        wall = time.perf_counter() - t0
    tokens = sum(len(r["prompt"]) for r in reqs)
    return {"tokens_per_s": tokens / wall, "latency_p90_s": eb.percentile(lat, 90),
            "latency_p50_s": eb.percentile(lat, 50)}


if __name__ == "__main__":
    sys.exit(main())
