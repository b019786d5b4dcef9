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
calls, the gateway's own call, logits back. It loads two such shards at once, ``layers`` layers
and one (``CALL_LAYERS``), times a batch's steps on both side by side, every batch once a round
(``timed_in_rounds``), each timed step right after an untimed one of its own batch and shard
(``DECODE_SETTLE``), and splits each step in three,

    served step(B, L) = call(B) + L x layer(B) + LM head(B)

the LM head's step from the lone measurement (``profile.measure``'s ``head`` points, which
include serialising the logits as the worker does), and the call -- what a Forward costs beyond
its layers and the head: the gRPC round trip, (de)serialising, the worker's per-call work on its
sequences, the embedding -- as what the slope between the two shards leaves of the larger step,
made non-decreasing in sequences over all the batches (``split_calls``), the layers taking the
rest of each step. The decode table gets the layer (per layer at TP 1, as before);
``call`` points become the profile's ``call_ms`` table, which the cost model charges once per
stage a step visits (costmodel.call_time), so a stage of 12 layers no longer pays a 6-layer
profile's one call twice, and a plan of two stages pays it twice. With ``layers`` = 1 there is
no split: the call stays in the layer's figure. The steps advance the sequences (a served step
can't be put back), so the context of batch B's steps is ``context`` plus the steps already
taken by its sequences; ``Point`` keeps the mean in ``context``. TP 1 only: a TP group's
all-reduces are measured by ``--tp`` without ``--served``.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import statistics
import time
from pathlib import Path

import torch

from .profile import Point, ProfileError, ProfileSpec, worker_threads

PREFILL_SEQS_PER_CALL = 8     # prompts per prefill Forward (bounded messages)
CALL_LAYERS = 1               # the second, smaller shard that splits a call's own cost from its layers'
STEP_TIMEOUT_S = 300.0
# untimed steps of the same batch on the same shard before each timed decode step. The two
# shards are two worker processes; a step taken right after the other one's came out 16-19%
# slower at one sequence, 12-17% at two, at most 3% from eight (the other process's threads still on
# the cores), where a server's loop steps the same worker again and again; settled, 0.96-1.03x
# the steps back to back. Switching the batch size alone cost nothing. bench/step_order_bench.py,
# on the Intel VM of session 36 (docs/fidelity.md).
DECODE_SETTLE = 1


def served_profile(spec: ProfileSpec, head_ms: dict[int, float], progress=None) -> tuple[Point, ...]:
    """Decode, prefill and call points measured through a served worker (module docstring).
    ``head_ms``: the LM head's step ms per rows, at least at every decode batch of ``spec`` (a
    prompt's one row: the table at 1, interpolated if 1 is not a decode batch);
    ``progress(point, done, total)`` after each."""
    from hexplan.gpus import ProfileTable
    from hexplan.models import model_from_hf_config, read_hf_config

    from ._proto import hexplan_v1_pb2 as pb
    from ._proto import hexplan_v1_pb2_grpc as pbg
    from .launch import start_node
    from .wire import channel

    if spec.tp != 1:
        raise ProfileError("--served measures TP 1 stages (the all-reduce table comes from --tp without --served)")
    batches = sorted(spec.decode_batches)
    prompts = tuple(sorted(spec.prefill_tokens))
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

    head1 = head_ms[1] if 1 in head_ms else ProfileTable(tuple(sorted(head_ms.items()))).ms(1)
    total = len(batches) * (2 if spec.layers > CALL_LAYERS else 1) + len(prompts)
    done = [0]

    def whole(kind: str, x: int, step: float, context: float, spread: float) -> None:
        head = head_ms[x] if kind == "decode" else head1
        if step * 1e3 <= head:
            what = f"decode step of {x} sequence(s)" if kind == "decode" else f"prompt of {x} tokens"
            raise ProfileError(f"the served {what} ({step * 1e3:.2f} ms) took less than the LM head's step alone "
                               f"({head:.2f} ms): the machine is too busy to measure; run again when it is quiet, "
                               "or with more --repeats")
        done[0] += 1
        if progress is not None:   # before the call is split off: the whole step over the layers
            progress(Point(kind, x, (step * 1e3 - head) / spec.layers, step * 1e3, 0.0, spread,
                           context=context), done[0], total)

    def split(kind: str, b: int, step: float, context: float, spread: float) -> None:
        done[0] += 1
        if progress is not None:   # this batch's own split, before the line is fitted over all of them
            raw = raw_call(steps[b][0] * 1e3, step * 1e3, spec.layers, CALL_LAYERS, head_ms[b])
            progress(Point("call", b, raw, step * 1e3, 0.0, spread, context=context), done[0], total)

    try:
        with channel(node_address, None, token) as node:
            shards = [(spec.layers, "profile")] + ([(CALL_LAYERS, "profile-call")] if spec.layers > CALL_LAYERS else [])
            timed = _served_steps(pb, pbg, node, ckpt, model, shards, batches, spec, ids, token, prompts)
        (steps, pre), small = timed[0], (timed[1][0] if len(timed) > 1 else None)
        for b in batches:
            whole("decode", b, *steps[b])
        for n in prompts:
            whole("prefill", n, *pre[n])
        for b in batches if small is not None else ():
            split("decode", b, *small[b])
        if small is None:   # one layer: no second shard to split the call from the layers
            per_layer = {b: (steps[b][0] * 1e3 - head_ms[b]) / spec.layers for b in batches}
            call = {}
        else:
            per_layer, call = split_calls({b: steps[b][0] * 1e3 for b in batches},
                                          {b: small[b][0] * 1e3 for b in batches}, spec.layers, CALL_LAYERS, head_ms)
        points = tuple(Point("decode", b, per_layer[b], steps[b][0] * 1e3, 0.0, steps[b][2], context=steps[b][1])
                       for b in batches)
        # a prompt alone: one sequence's call, the LM head on its last position (one row)
        call1 = ProfileTable(tuple(sorted(call.items()))).ms(1) if call else 0.0
        prefill = tuple(Point("prefill", n, max(1e-6, (pre[n][0] * 1e3 - head1 - call1) / spec.layers),
                              pre[n][0] * 1e3, 0.0, pre[n][2]) for n in prompts)
        calls = tuple(Point("call", b, c, small[b][0] * 1e3, 0.0, small[b][2], context=small[b][1])
                      for b, c in call.items())
        return points + prefill + calls
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)


def raw_call(step_ms: float, small_ms: float, layers: int, small_layers: int, head_ms: float) -> float:
    """One batch's call: what is left of the served step of ``layers`` layers after its layers
    (the slope to the step of ``small_layers`` layers at the same batch) and the LM head's step.
    Noisy (it can come out negative): ``split_calls`` smooths it over all batches."""
    per_layer = (step_ms - small_ms) / (layers - small_layers)
    return step_ms - head_ms - layers * per_layer


def split_calls(step_ms: dict, small_ms: dict, layers: int, small_layers: int,
                head_ms: dict) -> tuple[dict, dict]:
    """({batch: ms per layer}, {batch: ms of the call}) from the served steps of ``layers`` and of
    ``small_layers`` layers at each batch. The call is the batches' ``raw_call`` values made
    non-decreasing in sequences (``monotone``: a call never costs less for more sequences; on the
    development CPU one batch's split moved by 0-10 ms between neighbours) and floored at 0;
    each batch's layers then take the rest of its step, so ``layers x per_layer + call + head``
    is its served step. A batch whose step the call would leave <= 0 for its layers keeps the
    whole step in them (call 0)."""
    xs = sorted(step_ms)
    fitted = monotone([raw_call(step_ms[b], small_ms[b], layers, small_layers, head_ms[b]) for b in xs])
    per_layer, call = {}, {}
    for b, c in zip(xs, fitted):
        c = max(0.0, c)
        rest = step_ms[b] - head_ms[b] - c
        if rest <= 0:
            c, rest = 0.0, step_ms[b] - head_ms[b]
        per_layer[b], call[b] = rest / layers, c
    return per_layer, call


def monotone(ys: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``ys`` in least squares (pool adjacent violators:
    a run that falls is replaced by its mean)."""
    blocks: list[list[float]] = []          # [sum, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    return [s / n for s, n in blocks for _ in range(n)]


def timed_in_rounds(keys, warmup: int, repeats: int, step, settle: int = 0) -> dict:
    """{key: [what ``step(key)`` returned (its seconds), in the order taken]}, ``warmup +
    repeats`` of each, taken in rounds of every key, the rounds alternately forward and backward:
    a host whose speed drifts over the seconds this takes then slows or speeds every key alike (a
    linear drift exactly, over an even number of rounds), where timing each key's repeats back to
    back gave each key a different moment of the host.

    With ``settle`` > 0 each timed step comes right after ``settle`` untimed steps of its own key,
    whose results are dropped: where the keys are served by different processes, a step right
    after another process's is slower on a CPU than the same step repeated, which is how a server
    steps its batch (``DECODE_SETTLE``)."""
    keys = list(keys)
    times: dict = {k: [] for k in keys}
    for i in range(warmup + repeats):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            for _ in range(settle):
                step(k)
            times[k].append(step(k))
    return times


def _summary(timed: list[float], context: float) -> tuple[float, float, float]:
    """(median step s, ``context``, slowest / fastest) of one point's timed steps."""
    return statistics.median(timed), context, max(timed) / max(min(timed), 1e-12)


def _served_steps(pb, pbg, node, ckpt: Path, model, shards, batches, spec: ProfileSpec, ids, token: str,
                  prompts=()) -> list[tuple[dict, dict]]:
    """Load each of ``shards`` ((layers, stage id): layers [0, layers) as a first and last stage)
    on the node at once, prefill the largest batch's sequences on each, time decode steps of
    every batch on every shard in the same rounds (a batch's steps on the shards side by side,
    so the split between them is not a split between two moments of the host; each settled by
    ``DECODE_SETTLE`` untimed steps of its own), then a prompt of
    each of ``prompts`` tokens alone from position 0 on the first shard (a fresh sequence each
    time, released after it; in rounds of every length), unload. Returns, per shard, ({batch:
    (median step s, mean context, slowest / fastest)}, {prompt tokens: the same, context 0}; the
    first shard's only)."""
    from .wire import channel, to_proto

    with contextlib.ExitStack() as stack:
        stubs = []
        for layers, stage_id in shards:
            resp = pbg.StageStub(node).LoadShard(pb.LoadShardRequest(
                stage_id=stage_id, checkpoint=str(ckpt), layer_start=0, layer_end=layers, is_first=True,
                is_last=True, tp=1, gpus=[0] if spec.device == "cuda" else [], dtype=spec.dtype,
                model_json=json.dumps(model.to_dict())), timeout=STEP_TIMEOUT_S)
            stack.callback(lambda sid=stage_id: pbg.StageStub(node).UnloadShard(
                pb.UnloadShardRequest(stage_id=sid), timeout=60))
            stubs.append(pbg.StageStub(stack.enter_context(channel(resp.address, None, token))))

        def forward(stub, chunks: list[tuple[str, int, int]]) -> float:
            n = sum(c[2] for c in chunks)
            req = pb.ForwardRequest(chunks=[pb.SeqChunk(request_id=r, start=s, length=k) for r, s, k in chunks],
                                    inputs=to_proto(ids(n)))
            t = time.perf_counter()
            stub.Forward(req, timeout=STEP_TIMEOUT_S)
            return time.perf_counter() - t

        seqs = [f"served-{j}" for j in range(batches[-1])]
        pos = [dict.fromkeys(seqs, spec.context) for _ in stubs]
        for stub in stubs:
            for a in range(0, len(seqs), PREFILL_SEQS_PER_CALL):
                forward(stub, [(r, 0, spec.context) for r in seqs[a:a + PREFILL_SEQS_PER_CALL]])
        # decode steps in rounds, every batch once a round, as the prompts below: timed back to
        # back, a batch's repeats took whatever the host did in those seconds, and one run's
        # table rose and fell between neighbours; the first batch also took the steps right
        # after the prefill. With the two shards side by side, three runs of `--served` at 2
        # threads moved a step's call by 1.55x between runs (3.14x timed back to back, a shard
        # after the other) and its layer by 1.24x (1.52x) (docs/fidelity.md, session 35)
        def decode(key: tuple[int, int]) -> tuple[float, float]:
            """(seconds, the batch's mean context) of one decode step."""
            shard, b = key
            mine = seqs[:b]
            context = statistics.mean(pos[shard][r] for r in mine)
            took = forward(stubs[shard], [(r, pos[shard][r], 1) for r in mine])
            for r in mine:
                pos[shard][r] += 1
            return took, context

        keys = [(shard, b) for b in batches for shard in range(len(stubs))]
        times = timed_in_rounds(keys, spec.warmup, spec.repeats, decode, settle=DECODE_SETTLE)
        out: list[dict] = [{} for _ in stubs]
        for shard, b in keys:
            took, context = zip(*times[shard, b][spec.warmup:])
            out[shard][b] = _summary(list(took), statistics.mean(context))
        for stub in stubs:
            stub.Release(pb.ReleaseRequest(request_ids=seqs), timeout=60)
        # prompts in rounds, every length once a round: a shared host's speed drifts over
        # seconds, and timing each length's repeats back to back gave one length the host's
        # fast minute and the next its slow one (a 32-token prompt 5.6 to 7.0 ms a layer
        # between runs, against 5-7% for its neighbours), a kink in the table
        fresh = itertools.count()

        def prompt(n: int) -> float:
            rid = f"prompt-{n}-{next(fresh)}"
            took = forward(stubs[0], [(rid, 0, n)])
            stubs[0].Release(pb.ReleaseRequest(request_ids=[rid]), timeout=60)
            return took

        times = timed_in_rounds(prompts, spec.warmup, spec.repeats, prompt)
        pre = {n: _summary(times[n][spec.warmup:], 0.0) for n in prompts}
        return [(out[0], pre)] + [(o, {}) for o in out[1:]]
