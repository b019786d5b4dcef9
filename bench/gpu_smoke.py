"""The executor against transformers on one device: greedy agreement and tokens/s.

    python bench/gpu_smoke.py [--device cuda|cpu] [--dtype bfloat16|float32] [--checkpoint DIR]
                              [--out DIR] [--shape bench|small] [--requests 16] [--new-tokens 32]
                              [--tput-requests 64] [--tput-tokens 128]

Run by bench/gpu_check.sh: on a GPU machine with ``--device cuda --dtype bfloat16``, and here on
the CPU with ``--device cpu --dtype float32`` (and no GPU visible), the same code either way.

1. A random Llama checkpoint at ``--checkpoint`` (made there if missing): ``bench``, the
   executor benchmark's shape (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000,
   512 positions; weights N(0, 0.08) as the tests make them, for clear greedy margins), or
   ``small`` (hidden 128, 4 layers, 4 heads / 2 KV heads, vocab 512).
2. transformers ``generate`` (greedy, one prompt at a time, on the device, in the dtype): the
   baseline; and transformers in float32, the judge.
3. transformers ``generate_batch`` (continuous batching, transformers >= 4.56) on the throughput
   prompts: tokens/s. Its absence or failure is reported, not fatal.
4. The executor through ``hexplan.executor.launch.Launch`` (gateway, node executors, stage
   workers; a worker takes cuda:0 when a GPU is visible): one stage holding every layer, then two
   pipeline stages (two node executors, so two worker processes on the same device). Each runs
   the agreement prompts, then the throughput prompts all at once (one micro-batch).

Agreement. The judge is transformers in float32 on the same device, teacher-forced: it runs each
prompt followed by the tokens a run generated, in one forward pass, and every generated token is
compared with its argmax at that position (so one flipped near-tie does not derail the rest of a
request). token-match rate = tokens equal to that argmax / tokens generated. A bf16 run cannot
reach 1: a random model's logits are flat at the top, and rounding flips near-ties, for
transformers as much as for the executor (on the benchmark shape, on the CPU: transformers'
bf16 generate_batch 0.80, the executor 0.79). So the **baseline** is transformers' own greedy
``generate`` in the run's dtype, scored the same way, and the stated tolerance is: a run agrees
when its token-match rate is at least the baseline's minus 0.05 (float32: the baseline is 1).
Each row also shows how many differences were ties (the judge's logits of the two tokens within
2^-4 of its largest |logit|; float32: 1e-4) and the largest such gap, and, for information, the
free-running match (tokens before the first difference from the baseline's own tokens, over
all; low in bf16 for everyone, as one flip changes the rest).

The check passes when both executor runs agree and every request returns all its tokens.
generate_batch is reported, not checked.

Writes ``smoke.json`` and ``smoke.md`` to ``--out``, prints the table on stdout (progress on
stderr). Exit status 1 when the check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from executor_util import make_checkpoint, plan  # noqa: E402

SHAPES = {
    "bench": dict(layers=12, hidden=768, heads=12, kv_heads=12, intermediate=2048, vocab=32000, max_pos=512),
    "small": dict(layers=4, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512, max_pos=256),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIE = {"float32": 1e-4, "float16": 2 ** -4, "bfloat16": 2 ** -4}
MARGIN = 0.05   # a run agrees when its token-match rate >= the baseline's - MARGIN


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# ---- transformers --------------------------------------------------------------------------------

def hf_model(ckpt: str, device: str, dtype: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, dtype=DTYPES[dtype]).to(device).eval()


def hf_reference(model, device: str, batch: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens of each prompt, alone (no padding)."""
    tokens = []
    with torch.no_grad():
        for p in batch:
            ids = torch.tensor([p], dtype=torch.long, device=device)
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, attention_mask=torch.ones_like(ids))
            tokens.append(out[0, len(p):].tolist())
    return tokens


def hf_forced_logits(model, device: str, batch: list[list[int]], outputs: list[list[int]]) -> list:
    """transformers' logits at every generated position, given the prompt and the tokens generated
    before it (one forward pass per request): row i scores output token i, [n, vocab]."""
    rows = []
    with torch.no_grad():
        for p, out in zip(batch, outputs):
            if not out:
                rows.append(None)
                continue
            ids = torch.tensor([p + out[:-1]], dtype=torch.long, device=device)
            rows.append(model(ids).logits[0, len(p) - 1:].float().cpu())
    return rows


def hf_generate_batch(model, device: str, batch: list[list[int]], n: int) -> dict:
    """transformers' continuous batching on ``batch``: tokens/s over the requests' own span (from
    the first created to the last finished, so setup and warm-up are left out) and over the whole
    call; or why it could not run."""
    import transformers
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"status": f"unavailable: transformers {transformers.__version__} has no generate_batch"}
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
    try:
        sync(device)
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=batch, generation_config=cfg)
        sync(device)
        wall = time.perf_counter() - t0
    except Exception as e:   # report, do not fail the check: it is transformers', not ours
        return {"status": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    results = list(out.values())
    errors = [r.error for r in results if getattr(r, "error", None)]
    tokens = sum(len(r.generated_tokens) for r in results)
    res = {"status": "ok" if not errors and len(results) == len(batch) else
           f"{len(errors)} errors, {len(results)}/{len(batch)} results: {errors[:1]}",
           "tokens": tokens, "call_s": wall, "call_tokens_per_s": tokens / wall,
           "outputs": {tuple(r.prompt_ids): list(r.generated_tokens) for r in results}}
    spans = [(r.created_time, r.lifespan[1]) for r in results if getattr(r, "lifespan", (-1, -1))[1] > 0]
    if len(spans) == len(results) and spans:
        span = max(e for _, e in spans) - min(s for s, _ in spans)
        res.update(span_s=span, tokens_per_s=tokens / span)
    else:
        res["tokens_per_s"] = tokens / wall
    return res


# ---- the executor --------------------------------------------------------------------------------

def run_executor(ckpt: str, stages, dtype: str, agree: list[list[int]], n_agree: int,
                 tput: list[list[int]], n_tput: int) -> dict:
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    def run_all(address, batch, n):
        with futures.ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(lambda p: generate(address, token_ids=p, max_new_tokens=n, timeout=300)["token_ids"],
                                 batch))

    t0 = time.perf_counter()
    with Launch(plan(ckpt, stages), ckpt, dtype=dtype, max_batch=max(len(agree), len(tput))) as L:
        ready = time.perf_counter() - t0
        got = run_all(L.address, agree, n_agree)
        run_all(L.address, tput[:2], 4)                                    # warm the throughput shapes
        t1 = time.perf_counter()
        out = run_all(L.address, tput, n_tput)
        wall = time.perf_counter() - t1
        kv = None
        try:   # what the stages still hold once every request is done (should be nothing)
            from hexplan.executor._proto import hexplan_v1_pb2 as pb
            kv = [L.gateway.stub(a).Stats(pb.StatsRequest(), timeout=10).kv_bytes for a in L.gateway.pipelines[0].stages]
        except Exception as e:   # the gateway's internals moved: not this check's business
            kv = f"n/a ({type(e).__name__})"
    tokens = sum(len(t) for t in out)
    return {"tokens": got, "ready_s": ready, "tput_tokens": tokens, "tput_s": wall, "tokens_per_s": tokens / wall,
            "complete": all(len(t) == n_tput for t in out), "kv_bytes_after": kv}


# ---- agreement -----------------------------------------------------------------------------------

def free_running(got: list[list[int]], want: list[list[int]]) -> float:
    """Tokens before the first difference from the reference, over the reference's tokens."""
    total = sum(len(w) for w in want)
    matched = sum(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
                  for g, w in zip(got, want))
    return matched / total if total else 1.0


def teacher_forced(outputs: list[list[int]], logits: list, n: int, tie: float) -> dict:
    """Each generated token against transformers' argmax after the same prefix (``hf_forced_logits``)."""
    steps = exact = ties = clear = 0
    short = sum(len(o) != n for o in outputs)
    worst = 0.0
    for out, lg in zip(outputs, logits):
        for i, tok in enumerate(out):
            row = lg[i]
            top = int(row.argmax())
            steps += 1
            if tok == top:
                exact += 1
                continue
            rel = float(row[top] - row[tok]) / max(float(row.abs().max()), 1e-30)
            worst = max(worst, rel)
            if rel <= tie:
                ties += 1
            else:
                clear += 1
    return {"tokens": steps, "exact": exact, "ties": ties, "clear": clear, "short_requests": short,
            "token_match_rate": exact / steps if steps else 0.0, "worst_relative_gap": worst,
            "tie_tolerance": tie}


def agreement(model, device, batch, outputs, want, n, tie) -> dict:
    forced = teacher_forced(outputs, hf_forced_logits(model, device, batch, outputs), n, tie)
    return {**forced, "free_running_match_rate": free_running(outputs, want)}


# ---- main ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--shape", choices=tuple(SHAPES), help="default bench on cuda, small on cpu")
    ap.add_argument("--checkpoint", help="checkpoint directory (made there if missing; default: a temporary one)")
    ap.add_argument("--out", default="gpu_check_results", help="results folder (default ./gpu_check_results)")
    ap.add_argument("--requests", type=int, default=16, help="agreement prompts (default 16)")
    ap.add_argument("--new-tokens", type=int, help="tokens each agreement prompt generates (default 32 cuda, 16 cpu)")
    ap.add_argument("--tput-requests", type=int, help="throughput prompts, all at once (default 64 cuda, 16 cpu)")
    ap.add_argument("--tput-tokens", type=int, help="tokens each throughput prompt generates (default 128 cuda, 32 cpu)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    shape = SHAPES[args.shape or ("bench" if cuda else "small")]
    n_agree = args.new_tokens or (32 if cuda else 16)
    n_tput = args.tput_tokens or (128 if cuda else 32)
    n_tput_req = args.tput_requests or (64 if cuda else 16)
    if cuda and not torch.cuda.is_available():
        log("no CUDA device visible (run with --device cpu to check this script on the CPU)")
        return 2
    if not cuda and torch.cuda.is_available():
        log("--device cpu with a GPU visible: the executor's workers would take it; hide it (CUDA_VISIBLE_DEVICES=)")
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda:0" if cuda else "cpu"
    dev_name = torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    tmp = None if args.checkpoint else tempfile.TemporaryDirectory(prefix="gpu_smoke_")
    ckpt = args.checkpoint or str(Path(tmp.name) / "checkpoint")
    if not (Path(ckpt) / "config.json").exists():
        log(f"writing a random checkpoint {shape} to {ckpt}")
        make_checkpoint(ckpt, **shape)
    max_pos = shape["max_pos"]
    agree = prompts(args.requests, 4, 48, shape["vocab"], seed=1)
    tput = prompts(n_tput_req, 16, min(128, max_pos - n_tput - 1), shape["vocab"], seed=2)
    import transformers

    res: dict = {"device": dev_name, "dtype": dtype, "shape": shape, "torch": torch.__version__,
                 "transformers": transformers.__version__, "agreement_prompts": len(agree),
                 "agreement_new_tokens": n_agree, "throughput_prompts": len(tput), "throughput_new_tokens": n_tput}
    t_start = time.perf_counter()

    log(f"transformers generate on {device} ({dtype}): {len(agree)} prompts x {n_agree} tokens")
    model = hf_model(ckpt, device, dtype)
    judge = model if dtype == "float32" else hf_model(ckpt, device, "float32")   # the teacher-forced reference
    want = hf_reference(model, device, agree, n_agree)
    base = agreement(judge, device, agree, want, want, n_agree, TIE[dtype])
    res["baseline"] = base
    floor = (base["token_match_rate"] if dtype != "float32" else 1.0) - MARGIN
    res["agreement_floor"] = floor
    log(f"transformers generate_batch: {len(tput)} prompts x {n_tput} tokens")
    gb = hf_generate_batch(model, device, tput, n_tput)
    if gb.get("outputs"):   # its greedy tokens on the agreement prompts, checked the same way
        gb_agree = hf_generate_batch(model, device, agree, n_agree)
        if gb_agree.get("outputs"):
            got = [gb_agree["outputs"].get(tuple(p), []) for p in agree]
            gb["agreement"] = agreement(judge, device, agree, got, want, n_agree, TIE[dtype])
    gb.pop("outputs", None)
    res["generate_batch"] = gb
    del model

    L = shape["layers"]
    ok = True
    for key, stages in (("one_stage", [("a", 1, 0, L)]), ("two_stages", [("a", 1, 0, L // 2), ("b", 1, L // 2, L)])):
        log(f"executor, {key.replace('_', ' ')}: {stages}")
        r = run_executor(ckpt, stages, dtype, agree, n_agree, tput, n_tput)
        r["agreement"] = agreement(judge, device, agree, r.pop("tokens"), want, n_agree, TIE[dtype])
        res[key] = r
        kv = r["kv_bytes_after"]
        a = r["agreement"]
        a["ok"] = a["token_match_rate"] >= floor and a["short_requests"] == 0
        ok = ok and a["ok"] and r["complete"] and (isinstance(kv, str) or not any(kv))
        log(f"  token-match {a['token_match_rate']:.3f} (floor {floor:.3f}), "
            f"{r['tokens_per_s']:.1f} tokens/s")
    del judge
    res["ok"] = bool(ok)
    res["seconds"] = time.perf_counter() - t_start

    table = report(res)
    print(table)
    (out_dir / "smoke.md").write_text(table + "\n", encoding="utf-8")
    (out_dir / "smoke.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


def report(res: dict) -> str:
    def agree_cell(a):
        return (f"{a['token_match_rate']:.3f} | {a['ties']} ties, {a['clear']} other, worst gap "
                f"{a['worst_relative_gap']:.3f}; free-running {a['free_running_match_rate']:.2f}")

    gb = res["generate_batch"]
    gb_tput = f"{gb['tokens_per_s']:.1f}" if "tokens_per_s" in gb else "-"
    gb_agree = agree_cell(gb["agreement"]) if "agreement" in gb else "- | -"
    verdict = lambda a: "agrees" if a["ok"] else "DISAGREES"   # noqa: E731
    rows = [
        (f"transformers generate ({res['dtype']}): the baseline", agree_cell(res["baseline"]), "-", "-"),
        ("executor, 1 stage", agree_cell(res["one_stage"]["agreement"]), f"{res['one_stage']['tokens_per_s']:.1f}",
         f"{verdict(res['one_stage']['agreement'])}; KV left {res['one_stage']['kv_bytes_after']}"),
        ("executor, 2 pipeline stages (2 processes)", agree_cell(res["two_stages"]["agreement"]),
         f"{res['two_stages']['tokens_per_s']:.1f}",
         f"{verdict(res['two_stages']['agreement'])}; KV left {res['two_stages']['kv_bytes_after']}"),
        ("transformers generate_batch (continuous batching)", gb_agree, gb_tput, gb["status"]),
    ]
    tie = res["baseline"]["tie_tolerance"]
    lines = [f"{res['device']}, {res['dtype']}, torch {res['torch']}, transformers {res['transformers']}; "
             f"model {res['shape']}",
             f"agreement: {res['agreement_prompts']} prompts x {res['agreement_new_tokens']} greedy tokens, each against "
             f"transformers float32's argmax after the same prefix, same device; a run agrees at a token-match rate >= "
             f"{res['agreement_floor']:.3f} (the baseline's - {MARGIN}); ties: within {tie:g} x max|logit|; "
             f"throughput: {res['throughput_prompts']} prompts x {res['throughput_new_tokens']} tokens at once",
             "",
             "| run | token-match rate | differences | tokens/s | note |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", f"check: {'PASS' if res['ok'] else 'FAIL'} ({res['seconds']:.0f} s)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
