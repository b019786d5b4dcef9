"""The event loop: requests through a plan's pipelines, one batched step at a time.

The engine knows plans, the cluster's links and the cost model; it knows nothing about
percentiles or output formats (metrics.py) or where requests come from (workload.py).

* Routing: each arrival goes to the pipeline with the shortest expected delay
  (hexplan.dispatch, as the gateway: the fastest pipelines at light load, the plan's weights
  under heavy load), or with ``routing="weights"`` to pipeline i with probability weight_i (seeded).
* Admission, per pipeline, first come first served: a request waits in the pipeline's queue
  until a loop has room (< batch_size sequences), the pipeline has < concurrency sequences in
  flight, and its prompt + output tokens fit in the KV cache the plan reserved on every stage
  (concurrency x (P + O) tokens of the plan's workload). A request that could never fit is
  rejected at arrival.
* Continuous batching, as the gateway does it: a pipeline runs ``loops`` micro-batch loops
  (ceil(concurrency / batch) by default). An iteration of a loop is a step: admit waiting
  requests and carry prompt chunks (chunked prefill: ``prefill_chunk`` prompt tokens per step
  while the loop has sequences decoding; with none, the first prompt goes whole), then
  send the batch through coordinator link -> stage 0 -> link -> stage 1 -> ... -> last stage ->
  link back to the coordinator. Every stage and every link is a FIFO server. A step yields one
  token for each of its sequences; a request's first token comes from the step that prefilled
  it. (With fixed output lengths and a queue, a freed slot is refilled by its loop's next step,
  so which steps carry prompts repeats with the output length and is set by how the pipeline
  filled: docs/simulator.md, "Fixed lengths".)
* Service times come from hexplan.costmodel (the planner's own functions):
    stage s:  l_s * (decode_layer_time(n_dec, mean context) + sum of prefill_layer_time(p))
              (+ lm_head_time(n_dec + n_prefill) on the last stage)
    link:     send_time(bytes): activations (n_dec + prompt tokens) * H * b between stages,
              4-byte token ids in from and out to the coordinator.
  Links between two nodes are shared by every pipeline that uses the ordered pair; a link
  inside a node belongs to its pipeline hop.

* Scheduling policy (``EngineOptions.policy``): "fcfs" is all of the above. "mlfq" is FastServe's
  skip-join multi-level feedback queue (Wu et al., 2023) at the granularity of one output token,
  per pipeline: K queues with quanta q0 * 2**i, a new request joins the first queue whose quantum
  covers its estimated prefill, every step of a loop re-forms its batch from the highest-priority
  requests not in another loop's step (the rest are preempted and keep their KV cache), a request
  that used its quantum drops a queue, one that waited longer than ``mlfq_promote_s`` goes back
  to the top, and an admission that does not fit in the KV cache offloads the lowest-priority
  preempted requests' KV to host memory (brought back over ``offload_bandwidth`` before they
  run again). Its code is the ``_m_*`` methods; the fcfs path does not go through them.
  docs/simulator.md, "Scheduling policies: fcfs and mlfq".

* Interleaving (``Workload.interleave`` N > 1, Liger-style, as the executor's ``--interleave``): a
  step of n sequences runs as p = min(N, n) parts on a pipeline with more than one stage or a TP
  stage (a pipeline of one TP-1 stage has nothing to overlap). Stage times come from the cost
  model with p parts (every part re-reads the weights; TP all-reduces hide under compute), and
  after the first stage has the step's token ids each part goes through the stages and links on
  its own, 1/p of the step's time and bytes at each: stage s + 1 (and the link) starts on part 1
  while stage s computes part 2. The step is done when its last part is back. With N = 1, or a
  step of one sequence, nothing changes.

* Shared hosts (nodes naming the same ``host``, cluster.Host): a stage on one serves a step at a
  time, booked when it starts, slowed by its own ``Host.slowdown``, and further for the time it
  overlaps a step on another stage of the host, which is lengthened the same way
  (``_hosted_end``; its departure is an event that moves with it). A step's compute share
  (``_share``: 1, less a TP stage's all-reduces) goes into the slowdown. Processor sharing:
  where several steps overlap this one, each piece of the overlap is slowed by the set running
  then (three 1-thread stages on 2 cores: 1.5x, though no pair of them exceeds the cores). Nodes
  without a host take the path above, unchanged.

* Shift Parallelism (a stage with ``shift: {sp: S}``): every step on a shifted stage takes the
  mode ``hexplan.serving.shift.shift_mode(step tokens, threshold)`` gives, the rule the
  executor's workers apply; step tokens are its decode tokens plus its prompt chunks' tokens.
  The threshold is the stage's ``costmodel.shift_threshold`` (the cost model's TP/SP crossover),
  or ``CostParams.shift_threshold`` when set (``hexplan simulate --shift-threshold``). SP-mode
  steps take the cost model's SP-mode times (``sp=S``: decode, prompt chunks, LM head) and are
  not cut into interleaved parts. ``EngineStats.shift_steps`` counts the steps of each mode (once
  per step and kind of shifted stage in the pipeline).

Speed: only links shared by several pipeline hops need an event per visit. Every other server
is fed by exactly one upstream server whose departures are computed in time order, so a step
is walked through consecutive private servers at once (FIFO order is preserved); the heap holds
arrivals, step completions and visits to shared links.
"""
from __future__ import annotations

import functools
import heapq
import math
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from ..cluster import Cluster
from ..costmodel import (TOKEN_ID_BYTES, CostParams, Workload, allreduce_time, attention_pair_time, call_time,
                         decode_attention_time, decode_layer_time, lm_head_time, local_kv_heads, prefill_layer_time,
                         send_time, shift_threshold, step_fixed_time)
from ..dispatch import Dispatcher, skip_join_level  # noqa: F401  (skip_join_level: also used from here)
from ..serving import DONE_OK, Scheduler, pipeline_configs
from ..serving.setup import estimated_batches
from ..serving.shift import SP_MODE, TP_MODE, shift_mode
from ..evaluate import splits
from ..plan import Plan
from .workload import RequestStream

ARRIVAL, STEP_DONE, RESUME, HOSTED = 0, 1, 2, 3
_CACHE_LIMIT = 200_000
POLICIES = ("fcfs", "mlfq")


@dataclass(frozen=True)
class EngineOptions:
    prefill_budget: int | None = None  # prompt tokens of a step with nothing decoding; None: the workload's prompt length
    prefill_chunk: int | None = None   # prompt tokens of a step with sequences decoding; None: Workload.prefill_chunk(stages)
    loops: int | None = None       # micro-batch loops per pipeline; None: Workload.micro_batches (the gateway's rule)
    routing: str = "delay"         # "delay": shortest expected delay (the gateway's); "weights": random by weight
    policy: str = "fcfs"           # "fcfs": first come first served, a request keeps its slot; "mlfq": skip-join MLFQ
    mlfq_levels: int = 5           # mlfq: priority queues
    mlfq_quantum_s: float | None = None    # mlfq: quantum of the top queue; None: one decode step of the pipeline
    mlfq_promote_s: float | None = None    # mlfq: waiting longer than this goes back to the top; None: PROMOTE_QUANTA (100) x the last quantum
    offload_bandwidth: float = 16e9        # mlfq: bytes/s between a GPU and host memory (conservative for PCIe 4.0 x16)


@dataclass
class EngineStats:
    """Raw counts and samples of one run; metrics.py turns them into a SimResult."""

    window: tuple[float, float]
    end_time: float = 0.0
    arrived: int = 0
    arrived_in_window: int = 0
    rejected: int = 0
    truncated: int = 0
    unfinished: int = 0
    steps: int = 0
    tokens_in_window: int = 0
    in_system_area: float = 0.0                        # integral of requests in the system over the window
    ttft: list = field(default_factory=list)           # per request completed in the window
    tpot: list = field(default_factory=list)           # nan where output is one token
    e2e: list = field(default_factory=list)
    request: list = field(default_factory=list)        # each one's index among the admitted, in arrival order
    pipe_tokens: list = field(default_factory=list)    # per pipeline, in the window
    pipe_completed: list = field(default_factory=list)
    pipe_routed: list = field(default_factory=list)
    stage_busy: list = field(default_factory=list)     # per pipeline, per stage: busy seconds in the window
    link_busy: dict = field(default_factory=dict)      # "a->b" (between nodes): busy seconds in the window
    policy: str = "fcfs"
    offloads: int = 0          # mlfq: requests whose KV cache went to host memory (whole run)
    swap_ins: int = 0          # mlfq: ... and came back
    preemptions: int = 0       # mlfq: unfinished requests a loop's next step left out (and no other loop took)
    demotions: int = 0         # mlfq: moves to a lower-priority queue after using a quantum
    promotions: int = 0        # mlfq: moves back to the top queue after waiting mlfq_promote_s
    shift_steps: dict = field(default_factory=dict)   # Shift Parallelism: mode -> steps of shifted stages (whole run)


class _Kind:
    """Per-layer step times of one TP group type (GPU, degree, intra-node bandwidth; Shift
    Parallelism's SP ranks and threshold), memoised."""

    __slots__ = ("model", "gpu", "tp", "ic", "params", "dec", "pre", "dec_p", "pre_p", "sp", "threshold",
                 "dec_sp", "pre_sp", "attn", "pair", "fixed")

    def __init__(self, model, gpu, tp, ic, params, sp: int = 1):
        self.model, self.gpu, self.tp, self.ic, self.params = model, gpu, tp, ic, params
        self.dec: dict = {}
        self.pre: dict = {}
        self.dec_p: dict = {}    # interleaving: (n, ctx_sum, parts) -> seconds
        self.pre_p: dict = {}    # interleaving: (tokens, parts) -> seconds
        self.sp = sp             # > 1: a shifted stage; its steps above ``threshold`` tokens run in SP mode
        self.threshold = shift_threshold(model, gpu, tp, sp, ic, params) if sp > 1 else 0
        self.dec_sp: dict = {}   # SP mode: (n, ctx_sum) -> seconds
        self.pre_sp: dict = {}   # SP mode: tokens -> seconds
        self.attn: dict = {}     # mean context -> a decoding sequence's attention beside a chunk
        self.pair = attention_pair_time(model, gpu, tp, params)   # one (query, key) pair of a prompt
        self.fixed = step_fixed_time(model, gpu, tp)               # what a step pays once (a profile's)

    def sp_mode(self, step_tokens: int) -> bool:
        """Whether a step of ``step_tokens`` tokens runs in SP mode here (the shared rule)."""
        return self.sp > 1 and shift_mode(step_tokens, self.threshold) == SP_MODE

    def decode_sp(self, n: int, ctx_sum: int) -> float:
        key = (n, ctx_sum)
        t = self.dec_sp.get(key)
        if t is None:
            if len(self.dec_sp) > _CACHE_LIMIT:
                self.dec_sp.clear()
            t = self.dec_sp[key] = decode_layer_time(self.model, self.gpu, self.tp, n, ctx_sum / n, self.ic,
                                                     self.params, sp=self.sp)
        return t

    def prefill_sp(self, tokens: int) -> float:
        t = self.pre_sp.get(tokens)
        if t is None:
            t = self.pre_sp[tokens] = prefill_layer_time(self.model, self.gpu, self.tp, tokens, self.ic, self.params,
                                                         sp=self.sp)
        return t

    def decode(self, n: int, ctx_sum: int) -> float:
        key = (n, ctx_sum)
        t = self.dec.get(key)
        if t is None:
            if len(self.dec) > _CACHE_LIMIT:
                self.dec.clear()
            t = self.dec[key] = decode_layer_time(self.model, self.gpu, self.tp, n, ctx_sum / n, self.ic,
                                                  self.params)
        return t

    def prefill(self, tokens: int) -> float:
        t = self.pre.get(tokens)
        if t is None:
            t = self.pre[tokens] = prefill_layer_time(self.model, self.gpu, self.tp, tokens, self.ic, self.params)
        return t

    def mixed(self, n: int, ctx_sum: int, chunks, prefill=None) -> float:
        """A step with prompt ``chunks`` ((request, start, tokens, last)) beside ``n`` decoding
        sequences, as the executor runs it: one pass of the matrix products over all its T
        tokens (a prompt forward of T, less the attention across them: its chunks do not attend
        to each other), each chunk's attention within itself and to its earlier positions, and
        each decoding sequence's attention (docs/simulator.md, "Service times"). ``prefill``:
        the prompt forward's time (tokens -> s; default ``self.prefill``; SP mode's or an
        interleaved step's otherwise: their attention runs on the same heads)."""
        prefill = prefill or self.prefill
        T, own, big = n, 0, 0
        for c in chunks:
            k = c[2]
            T += k
            own += k * k + 2 * c[1] * k
            if k > big:
                big = k
        t = prefill(T) - self.pair * (T * T - own)
        floor = prefill(big)
        if t < floor:
            t = floor
        if n:
            ctx = ctx_sum // n
            a = self.attn.get(ctx)
            if a is None:
                if len(self.attn) > _CACHE_LIMIT:
                    self.attn.clear()
                a = self.attn[ctx] = decode_attention_time(self.model, self.gpu, self.tp, ctx, self.params)
            t += n * a
        return t

    def decode_parts(self, n: int, ctx_sum: int, parts: int) -> float:
        key = (n, ctx_sum, parts)
        t = self.dec_p.get(key)
        if t is None:
            if len(self.dec_p) > _CACHE_LIMIT:
                self.dec_p.clear()
            t = self.dec_p[key] = decode_layer_time(self.model, self.gpu, self.tp, n, ctx_sum / n, self.ic,
                                                    self.params, parts)
        return t

    def prefill_parts(self, tokens: int, parts: int) -> float:
        key = (tokens, parts)
        t = self.pre_p.get(key)
        if t is None:
            t = self.pre_p[key] = prefill_layer_time(self.model, self.gpu, self.tp, tokens, self.ic, self.params, parts)
        return t


class _Pipe:
    __slots__ = ("index", "stage_kind", "stage_layers", "kinds", "head", "head_cache", "links", "chain", "delay",
                 "act_bytes", "n_loops", "idle", "parts", "cur", "swap_s", "stage_res", "hosted", "calls", "call_cache")


class Engine:
    def __init__(self, plan: Plan, cluster: Cluster, workload: Workload, params: CostParams,
                 options: EngineOptions = EngineOptions(), dispatcher: Dispatcher | None = None):
        self.model, self.params, self.options, self.workload = plan.model, params, options, workload
        coord = cluster.coordinator_node.name
        kinds: dict = {}
        keys: dict = {}        # resource key -> id
        users: list = []       # resource id -> number of pipeline positions using it
        self.res_names: list = []

        def resource(key, name):
            rid = keys.get(key)
            if rid is None:
                rid = keys[key] = len(users)
                users.append(0)
                self.res_names.append(name)
            users[rid] += 1
            return rid

        def link_key(a, b, p, pos):   # links between nodes are shared; inside a node, per hop
            return (("net", a, b), f"{a}->{b}") if a != b else (("local", p, pos), "")

        self.pipes: list[_Pipe] = []
        for pi, pl in enumerate(plan.pipelines):
            pp = _Pipe()
            pp.index = pi
            nodes = [s.node for s in pl.stages]
            pp.kinds, pp.stage_kind, pp.stage_layers, pp.calls = [], [], [], []
            pp.call_cache = {}
            local_kinds: dict = {}
            for s in pl.stages:
                node = cluster.node(s.node)
                prof = node.gpu.profile_for(self.model.name)
                pp.calls.append(node.gpu if prof is not None and prof.call_ms is not None else None)
                key = (node.gpu, s.tp, node.interconnect, s.shift_sp)
                if key not in kinds:
                    kinds[key] = _Kind(self.model, node.gpu, s.tp, node.interconnect, params, s.shift_sp)
                if key not in local_kinds:
                    local_kinds[key] = len(pp.kinds)
                    pp.kinds.append(kinds[key])
                pp.stage_kind.append(local_kinds[key])
                pp.stage_layers.append(s.num_layers)
            last = cluster.node(nodes[-1])
            pp.head = (last.gpu, pl.stages[-1].tp, pp.kinds[pp.stage_kind[-1]])   # the last stage's kind: its mode
            pp.head_cache = {}
            hops = [(coord, nodes[0])] + list(zip(nodes, nodes[1:])) + [(nodes[-1], coord)]
            pp.links = [cluster.link(a, b) for a, b in hops]
            chain, delay, pp.stage_res = [], [], []
            for i, ((a, b), lk) in enumerate(zip(hops, pp.links)):
                chain.append(resource(*link_key(a, b, pi, i)))
                delay.append(lk.latency)     # propagation: after the link, not holding it
                if i < len(nodes):
                    chain.append(resource(("stage", pi, i), ""))
                    pp.stage_res.append(chain[-1])
                    delay.append(0.0)
            pp.chain, pp.delay = chain, delay
            pp.act_bytes = self.model.activation_bytes_per_token
            # Interleaving: parts a step may be cut into (1: not cut; a single TP-1 stage has
            # nothing to overlap, as the executor decides)
            pp.parts = workload.interleave if splits([s.tp for s in pl.stages]) else 1
            self.pipes.append(pp)
        self.shared = [u > 1 for u in users]
        self.n_res = len(users)
        self._shared_hosts(plan, cluster)
        self.weights = [max(0.0, p.weight) for p in plan.pipelines]
        if options.routing not in ("delay", "weights"):
            raise ValueError(f"routing must be 'delay' or 'weights', got {options.routing!r}")
        self.dispatcher = dispatcher or Dispatcher(self.weights)
        if options.policy not in POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'mlfq', got {options.policy!r}")
        self.mlfq = options.policy == "mlfq"
        self._check_mlfq_options()
        # The schedule: the gateway's (hexplan.serving), from the same plan and workload.
        # A bare plan's batch sizes: choose_batch on the cost model's decode steps, as the gateway
        # chooses on its stages' measured ones.
        self.configs = pipeline_configs(plan, workload, params, cluster, loops=options.loops,
                                        prefill_chunk=options.prefill_chunk, prefill_budget=options.prefill_budget,
                                        batches=estimated_batches(plan, workload, params, cluster))
        for pp, cfg, pl in zip(self.pipes, self.configs, plan.pipelines):
            pp.n_loops = cfg.loops
            # mlfq swap-in: every GPU of a stage brings back its own KV shard (its layers, its KV
            # heads) over its own host link, in parallel with the other GPUs and stages.
            pp.swap_s = [layers * 2 * local_kv_heads(self.model, s.tp) * self.model.dim_head
                         * self.model.bytes_per_param / options.offload_bandwidth
                         for layers, s in zip(pp.stage_layers, pl.stages)]
        self.scheduler = self.new_scheduler()

    def _shared_hosts(self, plan: Plan, cluster: Cluster) -> None:
        """Stages on nodes that share a machine (``Node.host``): each stage resource on one gets
        (host, threads per worker, its workers, the host's stage resources), for ``_hosted_end``."""
        self.host_info: list = [None] * self.n_res
        workers = cluster.workers_by_host(s for pl in plan.pipelines for s in pl.stages)
        members: dict = {}
        for pp, pl in zip(self.pipes, plan.pipelines):
            pp.hosted = False
            for rid, s in zip(pp.stage_res, pl.stages):
                host = cluster.host(cluster.node(s.node).host)
                if host is None:
                    continue
                threads = host.threads(workers[host.name])
                self.host_info[rid] = (host, threads, s.tp, members.setdefault(host.name, []))
                members[host.name].append(rid)
                pp.hosted = True

    def _hosted_end(self, r: int, start: float, d: float, share: float) -> float:
        """When a step of modelled time ``d`` that starts at ``start`` on stage resource ``r``
        (on a shared host) ends, its workers computing for ``share`` of it (``_share``). Alone
        they run ``Host.slowdown`` of their own slower than the profile (a TP stage's ranks share
        the host too); for the time it overlaps steps running on other stages of the host, each
        runs at its slowdown beside the others running then (the overlap cut into pieces where
        one of them ends): this step is lengthened, and so are the others (their ``free`` ends
        move; a HOSTED departure event sees that and waits for the new end). Sets this stage's
        ``hstart`` and ``hshare``; the caller books ``free`` and ``busy`` for this step."""
        host, threads, w, members = self.host_info[r]
        free, hstart, busy, hshare = self.free, self.hstart, self.busy, self.hshare
        me = (w, threads, share)
        m0 = host.slowdown(me)
        dur = d * m0
        end = start + dur
        extra = 0.0
        over = []                      # the other stages' steps this one overlaps: (from, to, stage, its tuple)
        for o in members:
            if o == r:
                continue
            a, b = max(start, hstart[o]), free[o]
            if (end if end < b else b) > a:
                over.append((a, end if end < b else b, o, (self.host_info[o][2], self.host_info[o][1], hshare[o])))
        # cut the overlap where one of the others starts or ends; each piece is slowed by the set
        # running then (with one other step: processor sharing of the pair)
        cuts = sorted({t for a, b, _, _ in over for t in (a, b)})
        grow = dict.fromkeys((o for _, _, o, _ in over), 0.0)
        for t0, t1 in zip(cuts, cuts[1:]):
            on = [(o, other) for a, b, o, other in over if a <= t0 and t1 <= b]
            if not on:
                continue
            extra += (t1 - t0) * (host.slowdown(me, tuple(x for _, x in on)) / m0 - 1.0)
            for o, other in on:
                rest = tuple(x for q, x in on if q != o)
                grow[o] += (t1 - t0) * (host.slowdown(other, rest + (me,)) / host.slowdown(other, rest) - 1.0)
        for o, g in grow.items():      # the others' steps are lengthened too
            b = free[o]
            free[o] = b + g
            if b + g > self.w0 and b < self.w1:
                busy[o] += min(b + g, self.w1) - max(b, self.w0)
        hstart[r] = start
        hshare[r] = share
        return end + extra

    def _share(self, pipe: _Pipe, stage: int, d: float, step) -> float:
        """The compute share of ``step`` on a pipeline's stage on a shared host, which takes it
        ``d`` (modelled, per part): 1, less a TP stage's all-reduces (2 per layer,
        ``allreduce_time``), for which its ranks wait on each other, and its call's own cost
        (``_call_s``), which rank 0 takes alone."""
        tp = self.host_info[pipe.stage_res[stage]][2]
        if tp == 1 or d <= 0.0:
            return 1.0
        kind = pipe.kinds[pipe.stage_kind[stage]]
        tokens = len(step.decode) + sum(c[2] for c in step.prefill)
        parts = min(pipe.parts, len(step.decode) + len(step.prefill))   # as _start cuts it
        comm = pipe.stage_layers[stage] * 2 * allreduce_time(self.model, kind.gpu, tp, tokens / parts, kind.ic,
                                                             self.params)
        comm += self._call_s(pipe, stage, len(step.decode) + len(step.prefill)) / parts   # rank 0 alone
        return max(0.0, 1.0 - comm / d)

    def _call_s(self, pipe: _Pipe, stage: int, seqs: int) -> float:
        """A call's own cost on a pipeline's stage for a step of ``seqs`` sequences (the
        profile's ``call_ms``, ``call_time``; 0 without one), memoised per pipeline."""
        gpu = pipe.calls[stage]
        if gpu is None:
            return 0.0
        c = pipe.call_cache.get((stage, seqs))
        if c is None:
            c = pipe.call_cache[(stage, seqs)] = call_time(self.model, gpu, seqs)
        return c

    def new_scheduler(self) -> Scheduler:
        """A fresh scheduler for a run, configured as the gateway configures its own."""
        o = self.options
        return Scheduler(self.configs, o.policy, self.dispatcher, mlfq_levels=o.mlfq_levels,
                         mlfq_quantum_s=o.mlfq_quantum_s, mlfq_promote_s=o.mlfq_promote_s)

    def _check_mlfq_options(self) -> None:
        o = self.options
        if isinstance(o.mlfq_levels, bool) or not isinstance(o.mlfq_levels, int) or o.mlfq_levels < 1:
            raise ValueError(f"mlfq_levels must be an integer >= 1, got {o.mlfq_levels!r}")
        for name in ("mlfq_quantum_s", "mlfq_promote_s", "offload_bandwidth"):
            v = getattr(o, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a positive number, got {v!r}")

    def prefill_estimate(self, pipe_index: int, prompt: int) -> float:
        """Seconds to prefill a prompt on a pipeline: sum over stages of layers x prefill_layer_time."""
        return self.configs[pipe_index].prefill_s(prompt)

    def join_level(self, pipe_index: int, prompt: int) -> int:
        """The queue a new request with this prompt joins on a pipeline (mlfq skip-join)."""
        return self.scheduler.join_level(pipe_index, prompt)

    # ---- one run ------------------------------------------------------------------------
    def run(self, stream: RequestStream, window: tuple[float, float], seed: int = 0) -> EngineStats:
        sched = self.scheduler = self.new_scheduler()   # a fresh one per run
        for pipe in self.pipes:
            pipe.idle = list(range(pipe.n_loops))   # a heap: the lowest idle loop is woken first
            pipe.cur = [None] * pipe.n_loops        # each loop's step in flight
        self.free = [0.0] * self.n_res
        self.hstart = [0.0] * self.n_res    # when the step on a shared host's stage started
        self.hshare = [1.0] * self.n_res    # and its compute share (_share)
        self.busy = [0.0] * self.n_res
        self.heap: list = []
        self.seq = 0
        self.w0, self.w1 = window
        self.stream = stream
        self.prompt = sched.prompt
        self.arrival: list[float] = []
        self.first: list[float] = []
        self.output = sched.out         # output tokens (the scheduler's max_new_tokens; 0: prefill-only)
        st = self.stats = EngineStats(window=window, policy=self.options.policy)
        n = len(self.pipes)
        st.pipe_tokens, st.pipe_completed, st.pipe_routed = [0] * n, [0] * n, [0] * n
        self.in_system = 0
        self.last_t = 0.0
        cum = list(accumulate(self.weights))
        total = cum[-1]
        route = random.Random(f"{seed}:routing")
        by_delay = self.options.routing == "delay"
        horizon = stream.horizon if stream.horizon > 0 else math.inf

        nxt = stream.next()
        if nxt is not None:
            self._push(nxt[0], ARRIVAL, nxt, None)
        heap, pipes = self.heap, self.pipes
        pop = heapq.heappop
        add, fits = sched.add, sched.fits
        now = 0.0
        while heap:
            ev = pop(heap)
            now = ev[0]
            if now > horizon:
                now = horizon
                break
            code = ev[2]
            if code == STEP_DONE:
                self._step_done(ev[3], ev[4], now)
            elif code == RESUME:
                pipe, g, svc, last = ev[3]
                self._walk(pipe, g, svc, ev[4], now, now, last)
            elif code == HOSTED:
                # a step leaving a shared host's stage: on, unless a later step on the host
                # lengthened it (then leave at its new end)
                pipe, g, svc, last, r, start = ev[3]
                if self.hstart[r] == start and self.free[r] > now:
                    self._push(self.free[r], HOSTED, ev[3], ev[4])
                else:
                    self._walk(pipe, g, svc, ev[4], now, now, last)
            else:
                t, p, o = ev[3]
                nxt = stream.next()
                if nxt is not None:
                    self._push(nxt[0], ARRIVAL, nxt, None)
                st.arrived += 1
                if self.w0 <= now <= self.w1:
                    st.arrived_in_window += 1
                if not fits(p, o):
                    st.rejected += 1
                    continue
                self.arrival.append(t)
                self.first.append(math.nan)
                # o == 0: a prefill-only request (scoring, embeddings), as the gateway's Prefill
                pi = None if by_delay else min(bisect_right(cum, route.random() * total), n - 1)
                r = add(p, o, now, o == 0, pi)
                pi = sched.pipe_of[r]
                st.pipe_routed[pi] += 1
                self._count(now, +1)
                self._wake(pipes[pi], now)
        if horizon < math.inf:
            now = horizon          # the window runs to the end of the traffic, idle or not
        st.end_time = now
        st.truncated = stream.truncated
        st.unfinished = self.in_system
        self._count(now, 0)
        st.window = (self.w0, min(self.w1, now))
        for pipe in pipes:
            st.stage_busy.append([self.busy[pipe.chain[2 * i + 1]] for i in range(len(pipe.stage_layers))])
        for rid, name in enumerate(self.res_names):
            if name:
                st.link_busy[name] = self.busy[rid]
        st.offloads, st.swap_ins, st.preemptions = sched.offloads, sched.swap_ins, sched.preemptions
        st.demotions, st.promotions = sched.demotions, sched.promotions
        return st

    def step_service(self, step, prompts, pipeline: int = 0) -> list:
        """Each stage's modelled time for ``step`` on its own, as ``_service`` books it (no queue,
        no shared host, links left out): [(stage time s, of which the call's own cost s)], for
        tools that set a measured step beside the model (bench/fidelity_bench.py). ``prompts``:
        the prompt length of each sequence id that the step's prefill chunks name."""
        pipe = self.pipes[pipeline]
        saved = (getattr(self, "prompt", None), getattr(self, "stats", None))
        self.prompt, self.stats = prompts, EngineStats(window=(0.0, 0.0))
        try:
            parts = min(pipe.parts, step.size)
            _, unit = self._service(pipe, step, parts)
        finally:
            self.prompt, self.stats = saved
        return [(unit[2 * i] * parts, self._call_s(pipe, i, step.size)) for i in range(len(pipe.stage_layers))]

    def _push(self, t, code, a, b):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, code, a, b))

    def _count(self, now: float, delta: int) -> None:
        """Requests in the system: integrate the count over the window (Little's law)."""
        a = min(max(self.last_t, self.w0), self.w1)
        b = min(max(now, self.w0), self.w1)
        self.stats.in_system_area += self.in_system * (b - a)
        self.last_t = now
        self.in_system += delta

    def _wake(self, pipe: _Pipe, now: float) -> None:
        idle, runnable, i = pipe.idle, self.scheduler.runnable, pipe.index
        while idle and runnable(i):
            g = heapq.heappop(idle)
            if not self._start(pipe, g, now):
                break

    # ---- a step -------------------------------------------------------------------------
    def _start(self, pipe: _Pipe, g: int, now: float) -> bool:
        """Ask the scheduler for loop g's next step and send it down the pipeline; False when
        it has nothing to run."""
        step = self.scheduler.schedule(now, pipe.index, g)
        if step is None or not (step.decode or step.prefill):
            heapq.heappush(pipe.idle, g)
            return False
        pipe.cur[g] = step
        parts = min(pipe.parts, len(step.decode) + len(step.prefill))
        first, unit = self._service(pipe, step, parts)
        if parts == 1:
            self._walk(pipe, g, [first] + unit, 0, now, now)
            return True
        # Every part arrives at the first stage with the token ids (the others take no time on
        # the first link), and the parts walk in order, so FIFO order holds at every server.
        for j in range(parts):
            self._walk(pipe, g, [first if j == 0 else 0.0] + unit, 0, now, now, j == parts - 1)
        return True

    def _service(self, pipe: _Pipe, step, parts: int) -> tuple:
        """Service times of a step: (the first link's, [stage 0, link, stage 1, ..., last stage,
        link back] of one part). Stage s: l_s x (one decode step of the step's decoding sequences
        at their mean context + each prompt chunk's share of its prompt's prefill) + the call's
        own cost for the step's sequences (profile ``call_ms``) (+ the LM head on the last stage,
        + mlfq's swap-in of restored KV); links: the bytes over bandwidth
        (latency is added after the link: pipe.delay). In ``parts`` > 1 parts (interleaving),
        each part takes 1/parts of the step's interleaved stage time (cost model, p parts: the
        weights read p times, TP all-reduces hidden under compute) and of its bytes."""
        n_dec = len(step.decode)
        chunks = step.prefill
        nlog = n_dec + len(chunks)   # the last stage's LM head runs on every chunk's last token (the
        # executor's _finish_part), also a prompt's chunks before its last, whose logits go unused
        swap_tok = step.restored_tokens
        tokens_in = n_dec
        for c in chunks:
            tokens_in += c[2]
        per_layer = self._layer_times(pipe, n_dec, step.decode_context, chunks, parts, tokens_in)
        links = pipe.links
        first = send_time(TOKEN_ID_BYTES * tokens_in, links[0].bandwidth, 0.0)
        last = len(pipe.stage_layers) - 1
        act = tokens_in * pipe.act_bytes
        unit = []
        seqs = n_dec + len(chunks)
        for i, layers in enumerate(pipe.stage_layers):
            t = layers * per_layer[pipe.stage_kind[i]] + self._call_s(pipe, i, seqs)   # once per stage
            if swap_tok:
                t += swap_tok * pipe.swap_s[i]
            if i == last:
                gpu, tp, kind = pipe.head
                sp = kind.sp if kind.sp_mode(tokens_in) else 1
                key = (nlog, parts, sp)
                h = pipe.head_cache.get(key)
                if h is None:
                    h = pipe.head_cache[key] = lm_head_time(self.model, gpu, tp, nlog, self.params, parts, sp)
                unit.append((t + h) / parts)
                unit.append(send_time(TOKEN_ID_BYTES * nlog / parts, links[i + 1].bandwidth, 0.0))
            else:
                unit.append(t / parts)
                unit.append(send_time(act / parts, links[i + 1].bandwidth, 0.0))
        return first, unit

    def _layer_times(self, pipe: _Pipe, n_dec: int, ctx_sum: int, chunks, parts: int = 1,
                     step_tokens: int = 0) -> list:
        """Per-layer time of a step on each kind of stage of the pipeline: one decode step of
        the ``n_dec`` decoding sequences at their mean context; with (request, start, tokens,
        last) prompt chunks, the larger of that plus each chunk's share of its prompt's prefill
        (tokens / prompt tokens: the planner's accounting, chunking spreads a prompt's cost)
        less the step's fixed cost, which the step pays once (``step_fixed_time``: a measured
        prefill table's intercept; with no decodes the step pays it itself), and the step as
        the executor runs it (``_Kind.mixed``: one pass of the products over all its tokens,
        each chunk's and each decode's attention; docs/simulator.md, "Service times"); in
        ``parts`` parts when interleaved.
        A shifted stage (Shift Parallelism) runs the step in SP mode when its ``step_tokens``
        (decode tokens + prompt chunk tokens) are above its threshold (``shift_mode``, the rule
        the executor's workers apply): the same sum with the SP-mode times, not interleaved."""
        prompt = self.prompt
        per_layer = []
        modes = self.stats.shift_steps
        for kind in pipe.kinds:
            sp = False
            if kind.sp > 1:
                sp = kind.sp_mode(step_tokens)
                mode = SP_MODE if sp else TP_MODE
                modes[mode] = modes.get(mode, 0) + 1
            fixed = 0.0
            if sp:
                t = kind.decode_sp(n_dec, ctx_sum) if n_dec else 0.0
                pre = kind.prefill_sp
            elif parts == 1:
                fixed = kind.fixed if chunks else 0.0
                t = kind.decode(n_dec, ctx_sum) if n_dec else fixed
                pre = kind.prefill
            else:
                t = kind.decode_parts(n_dec, ctx_sum, parts) if n_dec else 0.0
                pre = functools.partial(kind.prefill_parts, parts=parts)
            if chunks:
                for c in chunks:   # each chunk's share of its prompt's prefill, less the step's fixed cost
                    p = prompt[c[0]]
                    x = pre(p) - fixed
                    if x > 0.0:
                        t += x if c[2] == p else x * c[2] / p
                fused = kind.mixed(n_dec, ctx_sum, chunks, pre)
                if fused > t:
                    t = fused
            per_layer.append(t)
        return per_layer

    def _walk(self, pipe: _Pipe, g: int, svc: list, i: int, t: float, now: float, last: bool = True) -> None:
        """Serve the step (or one part of it) from chain position i (arriving at t) until a
        shared link in the future or the end of the pipeline; the step is done when its
        ``last`` part is."""
        chain, delay, free, busy, shared = pipe.chain, pipe.delay, self.free, self.busy, self.shared
        hosted = self.host_info if pipe.hosted else None
        w0, w1 = self.w0, self.w1
        n = len(chain)
        while i < n:
            r = chain[i]
            if t > now and shared[r]:
                self._push(t, RESUME, (pipe, g, svc, last), i)
                return
            if hosted is not None and hosted[r] is not None:
                # A stage on a shared host serves one step at a time, booked when it starts (a
                # step that runs beside it later can still lengthen it: ``_hosted_end``).
                if t > now or free[r] > now:
                    self._push(t if t > free[r] else free[r], RESUME, (pipe, g, svc, last), i)
                    return
                end = self._hosted_end(r, now, svc[i], self._share(pipe, (i - 1) // 2, svc[i], pipe.cur[g]))
                free[r] = end
                if end > w0 and now < w1:
                    busy[r] += (end if end < w1 else w1) - (now if now > w0 else w0)
                self._push(end, HOSTED, (pipe, g, svc, last, r, now), i + 1)
                return
            f = free[r]
            start = t if t > f else f
            end = start + svc[i]
            free[r] = end
            if end > w0 and start < w1:
                busy[r] += (end if end < w1 else w1) - (start if start > w0 else w0)
            t = end + delay[i]
            i += 1
        if last:
            self._push(t, STEP_DONE, pipe, g)

    def _step_done(self, pipe: _Pipe, g: int, now: float) -> None:
        st = self.stats
        step = pipe.cur[g]
        pipe.cur[g] = None
        done = self.scheduler.update(step, DONE_OK, now)
        st.steps += 1
        in_window = self.w0 <= now <= self.w1
        if in_window:
            ntok = step.logits - len(step.dropped)
            st.tokens_in_window += ntok
            st.pipe_tokens[pipe.index] += ntok
        first = self.first
        for c in step.prefill:
            if c[3]:
                first[c[0]] = now
        for r in done:
            self._complete(pipe, r, now, in_window)
        self._start(pipe, g, now)
        if pipe.idle and self.scheduler.runnable(pipe.index):
            self._wake(pipe, now)

    def _complete(self, pipe: _Pipe, r: int, now: float, in_window: bool) -> None:
        self._count(now, -1)
        if in_window:
            st = self.stats
            a, f, o = self.arrival[r], self.first[r], self.output[r]
            st.ttft.append(f - a)
            st.e2e.append(now - a)
            st.tpot.append((now - f) / (o - 1) if o > 1 else math.nan)
            st.request.append(r)
            st.pipe_completed[pipe.index] += 1
