"""Does the order of served decode steps change their time? The question behind `hexplan profile
--served`'s settle step (profile_served.DECODE_SETTLE).

    python bench/step_order_bench.py [--checkpoint DIR] [--threads 2] [--layers 6] [--alternations 8]

The executor benchmark's model (bench/executor_bench.py). A `hexplan node` on 127.0.0.1 loads
layers [0, ``layers``) as a first and last stage (embedding, layers, final norm, LM head), as
`hexplan profile --served` does, and a 1-layer shard beside it: two stage worker processes, each
with ``threads`` torch threads. Decode steps of B = 1, 2, 4, 8, 16 sequences (context 160) on the
big shard, timed from the client like the gateway's Forward, four ways:

  b2b      each batch's steps back to back (a server's loop at a steady batch)
  rounds   every batch once a round, alternately up and down (profile_served.timed_in_rounds):
           each step right after another batch's, in the same process
  other    each step right after a step of the same batch on the 1-layer shard (the other
           process): the profile's order before the settle step
  settled  rounds over both shards with one untimed step of the same batch on the same shard
           before each timed one (the profile's order now, settle=1)

The modes run in turns, ``alternations`` times (forward, then backward), each on fresh sequences
prefilled at context 160, so a host drifting over the minutes slows them alike. Prints the
median ms of each, and its ratio to b2b. About 2 minutes on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import contextlib
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

BATCHES = (1, 2, 4, 8, 16)
CONTEXT = 160
MODES = ("b2b", "rounds", "other", "settled")
REPEATS = 4          # steps of a batch per mode and alternation; the first is dropped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="the benchmark model's folder (made there when missing; "
                                         "default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each stage worker (default 2)")
    ap.add_argument("--layers", type=int, default=6, help="layers of the big shard (default 6)")
    ap.add_argument("--alternations", type=int, default=8, help="turns of the four modes (default 8)")
    args = ap.parse_args(argv)

    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg
    from hexplan.executor.launch import start_node
    from hexplan.executor.profile_served import timed_in_rounds
    from hexplan.executor.wire import channel, to_proto
    from hexplan.models import model_from_hf_config, read_hf_config

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(benchmark_checkpoint(args.checkpoint, tmp)).resolve()
        model = model_from_hf_config(read_hf_config(str(ckpt)), name=ckpt.name)
        token = secrets.token_urlsafe(24)
        gen = torch.Generator().manual_seed(0)
        res = {m: {b: [] for b in BATCHES} for m in MODES}
        proc, addr = start_node("order", "127.0.0.1", args.threads, None, token, checkpoint_root=str(ckpt.parent))
        try:
            with contextlib.ExitStack() as stack:
                node = stack.enter_context(channel(addr, None, token))
                stubs = []
                for sid, layers in (("big", args.layers), ("small", 1)):
                    r = pbg.StageStub(node).LoadShard(pb.LoadShardRequest(
                        stage_id=sid, checkpoint=str(ckpt), layer_start=0, layer_end=layers, is_first=True,
                        is_last=True, tp=1, gpus=[], dtype="float32", model_json=json.dumps(model.to_dict())),
                        timeout=300)
                    stubs.append(pbg.StageStub(stack.enter_context(channel(r.address, None, token))))

                def sequences(stub, name: str) -> tuple[list[str], dict]:
                    seqs = [f"{name}-{j}" for j in range(max(BATCHES))]
                    for a in range(0, len(seqs), 8):
                        forward(stub, [(q, 0, CONTEXT) for q in seqs[a:a + 8]])
                    return seqs, dict.fromkeys(seqs, CONTEXT)

                def forward(stub, chunks) -> float:
                    n = sum(c[2] for c in chunks)
                    req = pb.ForwardRequest(chunks=[pb.SeqChunk(request_id=q, start=s, length=k) for q, s, k in chunks],
                                            inputs=to_proto(torch.randint(0, model.vocab_size, (n,), generator=gen)))
                    t = time.perf_counter()
                    stub.Forward(req, timeout=300)
                    return time.perf_counter() - t

                for turn in range(args.alternations):
                    for mode in (MODES if turn % 2 == 0 else MODES[::-1]):
                        state = [sequences(stub, f"{mode}-{turn}-{i}") for i, stub in enumerate(stubs)]

                        def step(key) -> float:
                            shard, b = key
                            seqs, pos = state[shard]
                            took = forward(stubs[shard], [(q, pos[q], 1) for q in seqs[:b]])
                            for q in seqs[:b]:
                                pos[q] += 1
                            return took

                        order = BATCHES if turn % 2 == 0 else BATCHES[::-1]
                        if mode in ("b2b", "other"):
                            for b in order:
                                times = []
                                for _ in range(REPEATS):
                                    if mode == "other":
                                        step((1, b))
                                    times.append(step((0, b)))
                                res[mode][b] += times[1:]
                        else:
                            keys = [(0, b) for b in order] if mode == "rounds" else \
                                [(shard, b) for b in order for shard in (0, 1)]
                            t = timed_in_rounds(keys, 1, REPEATS - 1, step, settle=1 if mode == "settled" else 0)
                            for b in BATCHES:
                                res[mode][b] += t[0, b][1:]
                        for stub, (seqs, _) in zip(stubs, state):
                            stub.Release(pb.ReleaseRequest(request_ids=seqs), timeout=60)
                    print(f"turn {turn + 1}/{args.alternations} done", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    print(f"\nDecode steps on a {args.layers}-layer served shard, {args.threads} thread(s) a worker, "
          f"{args.alternations} alternations; median ms (over b2b)\n")
    print("| B | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for b in BATCHES:
        m = {k: statistics.median(res[k][b]) * 1e3 for k in MODES}
        print(f"| {b} | " + " | ".join(f"{m[k]:.1f}" + ("" if k == "b2b" else f" ({m[k] / m['b2b']:.2f})")
                                       for k in MODES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
