"""The scheduler the gateway and the simulator both run: torch-free, clock-free, in vLLM v1's shape.

    sched = Scheduler(pipeline_configs(plan, workload, ...), policy="fcfs", dispatcher=...)
    seq = sched.add(prompt_tokens, max_new_tokens, now)        # routed to a pipeline
    step = sched.schedule(now, pipeline, loop)                  # a Step, or None: nothing to run
    ...run it (gRPC, or the cost model's service times)...
    finished = sched.update(step, StepResult(finished=...))     # sequences that ended

Sequences are small integers; the caller keeps whatever else it needs (token ids, streams,
arrival times) beside them. Time is only ever what the caller passes as ``now``.

Each pipeline runs ``loops`` micro-batch loops (hexplan.serving.setup). A loop's next step is
asked for once its previous step is done, so the loops of a pipeline take turns at its stages.
The pieces, shared by both policies:

* Routing (``add``): the live pipeline with the shortest expected delay (hexplan.dispatch).
* Admission: a generative sequence needs a free KV reservation (prompt + max_new_tokens tokens
  out of the pipeline's ``kv_tokens``) and, under fcfs, one of ``concurrency`` slots;
  prefill-only sequences (scoring, embeddings) need neither: they never decode, hold no KV
  past their last chunk, and are admitted even when generative ones must wait.
* Chunked prefill: while a loop has sequences decoding, a step carries at most ``chunk``
  prompt tokens, so steps cost about the same and no stage waits on a long one; with nothing
  decoding the first prompt goes whole (and up to ``whole`` prompt tokens).
* Policy ``fcfs``: a loop keeps the sequences it admitted until they finish, and fills free
  batch room from its pipeline's queue in arrival order.
* Policy ``mlfq`` (FastServe): K queues with quanta ``q0 * 2**i``; a new sequence joins the
  first queue whose quantum covers its estimated prefill (skip-join); every step re-forms its
  batch from the highest-priority sequences not in another loop's step (the rest are
  preempted and keep their KV); a sequence that used its quantum drops a queue (the service it
  is charged is the estimate of what it ran: its chunks' share of its prefill, one decode step
  per token); one that waited longer than ``promote_s`` goes back to the top; a sequence that
  needs KV room evicts the lowest-priority preempted ones' KV to host memory (offload), and
  they bring it back when they next run (restore).
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque

from ..dispatch import Dispatcher, skip_join_level
from .setup import PipelineConfig
from .step import DONE_OK, Step, StepResult

POLICIES = ("fcfs", "mlfq")
NEW, RESIDENT, OFFLOADED, DONE = 0, 1, 2, 3      # where a sequence's KV cache is
PROMOTE_QUANTA = 100                             # mlfq: default promotion limit, in last-queue quanta
_EPS = 1e-9


class NoPipeline(Exception):
    """Every pipeline is down: nothing can take a request."""


class _Loop:
    """fcfs: one micro-batch loop. Decoding sequences advance one token per step together, so
    their contexts are summed in O(1): at step k the sequence that joined at step j with a
    prompt of p tokens attends to p + k - j; each is filed under the step that ends it."""

    __slots__ = ("k", "dec", "sum_p", "sum_j", "finish", "new", "pre", "ends", "cont")

    def __init__(self):
        self.k = 0               # steps completed
        self.dec: dict = {}      # decoding sequences, in the order they joined
        self.sum_p = 0           # their prompt tokens
        self.sum_j = 0           # the steps they joined at
        self.finish: dict = {}   # step -> sequences whose last token it produces
        self.new: list = []      # sequences whose prefill the step in flight completes
        self.pre: deque = deque()   # [sequence, prompt tokens not yet prefilled], in admission order
        self.ends: list = []     # prefill-only sequences the step in flight completes
        self.cont = None         # mlfq: the previous step's sequences that go on (for Step.preempted)


class _Pipe:
    __slots__ = ("index", "cfg", "alive", "loops", "pending", "inflight", "kv_used", "n_sys", "n_busy",
                 "release", "ponly_waiting",
                 # mlfq
                 "q0", "quanta", "promote", "run_q", "new_q", "resident", "waitq", "free_dec", "dec_s", "pre_s")


class Scheduler:
    def __init__(self, pipelines: list[PipelineConfig], policy: str = "fcfs", dispatcher: Dispatcher | None = None,
                 *, mlfq_levels: int = 5, mlfq_quantum_s: float | None = None, mlfq_promote_s: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'mlfq', got {policy!r}")
        if isinstance(mlfq_levels, bool) or not isinstance(mlfq_levels, int) or mlfq_levels < 1:
            raise ValueError(f"mlfq_levels must be an integer >= 1, got {mlfq_levels!r}")
        self.policy = policy
        self.mlfq = policy == "mlfq"
        self.configs = list(pipelines)
        self.dispatcher = dispatcher or Dispatcher([c.weight for c in pipelines])
        self.pipes: list[_Pipe] = []
        for i, c in enumerate(pipelines):
            pp = _Pipe()
            pp.index, pp.cfg, pp.alive = i, c, True
            pp.loops = [_Loop() for _ in range(c.loops)]
            pp.pending = deque()
            pp.inflight = pp.kv_used = pp.n_sys = pp.n_busy = pp.ponly_waiting = 0
            pp.release = []
            if self.mlfq:
                pp.q0 = mlfq_quantum_s or c.decode_s
                # what a step is charged: the estimates, or with none a quantum per step and chunk
                pp.dec_s, pp.pre_s = c.decode_s, c.prefill_s
                if not c.estimated and mlfq_quantum_s:
                    pp.dec_s = mlfq_quantum_s
                    pp.pre_s = lambda tokens, q=mlfq_quantum_s, chunk=c.chunk: q * tokens / chunk
                pp.quanta = [pp.q0 * 2 ** i for i in range(mlfq_levels)]
                pp.promote = mlfq_promote_s or PROMOTE_QUANTA * pp.quanta[-1]
                # Each queue in two parts, both in queue order: sequences admitted once (resident
                # or offloaded; a sorted list of (queue seq, sequence)) and sequences never
                # admitted (a dict: insertion order), so a step passes over the waiting ones at
                # once when no prompt could join it.
                pp.run_q = [[] for _ in pp.quanta]
                pp.new_q = [{} for _ in pp.quanta]
                pp.resident = {}               # sequences holding KV on the GPUs
                pp.waitq = deque()             # (since, sequence): candidates for promotion
                pp.free_dec = 0                # decoding sequences not in a step
            self.pipes.append(pp)
        # per sequence
        self.prompt: list[int] = []     # context tokens to prefill (prompt, plus tokens streamed before a failover)
        self.out: list[int] = []        # tokens it may still generate (max_new_tokens)
        self.ponly: list[bool] = []     # prefill-only
        self.pipe_of: list[int] = []
        self.state: list[int] = []
        self.cancelled: list[bool] = []
        self.gen: list[int] = []        # tokens generated on its current pipeline
        self.rem: list[int] = []        # mlfq: prompt tokens not yet prefilled (fcfs: its loop's pre items)
        self.busy: list[bool] = []      # in a step in flight
        self.join: list[int] = []       # fcfs: the step of its loop at which it began decoding
        self.loop_of: list[int] = []    # fcfs: its loop (-1: waiting)
        self.level: list[int] = []      # mlfq
        self.qseq: list[int] = []
        self.used: list[float] = []
        self.last_seen: list[float] = []
        self._arrays = (self.prompt, self.out, self.ponly, self.pipe_of, self.state, self.cancelled, self.gen,
                        self.rem, self.busy, self.join, self.loop_of, self.level, self.qseq, self.used,
                        self.last_seen)
        self.free: list[int] = []       # ids of ended sequences the caller gave back (forget)
        self.n_enq = 0
        self.n_cancel = 0               # cancellations not yet acted on
        # counters
        self.offloads = self.swap_ins = self.preemptions = self.demotions = self.promotions = 0
        self.partial_chunks = 0

    # ---- sequences ------------------------------------------------------------------------
    @property
    def kv_budget(self) -> int:
        """KV tokens a request may reserve at most: the smallest pipeline budget (routing may
        send it to any pipeline)."""
        return min(p.cfg.kv_tokens for p in self.pipes)

    def fits(self, prompt: int, max_new_tokens: int) -> bool:
        """Whether a request could ever be admitted (its KV reservation fits every budget)."""
        return prompt + max_new_tokens <= self.kv_budget

    @property
    def live(self) -> list[bool]:
        return [p.alive for p in self.pipes]

    def loads(self) -> list[int]:
        """Sequences routed to each pipeline and not finished."""
        return [p.n_sys for p in self.pipes]

    def add(self, prompt: int, max_new_tokens: int, now: float, prefill_only: bool = False,
            pipeline: int | None = None) -> int:
        """A new sequence of ``prompt`` tokens that may generate ``max_new_tokens`` (prefill-only:
        none), routed (or put on ``pipeline``); returns its id. Raises NoPipeline when every
        pipeline is down."""
        values = (prompt, 0 if prefill_only else max_new_tokens, prefill_only, -1, NEW, False, 0, prompt, False, 0,
                  -1, 0, 0, 0.0, now)
        if self.free:               # an id given back by forget()
            s = self.free.pop()
            for arr, v in zip(self._arrays, values):
                arr[s] = v
        else:
            s = len(self.prompt)
            for arr, v in zip(self._arrays, values):
                arr.append(v)
        self._route(s, now, pipeline)
        return s

    def _route(self, s: int, now: float, pipeline: int | None = None) -> None:
        pipes = self.pipes
        if pipeline is None:
            pipeline = self.dispatcher.choose([p.n_sys for p in pipes], [p.alive for p in pipes])
            if pipeline < 0:        # live pipelines of weight 0 only: least loaded
                live = [p for p in pipes if p.alive]
                if not live:
                    self.state[s] = DONE
                    raise NoPipeline("every pipeline is down")
                pipeline = min(live, key=lambda p: (p.n_sys, p.index)).index
        pipe = pipes[pipeline]
        self.pipe_of[s] = pipeline
        pipe.n_sys += 1
        if self.mlfq:
            self._m_arrive(pipe, s, now)
        else:
            pipe.pending.append(s)
            if self.ponly[s]:
                pipe.ponly_waiting += 1

    def forget(self, s: int) -> None:
        """The caller is done with an ended sequence: its id may be reused by ``add``, so a
        long-running server's per-sequence arrays stay as large as its peak load. (The simulator
        keeps every id: it indexes its own per-request arrays by them.)"""
        if self.state[s] != DONE or any(s in p.release for p in self.pipes):
            raise ValueError(f"sequence {s} has not ended (or its KV is still to be released)")
        self.free.append(s)

    def requeue(self, s: int, context: int, remaining: int, now: float) -> None:
        """Put a sequence of a failed pipeline on a live one: its whole context (prompt and the
        tokens already streamed) is prefilled again there, and it may generate ``remaining``
        more tokens (the caller's count: a sequence may move more than once). Raises NoPipeline."""
        self.prompt[s] = context
        if not self.ponly[s]:
            self.out[s] = max(0, remaining)
        self.state[s] = NEW
        self.gen[s] = 0
        self.rem[s] = context
        self.busy[s] = False
        self.loop_of[s] = -1
        self.used[s] = 0.0
        self.last_seen[s] = now
        self._route(s, now)

    def cancel(self, s: int) -> None:
        """The client went away: the sequence ends at the next chance (a waiting one at once;
        one in a step when the step is done, returned by ``update``; one preempted under mlfq
        at once, its KV freed by its pipeline's next step: ``Step.released``)."""
        if self.state[s] == DONE or self.cancelled[s]:
            return
        self.cancelled[s] = True
        pipe = self.pipes[self.pipe_of[s]]
        if self.busy[s]:
            self.n_cancel += 1
            return
        if self.mlfq:
            st = self.state[s]
            self._m_dequeue(pipe, s)
            if st == RESIDENT:
                del pipe.resident[s]
                pipe.kv_used -= self._kv(s)
            if st != NEW:
                if self.gen[s]:          # decoding, not in a step
                    pipe.free_dec -= 1
                pipe.release.append(s)
            self._end(pipe, s)
        elif self.loop_of[s] < 0:
            pipe.pending.remove(s)
            if self.ponly[s]:
                pipe.ponly_waiting -= 1
            self._end(pipe, s)
        else:                       # in a loop between steps (fcfs loops always have a step in flight)
            self.n_cancel += 1

    def fail(self, pipeline: int) -> list[int]:
        """Mark a pipeline down; returns its unfinished sequences, which the caller moves with
        ``requeue`` (or ends). Steps of it still in flight are ignored when they come back."""
        pipe = self.pipes[pipeline]
        pipe.alive = False
        out = [s for s in range(len(self.prompt)) if self.pipe_of[s] == pipeline and self.state[s] != DONE]
        for s in out:                  # out of the scheduler until requeue() (else ended)
            self.busy[s] = False
            self.pipe_of[s] = -1
            self.state[s] = DONE
            if self.cancelled[s]:
                self.cancelled[s] = False
                self.n_cancel = max(0, self.n_cancel - 1)
        pipe.loops = [_Loop() for _ in pipe.loops]
        pipe.pending.clear()
        pipe.inflight = pipe.kv_used = pipe.n_sys = pipe.n_busy = pipe.ponly_waiting = 0
        pipe.release = []
        if self.mlfq:
            pipe.run_q = [[] for _ in pipe.quanta]
            pipe.new_q = [{} for _ in pipe.quanta]
            pipe.resident, pipe.waitq, pipe.free_dec = {}, deque(), 0
        return out

    def revive(self, pipeline: int) -> None:
        """A failed pipeline is back (reloaded): new requests may be routed to it again. It
        starts empty: ``fail`` moved everything it held."""
        self.pipes[pipeline].alive = True

    def runnable(self, pipeline: int) -> bool:
        """Whether an idle loop of the pipeline could start a step now."""
        p = self.pipes[pipeline]
        if not p.alive:
            return False
        return p.n_sys > p.n_busy if self.mlfq else bool(p.pending) or bool(p.release)

    def _kv(self, s: int) -> int:
        return 0 if self.ponly[s] else self.prompt[s] + self.out[s]

    def _end(self, pipe: _Pipe, s: int) -> None:
        self.state[s] = DONE
        self.busy[s] = False
        pipe.n_sys -= 1

    # ---- the step -------------------------------------------------------------------------
    def schedule(self, now: float, pipeline: int, loop: int) -> Step | None:
        """The next step of a loop (whose previous step is done), or None if it has nothing to run."""
        pipe = self.pipes[pipeline]
        if not pipe.alive:
            return None
        return self._m_schedule(pipe, loop, now) if self.mlfq else self._f_schedule(pipe, loop)

    def update(self, step: Step, result: StepResult = DONE_OK, now: float = 0.0) -> list[int]:
        """A step is done: returns the sequences that ended with it (their last token came, they
        reached max_new_tokens, ``result.finished`` says so, a prefill-only one's last chunk
        ran, or they were cancelled). Callers free the KV of ended generative sequences."""
        pipe = self.pipes[step.pipeline]
        if not pipe.alive or result.failed:
            return []
        return self._m_update(pipe, step, result, now) if self.mlfq else self._f_update(pipe, step, result)

    def _budget(self, pipe: _Pipe, decoding: bool, first: int) -> int:
        """Prompt tokens a step may carry: the chunk while its loop has sequences decoding; else
        the ``whole`` budget and at least all of the first prompt."""
        c = pipe.cfg
        if decoding:
            return c.chunk
        return max(c.chunk, c.whole, first)

    # ---- fcfs ---------------------------------------------------------------------------------
    def _f_schedule(self, pipe: _Pipe, g: int) -> Step | None:
        lp = pipe.loops[g]
        released = ()
        if self.n_cancel:
            released = self._f_cancelled(pipe, lp)
        if pipe.release:
            released += tuple(pipe.release)
            pipe.release = []
        n_dec = len(lp.dec)
        pre = lp.pre
        prompt = self.prompt
        cfg = pipe.cfg
        pend = pipe.pending
        budget = self._budget(pipe, n_dec > 0, pre[0][1] if pre else (prompt[pend[0]] if pend else 0))
        chunks = []
        new, ends = [], []
        for item in pre:
            if budget <= 0:
                break
            s, left = item
            take = left if left < budget else budget
            budget -= take
            item[1] = left - take
            last = take == left
            chunks.append((s, prompt[s] - left, take, last))
        while pre and pre[0][1] == 0:
            s = pre.popleft()[0]
            (ends if self.ponly[s] else new).append(s)
        room = cfg.batch - n_dec - len(pre) - len(new) - len(ends)
        if room > 0 and pend and budget > 0:
            out, ponly = self.out, self.ponly
            while pend and room > 0 and budget > 0:
                s = pend[0]
                po = ponly[s]
                if not po:
                    need = prompt[s] + out[s]
                    if pipe.inflight >= cfg.concurrency or pipe.kv_used + need > cfg.kv_tokens:
                        # a full pipeline still takes the prefill-only requests queued behind
                        if not pipe.ponly_waiting:
                            break
                        s = next(x for x in pend if ponly[x])
                        po = True
                if s == pend[0]:
                    pend.popleft()
                else:
                    pend.remove(s)
                p = prompt[s]
                take = p if p < budget else budget
                budget -= take
                last = take == p
                chunks.append((s, 0, take, last))
                self.loop_of[s] = g
                self.state[s] = RESIDENT
                if po:
                    pipe.ponly_waiting -= 1
                    if last:
                        ends.append(s)
                    else:
                        pre.append([s, p - take])
                else:
                    pipe.inflight += 1
                    pipe.kv_used += prompt[s] + out[s]
                    if last:
                        new.append(s)
                    else:
                        pre.append([s, p - take])
                room -= 1
        if not chunks and not n_dec:
            if released:       # nothing to run, but KV to free: an empty step carries it
                return Step(pipe.index, g, released=released)
            return None
        self.partial_chunks += sum(1 for c in chunks if not c[3])
        lp.new, lp.ends = new, ends
        decode = tuple(lp.dec)
        step = Step(pipe.index, g, decode, tuple(chunks), lp.sum_p + n_dec * lp.k - lp.sum_j,
                    n_dec + len(new) + len(ends), released=released, dropped=tuple(ends))
        return step

    def _f_cancelled(self, pipe: _Pipe, lp: _Loop) -> tuple:
        """Cancelled sequences of a loop between its steps leave it; their KV is released."""
        out = []
        cancelled = self.cancelled
        for s in [s for s in lp.dec if cancelled[s]]:
            self._f_leave(pipe, lp, s)
            out.append(s)
        for item in [it for it in lp.pre if cancelled[it[0]]]:
            s = item[0]
            lp.pre.remove(item)
            if not self.ponly[s]:
                pipe.inflight -= 1
                pipe.kv_used -= self._kv(s)
            self._end(pipe, s)
            self.n_cancel -= 1
            out.append(s)
        return tuple(out)

    def _f_leave(self, pipe: _Pipe, lp: _Loop, s: int) -> None:
        """A decoding sequence leaves its loop: at its max_new_tokens, or before (stop token,
        cancel: then its entry under the step that would have ended it goes too, since its id
        may be reused)."""
        lst = lp.finish.get(self.join[s] + self.out[s] - 1)
        if lst is not None and s in lst:
            lst.remove(s)
        del lp.dec[s]
        lp.sum_p -= self.prompt[s]
        lp.sum_j -= self.join[s]
        pipe.inflight -= 1
        pipe.kv_used -= self._kv(s)
        if self.cancelled[s]:
            self.n_cancel -= 1
        self._end(pipe, s)

    def _f_update(self, pipe: _Pipe, step: Step, result: StepResult) -> list[int]:
        lp = pipe.loops[step.loop]
        k = lp.k
        out, cancelled = self.out, self.cancelled
        early = set(result.finished) if result.finished else ()
        done = []
        for s in lp.ends:            # prefill-only: its result is out
            if cancelled[s]:
                self.n_cancel -= 1
            self._end(pipe, s)
            done.append(s)
        for s in lp.new:             # first token
            self.gen[s] = 1
            if out[s] <= 1 or s in early or cancelled[s]:
                pipe.inflight -= 1
                pipe.kv_used -= self._kv(s)
                if cancelled[s]:
                    self.n_cancel -= 1
                self._end(pipe, s)
                done.append(s)
                continue
            lp.dec[s] = None
            lp.sum_p += self.prompt[s]
            lp.sum_j += k
            self.join[s] = k
            f = k + out[s] - 1
            lst = lp.finish.get(f)
            if lst is None:
                lp.finish[f] = [s]
            else:
                lst.append(s)
        lp.new, lp.ends = [], []
        dec = lp.dec
        ending = lp.finish.pop(k, None)
        if ending:
            for s in ending:
                if s in dec:         # not ended early
                    self._f_leave(pipe, lp, s)
                    done.append(s)
        if early or self.n_cancel:
            for s in step.decode:
                if s in dec and (s in early or cancelled[s]):
                    self._f_leave(pipe, lp, s)
                    done.append(s)
        lp.k = k + 1
        return done

    # ---- mlfq: FastServe's skip-join multi-level feedback queue --------------------------------
    def join_level(self, pipeline: int, tokens: int) -> int:
        """The queue a new sequence of ``tokens`` prompt tokens joins (skip-join)."""
        pipe = self.pipes[pipeline]
        return skip_join_level(pipe.pre_s(tokens), pipe.q0, len(pipe.quanta))

    def _m_enqueue(self, pipe: _Pipe, s: int, level: int) -> None:
        """To the back of queue ``level``."""
        self.level[s] = level
        self.n_enq += 1
        self.qseq[s] = self.n_enq
        if self.state[s] == NEW:
            pipe.new_q[level][s] = None
        else:
            pipe.run_q[level].append((self.n_enq, s))

    def _m_dequeue(self, pipe: _Pipe, s: int) -> None:
        lv = self.level[s]
        if self.state[s] == NEW:
            del pipe.new_q[lv][s]
        else:
            q = pipe.run_q[lv]
            del q[bisect_left(q, (self.qseq[s], s))]

    def _m_arrive(self, pipe: _Pipe, s: int, now: float) -> None:
        self._m_enqueue(pipe, s, skip_join_level(pipe.pre_s(self.prompt[s]), pipe.q0, len(pipe.quanta)))
        pipe.waitq.append((now, s))

    def _m_order(self, pipe: _Pipe, ctl: list):
        """Sequences in priority order: queue by queue, each in queue order; the never-admitted
        ones only while ``ctl[0]`` (a prompt could still join the step). Once ``ctl[1]`` (a
        sequence without KV did not fit: none after it may take KV), only the resident ones
        after that point, sorted (few: the KV budget bounds them)."""
        qseq = self.qseq
        last = None
        for run, new in zip(pipe.run_q, pipe.new_q):
            ita = iter(run)
            a = next(ita, None)
            f = None
            if new and ctl[0]:
                itn = iter(new)
                f = next(itn, None)
            while not ctl[1]:
                if f is not None and not ctl[0]:
                    f = None
                if f is None and a is None:
                    break
                if f is not None and (a is None or qseq[f] < a[0]):
                    last = f
                    yield f
                    f = next(itn, None)
                else:
                    last = a[1]
                    yield last
                    a = next(ita, None)
            if ctl[1]:
                break
        else:
            return
        level, busy = self.level, self.busy
        key = (level[last], qseq[last])
        rest = [(level[x], qseq[x], x) for x in pipe.resident if not busy[x]]
        rest.sort()
        for lv, q, x in rest:
            if (lv, q) > key:
                yield x

    def _m_promote(self, pipe: _Pipe, now: float) -> None:
        """Sequences that waited (were in no step) longer than the promotion limit go to the back
        of the top queue with a fresh quantum."""
        wq, lim = pipe.waitq, now - pipe.promote
        busy, state, last_seen, level = self.busy, self.state, self.last_seen, self.level
        while wq and wq[0][0] < lim:
            t, s = wq.popleft()
            if busy[s] or state[s] == DONE or last_seen[s] != t or self.pipe_of[s] != pipe.index:
                continue           # it ran since
            if level[s]:
                self._m_dequeue(pipe, s)
                self.used[s] = 0.0
                self._m_enqueue(pipe, s, 0)
                self.promotions += 1

    def _m_evict(self, pipe: _Pipe, s: int, need: int, offload: list) -> bool:
        """Make room for ``need`` KV tokens by offloading the lowest-priority preempted sequences
        of lower priority than ``s``; False (and nothing offloaded) if they cannot."""
        level, qseq, busy = self.level, self.qseq, self.busy
        key = (level[s], qseq[s])
        cands = [x for x in pipe.resident if not busy[x] and (level[x], qseq[x]) > key]
        room = pipe.cfg.kv_tokens - pipe.kv_used
        if room + sum(self._kv(x) for x in cands) < need:
            return False
        cands.sort(key=lambda x: (level[x], qseq[x]), reverse=True)
        for x in cands:
            if room >= need:
                break
            kv = self._kv(x)
            pipe.kv_used -= kv
            room += kv
            self.state[x] = OFFLOADED
            del pipe.resident[x]
            offload.append(x)
            self.offloads += 1
        return True

    def _m_schedule(self, pipe: _Pipe, g: int, now: float) -> Step | None:
        """Loop g's next batch: the highest-priority sequences not in another loop's step."""
        if pipe.waitq and pipe.waitq[0][0] < now - pipe.promote:
            self._m_promote(pipe, now)
        lp = pipe.loops[g]
        released = ()
        if pipe.release:
            released = tuple(pipe.release)
            pipe.release = []
        prompt, rem, state, busy, gen, ponly = self.prompt, self.rem, self.state, self.busy, self.gen, self.ponly
        cfg = pipe.cfg
        B = cfg.batch
        budget = cfg.chunk
        whole_first = pipe.free_dec == 0    # nothing to decode: the first prompt goes whole (as fcfs)
        decs: list = []
        chunks: list = []
        ends: list = []
        offload: list = []
        restored: list = []
        n_fin = 0                           # prompts the step finishes (they need logits)
        swap_tok = 0                        # context tokens brought back from host memory
        blocked = False                     # a sequence without KV did not fit: none after it gets any
        ctl = [True, False]                 # a never-admitted sequence could still join; blocked
        admitted = []
        n = 0
        for s in self._m_order(pipe, ctl):
            if busy[s]:
                continue
            left = rem[s]
            if left and budget <= 0 and not whole_first:
                continue
            st = state[s]
            if st != RESIDENT:
                if blocked:
                    continue
                need = self._kv(s)
                if pipe.kv_used + need > cfg.kv_tokens and not (st == NEW and self._m_evict(pipe, s, need, offload)):
                    blocked = True
                    ctl[0], ctl[1] = False, True
                    continue
                pipe.kv_used += need
                state[s] = RESIDENT
                if not ponly[s]:
                    pipe.resident[s] = None
                if st == NEW:
                    admitted.append(s)
                else:
                    swap_tok += prompt[s] - left + gen[s]
                    restored.append(s)
                    self.swap_ins += 1
            if left:
                if whole_first:
                    budget = max(budget, cfg.whole, left)
                    whole_first = False
                take = left if left < budget else budget
                budget -= take
                last = take == left
                chunks.append((s, prompt[s] - left, take, last))
                if last:
                    n_fin += 1
                    if ponly[s]:
                        ends.append(s)
                else:
                    self.partial_chunks += 1
                if budget <= 0:
                    ctl[0] = False
            else:
                decs.append(s)
            busy[s] = True
            n += 1
            if n >= B:
                break
        for s in admitted:
            lv = self.level[s]
            del pipe.new_q[lv][s]
            insort(pipe.run_q[lv], (self.qseq[s], s))
        if not n:
            if released or offload:
                return Step(pipe.index, g, released=released, offloaded=tuple(offload))
            return None
        pipe.n_busy += n
        pipe.free_dec -= len(decs)
        preempted = ()
        if lp.cont is not None:      # the previous step's sequences that continue but were left out
            preempted = tuple(s for s in lp.cont if not busy[s] and state[s] != DONE)
            self.preemptions += len(preempted)
        step = Step(pipe.index, g, tuple(decs), tuple(chunks), sum(prompt[s] + gen[s] for s in decs),
                    len(decs) + n_fin, preempted, tuple(offload), tuple(restored), swap_tok, released, tuple(ends))
        lp.cont = None
        return step

    def _m_update(self, pipe: _Pipe, step: Step, result: StepResult, now: float) -> list[int]:
        prompt, out, rem, gen, used = self.prompt, self.out, self.rem, self.gen, self.used
        pre_s = pipe.pre_s
        done = []
        cont = []
        early = set(result.finished) if result.finished else ()
        cancelled = self.cancelled
        # Service: a prompt chunk costs its share of the prompt's estimated prefill, a decode
        # token one decode step of the pipeline: every sequence of a step spends it.
        for s, _, take, last in step.prefill:
            p = prompt[s]
            used[s] += pre_s(p) * take / p
            left = rem[s] - take
            rem[s] = left
            if not last:
                if cancelled[s]:
                    self._m_finish(pipe, s)
                    done.append(s)
                    continue
                cont.append(s)
                continue
            if self.ponly[s]:
                self._m_finish(pipe, s)
                done.append(s)
                continue
            gen[s] = 1
            if out[s] <= 1 or s in early or cancelled[s]:
                self._m_finish(pipe, s)
                done.append(s)
                continue
            pipe.free_dec += 1
            cont.append(s)
        tok_s = pipe.dec_s
        for s in step.decode:
            k = gen[s] + 1
            gen[s] = k
            if k >= out[s] or s in early or cancelled[s]:
                self._m_finish(pipe, s)
                done.append(s)
                continue
            used[s] += tok_s
            pipe.free_dec += 1
            cont.append(s)
        pipe.n_busy -= len(step.prefill) + len(step.decode)
        busy, level, quanta = self.busy, self.level, pipe.quanta
        last_q = len(quanta) - 1
        waitq, last_seen = pipe.waitq, self.last_seen
        for s in cont:
            busy[s] = False
            last_seen[s] = now
            waitq.append((now, s))
            lv = level[s]
            if used[s] >= quanta[lv] * (1 - _EPS):   # quantum used: next queue (the last: its back)
                used[s] = 0.0
                self._m_dequeue(pipe, s)
                if lv < last_q:
                    lv += 1
                    self.demotions += 1
                self._m_enqueue(pipe, s, lv)
        pipe.loops[step.loop].cont = cont
        return done

    def _m_finish(self, pipe: _Pipe, s: int) -> None:
        self._m_dequeue(pipe, s)
        if s in pipe.resident:
            del pipe.resident[s]
        pipe.kv_used -= self._kv(s)
        if self.cancelled[s]:
            self.n_cancel -= 1
        self._end(pipe, s)
