"""The executor on a GPU: a two-stage pipeline (TP 1 each, both on cuda:0) against transformers.

    python bench/gpu_smoke.py [--requests 16] [--new-tokens 32]

Makes a tiny random Llama checkpoint (GQA, float32), launches it through hexplan's own gateway and
node executors (the stage workers pick cuda:0 when a GPU is visible), sends greedy requests, and
checks every token against transformers' generate on the same GPU. Prints one table row per
check: whether the tokens matched, decode tokens/s through the gateway, and where the KV went.
Exit status 1 if any request differs. Run by bench/gpu_check.sh; needs a CUDA device.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from executor_util import make_checkpoint, plan  # noqa: E402


def hf_greedy_on(device, checkpoint, prompts, n):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.long, device=device)
            g = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(ids))
            out.append(g[0, len(p):].tolist())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible", file=sys.stderr)
        return 2
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512,
                               vocab=512)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, 512, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(args.requests)]
        want = hf_greedy_on("cuda", ckpt, prompts, args.new_tokens)
        want_cpu = hf_greedy_on("cpu", ckpt, prompts, args.new_tokens)
        with Launch(plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)]), ckpt) as L:
            t0 = time.perf_counter()
            with futures.ThreadPoolExecutor(args.requests) as pool:
                got = list(pool.map(lambda p: generate(L.address, token_ids=p, max_new_tokens=args.new_tokens,
                                                       timeout=300)["token_ids"], prompts))
            secs = time.perf_counter() - t0
            from hexplan.executor._proto import hexplan_v1_pb2 as pb
            kv = [L.gateway.stub(a).Stats(pb.StatsRequest(), timeout=10).kv_bytes for a in L.gateway.pipelines[0].stages]
    same = sum(a == b for a, b in zip(got, want))
    same_cpu = sum(a == b for a, b in zip(got, want_cpu))
    print("| check | result |")
    print("|---|---|")
    print(f"| tokens equal to transformers on cuda | {same}/{len(prompts)} requests |")
    print(f"| tokens equal to transformers on cpu | {same_cpu}/{len(prompts)} requests |")
    print(f"| gateway decode throughput | {len(prompts) * args.new_tokens / secs:.1f} tokens/s "
          f"({len(prompts)} requests x {args.new_tokens} tokens in {secs:.2f} s) |")
    print(f"| KV bytes left on the stages after | {kv} |")
    return 0 if same == len(prompts) and not any(kv) else 1


if __name__ == "__main__":
    sys.exit(main())
