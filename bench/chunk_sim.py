"""One-stage prefill chunk, simulated: whole prompts against a larger step budget.

    python bench/chunk_sim.py [--chunks 0,136,256,512,1024]

The executor benchmark's model (bench/executor_bench.py: 134M-parameter random Llama) on one
CPU stage, timed by the profile `hexplan profile` measured on the quiet development host
(docs/executor.md, "Profiling": 2 threads, 6 layers, context 168). Two traces, both from
executor_bench.make_workload (prompts 16-256 tokens, outputs 16-128):

  burst    64 requests at t = 0 (bench/http_bench.py's workload), the plan's workload section as
           http_bench writes it (mean prompt and output, batch 64, concurrency 64)
  poisson  200 requests at 0.6, 1.2 and 1.6 requests/s, batch 64 and batch 16

For each prefill chunk (prompt tokens a step carries while sequences decode; 0: the default,
``Workload.prefill_chunk(1)``), the simulator's output tokens/s, P50 TTFT, P50 and P90 TPOT.
The gateway runs the same scheduler (hexplan/serving), so this is the schedule it would run;
the absolute numbers are the profile's (served steps are slower: docs/fidelity.md).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import executor_bench as eb  # noqa: E402

import hexplan  # noqa: E402
from hexplan.cluster import cluster_from_dict  # noqa: E402
from hexplan.costmodel import Workload  # noqa: E402
from hexplan.models import model_from_hf_config  # noqa: E402
from hexplan.plan import plan_from_dict  # noqa: E402
from hexplan.simulator.workload import TraceRequest, WorkloadSpec  # noqa: E402
from hexplan.yamlio import Locator  # noqa: E402

# `hexplan profile --checkpoint llama-134m --threads 2 --context 168 --layers 6 --repeats 5`,
# 2026-11-30 16:45 UTC, quiet host (docs/executor.md)
PROFILE = {
    "decode_ms": {1: 2.543, 2: 4.091, 3: 4.63, 4: 3.775, 5: 3.542, 6: 3.56, 7: 4.171, 8: 4.207, 9: 4.667,
                  10: 4.707, 11: 5.312, 12: 5.905, 13: 5.643, 14: 5.491, 15: 5.679, 16: 6.044, 32: 8.934, 64: 14.78},
    "prefill_ms": {16: 4.2, 32: 5.601, 64: 8.388, 128: 13.46, 256: 29.31, 512: 64.14},
    "lm_head_ms": {1: 7.714, 2: 15.85, 3: 23.61, 4: 14.39, 5: 14.81, 6: 16.65, 7: 24.69, 8: 15.6, 9: 17.88,
                   10: 17.31, 11: 24.5, 12: 17.38, 13: 18.55, 14: 21.55, 15: 19.27, 16: 17.89, 32: 24.42,
                   64: 33.13}}
NAME = "llama-134m"


def model_dict() -> dict:
    cfg = {**eb.MODEL, "model_type": "llama", "torch_dtype": "float32"}   # the checkpoint's config.json
    return model_from_hf_config(cfg, name=NAME).to_dict()


def cluster():
    return cluster_from_dict({"name": "local", "nodes": [{"name": "cpu0", "gpu": "cpu", "count": 1}],
                              "network": {"default": {"bandwidth": "10Gbps", "latency": "0.1ms"}},
                              "gpu_types": {"cpu": {"profiles": {NAME: PROFILE}}}}, Locator(None, {}))


def plan(workload: dict):
    return plan_from_dict({"model": model_dict(), "assumptions": {"workload": workload},
                           "pipelines": [{"weight": 1.0, "stages": [{"node": "cpu0", "gpus": [0], "tp": 1,
                                                                     "layers": [0, eb.MODEL["num_hidden_layers"]]}]}]})


def run(p, cl, trace: tuple, chunk: int, duration: float | None) -> dict:
    spec = WorkloadSpec(arrival="trace", trace=trace, duration=duration, warmup=0.0, trace_name="chunk")
    res = hexplan.simulate(p, cl, spec, seed=0, **({"prefill_chunk": chunk} if chunk else {}))
    tpot = sorted(res.samples["tpot_s"])
    if duration is None:      # the burst: every token over the makespan
        tput = sum(t.output_tokens for t in trace) / (res.window_s[1] - res.window_s[0])
    else:
        tput = res.throughput_tokens_per_s
    return {"tokens_per_s": tput, "ttft_p50_s": statistics.median(res.samples["ttft_s"]),
            "tpot_p50_s": statistics.median(tpot), "tpot_p90_s": tpot[int(0.9 * len(tpot))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="0,136,256,512,1024", help="prefill chunks to compare (0: the default; 136: the traces' mean prompt, whole prompts, the default before)")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    cl = cluster()
    vocab = eb.MODEL["vocab_size"]
    print("| trace | workload B | chunk | tokens/s | TTFT P50 s | TPOT P50 ms | TPOT P90 ms |")
    print("|---|---|---|---|---|---|---|")

    def row(name, b, p, trace, duration):
        for c in chunks:
            r = run(p, cl, trace, c, duration)
            shown = c or f"default ({Workload(**p.assumptions['workload']).prefill_chunk(1)})"
            print(f"| {name} | {b} | {shown} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | "
                  f"{r['tpot_p50_s'] * 1e3:.0f} | {r['tpot_p90_s'] * 1e3:.0f} |", flush=True)

    reqs = eb.make_workload(64, (16, 256), (16, 128), vocab, 0, None)
    w = {"prompt_tokens": round(statistics.mean(len(r["prompt"]) for r in reqs)),
         "output_tokens": round(statistics.mean(r["output_len"] for r in reqs)), "batch_size": 64, "concurrency": 64}
    row("burst 64", 64, plan(w), tuple(TraceRequest(0.0, len(r["prompt"]), r["output_len"]) for r in reqs), None)
    for b in (64, 16):
        for rate in (0.6, 1.2, 1.6):
            rng, t, trace = random.Random(1), 0.0, []
            for r in eb.make_workload(200, (16, 256), (16, 128), vocab, 3, None):
                t += rng.expovariate(rate)
                trace.append(TraceRequest(t, len(r["prompt"]), r["output_len"]))
            wl = {"prompt_tokens": 136, "output_tokens": 72, "batch_size": b, "concurrency": b}
            row(f"poisson {rate}/s", b, plan(wl), tuple(trace), t + 200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
