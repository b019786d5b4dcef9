"""Order a pipeline's groups and give them integer layer counts that maximise its throughput.

For a fixed order, throughput T is feasible when integer layers l_s exist with
    1 <= l_s <= min(max_layers_s, floor(rate_s / T)),   sum_s l_s = L,
    (last stage: floor(rate * (1/T - LM head seconds per token)))
    T * ROUND(l) <= concurrency,   T <= link limits,   TPOT(l) <= SLO,   TTFT(l) <= SLO,
where ROUND(l) = fixed + sum_s l_s * (decode_s + B/O * prefill_s) (hexplan.evaluate.round_trip)
and TPOT(l) = fixed + sum_s l_s * decode_s. For a given T the layers minimising ROUND fill the
stages with the smallest per-layer cost first (a greedy that is exact for unit-weight items), so
feasibility is checked in O(k log k) and T* is found by bisection (feasibility is monotone in T).
With interleaving (parts > 1) ROUND and TPOT are flow-shop times (hexplan.evaluate.flow_time:
sum / parts + (parts - 1) / parts * the slowest server), checked exactly for the greedy's layers;
the greedy minimises their sum term, so it is then a good rather than an exact choice.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from hexplan.evaluate import (PipelineMetrics, evaluate_pipeline, hop_shares, pipeline_latencies,
                              pipeline_overheads)

from .problem import Problem


@dataclass(frozen=True)
class ChainResult:
    slots: tuple            # ordered (node, tp)
    layers: tuple[int, ...]
    metrics: PipelineMetrics

    @property
    def throughput(self) -> float:
        return self.metrics.throughput


def order_slots(problem: Problem, slots) -> list:
    """Stages on one node stay adjacent (widest TP first); nodes are ordered to make the round
    trip coordinator -> ... -> coordinator cheap (nearest neighbour, then 2-opt)."""
    by_node: dict = {}
    for s in slots:
        by_node.setdefault(s[0], []).append(s)
    nodes = sorted(by_node)
    cl = problem.cluster
    coord = cl.coordinator_node.name
    w, m = problem.workload, problem.model
    act = (w.prompt_tokens + w.batch_size) * m.activation_bytes_per_token

    def cost(a, b):
        if a == b:
            return 0.0
        lk = cl.link(a, b)
        return 2 * lk.latency + act / lk.bandwidth

    if len(nodes) > 1:
        route, rest, cur = [], set(nodes), coord
        while rest:
            nxt = min(sorted(rest), key=lambda n: cost(cur, n))
            route.append(nxt)
            rest.remove(nxt)
            cur = nxt

        def total(r):
            return cost(coord, r[0]) + sum(cost(a, b) for a, b in zip(r, r[1:])) + cost(r[-1], coord)

        best = total(route)
        improved = len(route) <= 40
        while improved:
            improved = False
            for i, j in itertools.combinations(range(len(route)), 2):
                cand = route[:i] + route[i:j + 1][::-1] + route[j + 1:]
                c = total(cand)
                if c < best - 1e-12:
                    route, best, improved = cand, c, True
        nodes = route
    out = []
    for n in nodes:
        out += sorted(by_node[n], key=lambda s: -s[1])
    return out


def candidate_orders(problem: Problem, base) -> list:
    """Orders worth trying for one pipeline. Which stage pays for the embedding (first) and the
    LM head (last) matters as much as the network, so besides the network-cheapest order
    ``base`` this tries its reverse, every node moved to the front or the back (every
    permutation of up to 4 nodes; per kind of node beyond 8), and inside a node the narrowest
    TP group last as well as first."""
    blocks: dict = {}
    for s in base:
        blocks.setdefault(s[0], []).append(s)
    names = list(blocks)
    if len(names) <= 4:
        seqs = [list(p) for p in itertools.permutations(names)]
    else:
        movers = names
        if len(names) > 8:
            kinds: dict = {}
            for n in names:
                kinds.setdefault((problem.node_by_name[n].gpu.name, tuple(s[1] for s in blocks[n])), n)
            movers = list(kinds.values())
        seqs = [names, names[::-1]]
        for n in movers:
            rest = [m for m in names if m != n]
            seqs += [[n] + rest, rest + [n]]
    mixed = [n for n in names if len({s[1] for s in blocks[n]}) > 1]
    out, seen = [], set()
    for seq in seqs:
        variants = [[s for n in seq for s in blocks[n]]]
        if mixed:
            variants.append([s for n in seq for s in (blocks[n][::-1] if n in mixed else blocks[n])])
        for o in variants:
            key = tuple(o)
            if key not in seen:
                seen.add(key)
                out.append(o)
    # The network-cheapest order first: ties keep it.
    out.sort(key=lambda o: o != list(base))
    return out


def best_layers(problem: Problem, ordered, shares=None) -> ChainResult | None:
    """Integer layer counts maximising throughput for stages in this order (None: infeasible)."""
    k, L = len(ordered), problem.L
    if k == 0 or k > L:
        return None
    nodes = [s[0] for s in ordered]
    tps = [s[1] for s in ordered]
    ov = pipeline_overheads(problem.cluster, problem.costs, nodes, tps, shares)
    sc = ov.costs
    caps = [c.max_layers(first=(i == 0), last=(i == k - 1)) for i, c in enumerate(sc)]
    if min(caps) < 1 or sum(caps) < L:
        return None
    dec = [c.decode_layer_s for c in sc]
    pre = [c.prefill_layer_s for c in sc]      # a prompt's share of steps (rate, round)
    pre_t = [c.ttft_layer_s for c in sc]       # a prompt alone (TTFT): not cut into parts
    rate = [c.layer_rate for c in sc]
    parts = ov.parts
    C = problem.workload.concurrency
    share = problem.workload.batch_size / problem.workload.output_tokens   # prompts per round, B/O
    slo_tpot, slo_ttft = problem.slo_tpot, problem.slo_ttft
    rnd = [d + share * p for d, p in zip(dec, pre)]
    round_fixed = ov.tpot_fixed_s + share * ov.ttft_fixed_s
    by_round = sorted(range(k), key=lambda i: (rnd[i], i))
    by_dec = sorted(range(k), key=lambda i: (dec[i], i))
    by_pre = sorted(range(k), key=lambda i: (pre_t[i], i))
    orders = [by_round] + ([by_dec] if slo_tpot else []) + ([by_pre] if slo_ttft else [])
    link_limit = min(x[0] for x in ov.limits)

    def fill(upper, order):
        l = [1] * k
        rem = L - k
        for i in order:
            add = min(rem, upper[i] - 1)
            l[i] += add
            rem -= add
            if rem == 0:
                break
        return l

    head = sc[-1].head_cost_per_token

    def feasible(T):
        upper = [min(caps[i], math.floor(rate[i] / T * (1 + 1e-12))) if T > 0 else caps[i] for i in range(k)]
        if T > 0:  # the last stage also runs the LM head: l / rate + head <= 1 / T
            upper[-1] = min(caps[-1], math.floor(rate[-1] * (1 / T - head) * (1 + 1e-12)))
        if min(upper) < 1 or sum(upper) < L:
            return None
        # Each order minimises one of the coupled terms (greedy is exact for unit items); the
        # first that meets them all wins. If the order minimising a term fails it, nothing can.
        for order in orders:
            l = fill(upper, order)
            if parts > 1:   # interleaving: the exact flow-shop times of these layers
                tpot_l, _, round_l = pipeline_latencies(ov, problem.workload, l)
            else:
                tpot_l, round_l = None, round_fixed + sum(a * b for a, b in zip(l, rnd))
            # (With parts > 1 the greedy is not exact for the flow-shop terms: try every order.)
            if T * round_l > C * (1 + 1e-12):
                if order is by_round and parts == 1:
                    return None
                continue
            if slo_tpot and (ov.tpot_fixed_s + sum(a * b for a, b in zip(l, dec)) if tpot_l is None
                             else tpot_l) > slo_tpot:
                if order is by_dec and parts == 1:
                    return None
                continue
            if slo_ttft and ov.ttft_fixed_s + sum(a * b for a, b in zip(l, pre_t)) > slo_ttft:
                if order is by_pre:
                    return None
                continue
            return l
        return None

    l0 = feasible(0.0)
    if l0 is None:
        return None
    lo, hi, best = 0.0, min(link_limit, sum(rate) / L * 1.0000001), l0
    # Bisection on T; T* has a closed form only without the TPOT-coupled terms.
    for _ in range(48):
        if hi - lo <= 1e-6 * max(hi, 1e-9):
            break
        mid = (lo + hi) / 2
        l = feasible(mid)
        if l is None:
            hi = mid
        else:
            lo, best = mid, l
    metrics = evaluate_pipeline(problem.cluster, problem.costs, nodes, tps, best, shares)
    if not metrics.fits:
        return None
    if slo_tpot and metrics.tpot_s > slo_tpot * (1 + 1e-9):
        return None
    if slo_ttft and metrics.ttft_s > slo_ttft * (1 + 1e-9):
        return None
    return ChainResult(tuple(ordered), tuple(best), metrics)


class ChainEvaluator:
    """Memoised best_layers over the multiset of slots (order is derived)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self._cache: dict = {}
        self.calls = 0

    def __call__(self, slots) -> ChainResult | None:
        key = tuple(sorted(slots))
        if key in self._cache:
            return self._cache[key]
        self.calls += 1
        res = None
        for order in candidate_orders(self.problem, order_slots(self.problem, key)) if key else []:
            r = best_layers(self.problem, order)
            if r is not None and (res is None or r.throughput > res.throughput * (1 + 1e-9)):
                res = r
        self._cache[key] = res
        return res

    def value(self, slots) -> float:
        r = self(slots)
        return r.throughput if r else 0.0


def resolve_sharing(problem: Problem, chains: list) -> list:
    """Pipelines that send over the same ordered pair of nodes share its bandwidth, which the
    per-pipeline search does not see. Re-order (and re-layer) each such pipeline with the
    others' hops counted, keeping whatever is best."""
    chains = list(chains)
    for _ in range(2):
        changed = False
        for i, ch in enumerate(chains):
            others = [[s[0] for s in c.slots] for j, c in enumerate(chains) if j != i]
            nodes = [s[0] for s in ch.slots]
            if not any(hop_shares(problem.cluster, others + [nodes]).get(h, 1) > 1
                       for h in zip(nodes, nodes[1:]) if h[0] != h[1]):
                continue
            best = None
            for order in candidate_orders(problem, list(ch.slots)) + [list(ch.slots)[::-1]]:
                shares = hop_shares(problem.cluster, others + [[s[0] for s in order]])
                r = best_layers(problem, order, shares)
                if r is not None and (best is None or r.throughput > best.throughput * (1 + 1e-9)):
                    best = r
            current = best_layers(problem, list(ch.slots), hop_shares(problem.cluster, others + [nodes]))
            if best is not None and (current is None or best.throughput > current.throughput * (1 + 1e-9)):
                chains[i] = best
                changed = True
        if not changed:
            break
    return chains
