"""What a prompt chunk costs inside a step, against the simulator's rules for it.

    python bench/chunk_cost_bench.py [--checkpoint DIR] [--threads 1] [--layers 6]

The executor benchmark's model (bench/executor_bench.py), ``layers`` of its layers as one stage
(``StageModel.forward_batch``, the code a stage worker runs) in this process at ``threads``
torch threads. Times, ms per layer, the median of 12 after 3 warm-up steps:

* a 32-token chunk of a prompt at starts 0, 32, 96 and 200, alone and beside one decode;
* prompts of 16-128 tokens from position 0 (the profile's prefill table, measured the same way);
* decode steps of 1-16 sequences at context 150, alone, with a 32-token chunk at 96 and with
  an 8-token chunk at 128.

And for the steps with a decode and a 32-token chunk of a 136-token prompt, the simulator's two
rules from these same tables (docs/simulator.md, "Service times"): the chunk's share of the
prompt's prefill on top of the decode step, and the floor (a prompt forward of all the step's
tokens); the simulator takes the larger. Markdown tables on stdout. About 30 s on the 2-core
development machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_bench import MODEL, benchmark_checkpoint  # noqa: E402

PROMPT = 136          # the fidelity bench's mean prompt
CONTEXT = 150         # the decoding sequences' context


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a pp2 stage worker's: 1)")
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from hexplan.executor.distributed import TPContext
    from hexplan.executor.model import SeqCache, SeqChunk, ShardSpec, StageModel

    tmp = tempfile.TemporaryDirectory(prefix="hexplan-chunk-")
    ckpt = benchmark_checkpoint(args.checkpoint, tmp.name)
    L = args.layers
    m = StageModel.load(ckpt, ShardSpec(0, L, False, False), TPContext(0, 1))
    kv, hd = MODEL["num_key_value_heads"], MODEL["hidden_size"] // MODEL["num_attention_heads"]

    def cache(name: str) -> None:
        c = SeqCache(L, kv, hd, torch.float32, "cpu")
        c.reserve(512)
        c.k.normal_()
        c.v.normal_()
        m.caches[name] = c

    def ms(chunks: list) -> float:
        """Median ms per layer of a step of ``chunks`` (each sequence put back to its start)."""
        n = sum(c.length for c in chunks)
        times = []
        for _ in range(15):
            for c in chunks:
                m.caches[c.request_id].length = c.start
            x = torch.randn(n, MODEL["hidden_size"])
            t = time.perf_counter()
            m.forward_batch(chunks, x)
            times.append(time.perf_counter() - t)
        return statistics.median(times[3:]) * 1e3 / L

    cache("p")
    for i in range(16):
        cache(f"d{i}")

    def dec(n: int) -> list:
        return [SeqChunk(f"d{i}", CONTEXT, 1) for i in range(n)]

    print(f"\n{L} layers, {args.threads} thread(s), ms per layer\n")
    print("| chunk of 32 at | alone | with 1 decode |\n|---|---|---|")
    for start in (0, 32, 96, 200):
        print(f"| {start} | {ms([SeqChunk('p', start, 32)]):.2f} | {ms(dec(1) + [SeqChunk('p', start, 32)]):.2f} |")
    prefill = {n: ms([SeqChunk("p", 0, n)]) for n in (16, 32, 64, 128, 256)}
    print("\n| prompt tokens from 0 | " + " | ".join(map(str, prefill)) + " |\n" + "|---" * (len(prefill) + 1) + "|")
    print("| ms | " + " | ".join(f"{v:.2f}" for v in prefill.values()) + " |")

    def table(n: float) -> float:   # linear between the measured prompt sizes, as ProfileTable
        xs = sorted(prefill)
        lo = max((x for x in xs if x <= n), default=xs[0])
        hi = min((x for x in xs if x >= n), default=xs[-1])
        return prefill[lo] if hi == lo else prefill[lo] + (prefill[hi] - prefill[lo]) * (n - lo) / (hi - lo)

    print(f"\n| decodes | alone | + 32-token chunk at 96 | share rule | floor | + 8-token chunk at 128 |"
          "\n|---|---|---|---|---|---|")
    for n in (1, 2, 4, 8, 16):
        alone = ms(dec(n))
        with32 = ms(dec(n) + [SeqChunk("p", 96, 32)])
        with8 = ms(dec(n) + [SeqChunk("p", 128, 8)])
        share = alone + table(PROMPT) * 32 / PROMPT
        print(f"| {n} | {alone:.2f} | {with32:.2f} | {share:.2f} | {table(n + 32):.2f} | {with8:.2f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
