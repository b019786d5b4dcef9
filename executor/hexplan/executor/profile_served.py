"""Decode steps timed through a served stage worker: ``hexplan profile --served``.

``profile.measure`` times the stage's layers in the profiling process itself. A served worker
runs the same code, but behind its node executor, its gRPC server and the step's messages, in a
process of its own beside the others serving; on a CPU its decode steps were measured at up to
1.5x what the lone process shows (docs/fidelity.md, term 1), and that gap is what kept the
simulator's predictions from the measured runs.

This module measures the decode table that way. It starts a ``hexplan node`` on 127.0.0.1 (a
random token, the worker thread count a served worker gets), has it load layers ``[0, layers)``
as a first and last stage (embedding, the layers, final norm and LM head), prefills the largest
batch's sequences at ``context`` tokens, and then sends decode steps of B sequences as Forward
calls, the gateway's own call, logits back. A decode point's table value is

    (median served step - the LM head's step at B rows) / layers

with the LM head's step from the lone measurement (``profile.measure``'s ``head`` points, which
include serialising the logits as the worker does), so the table stays per layer at TP 1 and
the cost model adds the LM head as before. The steps advance the sequences (a served step can't
be put back), so the context of batch B's steps is ``context`` plus the steps already taken by
its sequences; ``Point`` keeps the mean in ``context``. TP 1 only: a TP group's all-reduces are
measured by ``--tp`` without ``--served``.
"""
from __future__ import annotations

import json
import secrets
import statistics
import time
from pathlib import Path

import torch

from .profile import Point, ProfileError, ProfileSpec, worker_threads

PREFILL_SEQS_PER_CALL = 8     # prompts per prefill Forward (bounded messages)
STEP_TIMEOUT_S = 300.0


def served_decode(spec: ProfileSpec, head_ms: dict[int, float], progress=None) -> tuple[Point, ...]:
    """Decode points measured through a served worker (module docstring). ``head_ms``: the LM
    head's step ms per rows, at least at every decode batch of ``spec``; ``progress(point, done,
    total)`` after each."""
    from hexplan.models import model_from_hf_config, read_hf_config

    from ._proto import hexplan_v1_pb2 as pb
    from ._proto import hexplan_v1_pb2_grpc as pbg
    from .launch import start_node
    from .wire import channel, to_proto

    if spec.tp != 1:
        raise ProfileError("--served measures TP 1 stages (the all-reduce table comes from --tp without --served)")
    batches = sorted(spec.decode_batches)
    missing = [b for b in batches if b not in head_ms]
    if missing:
        raise ProfileError(f"no LM head time for decode batch(es) {missing}")
    ckpt = Path(spec.checkpoint).resolve()
    model = model_from_hf_config(read_hf_config(str(ckpt)), name=ckpt.name)
    token = secrets.token_urlsafe(24)
    threads = spec.threads or worker_threads(1)
    proc, node_address = start_node("profile", "127.0.0.1", threads, None, token, checkpoint_root=str(ckpt.parent))
    gen = torch.Generator().manual_seed(0)
    vocab = model.vocab_size

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int64)

    try:
        with channel(node_address, None, token) as ch:
            resp = pbg.StageStub(ch).LoadShard(pb.LoadShardRequest(
                stage_id="profile", checkpoint=str(ckpt), layer_start=0, layer_end=spec.layers, is_first=True,
                is_last=True, tp=1, gpus=[0] if spec.device == "cuda" else [], dtype=spec.dtype,
                model_json=json.dumps(model.to_dict())), timeout=STEP_TIMEOUT_S)
        with channel(resp.address, None, token) as ch:
            stub = pbg.StageStub(ch)

            def forward(chunks: list[tuple[str, int, int]]) -> float:
                n = sum(c[2] for c in chunks)
                req = pb.ForwardRequest(chunks=[pb.SeqChunk(request_id=r, start=s, length=k) for r, s, k in chunks],
                                        inputs=to_proto(ids(n)))
                t = time.perf_counter()
                stub.Forward(req, timeout=STEP_TIMEOUT_S)
                return time.perf_counter() - t

            seqs = [f"served-{j}" for j in range(batches[-1])]
            pos = dict.fromkeys(seqs, spec.context)
            for a in range(0, len(seqs), PREFILL_SEQS_PER_CALL):
                forward([(r, 0, spec.context) for r in seqs[a:a + PREFILL_SEQS_PER_CALL]])
            points = []
            for done, b in enumerate(batches, 1):
                mine = seqs[:b]
                context = statistics.mean(pos[r] for r in mine)
                times = []
                for i in range(spec.warmup + spec.repeats):
                    times.append(forward([(r, pos[r], 1) for r in mine]))
                    for r in mine:
                        pos[r] += 1
                timed = times[spec.warmup:]
                step = statistics.median(timed)
                if step * 1e3 <= head_ms[b]:
                    raise ProfileError(f"the served decode step of {b} sequence(s) ({step * 1e3:.2f} ms) took less "
                                       f"than the LM head's step alone ({head_ms[b]:.2f} ms): the machine is too busy "
                                       "to measure; run again when it is quiet, or with more --repeats")
                per_layer = (step * 1e3 - head_ms[b]) / spec.layers
                point = Point("decode", b, per_layer, step * 1e3, 0.0, max(timed) / max(min(timed), 1e-12),
                              context=context)
                points.append(point)
                if progress is not None:
                    progress(point, done, len(batches))
            stub.Release(pb.ReleaseRequest(request_ids=seqs), timeout=60)
        return tuple(points)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)
