"""HTTP benchmark: `hexplan launch --http` against transformers' continuous batching, same CPU.

    python bench/http_bench.py [--requests 64] [--repeat 3] [--only tf,bare,planned,grpc]
                               [--checkpoint DIR] [--quick] [--json out.json]

The peer a one-machine user would pick instead of hexplan is `transformers serve`, whose engine
is transformers' continuous batching. Same machine, same checkpoint (bench/executor_bench.py's:
hidden 768, 12 layers, vocab 32000, 134M parameters, float32), same requests (its seeded
workload: 64 requests, prompts of 16 to 256 random token ids, outputs of 16 to 128 tokens, all
at t=0, greedy, every output forced to its length), served four ways:

  tf       transformers' continuous batching manager (the one `generate_batch` and `transformers
           serve` wrap), in this process, each request with its own max_new_tokens, EOS off;
           tuned: sdpa, max_batch_tokens 1024, max_requests_per_batch 32 (the issue measured
           90.2 tokens/s with these against 74.9 with the defaults)
  bare     `Launch(..., http=...)` on a one-stage plan of only model and pipelines (what a user
           writes first), driven through /v1/completions (streamed, token ids in and out, one
           client thread per request, `ignore_eos`)
  planned  the same with the plan's workload section as `hexplan solve` writes it for this
           workload: its mean prompt and output, and every request at once (`hexplan solve
           --prompt-tokens P --output-tokens O --batch-size N --concurrency N`, N = --requests)
  (bare chooses its batch size itself from its stage's decode steps, timed at load)
  grpc     `planned` driven through the gRPC API (hexplan.executor.client.generate), for the
           HTTP front's own cost

Output tokens/s (useful tokens over the wall time from the release of all requests to the
last token), TTFT and end-to-end P50/P90, per run; the table gives each config's median run
(runs alternate between configs: --repeat). Targets (issue 12): hexplan >= 1.3x tuned
continuous batching, bare and planned; HTTP within 5% of gRPC in tokens/s.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_bench as eb  # noqa: E402

from hexplan.models import model_from_hf_config, read_hf_config  # noqa: E402

CONFIGS = {
    "tf": "transformers continuous batching (tuned)",
    "bare": "hexplan HTTP, bare plan (model + pipelines)",
    "planned": "hexplan HTTP, plan with the workload",
    "grpc": "hexplan gRPC, plan with the workload",
}
log = eb.log


def fresh(fn, *args):
    """``fn(*args)`` in a new process (spawned: nothing of this one's state), its result back."""
    import multiprocessing as mp
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_tf(checkpoint: str, reqs: list, threads: int, max_batch_tokens: int, max_requests: int) -> dict:
    """transformers' continuous batching manager, one request per prompt with its own length."""
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_new_tokens=max(r["output_len"] for r in reqs))
    cbc = ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_requests)
    hints = None
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
        hints = WorkloadHints(max_prompt_length=max(len(r["prompt"]) for r in reqs),
                              max_generated_length=max(r["output_len"] for r in reqs), num_requests=len(reqs))
    except ImportError:
        pass
    gflops = eb.calibrate(threads)
    records = []
    with torch.no_grad(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cbc, block=True, timeout=30,
            workload_hints=hints) as m:
        m.add_request([1, 2, 3, 4, 5, 6, 7, 8], request_id="warm", max_new_tokens=4)   # warm-up
        while True:
            r = m.get_result(timeout=60)
            if r is None:
                raise RuntimeError("transformers' warm-up request did not finish")
            if r.request_id == "warm" and r.is_finished():
                break
        t0 = time.perf_counter()
        for r in reqs:
            m.add_request(r["prompt"], request_id=str(r["id"]), max_new_tokens=r["output_len"], record_timestamps=True)
        by_id = {str(r["id"]): r for r in reqs}
        while len(records) < len(reqs):
            out = m.get_result(timeout=600)
            if out is None:
                raise RuntimeError("transformers' continuous batching stopped before every request ended")
            if not out.is_finished() or out.request_id not in by_id:
                continue
            end = time.perf_counter()
            r = by_id[out.request_id]
            if out.error or len(out.generated_tokens) != r["output_len"]:
                raise RuntimeError(f"request {r['id']}: {len(out.generated_tokens)} tokens, expected "
                                   f"{r['output_len']} ({out.error})")
            first = out.timestamps[0] if out.timestamps else end
            records.append({"id": r["id"], "prompt_len": len(r["prompt"]), "tokens": r["output_len"],
                            "arrival": 0.0, "ttft": first - t0, "latency": end - t0, "end": end - t0})
            if len(records) % 16 == 0:
                log(f"  tf: {len(records)}/{len(reqs)} requests done at {end - t0:.1f} s")
    wall = max(x["end"] for x in records)
    del model
    torch.set_num_threads(1)
    return eb.summarize("tf", records, wall, {"torch_threads": threads, "max_batch_tokens": max_batch_tokens,
                                              "max_requests_per_batch": max_requests, "calibration_gflops": gflops})


def http_stream(port: int, model: str, r: dict, t0: float) -> dict:
    """One streamed /v1/completions request (token ids in, token ids out): its record."""
    body = json.dumps({"model": model, "prompt": r["prompt"], "max_tokens": r["output_len"], "temperature": 0,
                       "ignore_eos": True, "stream": True, "return_token_ids": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"request {r['id']}: HTTP {resp.status}: {resp.read()[:300]!r}")
        tokens, first, reason = 0, None, None
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(f"request {r['id']}: {ch['error']}")
            for c in ch["choices"]:
                n = len(c.get("token_ids") or ())
                if n and first is None:
                    first = time.perf_counter()
                tokens += n
                reason = c.get("finish_reason") or reason
        end = time.perf_counter()
    finally:
        conn.close()
    if tokens != r["output_len"] or reason != "length":
        raise RuntimeError(f"request {r['id']}: {tokens} tokens ({reason}), expected {r['output_len']}")
    return {"id": r["id"], "prompt_len": len(r["prompt"]), "tokens": tokens, "arrival": 0.0,
            "ttft": first - t0, "latency": end - t0, "end": end - t0}


def replay_http(port: int, model: str, reqs: list, label: str) -> list:
    """Every request from its own client thread, all released at once."""
    go, t0 = threading.Event(), [0.0]
    done, lock = [0], threading.Lock()

    def one(r):
        go.wait()
        rec = http_stream(port, model, r, t0[0])
        with lock:
            done[0] += 1
            if done[0] % 16 == 0:
                log(f"  {label}: {done[0]}/{len(reqs)} requests done at {rec['end']:.1f} s")
        return rec
    pool = futures.ThreadPoolExecutor(max_workers=len(reqs), thread_name_prefix="http-client")
    try:
        jobs = [pool.submit(one, r) for r in reqs]
        time.sleep(0.2)
        t0[0] = time.perf_counter()
        go.set()
        return [j.result() for j in jobs]
    finally:
        go.set()
        pool.shutdown(wait=False, cancel_futures=True)


def run_hexplan(name: str, checkpoint: str, layers: int, reqs: list, threads: int, workload: dict | None,
                prefill_chunk: int | None = None) -> dict:
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    plan = eb.make_plan(checkpoint, [(1, 0, layers)], workload)
    torch.set_num_threads(1)   # this process: gateway, HTTP front, clients
    with Launch(plan, checkpoint, threads=threads, http="127.0.0.1:0", prefill_chunk=prefill_chunk) as L:
        c = L.gateway.scheduler.configs[0]
        log(f"  {name}: {c.loops} micro-batch loop(s) of <= {c.batch}, <= {c.concurrency} in flight"
            + (f" (batch chosen from decode steps, ms: {L.gateway.decode_ms[0]})" if L.gateway.decode_ms else ""))
        generate(L.address, token_ids=[1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=4, timeout=300)   # warm-up
        http_stream(L.http.port, L.http.front.model, {"id": "warm", "prompt": [1, 2, 3], "output_len": 4},
                    time.perf_counter())
        gflops = eb.calibrate(os.cpu_count() or 1)
        steps = eb.instrument_steps(L.gateway, [time.perf_counter()])
        if name == "grpc":
            records = eb.replay(L.address, reqs, f"  {name}")
        else:
            records = replay_http(L.http.port, L.http.front.model, reqs, name)
        schedule = {"micro_batches": c.loops, "max_batch": c.batch, "concurrency": c.concurrency}
    wall = max(r["end"] for r in records)
    return eb.summarize(name, records, wall, {"threads_per_worker": threads, "schedule": schedule,
                                              "workload": workload, "calibration_gflops": gflops,
                                              "steps": step_summary(steps)})


def step_summary(steps: list) -> dict:
    """The gateway's steps as its step runner timed them (start, seconds, sequences, tokens):
    how many, their total time, and the median time of the decode-only steps of the largest
    batches (at least 7/8 of the largest), the figure to hold against a stage's decode step
    timed alone (docs/executor-benchmark.md, "One compute thread per worker")."""
    if not steps:
        return {}
    decode = [s for s in steps if s[3] == s[2]]
    top = max((s[2] for s in decode), default=0)
    big = sorted(s[1] for s in decode if s[2] * 8 >= top * 7)
    return {"count": len(steps), "busy_s": sum(s[1] for s in steps), "decode_only": len(decode),
            "large_decode_batch": top, "large_decode_step_ms_p50": 1e3 * big[len(big) // 2] if big else None}


def table(rows: list, base: dict | None, grpc: dict | None) -> str:
    out = ["| config | tokens/s | vs tf | TTFT P50 s | TTFT P90 s | E2E P50 s | E2E P90 s | runs (tokens/s) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        out.append(f"| {CONFIGS[r['config']]} | {r['tokens_per_s']:.1f} | {ratio} | {r['ttft_p50_s']:.2f} | "
                   f"{r['ttft_p90_s']:.2f} | {r['latency_p50_s']:.2f} | {r['latency_p90_s']:.2f} | "
                   f"{', '.join(f'{x:.1f}' for x in r['all_tokens_per_s'])} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=None, help="requests (default 64; 8 with --quick)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every config, alternating (default 3)")
    ap.add_argument("--only", default="tf,bare,planned,grpc", help="comma-separated subset of tf,bare,planned,grpc")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 short requests, one run each")
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--max-batch-tokens", type=int, default=1024, help="tf: max_batch_tokens (default 1024)")
    ap.add_argument("--max-requests-per-batch", type=int, default=32, help="tf: max_requests_per_batch (default 32)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="planned and grpc: prompt tokens per step beside decoding sequences (default: the plan's)")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in CONFIGS]
    if bad:
        ap.error(f"--only: unknown config(s) {', '.join(bad)}")
    n_req = args.requests or (8 if args.quick else 64)
    repeat = 1 if args.quick else args.repeat
    prompt_range, output_range = ((16, 64), (8, 24)) if args.quick else ((16, 256), (16, 128))
    threads = args.threads or os.cpu_count() or 1
    tmp = tempfile.TemporaryDirectory(prefix="hexplan-http-bench-")
    runs: dict = {c: [] for c in CONFIGS if c in only}
    try:
        ckpt = eb.benchmark_checkpoint(args.checkpoint, tmp.name)
        model = model_from_hf_config(read_hf_config(ckpt), name=Path(ckpt).name)
        reqs = eb.make_workload(n_req, prompt_range, output_range, model.vocab_size, args.seed, None)
        workload = {"prompt_tokens": round(statistics.mean(len(r["prompt"]) for r in reqs)),
                    "output_tokens": round(statistics.mean(r["output_len"] for r in reqs)),
                    "batch_size": n_req, "concurrency": n_req}
        log(f"checkpoint {ckpt}; {n_req} requests, {sum(r['output_len'] for r in reqs)} output tokens, all at t=0")
        for rep in range(repeat):
            for name in runs:
                log(f"({name}) {CONFIGS[name]}, run {rep + 1}/{repeat}")
                # each run in a fresh process: one engine's leftovers (memory, threads) never
                # weigh on the next run's, whichever engine that is
                if name == "tf":
                    res = fresh(run_tf, ckpt, reqs, threads, args.max_batch_tokens, args.max_requests_per_batch)
                else:
                    res = fresh(run_hexplan, name, ckpt, model.num_layers, reqs, threads,
                                None if name == "bare" else workload, None if name == "bare" else args.prefill_chunk)
                st = res.get("steps") or {}
                log(f"({name}) {res['tokens_per_s']:.1f} tokens/s, TTFT P50 {res['ttft_p50_s']:.2f} s, "
                    f"E2E P50 {res['latency_p50_s']:.2f} s"
                    + (f"; {st['count']} steps, decode-only steps of {st['large_decode_batch']}: "
                       f"{st['large_decode_step_ms_p50']:.0f} ms (P50)" if st.get("large_decode_step_ms_p50") else ""))
                runs[name].append(res)
    finally:
        tmp.cleanup()
    rows = []
    for name, rs in runs.items():
        if not rs:
            continue
        med = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        rows.append(dict(med, all_tokens_per_s=[r["tokens_per_s"] for r in rs]))
    by = {r["config"]: r for r in rows}
    print(f"# {Path(sys.executable).name} {' '.join(sys.argv)}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{n_req} requests; median of {repeat} alternating run(s)\n")
    print(table(rows, by.get("tf"), by.get("grpc")))
    if "planned" in by and "grpc" in by:
        print(f"\nHTTP / gRPC tokens/s (planned): {by['planned']['tokens_per_s'] / by['grpc']['tokens_per_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "workload": workload}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
