"""The step runner: the gateway's micro-batch loops.

Each loop (one thread per loop of each pipeline) asks the scheduler (hexplan.serving) for its
next Step, frees or offloads the KV caches the Step names, sends its batch down the pipeline in
one ``Forward`` call (the first stage forwards it stage to stage), samples one token for every
sequence whose context is now all cached (a prompt's last chunk, or a decode step), streams it,
and reports back (``Scheduler.update``). Sequences that ended have their KV cache released on
every stage before their streams end, so a finished response means its KV is freed.
Prefill-only sequences' last chunk tells every stage to drop their KV in the same step; the
last stage returns their last-token hidden state beside the logits, and nothing is sampled.

The runner never decides what runs; the scheduler never touches tensors or gRPC.
"""
from __future__ import annotations

import logging

import grpc
import torch

from hexplan.serving import Step, StepResult

from ._proto import hexplan_v1_pb2 as pb
from .faults import pipeline_failed
from .sampling import sample
from .wire import from_proto, to_proto

log = logging.getLogger("hexplan.gateway")

STEP_TIMEOUT_S = 300.0
IDLE_WAIT_S = 0.05       # a loop with nothing to run sleeps this long unless a request arrives


class StepRunner:
    def __init__(self, gw):
        self.gw = gw

    def loop(self, pi: int, g: int) -> None:
        """Thread body of loop ``g`` of pipeline ``pi``: until the gateway stops or the pipeline
        goes down."""
        gw = self.gw
        while not gw.stop_event.is_set():
            step = self.next_step(pi, g)
            if step is None:
                if not gw.pipelines[pi].alive:
                    return
                continue
            if not self.run(step):
                return

    def next_step(self, pi: int, g: int, wait: float = IDLE_WAIT_S) -> Step | None:
        """The loop's next Step from the scheduler, or None after waiting up to ``wait`` seconds
        for a request when it has nothing to run."""
        gw = self.gw
        with gw.cv:
            if not gw.pipelines[pi].alive:
                return None
            step = gw.scheduler.schedule(gw.clock(), pi, g)
            if step is None and wait:
                gw.cv.wait(wait)
            return step

    def forward_request(self, step: Step) -> pb.ForwardRequest:
        """The Step as one Forward call: decode tokens first, then prompt chunks."""
        gw = self.gw
        reqs = gw.requests
        chunks, tokens = [], []
        for s in step.decode:
            r = reqs[s]
            ctx = r.context()
            chunks.append(pb.SeqChunk(request_id=r.id, start=len(ctx) - 1, length=1))
            tokens.append(ctx[-1])
        dropped = step.dropped
        for s, start, n, _last in step.prefill:
            r = reqs[s]
            drop = s in dropped
            chunks.append(pb.SeqChunk(request_id=r.id, start=start, length=n, hidden=drop and r.want_hidden, drop=drop))
            tokens += r.context()[start:start + n]
        p = gw.pipelines[step.pipeline]
        return pb.ForwardRequest(chunks=chunks, inputs=to_proto(torch.tensor(tokens, dtype=torch.int64)),
                                 downstream=p.stages[1:], micro_batches=gw.interleave, matmul_pieces=gw.matmul_pieces)

    def run(self, step: Step) -> bool:
        """Run one Step; False when the pipeline failed (its requests have moved)."""
        gw = self.gw
        p = gw.pipelines[step.pipeline]
        if step.released:
            gw.release(p, gw.take_released(step.released))
        if step.offloaded:
            gw.offload(p, [gw.requests[s] for s in step.offloaded])
        if not (step.decode or step.prefill):
            return True
        try:
            resp = gw.stub(p.stages[0]).Forward(self.forward_request(step), timeout=STEP_TIMEOUT_S)
            logits = from_proto(resp.logits)
            hidden = list(from_proto(resp.hidden)) if resp.HasField("hidden") else []
        except grpc.RpcError as e:
            pipeline_failed(gw, p, f"{e.code().name}: {e.details()}")
            return False
        self.finish(step, logits, hidden)
        return True

    def finish(self, step: Step, logits, hidden=()) -> list[int]:
        """Sample, stream and report a completed Step (``logits``: one row per chunk, in
        forward_request's order; ``hidden``: one row per chunk that asked for it). Returns the
        sequences that ended."""
        gw = self.gw
        reqs = gw.requests
        if not gw.pipelines[step.pipeline].alive:    # failed meanwhile: its requests moved
            return []
        rows = iter(logits)
        hid = iter(hidden)
        sampled, results, stops = [], [], {}
        for s in step.decode:
            self._sample(reqs.get(s), next(rows), s, sampled, stops)
        for s, _start, _n, last in step.prefill:
            row = next(rows)
            r = reqs.get(s)
            if r is None:
                continue
            if s in step.dropped:                     # prefill-only: its result
                results.append((r, row, next(hid) if r.want_hidden else None))
            elif last:
                self._sample(r, row, s, sampled, stops)
        with gw.cv:
            p = gw.pipelines[step.pipeline]
            if not p.alive:           # failed meanwhile: its requests moved, prefilled again elsewhere
                return []
            for r, tok in sampled:
                r.generated.append(tok)
                r.events.put(("tokens", [tok]))
            done = gw.scheduler.update(step, StepResult(finished=tuple(stops)), gw.clock())
            ended = [gw.retire_locked(s) for s in done]
            gw.cv.notify_all()
        for r, row, h in results:
            if not r.cancelled.is_set():
                r.events.put(("result", row, h))
        finished = [r for r in ended if not r.prefill_only]
        if finished:
            # The last token is already streamed, but the stream ends only once every stage
            # has released the cache (a client that reads Stats when its stream ends sees it
            # gone), and ends even if the release fails.
            try:
                gw.release(p, finished)
            finally:
                for r in finished:
                    r.events.put(("done", stops.get(r.sid, "length")))
        return done

    def _sample(self, r, row, s: int, sampled: list, stops: dict) -> None:
        if r is None or r.cancelled.is_set():    # None: ended while a failed pipeline's step ran
            return
        tok = sample(row, r.sampling)
        sampled.append((r, tok))
        if tok in r.sampling.stop_token_ids:
            stops[s] = "stop"
        elif len(r.prompt) + len(r.generated) + 1 >= self.gw.context_limit:
            stops[s] = "length"
