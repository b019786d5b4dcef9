"""What a prompt chunk adds to a step of n decodes, timed in this process on the stage's own code.

    python bench/chunk_step_bench.py [--checkpoint DIR] [--layers 3] [--seconds 60] [--chunk 32]

The executor benchmark's model (bench/executor_bench.py), layers [0, ``layers``) loaded with
the executor's StageModel on 1 torch thread (a pp2 stage worker's). For each n it times, in
rounds until ``seconds`` have passed (a shared host drifts; every row once a round), a decode
step of n sequences at context 150, a prompt of n + ``chunk`` tokens alone, and the step the
executor runs with n decodes and a ``chunk``-token prompt chunk beside them; medians, ms per
layer. "chunk beside n" is the mixed step less the decode step: what the chunk costs when a
decode step has already paid the layers' fixed cost. The simulator's share rule charges a chunk
its share of its prompt's prefill less that fixed cost (docs/fidelity.md, "The fixed cost of a
step, paid once"). Markdown on stdout, progress on stderr.
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
from executor_bench import benchmark_checkpoint  # noqa: E402

CONTEXT = 150
DECODES = (1, 2, 4, 8, 12, 16, 24, 32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0, help="time the rows in rounds for this long")
    ap.add_argument("--chunk", type=int, default=32, help="prompt chunk tokens")
    args = ap.parse_args()
    from hexplan.executor.distributed import TPContext
    from hexplan.executor.model import SeqCache, SeqChunk, ShardSpec, StageModel

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="hexplan-chunk-")
    ckpt = benchmark_checkpoint(args.checkpoint, tmp.name)
    m = StageModel.load(ckpt, ShardSpec(0, args.layers, False, False), TPContext(), torch.float32, "cpu")
    H = m.args.hidden_size
    ids = [f"d{i}" for i in range(max(DECODES))]
    m.forward_parts([SeqChunk(ids[0], 0, CONTEXT)], torch.randn(CONTEXT, H))
    src = m.caches[ids[0]]
    for r in ids[1:]:   # every decoding sequence holds a copy of the first one's cache
        c = SeqCache(args.layers, m.tp.kv_heads, m.args.head_dim, torch.float32, "cpu")
        c.k, c.v, c.length = src.k.clone(), src.v.clone(), src.length
        m.caches[r] = c

    def step(n: int, prompt: int):
        x = torch.randn(n + prompt, H)
        chunks = [SeqChunk(r, CONTEXT, 1) for r in ids[:n]] + ([SeqChunk("p", 0, prompt, drop=True)] if prompt else [])

        def run():
            for r in ids[:n]:   # the same step every time
                m.caches[r].length = CONTEXT
            m.forward_parts(chunks, x)
        return run

    rows = {}
    for n in DECODES:
        rows[("decode", n)] = step(n, 0)
        rows[("prompt", n)] = step(0, n + args.chunk)
        rows[("mixed", n)] = step(n, args.chunk)
    times: dict = {k: [] for k in rows}
    for f in rows.values():   # warm-up
        f()
    end, rounds = time.time() + args.seconds, 0
    while time.time() < end:
        for k, f in rows.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
        rounds += 1
        print(f"round {rounds}", file=sys.stderr, flush=True)
    ms = {k: statistics.median(v) * 1e3 / args.layers for k, v in times.items()}
    c = args.chunk
    print(f"ms per layer, medians of {rounds} rounds ({args.layers} layers, 1 thread, decodes at context {CONTEXT})\n")
    print(f"| decodes n | decode step | prompt of n + {c} | n decodes + a {c}-token chunk | chunk beside n |")
    print("|---|---|---|---|---|")
    for n in DECODES:
        print(f"| {n} | {ms[('decode', n)]:.2f} | {ms[('prompt', n)]:.2f} | {ms[('mixed', n)]:.2f} | "
              f"{ms[('mixed', n)] - ms[('decode', n)]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
