"""Shift Parallelism on the CPU: one TP-2 stage (two worker processes, gloo) run three ways.

    python bench/shift_bench.py [--quick] [--repeat N] [--threshold TOKENS] [--checkpoint DIR] [--json out.json]

The model of bench/executor_bench.py (a random 134M Llama: hidden 768, 12 layers, 12 heads,
float32), one stage holding all 12 layers on two workers of one thread each, served by
hexplan.executor.launch.Launch (gateway, node executor, gRPC, as `hexplan launch`):

  tp     the stage as a plain TP-2 group (every step: two all-reduces per layer)
  sp     the stage shifted (shift: {sp: 2}) with threshold 0: every step in SP mode (sp 2 x tp 1:
         each worker runs half the step's tokens through all the weights, two all-to-alls per layer)
  shift  the stage shifted with --threshold (default 64 tokens): large steps SP, small ones TP

Low load: 1, 2 and 4 concurrent requests (prompts of 192 tokens, 32 output tokens), all sent at
once: TTFT and time per output token (medians over the requests). High load: 64 requests
(prompts 16..256, outputs 16..64 tokens, seeded) sent at once: output tokens per second.
The plan's workload (batch 16, 64 in flight) fixes the schedule, so no calibration runs at load.

Beside each measurement the cost model's prediction for the same step (hexplan.costmodel's
prefill/decode layer times with sp = 1 or 2, the mode of shift_mode) on a "GPU" that describes
this machine: the matmul GFLOPS measured at start, an assumed 10 GB/s of memory bandwidth per
worker and gloo on loopback as the interconnect (1 GB/s, 50 us per step). These are rough
figures: the prediction shows what the model expects of the modes, not a calibrated forecast.

Progress on stderr, a markdown table on stdout. The development machine is a shared 2-vCPU VM
whose speed swings by 2x within minutes: ``--repeat N`` runs the three configs N times in
rotation (tp, sp, shift, tp, ...) and reports each figure's median over the N runs. Results and
discussion: docs/executor.md, "Shift Parallelism".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from executor_bench import benchmark_checkpoint, calibrate, log, make_workload, replay  # noqa: E402
from hexplan.plan import plan_from_dict  # noqa: E402

WORKLOAD = {"prompt_tokens": 136, "output_tokens": 40, "batch_size": 16, "concurrency": 64}


def make_plan(checkpoint: str, sp: int):
    stage = {"node": "cpu0", "gpus": [0, 1], "tp": 2, "layers": [0, 12], **({"shift": {"sp": sp}} if sp > 1 else {})}
    return plan_from_dict({"model": checkpoint, "pipelines": [{"weight": 1.0, "stages": [stage]}],
                           "assumptions": {"workload": WORKLOAD}})


def run_config(name: str, checkpoint: str, sp: int, threshold: int | None, loads, high: int, seed: int) -> dict:
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    torch.set_num_threads(1)
    out = {"config": name, "sp": sp, "threshold": threshold, "low": {}}
    with Launch(make_plan(checkpoint, sp), checkpoint, listen="127.0.0.1:0", threads=1,
                shift_threshold=threshold) as L:
        generate(L.address, token_ids=list(range(1, 9)), max_new_tokens=4, timeout=300)     # warm-up
        for c in loads:
            reqs = make_workload(c, (192, 192), (32, 32), 32000, seed + c, None)
            recs = replay(L.address, reqs, f"{name} x{c}")
            out["low"][c] = {"ttft_s": statistics.median(r["ttft"] for r in recs),
                             "tpot_s": statistics.median(r["tpot"] for r in recs)}
            log(f"  {name}: {c} concurrent: TTFT {out['low'][c]['ttft_s'] * 1e3:.0f} ms, "
                f"TPOT {out['low'][c]['tpot_s'] * 1e3:.1f} ms")
        reqs = make_workload(high, (16, 256), (16, 64), 32000, seed, None)
        recs = replay(L.address, reqs, f"{name} x{high}")
        wall = max(r["end"] for r in recs)
        out["high"] = {"requests": high, "tokens": sum(r["tokens"] for r in recs), "wall_s": wall,
                       "tokens_per_s": sum(r["tokens"] for r in recs) / wall}
        log(f"  {name}: {high} requests: {out['high']['tokens_per_s']:.1f} tokens/s")
    return out


def cpu_description(checkpoint: str, gflops: float):
    """(model, "GPU", params, interconnect) describing this machine to the cost model (module docstring)."""
    from hexplan import costmodel as cm
    from hexplan.gpus import GpuType
    from hexplan.models import model_from_hf_config, read_hf_config

    model = model_from_hf_config(read_hf_config(Path(checkpoint) / "config.json"), name="bench-134m")
    link = 1e9
    p = cm.CostParams(allreduce_alpha=50e-6, flops_efficiency=1.0, mem_efficiency=1.0)
    cpu = GpuType("cpu-2vcpu", 16e9, 10e9, gflops / 1e3 / 2, link)   # per worker: half the machine's GFLOPS
    return model, cpu, p, link


def predict(checkpoint: str, gflops: float, sp: int, threshold: int | None, loads) -> dict | None:
    """The cost model's TTFT and TPOT for the low-load runs (module docstring), or None when
    hexplan.costmodel has no SP-mode step time."""
    from hexplan import costmodel as cm
    from hexplan.serving.shift import SP_MODE, shift_mode

    if "sp" not in cm.prefill_layer_time.__code__.co_varnames:
        return None
    model, cpu, p, link = cpu_description(checkpoint, gflops)
    L = model.num_layers
    thr = 0 if threshold is None else threshold
    out = {}
    for c in loads:
        prompt = 192 * c                                   # the c prompts arrive together: one prefill step
        mode_p = sp if sp > 1 and shift_mode(prompt, thr) == SP_MODE else 1
        mode_d = sp if sp > 1 and shift_mode(c, thr) == SP_MODE else 1
        ttft = L * cm.prefill_layer_time(model, cpu, 2, prompt, link, p, sp=mode_p)
        tpot = L * cm.decode_layer_time(model, cpu, 2, c, 192 + 16, link, p, sp=mode_d)
        out[c] = {"ttft_s": ttft, "tpot_s": tpot}
    return out


def median_result(runs: list) -> dict:
    """One config's runs -> the median of each figure (the runs' own figures kept in ``runs``)."""
    r0 = runs[0]
    low = {c: {k: statistics.median(r["low"][c][k] for r in runs) for k in r0["low"][c]} for c in r0["low"]}
    high = dict(r0["high"], tokens_per_s=statistics.median(r["high"]["tokens_per_s"] for r in runs))
    return {**r0, "low": low, "high": high, "runs": runs}


def table(results: list, preds: dict, loads) -> str:
    rows = ["| config | threshold | " + " | ".join(f"{c} req: TTFT ms (pred) | TPOT ms (pred)" for c in loads)
            + f" | {results[0]['high']['requests']} req: tokens/s | vs tp |",
            "|---|---|" + "---|---|" * len(loads) + "---|---|"]
    base = results[0]["high"]["tokens_per_s"]
    for r in results:
        pr = preds.get(r["config"])
        cells = []
        for c in loads:
            m = r["low"][c]
            pt = f" ({pr[c]['ttft_s'] * 1e3:.0f})" if pr else ""
            pd = f" ({pr[c]['tpot_s'] * 1e3:.1f})" if pr else ""
            cells += [f"{m['ttft_s'] * 1e3:.0f}{pt}", f"{m['tpot_s'] * 1e3:.1f}{pd}"]
        thr = "-" if r["sp"] == 1 else str(r["threshold"])
        rows.append(f"| {r['config']} | {thr} | " + " | ".join(cells)
                    + f" | {r['high']['tokens_per_s']:.1f} | {r['high']['tokens_per_s'] / base:.2f}x |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 concurrent requests, 16 at high load")
    ap.add_argument("--threshold", type=int, default=64, help="the shift config's threshold in tokens (default 64)")
    ap.add_argument("--checkpoint", help="the benchmark checkpoint's directory (made there if missing)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each config, in rotation (default 1)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threshold < 0 or args.repeat < 1:
        print("shift_bench: error: --threshold must be >= 0 tokens and --repeat >= 1", file=sys.stderr)
        return 2
    loads, high = ((1, 2), 16) if args.quick else ((1, 2, 4), 64)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = benchmark_checkpoint(args.checkpoint, tmp)
        gflops = calibrate(os.cpu_count() or 1)
        log(f"machine: {os.cpu_count()} CPU(s), {gflops:.1f} GFLOPS (float32 matmul, all threads)")
        configs = [("tp", 1, None), ("sp", 2, 0), ("shift", 2, args.threshold)]
        runs: dict = {name: [] for name, _, _ in configs}
        preds = {}
        for i in range(args.repeat):
            for name, sp, thr in configs:
                t0 = time.perf_counter()
                runs[name].append(run_config(name, ckpt, sp, thr, loads, high, args.seed))
                log(f"{name}: run {i + 1}/{args.repeat} done in {time.perf_counter() - t0:.0f} s")
        for name, sp, thr in configs:
            pr = predict(ckpt, gflops, sp, thr, loads)
            if pr is not None:
                preds[name] = pr
        results = [median_result(runs[name]) for name, _, _ in configs]
        gflops_after = calibrate(os.cpu_count() or 1)
        crossover = None
        if preds:
            from hexplan.costmodel import shift_threshold
            model, cpu, p, link = cpu_description(ckpt, gflops)
            crossover = shift_threshold(model, cpu, 2, 2, link, p)
    print(f"Machine: {os.cpu_count()} CPU(s); float32 matmul {gflops:.1f} GFLOPS before, {gflops_after:.1f} after; "
          f"medians of {args.repeat} run(s) per config. Predictions (in brackets): the cost model on a rough "
          "description of this machine (module docstring).")
    if not preds:
        print("The cost model's prediction: not available (hexplan.costmodel has no SP-mode step time).")
    else:
        print(f"The cost model's TP/SP crossover on that description: {crossover} tokens "
              "(hexplan.costmodel.shift_threshold, clamped to at least 16).")
    print()
    print(table(results, preds, loads))
    if args.json:
        Path(args.json).write_text(json.dumps({"gflops": [gflops, gflops_after], "results": results,
                                               "predicted": preds}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
