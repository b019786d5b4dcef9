"""The step runner: the gateway's micro-batch loops.

Each loop (one thread per loop of each pipeline) asks the scheduler (hexplan.serving) for its
next Step, frees or offloads the KV caches the Step names, sends its batch down the pipeline in
one ``Forward`` call (the first stage forwards it stage to stage), samples one token for every
sequence whose context is now all cached (a prompt's last chunk, or a decode step), streams it,
and reports back (``Scheduler.update``). Sequences that ended have their KV cache released on
every stage before their streams end, so a finished response means its KV is freed.
Prefill-only sequences' last chunk tells every stage to drop their KV in the same step; the
last stage returns their last-token hidden state beside the logits, and nothing is sampled.

A failure stays with the requests it touches: an exception while sampling fails that request
(INTERNAL), an error a stage returns for a step's data, or any exception of this code while
running a step, fails that step's requests (INTERNAL) and releases their KV; the loop goes on.
Only a stage that does not answer, or a step that stalls (longer than ``stall_factor`` x the
expected step time, at least ``stall_timeout_s``), fails the pipeline (faults.py).

The runner never decides what runs; the scheduler never touches tensors or gRPC.
"""
from __future__ import annotations

import logging
import time

import grpc
import torch

from hexplan.serving import Step, StepResult

from ._proto import hexplan_v1_pb2 as pb
from .faults import pipeline_failed
from .sampling import sample
from .wire import from_proto, to_proto

log = logging.getLogger("hexplan.gateway")

IDLE_WAIT_S = 0.05       # a loop with nothing to run sleeps this long unless a request arrives
# Errors a stage returns about a step's data: the requests fail, the pipeline is fine. Any other
# code (UNAVAILABLE, DEADLINE_EXCEEDED, ...) means the stage or the link is in trouble.
REQUEST_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.RESOURCE_EXHAUSTED})


class StepRunner:
    def __init__(self, gw):
        self.gw = gw

    def loop(self, pi: int, g: int) -> None:
        """Thread body of loop ``g`` of pipeline ``pi``: until the gateway stops or the pipeline
        goes down."""
        gw = self.gw
        epoch = gw.pipelines[pi].epoch
        while not gw.stop_event.is_set():
            if gw.pipelines[pi].epoch != epoch:     # failed (and maybe revived with loops of its own)
                return
            step = self.next_step(pi, g)
            if step is None:
                continue
            if not self.run(step, epoch):
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
        now = time.monotonic()
        for s, start, n, _last in step.prefill:
            r = reqs[s]
            if not r.t_sched:           # its first step: it waited until now (metrics, access line)
                r.t_sched = now
            drop = s in dropped
            chunks.append(pb.SeqChunk(request_id=r.id, start=start, length=n, hidden=drop and r.want_hidden, drop=drop))
            tokens += r.context()[start:start + n]
        # Every sequence greedy and none prefill-only: the last stage sends back tokens, not a
        # step's logits (64 rows of a 32000 vocabulary are 8 MB each step, to encode, send and read).
        greedy = not dropped and all(reqs[s].sampling.temperature <= 0
                                     for s in list(step.decode) + [s for s, *_ in step.prefill])
        # the first stage sends it on to the stages after it (fixed when they were loaded)
        return pb.ForwardRequest(chunks=chunks, inputs=to_proto(torch.tensor(tokens, dtype=torch.int64)),
                                 micro_batches=gw.interleave, matmul_pieces=gw.matmul_pieces, greedy=greedy)

    def step_timeout(self, step: Step) -> float:
        """How long a step may take before its pipeline is suspect: ``stall_factor`` x its
        expected time (the larger of the scheduler's estimate and the pipeline's running mean),
        at least ``stall_timeout_s``."""
        gw = self.gw
        cfg = gw.scheduler.configs[step.pipeline]
        est = cfg.decode_s if step.decode else 0.0
        if step.prefill and cfg.prefill_s is not None:
            est += cfg.prefill_s(sum(n for _s, _a, n, _l in step.prefill))
        expected = max(est, gw.pipelines[step.pipeline].step_s)
        return max(gw.stall_timeout_s, gw.stall_factor * expected)

    def run(self, step: Step, epoch: int | None = None) -> bool:
        """Run one Step; False when the pipeline failed (its requests have moved)."""
        gw = self.gw
        p = gw.pipelines[step.pipeline]
        epoch = p.epoch if epoch is None else epoch
        try:
            if step.released:
                gw.release(p, gw.take_released(step.released))
            if step.offloaded:
                gw.offload(p, [gw.requests[s] for s in step.offloaded])
            if not (step.decode or step.prefill):
                return True
            request = self.forward_request(step)
            t0 = time.monotonic()
            try:
                resp = gw.stub(p.stages[0]).Forward(request, timeout=self.step_timeout(step))
            except grpc.RpcError as e:
                code = e.code()
                if code in REQUEST_ERRORS:
                    self.fail_step(step, epoch, f"stage {p.stages[0]}: {code.name}: {e.details()}")
                    return True
                pipeline_failed(gw, p, f"{code.name}: {e.details()}", epoch,
                                stalled=code == grpc.StatusCode.DEADLINE_EXCEEDED)
                return False
            dt = time.monotonic() - t0
            p.step_s = dt if p.step_s == 0 else 0.9 * p.step_s + 0.1 * dt
            if gw.metrics is not None:
                gw.metrics.on_step(p.index, dt)
            # a greedy step's tokens; logits from a stage that sent them anyway (one without greedy)
            logits = list(resp.tokens) if request.greedy and not resp.HasField("logits") else from_proto(resp.logits)
            hidden = list(from_proto(resp.hidden)) if resp.HasField("hidden") else []
            self.finish(step, logits, hidden, epoch)
        except Exception as e:   # a bug or bad data of ours: only this step's requests pay for it
            log.exception("pipeline %d: step failed", step.pipeline)
            self.fail_step(step, epoch, f"internal error: {type(e).__name__}: {e}")
        return True

    def fail_step(self, step: Step, epoch: int, message: str) -> None:
        """The step's requests fail with INTERNAL; their KV is released on every stage; the
        pipeline and the other requests go on."""
        gw = self.gw
        p = gw.pipelines[step.pipeline]
        sids = list(step.decode) + [s for s, *_ in step.prefill]
        with gw.cv:
            if p.epoch != epoch:            # the pipeline failed meanwhile: they have moved
                return
            for s in sids:
                gw.fail_locked(s, grpc.StatusCode.INTERNAL, message)
            done = gw.scheduler.update(step, StepResult(), gw.clock())
            ended = [gw.retire_locked(s) for s in done if s in gw.requests]
            gw.cv.notify_all()
        gw.release(p, [r for r in ended if not r.prefill_only])

    def finish(self, step: Step, logits, hidden=(), epoch: int | None = None) -> list[int]:
        """Sample, stream and report a completed Step (``logits``: one row per chunk, in
        forward_request's order, or for a greedy step each row's token; ``hidden``: one row per
        chunk that asked for it). Returns the sequences that ended."""
        gw = self.gw
        reqs = gw.requests
        p = gw.pipelines[step.pipeline]
        epoch = p.epoch if epoch is None else epoch
        if p.epoch != epoch:    # failed meanwhile: its requests moved
            return []
        rows = iter(logits)
        hid = iter(hidden)
        sampled, results, stops, errors = [], [], {}, {}
        for s in step.decode:
            self._sample(reqs.get(s), next(rows), s, sampled, stops, errors)
        for s, _start, _n, last in step.prefill:
            row = next(rows)
            r = reqs.get(s)
            if r is None:
                continue
            if s in step.dropped:                     # prefill-only: its result
                results.append((r, row, next(hid) if r.want_hidden else None))
            elif last:
                self._sample(r, row, s, sampled, stops, errors)
        now = time.monotonic()
        firsts, gaps = [], []       # requests given their first token; the others' inter-token times
        with gw.cv:
            if p.epoch != epoch:      # failed meanwhile: its requests moved, prefilled again elsewhere
                return []
            for r, tok in sampled:
                r.generated.append(tok)
                r.events.put(("tokens", [tok]))
                if r.t_first_token:
                    gaps.append(now - r.t_last_token)
                else:
                    r.t_first_token = now
                    firsts.append(r)
                r.t_last_token = now
            for s, msg in errors.items():
                gw.fail_locked(s, grpc.StatusCode.INTERNAL, msg)
            done = gw.scheduler.update(step, StepResult(finished=tuple(stops)), gw.clock())
            ended = [gw.retire_locked(s) for s in done if s in gw.requests]
            gw.cv.notify_all()
        if sampled and gw.metrics is not None:
            gw.metrics.on_tokens(p.index, len(sampled), firsts, gaps, now)
        for r, row, h in results:
            if not r.cancelled.is_set():
                gw.request_ended(r)      # recorded before its client can see the end
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
                    if not r.failed:
                        reason = stops.get(r.sid, "length")
                        gw.request_ended(r, None, reason)
                        r.events.put(("done", reason))
        return done

    def _sample(self, r, row, s: int, sampled: list, stops: dict, errors: dict) -> None:
        if r is None or r.cancelled.is_set():    # None: ended while a failed pipeline's step ran
            return
        try:
            if isinstance(row, int):   # a greedy step: the last stage's argmax, -1 if not finite
                if row < 0:
                    raise ValueError("the model returned non-finite logits")
                tok = row
            else:
                tok = sample(row, r.sampling)
        except Exception as e:      # this request's sampling: only it fails
            errors[s] = f"sampling failed: {type(e).__name__}: {e}"
            stops[s] = "error"
            return
        sampled.append((r, tok))
        if tok in r.sampling.stop_token_ids:
            stops[s] = "stop"
        elif len(r.prompt) + len(r.generated) + 1 >= self.gw.context_limit:
            stops[s] = "length"
