"""Predicted throughput and latency of pipelines whose layers are already placed.

For one pipeline (stages in order, coordinator C at both ends):

    TPOT  = hop(C -> s1, B token ids) + sum_s l_s * decode_layer_s + sum_hops hop(B activations)
            + LM head(B tokens) + hop(s_k -> C, B token ids)
    TTFT  = hop(C -> s1, P token ids) + sum_s l_s * prefill_layer_s + sum_hops hop(P activations)
            + LM head(1 token) + hop(s_k -> C, one token id)
    T     = min( min_s 1 / (l_s / layer_rate_s [+ LM head per token, last stage]),   # compute
                 min_hops link capacity / sharing,    # activation bytes per output token
                 coordinator link capacities,         # token ids
                 concurrency / ROUND )                # Little's law: in-flight sequences / round trip
    ROUND = TPOT + (B / O) * TTFT      # a micro-batch's step also carries the prefill of the B/O
                                       # requests that replace its finished ones

The plan's throughput is the max-flow over these pipelines (hexplan.solver.routing), which for
disjoint chains is the sum of their T.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

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

    def get(self, gpu, tp: int, interconnect: float) -> StageCost:
        key = (gpu.name, gpu, tp, interconnect)
        sc = self._cache.get(key)
        if sc is None:
            sc = self._cache[key] = stage_cost(self.model, gpu, tp, self.workload, interconnect, self.params)
        return sc


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


def pipeline_overheads(cluster: Cluster, costs: CostCache, nodes, tps,
                       shares: Counter | None = None) -> Overheads:
    model, w = costs.model, costs.workload
    coord = cluster.coordinator_node.name
    sc = []
    for n, tp in zip(nodes, tps):
        node = cluster.node(n)
        sc.append(costs.get(node.gpu, tp, node.interconnect))
    link_in, link_out = cluster.link(coord, nodes[0]), cluster.link(nodes[-1], coord)
    hops = [cluster.link(a, b) for a, b in zip(nodes, nodes[1:])]
    tpot = (send_time(w.batch_size * TOKEN_ID_BYTES, link_in.bandwidth, link_in.latency)
            + sum(hop_decode_time(model, w, h.bandwidth, h.latency) for h in hops)
            + sc[-1].head_decode_s
            + send_time(w.batch_size * TOKEN_ID_BYTES, link_out.bandwidth, link_out.latency))
    ttft = (send_time(w.prompt_tokens * TOKEN_ID_BYTES, link_in.bandwidth, link_in.latency)
            + sum(hop_prefill_time(model, w, h.bandwidth, h.latency) for h in hops)
            + sc[-1].head_prefill_s
            + send_time(TOKEN_ID_BYTES, link_out.bandwidth, link_out.latency))
    limits = []
    for h, a, b in zip(hops, nodes, nodes[1:]):
        share = (shares or {}).get((a, b), 1) if a != b else 1
        limits.append((link_token_capacity(model, w, h.bandwidth) / max(1, share), f"link {a}->{b}"))
    limits.append((coordinator_token_capacity(w, link_in.bandwidth), "coordinator link in"))
    limits.append((coordinator_out_capacity(link_out.bandwidth), "coordinator link out"))
    return Overheads(tuple(sc), tpot, ttft, tuple(limits))


def evaluate_pipeline(cluster: Cluster, costs: CostCache, nodes, tps, layer_counts,
                      shares: Counter | None = None) -> PipelineMetrics:
    """Metrics of one pipeline: ``nodes[i]`` hosts stage i with TP ``tps[i]`` and ``layer_counts[i]`` layers."""
    w = costs.workload
    k = len(nodes)
    ov = pipeline_overheads(cluster, costs, nodes, tps, shares)
    sc = ov.costs
    tpot = ov.tpot_fixed_s + sum(l * s.decode_layer_s for l, s in zip(layer_counts, sc))
    ttft = ov.ttft_fixed_s + sum(l * s.prefill_layer_s for l, s in zip(layer_counts, sc))
    round_s = round_trip(w, tpot, ttft)
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
    return [evaluate_pipeline(cluster, costs, [s.node for s in p.stages], [s.tp for s in p.stages],
                              [s.num_layers for s in p.stages], shares) for p in plan_pipelines]


def weighted_mean(values, weights) -> float:
    tot = sum(weights)
    if tot <= 0:
        return math.nan
    return sum(v * w for v, w in zip(values, weights)) / tot
