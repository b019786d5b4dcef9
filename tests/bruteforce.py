"""Exhaustive reference optimizer for tiny clusters (a test helper, not a test module).

It shares nothing with the solver (hexplan/solver): it only uses the cost model through
``hexplan.evaluate.evaluate_pipeline``, the same function the validator uses. For a cluster of a
handful of GPUs and a model of a few layers it enumerates

* every way to split each node's GPUs into TP groups: every multiset of degrees in {1, 2, 4, 8}
  that the model can split (``ModelSpec.tp_degree_ok``), that fit in the node, summing to at most
  the node's GPU count (GPUs of one node are identical, so a multiset of degrees is a split;
  GPUs left over are unused);
* every assignment of those groups to pipelines (every set partition of the groups; a group
  that is not wanted is covered by the smaller multiset without it);
* every order of the stages of every pipeline (all permutations);
* every integer layer split of every pipeline (each stage >= 1 layer, sum = L),

and scores a candidate plan as the sum of the throughputs of its pipelines that fit, where each
pipeline is evaluated with the link sharing (``hop_shares``) of all the candidate's pipelines.
For fixed orders the pipelines only interact through those shares, so the best layer split of
each pipeline is found separately (memoised on its stage order and the shares of its hops);
this is exact, not a heuristic.

Also computed: the minimum time per output token over every single pipeline that fits
(``min_tpot_s``) and the best throughput when every pipeline must meet a TPOT SLO.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from hexplan.cluster import Cluster
from hexplan.costmodel import Workload
from hexplan.evaluate import CostCache, evaluate_pipeline, hop_shares
from hexplan.models import ModelSpec

TP_DEGREES = (1, 2, 4, 8)


def node_splits(count: int, degrees) -> list[tuple[int, ...]]:
    """Every multiset (non-increasing tuple) of ``degrees`` with sum <= count, the empty one included."""
    degrees = sorted(set(degrees), reverse=True)
    out = []

    def rec(remaining, start, acc):
        out.append(tuple(acc))
        for i in range(start, len(degrees)):
            if degrees[i] <= remaining:
                rec(remaining - degrees[i], i, acc + [degrees[i]])

    rec(count, 0, [])
    return out


def set_partitions(items: list):
    """Every partition of ``items`` into non-empty blocks (items are distinguishable by position)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def compositions(total: int, k: int):
    """Every tuple of k positive integers summing to ``total``."""
    if k <= 0 or k > total:
        return
    for cuts in itertools.combinations(range(1, total), k - 1):
        bounds = (0,) + cuts + (total,)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


@dataclass
class BrutePipeline:
    slots: tuple            # ordered ((node, tp), ...)
    layers: tuple
    throughput: float
    tpot_s: float


@dataclass
class BruteResult:
    throughput: float
    pipelines: list = field(default_factory=list)
    plans_scored: int = 0

    def describe(self) -> str:
        parts = []
        for p in self.pipelines:
            stages = " -> ".join(f"{n}/tp{d}x{l}" for (n, d), l in zip(p.slots, p.layers))
            parts.append(f"[{stages}] {p.throughput:.6g} tok/s")
        return f"{self.throughput:.6g} tok/s = " + " + ".join(parts)


class BruteForce:
    def __init__(self, cluster: Cluster, model: ModelSpec, workload: Workload | None = None):
        self.cluster, self.model = cluster, model
        self.workload = workload or Workload()
        self.costs = CostCache(model, self.workload)
        self.L = model.num_layers
        self.degrees = {n.name: [d for d in TP_DEGREES if d <= n.count and model.tp_degree_ok(d) is None]
                        for n in cluster.nodes}
        self._best: dict = {}
        self.evaluations = 0

    # ---- one pipeline ----------------------------------------------------------------
    def _scan(self, ordered, shares_key, slo_tpot_s):
        """(best throughput, layers, tpot) over every layer split of this stage order."""
        key = (ordered, shares_key, slo_tpot_s)
        hit = self._best.get(key)
        if hit is not None:
            return hit
        nodes = [s[0] for s in ordered]
        tps = [s[1] for s in ordered]
        shares = dict(zip(zip(nodes, nodes[1:]), shares_key))
        best = (0.0, None, math.inf)
        for layers in compositions(self.L, len(ordered)):
            self.evaluations += 1
            m = evaluate_pipeline(self.cluster, self.costs, nodes, tps, layers, shares)
            if not m.fits:
                continue
            if slo_tpot_s is not None and m.tpot_s > slo_tpot_s:
                continue
            if m.throughput > best[0]:
                best = (m.throughput, layers, m.tpot_s)
        self._best[key] = best
        return best

    def _min_tpot_scan(self, ordered):
        nodes = [s[0] for s in ordered]
        tps = [s[1] for s in ordered]
        best = (math.inf, None)
        for layers in compositions(self.L, len(ordered)):
            self.evaluations += 1
            m = evaluate_pipeline(self.cluster, self.costs, nodes, tps, layers)
            if m.fits and m.tpot_s < best[0]:
                best = (m.tpot_s, layers)
        return best

    # ---- enumeration -----------------------------------------------------------------
    def group_sets(self):
        """Every combination of per-node splits, as a sorted tuple of (node, tp) groups."""
        per_node = [[tuple((n.name, d) for d in split) for split in node_splits(n.count, self.degrees[n.name])]
                    for n in self.cluster.nodes]
        for combo in itertools.product(*per_node):
            groups = tuple(sorted(g for part in combo for g in part))
            if groups:
                yield groups

    def partitions(self):
        """Every distinct multiset of pipelines (each a multiset of groups) over every group set."""
        seen = set()
        for groups in self.group_sets():
            for part in set_partitions(list(groups)):
                key = tuple(sorted(tuple(sorted(b)) for b in part))
                if key not in seen:
                    seen.add(key)
                    yield key

    def solve(self, slo_tpot_s: float | None = None) -> BruteResult:
        """Maximum total throughput (optionally with every pipeline's TPOT <= slo_tpot_s)."""
        best = BruteResult(0.0)
        scored = 0
        for part in self.partitions():
            orders = [sorted(set(itertools.permutations(block))) for block in part]
            for chosen in itertools.product(*orders):
                scored += 1
                shares = hop_shares(self.cluster, [[s[0] for s in p] for p in chosen])
                total, pipes = 0.0, []
                for p in chosen:
                    nodes = [s[0] for s in p]
                    skey = tuple(shares.get((a, b), 1) if a != b else 1 for a, b in zip(nodes, nodes[1:]))
                    thr, layers, tpot = self._scan(p, skey, slo_tpot_s)
                    if thr > 0:
                        total += thr
                        pipes.append(BrutePipeline(p, layers, thr, tpot))
                if total > best.throughput:
                    best = BruteResult(total, pipes)
        best.plans_scored = scored
        return best

    def min_tpot(self) -> tuple[float, BrutePipeline | None]:
        """Minimum TPOT (s) over every single pipeline that fits, and that pipeline."""
        best, arg = math.inf, None
        seen = set()
        for groups in self.group_sets():
            # every subset of the groups, in every order (subsets of group sets are group sets,
            # so taking the whole set in every order covers them all)
            for ordered in set(itertools.permutations(groups)):
                if ordered in seen:
                    continue
                seen.add(ordered)
                tpot, layers = self._min_tpot_scan(ordered)
                if tpot < best:
                    best, arg = tpot, BrutePipeline(ordered, layers, 0.0, tpot)
        return best, arg
