"""Predicted throughput and latency of pipelines whose layers are already placed.

For one pipeline (stages in order, coordinator C at both ends):

    TPOT  = hop(C -> s1, B token ids) + sum_s l_s * decode_layer_s + sum_hops hop(B activations)
            + LM head(B tokens) + sum_s call(B) + hop(s_k -> C, B token ids)
    TTFT  = hop(C -> s1, P token ids) + sum_s l_s * prefill_layer_s + sum_hops hop(P activations)
            + LM head(1 token) + sum_s call(1) + hop(s_k -> C, one token id)
    T     = min( min_s 1 / (l_s / layer_rate_s [+ LM head per token, last stage] + call per token),  # compute
                 min_hops link capacity / sharing,    # activation bytes per output token
                 coordinator link capacities,         # token ids
                 concurrency / ROUND )                # Little's law: in-flight sequences / round trip
    ROUND = TPOT + (B / O) * TTFT      # a micro-batch's step also carries the prefill of the B/O
                                       # requests that replace its finished ones

call(n) is a call's own cost on every stage a step visits, from the profile's ``call_ms`` table
(costmodel.call_time; 0 without one).

The plan's throughput is the max-flow over these pipelines (hexplan.solver.routing), which for
disjoint chains is the sum of their T.

Interleaving (Workload.interleave N > 1; docs/cost-model.md, section 13): the stage times are the
cost model's N-part ones, and a step flows through the pipeline as N parts after the first stage
has its token ids (a flow shop of identical jobs): for per-server times u_i of the whole step
(stages, and link transfers without their latency) and latencies lat_i,
    time = coordinator link in + sum_i u_i / N + sum_i lat_i + (N - 1) / N * max_i u_i
for TPOT (a decode step) and ROUND (a decode step with its B/O prompts' share); TTFT is a prompt
alone, one chunk, which the executor does not cut. A pipeline of one TP-1 stage has nothing to
overlap and is not interleaved.

Shift Parallelism (a stage with ``shift: {sp: S}``; docs/cost-model.md, section 14): the stage's
costs are ``stage_cost(..., shift_sp=S)``: SP mode's weight shards in its memory, a decode step of B
sequences and a prompt of P tokens each in the mode the threshold rule gives.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from .cluster import Cluster
from .costmodel import (DEFAULT_PARAMS, TOKEN_ID_BYTES, CostParams, StageCost, Workload,
                        coordinator_out_capacity, coordinator_token_capacity, hop_decode_time, hop_prefill_time,
                        link_token_capacity, send_time, stage_cost)
from .models import ModelSpec


@dataclass(frozen=True)
class PipelineMetrics:
    throughput: float          # output tokens/s
    tpot_s: float              # time per output token of a sequence, no queueing
    ttft_s: float              # time to first token, no queueing
    bottleneck: str            # what limits the throughput
    stage_capacity: tuple[float, ...]
    memory_per_gpu: tuple[float, ...]   # bytes used per GPU of each stage
    memory_limit: tuple[float, ...]     # bytes usable per GPU of each stage
    fits: bool
    round_s: float = 0.0       # one micro-batch's round trip, with its share of prefill work


class CostCache:
    """Memoises StageCost per (GPU type, TP degree, interconnect) for one model and workload."""

    def __init__(self, model: ModelSpec, workload: Workload, params: CostParams = DEFAULT_PARAMS):
        self.model, self.workload, self.params = model, workload, params
        self._cache: dict = {}

    def get(self, gpu, tp: int, interconnect: float, split: bool = True, shift_sp: int = 1) -> StageCost:
        """``split`` False: the group's costs without interleaving (a pipeline of one TP-1 stage,
        which the executor does not cut into parts). ``shift_sp`` > 1: a shifted stage (Shift
        Parallelism: SP mode's weight shards, each step in the mode of the threshold rule)."""
        key = (gpu.name, gpu, tp, interconnect) + ((shift_sp,) if shift_sp > 1 else ())
        if not split and self.workload.interleave > 1:
            key += ("whole",)
            sc = self._cache.get(key)
            if sc is None:
                sc = self._cache[key] = stage_cost(self.model, gpu, tp, replace(self.workload, interleave=1),
                                                   interconnect, self.params, shift_sp)
            return sc
        sc = self._cache.get(key)
        if sc is None:
            sc = self._cache[key] = stage_cost(self.model, gpu, tp, self.workload, interconnect, self.params,
                                               shift_sp)
        return sc


def splits(tps) -> bool:
    """Whether interleaving cuts this pipeline's steps: it has a next stage to send parts to or a
    TP group whose all-reduces can overlap (as the executor decides)."""
    return len(tps) > 1 or tps[0] > 1


def round_trip(w, tpot_s: float, ttft_s: float) -> float:
    """A micro-batch's round trip through the pipeline in steady state: one decode step of its
    B sequences plus, on average, the prefill of the B/O requests that replace finished ones
    (continuous batching puts both in the same steps). Little's law: T <= concurrency / round."""
    return tpot_s + w.batch_size / w.output_tokens * ttft_s


def hop_shares(cluster: Cluster, pipelines_nodes) -> Counter:
    """How many pipeline hops use each ordered pair of distinct nodes (they share its bandwidth)."""
    c: Counter = Counter()
    for nodes in pipelines_nodes:
        for a, b in zip(nodes, nodes[1:]):
            if a != b:
                c[(a, b)] += 1
    return c


@dataclass(frozen=True)
class Overheads:
    """What a pipeline costs besides its layers: fixed latency terms and link limits."""

    costs: tuple[StageCost, ...]
    tpot_fixed_s: float       # coordinator links + activation hops + LM head, per decode round
    ttft_fixed_s: float       # coordinator links + activation hops + LM head, per prompt
    limits: tuple[tuple[float, str], ...]  # (output tokens/s, what) for links
    parts: int = 1            # interleaving: parts a step flows through the pipeline in (1: off)
    # Interleaving only (parts > 1), for the flow-shop times: the coordinator link in (whole
    # message, latency included); per link after the first stage (hops, then the link back to
    # the coordinator) its latency and its transfer time for a decode step and for a prompt.
    in_s: tuple[float, float] = (0.0, 0.0)               # (decode step, prompt)
    lat_s: tuple[float, ...] = ()
    xfer_s: tuple[tuple[float, float], ...] = ()         # (decode step, prompt) per link


def flow_time(first: float, units, lags: float, parts: int) -> float:
    """A step cut into ``parts`` equal parts once its first message has arrived, through servers
    in a row with whole-step service times ``units`` (each part takes units / parts) and
    latencies adding up to ``lags``: the last part is back after the first server's pipeline
    fill plus (parts - 1) parts at the slowest server (a flow shop of identical jobs)."""
    return first + sum(units) / parts + lags + (parts - 1) / parts * max(units)


def pipeline_latencies(ov: Overheads, w: Workload, layer_counts) -> tuple[float, float, float]:
    """(TPOT, TTFT, ROUND) of a pipeline with these layers, no queueing (module docstring)."""
    sc = ov.costs
    if ov.parts == 1:
        tpot = ov.tpot_fixed_s + sum(l * s.decode_layer_s for l, s in zip(layer_counts, sc))
        ttft = ov.ttft_fixed_s + sum(l * s.prefill_layer_s for l, s in zip(layer_counts, sc))
        return tpot, ttft, round_trip(w, tpot, ttft)
    share = w.batch_size / w.output_tokens
    dec, rnd = [], []
    k = len(sc)
    for i, (l, s) in enumerate(zip(layer_counts, sc)):
        d = l * s.decode_layer_s + s.call_decode_s
        r = l * (s.decode_layer_s + share * s.prefill_layer_s) + s.call_decode_s + share * s.call_prefill_s
        if i == k - 1:
            d += s.head_decode_s
            r += s.head_decode_s + share * s.head_prefill_s
        x_dec, x_pre = ov.xfer_s[i]
        dec += [d, x_dec]
        rnd += [r, x_dec + share * x_pre]
    lags = sum(ov.lat_s)
    tpot = flow_time(ov.in_s[0], dec, lags, ov.parts)
    ttft = ov.ttft_fixed_s + sum(l * s.ttft_layer_s for l, s in zip(layer_counts, sc))
    # The round: a decode step carrying the B/O prompts' share (latencies counted 1 + B/O times,
    # as TPOT + (B/O) TTFT does without interleaving).
    round_s = flow_time(ov.in_s[0] + share * ov.in_s[1], rnd, (1 + share) * lags, ov.parts)
    return tpot, ttft, round_s


def host_slowdowns(cluster: Cluster, nodes, tps, beside=()) -> tuple[list[float], list[float]] | None:
    """Each stage's slowdown on a machine it shares with other nodes' workers (``Node.host``,
    ``Host.slowdown``; docs/cluster-format.md, "Shared machines"): (alone, beside every other
    stage on its host computing all the time), 1.0 for a stage on a machine of its own; None
    when no stage is on a shared one. ``beside``: (node, TP) of the stages of the plan's other
    pipelines. Each worker gets max(1, cores // workers on the host) threads, as `hexplan
    launch` gives them. The second is the steady state the throughput is rated at: at capacity
    every stage computes nearly all the time (a TP stage's all-reduce waits, during which the
    simulator lets others have its cores, are counted as compute here)."""
    if not cluster.hosts:
        return None
    hosts = [cluster.host(cluster.node(n).host) for n in nodes]
    if all(h is None for h in hosts):
        return None
    everyone = list(zip(nodes, tps)) + list(beside)
    workers = cluster.workers_by_host(_Placed(n, tp) for n, tp in everyone)
    alone, busy = [], []
    for i, (tp, h) in enumerate(zip(tps, hosts)):
        if h is None:
            alone.append(1.0)
            busy.append(1.0)
            continue
        threads = h.threads(workers[h.name])
        others = tuple((t, threads, 1.0) for j, (m, t) in enumerate(everyone)
                       if j != i and cluster.node(m).host == h.name)
        alone.append(h.slowdown((tp, threads, 1.0)))
        busy.append(h.slowdown((tp, threads, 1.0), others))
    return alone, busy


@dataclass(frozen=True)
class _Placed:          # what Cluster.workers_by_host reads of a stage
    node: str
    tp: int


def pipeline_overheads(cluster: Cluster, costs: CostCache, nodes, tps,
                       shares: Counter | None = None, shifts=None, slow=None) -> Overheads:
    """``shifts``: each stage's Shift Parallelism SP ranks (None: no stage is shifted). ``slow``:
    each stage's time multiplier (a shared host's, ``host_slowdowns``; None: 1)."""
    model, w = costs.model, costs.workload
    coord = cluster.coordinator_node.name
    sc = []
    split = splits(tps)
    for n, tp, sp in zip(nodes, tps, shifts or [1] * len(tps)):
        node = cluster.node(n)
        sc.append(costs.get(node.gpu, tp, node.interconnect, split, sp))
    if slow is not None:
        sc = [s.slowed(f) for s, f in zip(sc, slow)]
    link_in, link_out = cluster.link(coord, nodes[0]), cluster.link(nodes[-1], coord)
    hops = [cluster.link(a, b) for a, b in zip(nodes, nodes[1:])]
    tpot = (send_time(w.batch_size * TOKEN_ID_BYTES, link_in.bandwidth, link_in.latency)
            + sum(hop_decode_time(model, w, h.bandwidth, h.latency) for h in hops)
            + sc[-1].head_decode_s + sum(s.call_decode_s for s in sc)
            + send_time(w.batch_size * TOKEN_ID_BYTES, link_out.bandwidth, link_out.latency))
    ttft = (send_time(w.prompt_tokens * TOKEN_ID_BYTES, link_in.bandwidth, link_in.latency)
            + sum(hop_prefill_time(model, w, h.bandwidth, h.latency) for h in hops)
            + sc[-1].head_prefill_s + sum(s.call_prefill_s for s in sc)
            + send_time(TOKEN_ID_BYTES, link_out.bandwidth, link_out.latency))
    limits = []
    for h, a, b in zip(hops, nodes, nodes[1:]):
        share = (shares or {}).get((a, b), 1) if a != b else 1
        limits.append((link_token_capacity(model, w, h.bandwidth) / max(1, share), f"link {a}->{b}"))
    limits.append((coordinator_token_capacity(w, link_in.bandwidth), "coordinator link in"))
    limits.append((coordinator_out_capacity(link_out.bandwidth), "coordinator link out"))
    parts = sc[0].parts
    if parts == 1:
        return Overheads(tuple(sc), tpot, ttft, tuple(limits))
    act = model.activation_bytes_per_token
    ins = (send_time(w.batch_size * TOKEN_ID_BYTES, link_in.bandwidth, link_in.latency),
           send_time(w.prompt_tokens * TOKEN_ID_BYTES, link_in.bandwidth, link_in.latency))
    outs = hops + [link_out]
    xfer = [(w.batch_size * act / h.bandwidth, w.prompt_tokens * act / h.bandwidth) for h in hops]
    xfer.append((w.batch_size * TOKEN_ID_BYTES / link_out.bandwidth, TOKEN_ID_BYTES / link_out.bandwidth))
    return Overheads(tuple(sc), tpot, ttft, tuple(limits), parts, ins, tuple(h.latency for h in outs), tuple(xfer))


def evaluate_pipeline(cluster: Cluster, costs: CostCache, nodes, tps, layer_counts,
                      shares: Counter | None = None, shifts=None, beside=()) -> PipelineMetrics:
    """Metrics of one pipeline: ``nodes[i]`` hosts stage i with TP ``tps[i]`` and ``layer_counts[i]``
    layers (and, with ``shifts``, Shift Parallelism's SP ranks ``shifts[i]``; 1: not shifted).
    Stages on a shared machine (``host_slowdowns``; ``beside``: the other pipelines' (node, TP))
    are rated at their slowdown with every stage there computing, and TPOT and TTFT, a request
    alone, at their slowdown alone."""
    w = costs.workload
    k = len(nodes)
    slow = host_slowdowns(cluster, nodes, tps, beside)
    ov = pipeline_overheads(cluster, costs, nodes, tps, shares, shifts, None if slow is None else slow[1])
    sc = ov.costs
    tpot, ttft, round_s = pipeline_latencies(ov, w, layer_counts)
    if slow is not None:
        tpot, ttft, _ = pipeline_latencies(pipeline_overheads(cluster, costs, nodes, tps, shares, shifts, slow[0]),
                                           w, layer_counts)
    limits = [(s.capacity(l, last=(i == k - 1)), f"stage {i} compute") for i, (l, s) in enumerate(zip(layer_counts, sc))]
    limits += list(ov.limits)
    limits.append((w.concurrency / round_s, "concurrency / round trip"))
    throughput, bottleneck = min(limits, key=lambda x: x[0])

    mem, lim = [], []
    for i, (l, s) in enumerate(zip(layer_counts, sc)):
        mem.append(s.memory_used(l, first=(i == 0), last=(i == k - 1)))
        lim.append(s.usable_memory)
    fits = all(m <= u * (1 + 1e-9) for m, u in zip(mem, lim)) and all(l > 0 for l in layer_counts)
    return PipelineMetrics(throughput if fits else 0.0, tpot, ttft, bottleneck,
                           tuple(x[0] for x in limits[:k]), tuple(mem), tuple(lim), fits, round_s)


def evaluate_plan_pipelines(cluster: Cluster, costs: CostCache, plan_pipelines) -> list[PipelineMetrics]:
    """Metrics for each pipeline of a plan (stages carry node, tp and layer ranges)."""
    node_lists = [[s.node for s in p.stages] for p in plan_pipelines]
    shares = hop_shares(cluster, node_lists)
    placed = [[(s.node, s.tp) for s in p.stages] for p in plan_pipelines]
    return [evaluate_pipeline(cluster, costs, [s.node for s in p.stages], [s.tp for s in p.stages],
                              [s.num_layers for s in p.stages], shares, stage_shifts(p),
                              [x for j, q in enumerate(placed) if j != i for x in q])
            for i, p in enumerate(plan_pipelines)]


def stage_shifts(pipeline) -> list[int] | None:
    """Each stage's Shift Parallelism SP ranks (``Stage.shift_sp``), None when none is shifted."""
    sps = [getattr(s, "shift_sp", 1) for s in pipeline.stages]
    return sps if any(sp > 1 for sp in sps) else None


def weighted_mean(values, weights) -> float:
    tot = sum(weights)
    if tot <= 0:
        return math.nan
    return sum(v * w for v, w in zip(values, weights)) / tot
