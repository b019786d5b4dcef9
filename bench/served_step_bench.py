"""Served steps with prompts and prompt chunks, through a stage worker on a local node.

    python bench/served_step_bench.py [--checkpoint DIR] [--threads 1] [--layers 6] [--rounds 2] [--between N]

The executor benchmark's model (bench/executor_bench.py), layers [0, ``layers``) as a first and
last stage (embedding, layers, final norm, LM head) on a `hexplan node` started on 127.0.0.1 with
``threads`` torch threads, as `hexplan profile --served` loads it. Each row is one kind of
Forward call, timed from the client like the gateway's, greedy (token ids back); the median of 9
after 3 warm-up calls, in ms for the whole step:

* decode steps of 1 and 3 sequences at context 150;
* prompts of 16, 32, 64, 136 and 256 tokens alone from position 0 (what the prefill table holds);
* a 32-token chunk at position 96 of a prompt (its first 96 tokens sent before, untimed), alone
  and with 1, 2 or 3 decodes beside it: the steps a two-loop plan makes while it prefills in
  chunks (docs/fidelity.md, "A call's own cost, prompts as served, a chunk's context");
* with ``--between N``, a decode step, a prompt and a chunk step again, each right after an
  untimed decode step of N other sequences (docs/fidelity.md, "Steps with a prompt chunk").

``rounds`` repeats the whole table (the figures move between rounds on a shared host). Markdown
on stdout, progress on stderr. About a minute on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_bench import benchmark_checkpoint  # noqa: E402

CONTEXT = 150
WARMUP, TIMED = 3, 9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--threads", type=int, default=1, help="the worker's torch threads (a pp2 stage worker's: 1)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--between", type=int, default=0, metavar="N",
                    help="also time some rows right after an untimed decode step of N other sequences (16: the "
                         "other loop's step, as a two-loop stage alternates in service)")
    args = ap.parse_args()
    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg
    from hexplan.executor.launch import start_node
    from hexplan.executor.wire import channel, to_proto
    from hexplan.models import model_from_hf_config, read_hf_config

    tmp = tempfile.TemporaryDirectory(prefix="hexplan-served-")
    ckpt = Path(benchmark_checkpoint(args.checkpoint, tmp.name)).resolve()
    model = model_from_hf_config(read_hf_config(str(ckpt)), name=ckpt.name)
    token = secrets.token_urlsafe(24)
    proc, address = start_node("bench", "127.0.0.1", args.threads, None, token, checkpoint_root=str(ckpt.parent))
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, list[float]] = {}
    try:
        with channel(address, None, token) as node:
            resp = pbg.StageStub(node).LoadShard(pb.LoadShardRequest(
                stage_id="s", checkpoint=str(ckpt), layer_start=0, layer_end=args.layers, is_first=True, is_last=True,
                tp=1, gpus=[], dtype="float32", model_json=json.dumps(model.to_dict())), timeout=300)
        with channel(resp.address, None, token) as ch:
            stub = pbg.StageStub(ch)

            def forward(chunks) -> float:
                n = sum(c[2] for c in chunks)
                ids = torch.randint(0, model.vocab_size, (n,), generator=gen, dtype=torch.int64)
                req = pb.ForwardRequest(chunks=[pb.SeqChunk(request_id=r, start=s, length=k) for r, s, k in chunks],
                                        inputs=to_proto(ids), greedy=True)
                t = time.perf_counter()
                stub.Forward(req, timeout=300)
                return (time.perf_counter() - t) * 1e3

            decoders = [f"d{j}" for j in range(3)]
            others = [f"o{j}" for j in range(args.between)]
            for r in others:
                forward([(r, 0, CONTEXT)])
            opos = dict.fromkeys(others, CONTEXT)
            for r in decoders:
                forward([(r, 0, CONTEXT)])
            pos = dict.fromkeys(decoders, CONTEXT)
            fresh = iter(range(1 << 30))

            def row(name: str, n_dec: int, chunk: int = 0, start: int = 0, between: bool = False) -> None:
                times = []
                for i in range(WARMUP + TIMED):
                    if between:   # the other loop's step first, untimed, as a stage alternates in service
                        forward([(r, opos[r], 1) for r in others])
                        for r in others:
                            opos[r] += 1
                    chunks = [(r, pos[r], 1) for r in decoders[:n_dec]]
                    rid = None
                    if chunk:
                        rid = f"p{next(fresh)}"
                        if start:
                            forward([(rid, 0, start)])        # the prompt's first tokens, untimed
                        chunks.append((rid, start, chunk))
                    t = forward(chunks)
                    for r in decoders[:n_dec]:
                        pos[r] += 1
                    if rid is not None:
                        stub.Release(pb.ReleaseRequest(request_ids=[rid]), timeout=60)
                    if i >= WARMUP:
                        times.append(t)
                rows.setdefault(name, []).append(statistics.median(times))
                print(f"  {name}: {rows[name][-1]:.2f} ms", file=sys.stderr, flush=True)

            for k in range(args.rounds):
                print(f"round {k + 1}/{args.rounds}", file=sys.stderr, flush=True)
                row("decode, 1 sequence", 1)
                row("decode, 3 sequences", 3)
                for n in (16, 32, 64, 136, 256):
                    row(f"prompt of {n} tokens from 0", 0, n)
                row("32-token chunk at 96", 0, 32, 96)
                for d in (1, 2, 3):
                    row(f"{d} decode(s) + 32-token chunk at 96", d, 32, 96)
                if others:
                    b = f"after a decode step of {len(others)}"
                    row(f"decode, 1 sequence, {b}", 1, between=True)
                    row(f"prompt of 32 tokens from 0, {b}", 0, 32, between=True)
                    row(f"prompt of 136 tokens from 0, {b}", 0, 136, between=True)
                    row(f"1 decode + 32-token chunk at 96, {b}", 1, 32, 96, between=True)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"Served steps, {args.layers} layers as a first and last stage, {args.threads} thread(s), ms per step "
          f"(median of {TIMED}; one column per round):\n")
    print("| step | " + " | ".join(f"round {k + 1}" for k in range(args.rounds)) + " |")
    print("|---|" + "---|" * args.rounds)
    for name, v in rows.items():
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
