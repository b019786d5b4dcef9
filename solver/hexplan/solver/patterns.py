"""Column generation over node *kinds*: a valid, tight upper bound and integer pipeline patterns.

Identical nodes (same GPU type, GPU count, interconnect and region, neither the coordinator nor
named in a link rule) are interchangeable: swapping two of them maps plans to plans of the same
throughput. A *kind* is such a class; a *slot type* is (kind, TP degree); a *pattern* is a
multiset of slot types, i.e. one pipeline up to the choice of nodes and of the stage order.

* ``upper_value(p)``: an upper bound on the throughput of every pipeline of pattern p, over every
  stage order, every choice of nodes and every integer layer split (a relaxation of
  solver/hexplan/solver/layers.py: the first and last slot types are enumerated, so memory,
  LM head, coordinator links are exact; hops are charged at the least they can cost).
* ``exact_value(p)``: the value of one concrete pipeline of pattern p (nodes packed compactly,
  valued by ``ChainEvaluator``); a lower bound, used for the integer choice.
* Master LP:  max sum_p u_p x_p  s.t.  sum_p g_kp x_p <= G_k (GPUs of kind k),
  [sum_p x_p <= K_max],  x >= 0.   Any plan is an integer point with u_p >= its throughput
  (link sharing between pipelines only lowers a plan), so the LP over *all* patterns bounds it.
* Pricing: first the patterns one group away from the LP's support, valued exactly (cheap:
  columns only); then a bound on max_p (u_p - pi g_p - mu) from a min-cost knapsack over slot
  types per region set and throughput level (Lagrangian relaxation of Little's law), which also
  proposes columns. Bound: z* <= pi.G + mu P + max {sum_i n_i r_i} over the pricing's classes
  (pipeline count, value and cost rows; docs/solver.md, "Patterns over node kinds"), valid for
  any duals >= 0.
* Integer choice of patterns (CP-SAT, or HiGHS MILP) on exact values, then mapping onto nodes.

Entry points: ``pattern_bound(problem, time_limit)`` and ``pattern_plan(problem, time_limit)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from hexplan.costmodel import (TOKEN_ID_BYTES, coordinator_out_capacity, coordinator_token_capacity,
                               hop_decode_time, hop_prefill_time, link_token_capacity, send_time)

from .bounds import compute_bound, max_pipelines
from .layers import ChainEvaluator, resolve_sharing
from .milp import native_stdout_silenced
from .problem import Problem

INF = math.inf
LP_BACKENDS = ("highs", "glop", "pdlp")   # pdlp: OR-Tools' first-order LP solver
SMALL_KIND_GPUS = 16     # kinds with at most this many GPUs are priced as a whole (GPU limit exact)
INT_BACKENDS = ("cpsat", "highs")
NEW_COLUMNS = 100        # columns added per column-generation iteration, at most
# pricing passes: a coarse one for columns while the LP moves, a fine one for the bound
COARSE = dict(rel_tol=0.01, max_points=40, steps=4, ratio=1.5, floor=1e-4)
FINE = dict(rel_tol=1e-4, max_points=3000, steps=12, ratio=1.25, floor=1e-4)
EXACT_BUCKETS = 256      # cost buckets of _constrained_cost (its bound is within blocks x target / 256)
EXACT_GOAL = 0.003       # the exact pass stops once every class's bound x P_max is below this share of z
LOCAL_ROUNDS = 40        # rounds of neighbour pricing (cheap) in a column generation, at most


# ---------------------------------------------------------------------------------------
# Kinds and slot types

@dataclass
class Kind:
    idx: int
    nodes: list            # node names, in cluster order
    count: int             # GPUs per node
    region: str

    @property
    def gpus(self) -> int:
        return self.count * len(self.nodes)


@dataclass
class SlotType:
    idx: int
    kind: int
    tp: int
    avail: int             # groups of this degree the kind can offer
    rate: float            # layer rate (split costs: a pipeline of >= 2 stages)
    cap: tuple             # max layers: (middle, first, last, first+last)
    rnd: float             # round-trip seconds per layer (decode + B/O prefill), / parts
    dec: float             # decode seconds per layer, / parts
    ttft: float            # prompt seconds per layer (not cut)
    head_tok: float        # LM head seconds per output token (compute, last stage)
    head_r: float          # LM head in the round, / parts
    head_d: float          # LM head in TPOT, / parts
    head_p: float          # LM head in TTFT


def _signature(problem: Problem, node) -> tuple:
    cl = problem.cluster
    named = {x for r in cl.links for x in r.between}
    special = node.name if (node.name == cl.coordinator_node.name or node.name in named) else ""
    return (node.gpu, node.count, node.interconnect, node.region, special)


class Patterns:
    """Kinds, slot types, hop and coordinator costs, and the pattern values of one problem."""

    def __init__(self, problem: Problem):
        self.problem = problem
        cl, w, m = problem.cluster, problem.workload, problem.model
        self.L = problem.L
        self.share = w.batch_size / w.output_tokens
        self.C = w.concurrency
        by_sig: dict = {}
        for n in problem.nodes:
            by_sig.setdefault(_signature(problem, n), []).append(n.name)
        self.kinds: list[Kind] = []
        for sig, names in by_sig.items():
            self.kinds.append(Kind(len(self.kinds), names, sig[1], sig[3]))
        self.kind_of = {n: k.idx for k in self.kinds for n in k.nodes}
        self.types: list[SlotType] = []
        for k in self.kinds:
            rep = k.nodes[0]
            for d in problem.allowed_tp[rep]:
                sc = problem.cost(rep, d)               # split costs (>= 2 stages)
                N = sc.parts
                caps = (sc.max_layers(), sc.max_layers(first=True), sc.max_layers(last=True),
                        sc.max_layers(first=True, last=True))
                if caps[0] < 1:
                    continue
                self.types.append(SlotType(
                    len(self.types), k.idx, d, len(k.nodes) * (k.count // d), sc.layer_rate, caps,
                    (sc.decode_layer_s + self.share * sc.prefill_layer_s) / N, sc.decode_layer_s / N,
                    sc.ttft_layer_s, sc.head_cost_per_token,
                    (sc.head_decode_s + self.share * sc.head_prefill_s) / N, sc.head_decode_s / N,
                    sc.head_prefill_s))
        self.parts = max([problem.cost(t_node, 1).parts for t_node in [problem.nodes[0].name]] or [1])
        N = self.parts
        coord = cl.coordinator_node.name

        def hop(a: str, b: str):
            lk = cl.link(a, b)
            hd = hop_decode_time(m, w, lk.bandwidth, lk.latency)
            hp = hop_prefill_time(m, w, lk.bandwidth, lk.latency)
            # (round, tpot, ttft) seconds, capacity; interleaving divides all but TTFT by N at most
            return ((hd + self.share * hp) / N, hd / N, hp), link_token_capacity(m, w, lk.bandwidth)

        nk = len(self.kinds)
        # inter-node hop a -> b between distinct nodes (None: impossible)
        self.inter: list = [[None] * nk for _ in range(nk)]
        for a in self.kinds:
            for b in self.kinds:
                if a.idx == b.idx:
                    if len(a.nodes) >= 2:
                        self.inter[a.idx][b.idx] = hop(a.nodes[0], a.nodes[1])
                else:
                    self.inter[a.idx][b.idx] = hop(a.nodes[0], b.nodes[0])
        self.intra = [hop(k.nodes[0], k.nodes[0]) if k.count >= 2 else None for k in self.kinds]
        # coordinator links per kind: in (round, tpot, ttft), out (...), capacities
        self.coord_in, self.coord_out = [], []
        for k in self.kinds:
            li, lo = cl.link(coord, k.nodes[0]), cl.link(k.nodes[0], coord)
            ind = send_time(w.batch_size * TOKEN_ID_BYTES, li.bandwidth, li.latency)
            inp = send_time(w.prompt_tokens * TOKEN_ID_BYTES, li.bandwidth, li.latency)
            outd = send_time(w.batch_size * TOKEN_ID_BYTES, lo.bandwidth, lo.latency)
            outp = send_time(TOKEN_ID_BYTES, lo.bandwidth, lo.latency)
            # flow shop: the message in is whole; the one out is a server (/ N at most)
            self.coord_in.append(((ind + self.share * inp), ind, inp, coordinator_token_capacity(w, li.bandwidth)))
            self.coord_out.append(((outd + self.share * outp) / N, outd / N, outp, coordinator_out_capacity(lo.bandwidth)))
        self.ev = ChainEvaluator(problem)
        self._splits: dict = {}
        self._ktab: dict = {}
        self._hkeys: dict = {}
        self._ktypes: dict = {}
        self._nmat: dict = {}
        self.t_cap = compute_bound(problem) * (1 + 1e-9)   # no pipeline carries more
        self.full = [k.gpus for k in self.kinds]
        self.caps = list(self.full)
        self._upper: dict = {}
        self._exact: dict = {}
        self._pts_key, self._pts_cache = None, {}    # price(): points priced at the last duals
        self._rmin: dict = {}                          # least round trip per (region set, T)
        self._fin: dict = {}
        self._nx: dict = {}
        self.P_max = max_pipelines(problem)
        if problem.options.max_pipelines:
            self.P_max = min(self.P_max, problem.options.max_pipelines)

    # ---- per-pattern values -------------------------------------------------------------
    def gpus(self, pat) -> dict:
        """GPUs per kind used by a pattern (a sorted tuple of (type index, count))."""
        g: dict = {}
        for j, n in pat:
            t = self.types[j]
            g[t.kind] = g.get(t.kind, 0) + t.tp * n
        return g

    def fits(self, pat, caps=None) -> bool:
        """Whether the pattern's groups exist within ``caps`` (GPUs per kind; default
        ``self.caps``, the whole cluster unless a dive has fixed pipelines)."""
        caps = self.caps if caps is None else caps
        return all(v <= caps[k] for k, v in self.gpus(pat).items()) and \
            all(n <= self.avail(self.types[j], caps) for j, n in pat)

    def avail(self, t, caps=None) -> int:
        caps = self.caps if caps is None else caps
        if caps[t.kind] >= self.kinds[t.kind].gpus:
            return t.avail
        return min(t.avail, caps[t.kind] // t.tp)

    def h_in(self, j: int, kinds) -> tuple:
        """Least (round, tpot, ttft) seconds of the hop into a slot of type j from a stage on a
        node of one of ``kinds`` (same node when it can hold both), and that hop's capacity."""
        t = self.types[j]
        best = [INF, INF, INF]
        cap = 0.0
        opts = []
        if self.kinds[t.kind].count > t.tp and self.intra[t.kind] is not None:
            opts.append(self.intra[t.kind])
        for a in kinds:
            h = self.inter[a][t.kind]
            if h is not None:
                opts.append(h)
        for (r, d, p), c in opts:
            best = [min(best[0], r), min(best[1], d), min(best[2], p)]
            cap = max(cap, c)
        # no hop into it is possible: it can only be a first stage; 0 keeps every sum a bound
        return tuple(0.0 if x == INF else x for x in best), cap

    def upper_value(self, pat) -> float:
        """Upper bound on the throughput of any pipeline whose slots have these types."""
        key = tuple(pat)
        hit = self._upper.get(key)
        if hit is None:
            hit = self._upper[key] = self._upper_value(key)
        return hit

    def _upper_value(self, pat) -> float:
        k = sum(n for _, n in pat)
        if k == 0 or k > self.L or not self.fits(pat, self.full):
            return 0.0
        if k == 1:
            return self.exact_value(pat)   # one stage: the evaluator is exact
        L = self.L
        tys = [self.types[j] for j, _ in pat]
        cnt = [n for _, n in pat]
        kinds = sorted({t.kind for t in tys})
        regions = {self.kinds[a].region for a in kinds}
        R = len(regions)
        gk = self.gpus(pat)
        M = sum(math.ceil(v / self.kinds[a].count) for a, v in gk.items())
        if any(math.ceil(v / self.kinds[a].count) > len(self.kinds[a].nodes) for a, v in gk.items()):
            return 0.0
        # hop mins over the kinds used: any hop (cI), between nodes (cN), between regions (cXR)
        cI, cN, cXR = [INF] * 3, [INF] * 3, [INF] * 3
        capN, capX = 0.0, 0.0
        for a in kinds:
            if self.intra[a] is not None:
                cI = [min(x, y) for x, y in zip(cI, self.intra[a][0])]
            for b in kinds:
                h = self.inter[a][b]
                if h is None:
                    continue
                cN = [min(x, y) for x, y in zip(cN, h[0])]
                capN = max(capN, h[1])
                if self.kinds[a].region != self.kinds[b].region:
                    cXR = [min(x, y) for x, y in zip(cXR, h[0])]
                    capX = max(capX, h[1])
        cI = [min(x, y) for x, y in zip(cI, cN)]
        link_cap = INF
        if M >= 2:
            link_cap = min(link_cap, capN)
        if R >= 2:
            link_cap = min(link_cap, capX)
        hops_a = [0.0, 0.0, 0.0]
        for d in range(3):
            v = (k - M) * cI[d] if k > M else 0.0
            if M > R:
                v += (M - R) * cN[d]
            if R > 1:
                v += (R - 1) * cXR[d]
            hops_a[d] = v
        hin = [self.h_in(j, kinds)[0] for j, _ in pat]
        xr_extra = [0.0, 0.0, 0.0]
        if R > 1:
            hmax = [max(h[d] for h in hin) for d in range(3)]
            xr_extra = [max(0.0, cXR[d] - hmax[d]) * (R - 1) for d in range(3)]
        best = 0.0
        for ia, ta in enumerate(tys):
            for ib, tb in enumerate(tys):
                if ia == ib and cnt[ia] < 2:
                    continue
                # hops: every stage but the first has a hop into it
                hops = []
                for d in range(3):
                    v = sum((n - (i == ia)) * h[d] for i, (n, h) in enumerate(zip(cnt, hin))) + xr_extra[d]
                    hops.append(max(v, hops_a[d]))
                ci, co = self.coord_in[ta.kind], self.coord_out[tb.kind]
                fixed_r = ci[0] + co[0] + tb.head_r + hops[0]
                fixed_d = ci[1] + co[1] + tb.head_d + hops[1]
                fixed_p = ci[2] + co[2] + tb.head_p + hops[2]
                hi = min(link_cap, ci[3], co[3])
                # slots: (type, count, cap, is_last)
                slots = []
                for i, (t, n) in enumerate(zip(tys, cnt)):
                    mid = n - (i == ia) - (i == ib)
                    if mid > 0:
                        slots.append((t, mid, t.cap[0], False))
                if ia == ib:
                    slots.append((ta, 1, ta.cap[1], False))
                    slots.append((tb, 1, tb.cap[2], True))
                else:
                    slots.append((ta, 1, ta.cap[1], False))
                    slots.append((tb, 1, tb.cap[2], True))
                T = self._bisect(slots, fixed_r, fixed_d, fixed_p, min(hi, sum(t.rate * n for t, n in zip(tys, cnt)) / L),
                                 floor=best)
                best = max(best, T)
        return min(best, self.t_cap)

    def _bisect(self, slots, fixed_r, fixed_d, fixed_p, hi, floor=0.0) -> float:
        """The largest feasible T (from above: a bound). Only a value above ``floor`` matters
        to the caller (the best of other first / last choices): when ``floor`` is infeasible,
        T* <= floor and ``floor`` is returned."""
        L, C = self.L, self.C
        pb = self.problem
        if sum(n * c for _, n, c, _ in slots) < L or min(c for _, _, c, _ in slots) < 1:
            return 0.0
        orders = [sorted(slots, key=lambda s: s[0].rnd)]
        if pb.slo_tpot:
            orders.append(sorted(slots, key=lambda s: s[0].dec))
        if pb.slo_ttft:
            orders.append(sorted(slots, key=lambda s: s[0].ttft))

        def minsum(T, order, attr):
            rem, tot = L, 0.0
            ups = []
            for t, n, c, last in order:
                u = c
                if T > 0:
                    u = min(c, math.floor(t.rate * ((1 / T) - (t.head_tok if last else 0.0)) * (1 + 1e-9)))
                if u < 1:
                    return None
                ups.append((t, n, u))
            if sum(n * u for _, n, u in ups) < L:
                return None
            rem = L - sum(n for _, n, _ in ups)
            tot = sum(n * getattr(t, attr) for t, n, _ in ups)
            for t, n, u in ups:
                add = min(rem, n * (u - 1))
                tot += add * getattr(t, attr)
                rem -= add
                if rem == 0:
                    break
            return tot

        def feasible(T):
            r = minsum(T, orders[0], "rnd")
            if r is None or T * (fixed_r + r) > C * (1 + 1e-9):
                return False
            if pb.slo_tpot:
                d = minsum(T, orders[1], "dec")
                if fixed_d + d > pb.slo_tpot * (1 + 1e-9):
                    return False
            if pb.slo_ttft:
                p = minsum(T, orders[-1], "ttft")
                if fixed_p + p > pb.slo_ttft * (1 + 1e-9):
                    return False
            return True

        if hi <= 0 or hi * (1 + 1e-9) <= floor:
            return min(hi * (1 + 1e-9), floor) if hi > 0 else 0.0
        if floor > 0:
            if not feasible(floor):
                return floor
        elif not feasible(0.0):
            return 0.0
        hi = hi * (1 + 1e-9)
        if feasible(hi):
            return hi
        lo = floor
        for _ in range(60):
            if hi - lo <= 1e-7 * hi:
                break
            mid = (lo + hi) / 2
            if feasible(mid):
                lo = mid
            else:
                hi = mid
        return hi    # the upper end: a bound

    def materialize(self, pat, free: dict | None = None):
        """Concrete slots for one pipeline of pattern ``pat``: each kind's groups packed onto as
        few of its nodes as possible (widest first), from the free GPUs ``free`` (node ->
        GPUs; updated). None when they do not fit."""
        free = free if free is not None else {n: self.kinds[k].count for n, k in self.kind_of.items()}
        slots = []
        by_kind: dict = {}
        for j, n in pat:
            t = self.types[j]
            by_kind.setdefault(t.kind, []).extend([t.tp] * n)
        for kd, tps in by_kind.items():
            used: list = []
            for d in sorted(tps, reverse=True):
                cand = [x for x in used if free[x] >= d]
                if not cand:
                    others = [x for x in self.kinds[kd].nodes if free[x] >= d and x not in used]
                    if not others:
                        for (x, dd) in slots:     # roll back
                            free[x] += dd
                        return None
                    # best fit: the fullest node that holds this group
                    x = min(others, key=lambda x: (free[x], self.kinds[kd].nodes.index(x)))
                    used.append(x)
                else:
                    x = min(cand, key=lambda x: free[x])
                free[x] -= d
                slots.append((x, d))
        return slots

    def repair(self, pat, duals=None) -> tuple:
        """A pattern that fits its kinds' GPUs and holds L layers, near ``pat``: drop the widest
        groups of a kind over its GPUs, then add the cheapest groups (dual price per layer)
        until the layers fit."""
        cnt = dict(pat)
        duals = duals or [0.0] * len(self.kinds)
        for kd in range(len(self.kinds)):
            while True:
                use = sum(self.types[j].tp * n for j, n in cnt.items() if self.types[j].kind == kd)
                if use <= self.caps[kd]:
                    break
                j = max((j for j in cnt if self.types[j].kind == kd and cnt[j] > 0),
                        key=lambda j: (self.types[j].tp, j))
                cnt[j] -= 1
                if cnt[j] == 0:
                    del cnt[j]
        for _ in range(self.L):
            if sum(self.types[j].cap[0] * n for j, n in cnt.items()) >= self.L + 2:
                break
            g = self.gpus(tuple(cnt.items()))
            opts = [t for t in self.types if cnt.get(t.idx, 0) < self.avail(t)
                    and g.get(t.kind, 0) + t.tp <= self.caps[t.kind]]
            if not opts:
                break
            t = min(opts, key=lambda t: ((duals[t.kind] * t.tp + 1e-9) / t.cap[0], -t.rate, t.idx))
            cnt[t.idx] = cnt.get(t.idx, 0) + 1
        return tuple(sorted(cnt.items()))

    def pattern_of(self, slots):
        """The pattern (sorted (type, count) tuple) of a pipeline given as (node, tp) slots, or
        None when a slot has no type here."""
        tid = {(t.kind, t.tp): t.idx for t in self.types}
        cnt: dict = {}
        for node, tp in slots:
            j = tid.get((self.kind_of.get(node), tp))
            if j is None:
                return None
            cnt[j] = cnt.get(j, 0) + 1
        return tuple(sorted(cnt.items())) or None

    def seed_patterns(self) -> list:
        """Starting columns: one slot of each type, and the pipelines of a greedy deal (each
        TP policy, every pipeline count): groups largest memory first onto the emptiest."""
        out = [((t.idx, 1),) for t in self.types]
        tid = {(t.kind, t.tp): t.idx for t in self.types}
        for prefer in (None, 8, 4, 2, 1):
            groups = []
            for kd in self.kinds:
                degs = sorted({t.tp for t in self.types if t.kind == kd.idx}, reverse=True)
                for _ in kd.nodes:
                    rem = kd.count
                    for d in degs:
                        if prefer is not None and d > prefer:
                            continue
                        while rem >= d:
                            groups.append(tid[(kd.idx, d)])
                            rem -= d
            if not groups:
                continue
            groups.sort(key=lambda j: (-self.types[j].cap[0], -self.types[j].rate, j))
            Ks = {1, 2, 3, self.P_max // 4, self.P_max // 2, self.P_max - 1, self.P_max}
            for K in sorted(k for k in Ks if 1 <= k <= max(1, self.P_max)):
                pipes = [dict() for _ in range(K)]
                mem = [0] * K
                for j in groups:
                    i = min(range(K), key=lambda i: (mem[i], i))
                    pipes[i][j] = pipes[i].get(j, 0) + 1
                    mem[i] += self.types[j].cap[0]
                out += [tuple(sorted(p.items())) for p in pipes if p]
        return out

    def exact_value(self, pat) -> float:
        key = tuple(pat)
        hit = self._exact.get(key)
        if hit is None:
            slots = self.materialize(key)
            r = self.ev(slots) if slots else None
            hit = self._exact[key] = r.throughput if r is not None else 0.0
        return hit

    # ---- pricing -------------------------------------------------------------------------
    def contexts(self):
        """Region sets (as tuples of kind indices and the region count)."""
        regions = sorted({k.region for k in self.kinds})
        out = []
        for mask in range(1, 1 << len(regions)):
            rs = {regions[i] for i in range(len(regions)) if mask >> i & 1}
            kinds = [k.idx for k in self.kinds if k.region in rs]
            out.append((kinds, len(rs)))
        return out

    def context_data(self, kinds, R):
        """Per type (in the context) its least incoming hop, and the context's constant: the
        extra cost of the R - 1 hops between regions over the least hop into any slot."""
        tys = [t for t in self.types if t.kind in kinds]
        hin = {t.idx: self.h_in(t.idx, kinds) for t in tys}
        cXR, capX = INF, 0.0
        if R > 1:
            for a in kinds:
                for b in kinds:
                    h = self.inter[a][b]
                    if h is not None and self.kinds[a].region != self.kinds[b].region:
                        cXR = min(cXR, h[0][0])
                        capX = max(capX, h[1])
        hmax = max((h[0][0] for h in hin.values()), default=0.0)
        const = (R - 1) * max(0.0, cXR - hmax) if R > 1 else 0.0
        cap = min(max(self.coord_in[a][3] for a in kinds), max(self.coord_out[a][3] for a in kinds))
        if R > 1:
            cap = min(cap, capX)
        return tys, hin, const, cap

    def _type_opts(self, t, hin, price, T, lam, ys):
        """Options of one slot type in the knapsack: per (first, last) flags, the cost of y
        layers in the fewest slots of this type, and a function giving the slots used."""
        inv = 1 / T if T > 0 else INF

        def cap_at(c, head=0.0):
            if T <= 0:
                return c
            return min(c, math.floor(t.rate * (inv - head) * (1 + 1e-9)))
        U0, U1, U2 = cap_at(t.cap[0]), cap_at(t.cap[1]), cap_at(t.cap[2], t.head_tok)
        h = hin[t.idx][0][0]
        per_slot = price[t.kind] * t.tp + lam * h
        hn = self._node_extra(hin).get(t.idx, 0.0)
        opts = []
        for df in (0, 1):
            for dl in (0, 1):
                if (df and U1 < 1) or (dl and U2 < 1):
                    continue
                base = df * U1 + dl * U2
                fixed = df + dl
                if U0 >= 1:
                    n = fixed + np.ceil(np.maximum(ys - base, 0) / U0)
                else:
                    n = np.where(ys <= base, float(fixed), 1e18)
                ok = (ys >= np.maximum(n, 1)) & (n <= self.avail(t))
                cost = n * per_slot + lam * t.rnd * ys
                if hn > 0:    # whole nodes these groups fill, less the first stage's node
                    full = np.floor(np.minimum(n, 1e9) * t.tp / self.kinds[t.kind].count)
                    cost = cost + lam * hn * (np.maximum(full - 1, 0) if df else full)
                if df:
                    cost = cost - lam * h + lam * self.coord_in[t.kind][0]
                if dl:
                    cost = cost + lam * (self.coord_out[t.kind][0] + t.head_r)
                cost = np.where(ok, cost, INF)
                if not fixed:
                    cost[0] = 0.0
                nn = n
                opts.append((2 * df + dl, cost, lambda y, nn=nn, j=t.idx: {j: int(nn[y])} if y else {}))
        return opts

    def _node_extra(self, hin) -> dict:
        """Per slot type of a multi-GPU kind priced by type (not as a whole), the least extra
        round seconds per node its groups fill: each node's first stage (but the pipeline's
        first) is reached from another node, at least ``h_node`` (the least inter-node hop
        into the kind within the context), while its group was charged only its ``hin``. The
        groups of types of one kind below the node size (tp < GPUs per node) fill at least
        sum_t floor(n_t tp_t / count) <= (nodes they use) nodes, less one when the first stage
        is one of them and all their nodes are full; so the knapsack adds
        hn * floor(n tp / count) per type (one node fewer for the first stage's type).
        hn = h_node - the largest hin of the kind's partial types. Left out (0) where the
        context's region crossings are charged over a hop below h_node (``context_data``)."""
        k = id(hin)
        hit = self._nx.get(k)
        if hit is not None and hit[0] is hin:
            return hit[1]
        out = {}
        ctx_kinds = {self.types[j].kind for j in hin}
        regions = {self.kinds[a].region for a in ctx_kinds}
        hmax = max((h[0][0] for h in hin.values()), default=0.0)
        for kd in ctx_kinds:
            cnt = self.kinds[kd].count
            if cnt < 2 or self.kinds[kd].gpus <= SMALL_KIND_GPUS:
                continue     # single-GPU nodes: every hop in is inter-node already; small: tables
            hops = [self.inter[a][kd][0][0] for a in ctx_kinds if self.inter[a][kd] is not None]
            part = [j for j in hin if self.types[j].kind == kd and self.types[j].tp < cnt]
            if not hops or not part:
                continue
            h_node = min(hops)
            if len(regions) > 1 and hmax < h_node:
                continue
            hn = max(0.0, h_node - max(hin[j][0][0] for j in part))
            for j in part:
                out[j] = hn
        self._nx[k] = (hin, out)
        return out

    def kind_splits(self, kd: int) -> list:
        """Every non-empty multiset of this kind's groups (type index, count) that fits in its
        nodes (first-fit decreasing) and its GPUs (a small kind: SMALL_KIND_GPUS at most)."""
        hit = self._splits.get((kd, self.caps[kd]))
        if hit is not None:
            return hit
        k = self.kinds[kd]
        tys = sorted((t for t in self.types if t.kind == kd), key=lambda t: -t.tp)
        out = []

        def packs(sizes):
            bins = [k.count] * len(k.nodes)
            for d in sorted(sizes, reverse=True):
                i = next((i for i, b in enumerate(bins) if b >= d), None)
                if i is None:
                    return False
                bins[i] -= d
            return True

        def rec(i, left, acc):
            if i == len(tys):
                if acc and packs([self.types[j].tp for j, n in acc for _ in range(n)]):
                    out.append(tuple(sorted(acc)))
                return
            t = tys[i]
            for n in range(0, min(t.avail, left // t.tp) + 1):
                rec(i + 1, left - n * t.tp, acc + ([(t.idx, n)] if n else []))

        rec(0, self.caps[kd], [])
        self._splits[(kd, self.caps[kd])] = out
        return out

    def _kind_table(self, kd, hin, T):
        """Per (first, last) flags: GPUs of each split of a small kind and, per layer count y,
        the least seconds of round trip (layers, hops into its groups, coordinator links and
        LM head for the first / last group) of y layers on exactly that split. Vectorised over
        the splits: the layers beyond one per group go to the smallest round cost first."""
        L = self.L
        inv = 1 / T if T > 0 else INF
        ktys = self._ktypes.get(kd)
        if ktys is None:
            ktys = self._ktypes[kd] = [t for t in self.types if t.kind == kd]
        ucap = []
        for t in ktys:
            if T <= 0:
                ucap.append(t.cap[:3])
            else:
                ucap.append((min(t.cap[0], math.floor(t.rate * inv * (1 + 1e-9))),
                             min(t.cap[1], math.floor(t.rate * inv * (1 + 1e-9))),
                             min(t.cap[2], math.floor(t.rate * (inv - t.head_tok) * (1 + 1e-9)))))
        key = (kd, tuple(ucap), self._hkey(hin), self.caps[kd])
        hit = self._ktab.get(key)
        if hit is not None:
            return hit
        splits = self.kind_splits(kd)
        mkey = (kd, self.caps[kd])
        Nmat = self._nmat.get(mkey)
        if Nmat is None:
            Nmat = self._nmat[mkey] = np.array([[dict(S).get(t.idx, 0) for t in ktys] for S in splits],
                                               dtype=float).reshape(len(splits), len(ktys))
        ctx_kinds = {self.types[j].kind for j in hin}
        node_hops = [self.inter[a][kd][0][0] for a in ctx_kinds if self.inter[a][kd] is not None]
        h_node = min(node_hops) if node_hops else 0.0          # least hop from another node
        # a node's first stage (not the pipeline's first) comes from another node: at least
        # h_node, of which its own group was charged at most the largest hop into a partial
        # group (tp < node size); whole-node groups are charged an inter-node hop already
        cnt = self.kinds[kd].count
        part = [i for i, t in enumerate(ktys) if t.tp < cnt]
        hn = max(0.0, h_node - max(hin[ktys[i].idx][0][0] for i in part)) if part else 0.0
        U = np.array(ucap, dtype=float).reshape(len(ktys), 3)
        U0, U1, U2 = U[:, 0], U[:, 1], U[:, 2]
        rho = np.array([t.rnd for t in ktys])
        h = np.array([hin[t.idx][0][0] for t in ktys])
        tp = np.array([t.tp for t in ktys], dtype=float)
        used = Nmat > 0
        ok = ~(used & (U0[None, :] < 1)).any(axis=1)
        kS = Nmat.sum(axis=1)
        gS = Nmat @ tp
        pmask = np.array([t.tp < cnt for t in ktys], dtype=bool)
        mS = np.ceil((Nmat * pmask[None, :]) @ tp / cnt)     # nodes holding partial groups
        base = Nmat @ (rho + h) + mS * hn
        order = np.argsort(rho, kind="stable")
        r_sorted = rho[order]
        ys = np.arange(L + 1)
        extra0 = Nmat * np.maximum(U0 - 1, 0)[None, :]

        def vec(extra, const, mask):
            ce = extra[:, order]
            cum = np.cumsum(ce, axis=1)
            prev = cum - ce
            z = ys[None, None, :] - kS[:, None, None] - prev[:, :, None]
            take = np.minimum(np.maximum(z, 0), ce[:, :, None])
            cost = base[:, None] + const[:, None] + (take * r_sorted[None, :, None]).sum(axis=1)
            feas = (ys[None, :] >= kS[:, None]) & (ys[None, :] <= kS[:, None] + cum[:, -1:]) & mask[:, None] & ok[:, None]
            return np.where(feas, cost, INF)

        nS = len(splits)
        zero = np.zeros(nS)
        tables = {0: vec(extra0, zero, np.ones(nS, dtype=bool))}
        firsts, lasts = {}, {}
        for i, t in enumerate(ktys):
            if U1[i] >= 1:
                e = extra0.copy()
                e[:, i] -= np.where(used[:, i], U0[i] - U1[i], 0.0)
                firsts[i] = (e, -h[i] - (hn if pmask[i] else 0.0) + self.coord_in[kd][0])
            if U2[i] >= 1:
                lasts[i] = (U0[i] - U2[i], self.coord_out[kd][0] + t.head_r)
        best2 = np.full((nS, L + 1), INF)
        for i, (e, c) in firsts.items():
            best2 = np.minimum(best2, vec(e, zero + c, used[:, i]))
        tables[2] = best2
        best1 = np.full((nS, L + 1), INF)
        for i, (d2, c) in lasts.items():
            e = extra0.copy()
            e[:, i] -= np.where(used[:, i], d2, 0.0)
            best1 = np.minimum(best1, vec(e, zero + c, used[:, i]))
        tables[1] = best1
        best3 = np.full((nS, L + 1), INF)
        for i, (e1, c1) in firsts.items():
            for k2, (d2, c2) in lasts.items():
                e = e1.copy()
                e[:, k2] -= np.where(used[:, k2], d2, 0.0)
                mask = used[:, i] & used[:, k2] & (kS >= 2)
                if i == k2:
                    mask &= Nmat[:, i] >= 2
                best3 = np.minimum(best3, vec(e, zero + c1 + c2, mask))
        tables[3] = best3
        table = {}
        for dd, A in tables.items():
            fin = np.isfinite(A).any(axis=1)
            table[dd] = (np.nonzero(fin)[0], gS[fin], A[fin])
        self._ktab[key] = table
        return table

    def _hkey(self, hin):
        k = id(hin)
        hit = self._hkeys.get(k)
        if hit is None or hit[0] is not hin:
            hit = self._hkeys[k] = (hin, tuple(sorted((j, h[0][0]) for j, h in hin.items())))
        return hit[1]

    def _kind_opts(self, kd, hin, price, T, lam):
        """Options of a small kind in the knapsack: per flags, min over its splits of
        price x GPUs + lam x round seconds, per layer count."""
        table = self._kind_table(kd, hin, T)
        splits = self.kind_splits(kd)
        L = self.L
        opts = []
        for dd, (sidx, gpus, A) in table.items():
            if not len(sidx):
                if dd == 0:
                    cost = np.full(L + 1, INF)
                    cost[0] = 0.0
                    opts.append((0, cost, lambda y: {}))
                continue
            A0, pen = self._finite_parts(A)
            M = (price[kd] * gpus)[:, None] + pen
            if lam:
                M = M + lam * A0
            arg = np.argmin(M, axis=0)
            cost = M[arg, np.arange(L + 1)]
            if dd == 0:
                cost[0] = 0.0
            opts.append((dd, cost, lambda y, arg=arg, sidx=sidx: dict(splits[sidx[arg[y]]]) if y else {}))
        return opts

    def _finite_parts(self, A):
        """(A with inf set to 0, 0 / inf where A is finite / not), cached per table."""
        hit = self._fin.get(id(A))
        if hit is None or hit[0] is not A:
            fin = np.isfinite(A)
            hit = self._fin[id(A)] = (A, np.where(fin, A, 0.0), np.where(fin, 0.0, INF))
        return hit[1], hit[2]

    _IDX: dict = {}

    def knapsack(self, tys, hin, price, T, lam):
        """Lower bound on the cost of a pipeline of >= 2 stages feasible at throughput T:
        min over multisets of slot types (in the context), one of them first and one last,
        and integer layers summing to L, of
            sum_slots (price_kind * tp + lam * hop into it [not the first])
            + lam * (sum layers * rnd + coordinator in [first] + out and LM head [last]);
        layers per slot <= min(max layers, rate / T) (first: with the embedding; last: with the
        LM head, and rate (1/T - head)). Returns (value, (counts, layers) per type) or (inf, None)."""
        L = self.L
        idx = self._IDX.get(L)
        if idx is None:
            ys = np.arange(L + 1)
            d = ys[:, None] - ys[None, :]
            idx = self._IDX[L] = (ys, np.where(d >= 0, d, L + 1))   # L + 1: an INF entry
        ys, gather = idx
        # f[s][x], s = 2 F + E: F first placed, E last placed, x layers
        f = np.full((4, L + 2), INF)
        f[0, 0] = 0.0
        steps = []
        small = {}
        for t in tys:
            if self.kinds[t.kind].gpus <= SMALL_KIND_GPUS:
                small.setdefault(t.kind, []).append(t)
        blocks = [("kind", kd) for kd in small] + [("type", t) for t in tys if t.kind not in small]
        for what, item in blocks:
            if what == "kind":
                opts = self._kind_opts(item, hin, price, T, lam)
            else:
                opts = self._type_opts(item, hin, price, T, lam, ys)
            if not opts:
                continue
            g = np.full((4, L + 2), INF)
            code = np.full((4, L + 1), -1)
            ych = np.zeros((4, L + 1), dtype=int)
            for src in range(4):
                row = f[src]
                if not np.isfinite(row[:L + 1]).any():
                    continue
                G = row[gather]
                for oi, (dd, cost, _) in enumerate(opts):
                    if src & dd:
                        continue
                    M = G + cost[None, :]
                    a_ = np.argmin(M, axis=1)
                    v = M[ys, a_]
                    tgt = src | dd
                    better = v < g[tgt, :L + 1]
                    if better.any():
                        g[tgt, :L + 1] = np.where(better, v, g[tgt, :L + 1])
                        code[tgt] = np.where(better, src * 4 + oi, code[tgt])
                        ych[tgt] = np.where(better, a_, ych[tgt])
            f = g
            steps.append((opts, code, ych))
        if not math.isfinite(f[3, L]):
            return INF, None
        x, st = L, 3
        counts, layers = {}, {}
        for opts, code, ych in reversed(steps):
            c = int(code[st, x])
            src, oi = divmod(c, 4)
            y = int(ych[st, x])
            for j, n in opts[oi][2](y).items():
                if n:
                    counts[j] = counts.get(j, 0) + n
            x, st = x - y, src
        layers = self._greedy_layers(counts, T)
        return float(f[3, L]), (counts, layers)

    def _greedy_layers(self, counts, T) -> dict:
        """Layers per type that the least round trip gives these slots at T (caps without the
        embedding and LM head: a lower bound on the round)."""
        rem = self.L - sum(counts.values())
        layers = {j: n for j, n in counts.items()}
        for j in sorted(counts, key=lambda j: self.types[j].rnd):
            t = self.types[j]
            U = t.cap[0] if T <= 0 else min(t.cap[0], math.floor(t.rate / T * (1 + 1e-9)))
            add = max(0, min(rem, counts[j] * (U - 1)))
            layers[j] += add
            rem -= add
        return layers

    def _round_of(self, counts, layers, hin) -> float:
        """Least round trip of a knapsack solution (first / last on the best types)."""
        r = sum(layers[j] * self.types[j].rnd + counts[j] * hin[j][0][0] for j in counts)
        js = list(counts)
        r += min(self.coord_in[self.types[j].kind][0] - hin[j][0][0] for j in js)
        r += min(self.coord_out[self.types[j].kind][0] + self.types[j].head_r for j in js)
        nx = self._node_extra(hin)     # the nodes filled (as the knapsack charges them)
        if nx:
            ex = [nx.get(j, 0.0) * (counts[j] * self.types[j].tp // self.kinds[self.types[j].kind].count) for j in js]
            r += sum(ex) - max([nx.get(j, 0.0) for j in js if ex[js.index(j)] > 0], default=0.0)
        return r

    def price(self, duals, mu, t_start, deadline, rel_tol=0.002, max_points=400, steps=7, ratio=1.25, floor=1e-4,
              exact_until=None, exact_goal=0.0):
        """Upper bound on max_p (u_p - duals . g_p - mu) over all patterns, and candidate
        patterns with their reduced costs. ``exact_until``: then, until that time, the classes
        whose bound exceeds ``exact_goal`` get Little's law as a constraint (``_tighten``)."""
        cands: dict = {}
        rc_ub = 0.0
        intervals = []      # (reduced cost bound, least value) of every class of patterns
        t_hi_all = compute_bound(self.problem) * (1 + 1e-9)
        # single-slot patterns: exact
        for t in self.types:
            pat = ((t.idx, 1),)
            u = self.upper_value(pat)
            rc = u - duals[t.kind] * t.tp - mu
            cands[pat] = rc
            rc_ub = max(rc_ub, rc)
            if rc > 0:
                intervals.append((rc, u, u - rc))
        C = self.C
        hard_stop = deadline      # past it: only what keeps the bound valid, cheaply
        classes = []        # per region set: (index, kinds, R, points T -> (least cost, solution), ...)
        cache_key = (tuple(duals), mu, tuple(self.caps))
        if self._pts_key != cache_key:      # new duals: the points priced before say nothing
            self._pts_key, self._pts_cache = cache_key, {}
        for ci, (kinds, R) in enumerate(self.contexts()):
            tys, hin, const, cap = self.context_data(kinds, R)
            if not tys:
                continue
            T_top = min(cap, t_hi_all)
            if T_top <= 0:
                continue

            cached = self._pts_cache.get(ci)
            if cached is None and time.perf_counter() > hard_stop:
                # out of time before this region set: its patterns carry at most T_top and cost
                # at least 0, which is a valid (weak) class
                intervals.append((T_top - mu, 0.0, mu))
                rc_ub = max(rc_ub, T_top - mu)
                continue
            lam_hint = [cached[1] if cached else 0.0]
            seen_sols: set = set()     # every knapsack solution met: candidate columns

            def lower_cost(T):
                """Lower bound on min cost (duals . g) of a pattern of >= 2... any slots feasible at T."""
                v0, sol = self.knapsack(tys, hin, duals, T, 0.0)
                if sol is None:
                    return INF, None
                best, best_sol = v0, sol
                # Little's law: sum layers * rnd + hops + const <= C / T
                counts, layers = sol
                used = self._round_of(counts, layers, hin) + const
                if used * T > C * (1 + 1e-9):
                    # Lagrangian on Little's law: g(lam) is concave; its slope at lam is the
                    # round of the knapsack's solution minus C / T. Bracket, then bisect on it.
                    # No pattern at all when even the least round trip breaks Little's law.
                    rkey = (ci, T, tuple(self.caps))
                    rmin = self._rmin.get(rkey)
                    if rmin is None:     # the least round at T: the same for every dual
                        zero = {k_: 0.0 for k_ in range(len(self.kinds))}
                        rmin = self._rmin[rkey] = self.knapsack(tys, hin, zero, T, 1.0)[0]
                    if rmin + const > C / T * (1 + 1e-9):
                        return INF, None

                    def g(lam):
                        v, s_ = self.knapsack(tys, hin, duals, T, lam)
                        if s_ is None:
                            return INF, None, 0.0
                        seen_sols.add(tuple(sorted(s_[0].items())))
                        c = sum(n * duals[self.types[j].kind] * self.types[j].tp for j, n in s_[0].items())
                        slope = (v - c) / lam + const - C / T     # the solution's round - C / T
                        return v + lam * (const - C / T), s_, slope

                    lam = lam_hint[0] or max(1e-9, max(duals[t.kind] * t.tp for t in tys), mu) / (C / T)
                    v, s_, sl = g(lam)
                    if v > best:
                        best, best_sol = v, s_
                    lo = hi = None
                    if sl > 0:
                        lo = lam
                        for _ in range(40):
                            if time.perf_counter() > hard_stop:
                                break         # every g(lam) is a lower bound: best stays valid
                            lam *= 4
                            v, s_, sl = g(lam)
                            if v > best:
                                best, best_sol = v, s_
                            if sl <= 0:
                                hi = lam
                                break
                    else:
                        hi = lam
                        for _ in range(12):
                            if time.perf_counter() > hard_stop:
                                break
                            lam /= 4
                            v, s_, sl = g(lam)
                            if v > best:
                                best, best_sol = v, s_
                            if sl > 0:
                                lo = lam
                                break
                    if lo is not None and hi is not None:
                        for _ in range(steps):
                            if time.perf_counter() > hard_stop:
                                break
                            mid = math.sqrt(lo * hi)
                            v, s_, sl = g(mid)
                            if v > best:
                                best, best_sol = v, s_
                            if sl > 0:
                                lo = mid
                            else:
                                hi = mid
                        lam_hint[0] = hi
                return best, best_sol

            # geometric grid from T_top down, refined where the bound is largest; the points of an
            # earlier pricing at the same duals (a coarse pass) are kept and only refined
            pts = dict(cached[0]) if cached else {}
            grid = [T_top]
            T = T_top
            while T > T_top * floor and len(grid) < 200:
                T /= ratio
                grid.append(T)
            if floor <= 1e-4:
                grid.append(T_top * 1e-9)
            grid.sort(reverse=True)
            low = min(pts) if pts else INF
            for T in (T for T in grid if T < low):      # all of it, or what a cut pass left
                pts[T] = lower_cost(T)
                if time.perf_counter() > deadline:
                    break
            if T_top not in pts:
                # out of time: the rest of the range, (last point, T_top], at the last point's cost
                # (cost is non-decreasing in T), which keeps the bound valid
                pts[T_top] = (pts[max(pts)][0], None)
            # intervals (T_lo, T_hi]: rc <= T_hi - mincost(T_lo) - mu; below the grid: T_min - cost(T_min)
            def interval_ubs():
                Ts = sorted(pts)
                out = [(Ts[0] - mu, 0.0, Ts[0])]      # costs are >= 0
                for lo, hi in zip(Ts, Ts[1:]):
                    c = pts[lo][0]
                    out.append((hi - c - mu if math.isfinite(c) else -INF, lo, hi))
                return out

            n_ref = 0
            while n_ref < max_points and time.perf_counter() < deadline:
                ubs = interval_ubs()
                top = max(ubs)
                v, lo, hi = top
                if v <= 0 or hi - lo <= rel_tol * hi or lo == 0.0:
                    break
                mid = math.sqrt(lo * hi)
                pts[mid] = lower_cost(mid)
                n_ref += 1
            self._pts_cache[ci] = (dict(pts), lam_hint[0])
            classes.append((ci, kinds, R, pts, tys, hin, const))
            # candidate columns from the knapsack solutions
            for T, (c, sol) in pts.items():
                if sol is not None:
                    seen_sols.add(tuple(sorted(sol[0].items())))
            for pat in seen_sols:
                if time.perf_counter() > hard_stop:
                    break            # candidate columns only: the bound does not need them
                for q in {pat, self.repair(pat, duals)}:
                    if not q or q in cands:
                        continue
                    cands[q] = self.upper_value(q) - sum(duals[k] * v for k, v in self.gpus(q).items()) - mu
        if exact_until is not None and classes:
            self._tighten(classes, duals, mu, exact_until, exact_goal)
        for ci, kinds, R, pts, *_ in classes:
            ubs = _interval_ubs(pts, mu)
            # (rc bound, least value, least pi.g + mu) per class: a pattern of (lo, hi] is feasible
            # at lo, so its cost is at least the knapsack's there (costs are >= 0 below the grid)
            intervals += [(v, lo, (pts[lo][0] if lo > 0 and math.isfinite(pts[lo][0]) else 0.0) + mu)
                          for v, lo, _ in ubs if v > 0]
            top = max(ubs)
            if top[0] > rc_ub:
                rc_ub = top[0]
                self.last_argmax = (kinds, R, top, pts.get(top[1]))
        self.intervals = intervals
        return rc_ub, cands

    def _tighten(self, classes, duals, mu, deadline, goal=0.0):
        """Raise the least cost of the classes with the largest reduced-cost bound, largest
        first, with Little's law as a constraint (not dualised), until ``deadline`` or until no
        class's bound exceeds ``goal``. The dynamic programme depends on T only through the
        layer caps, and larger caps only relax it: one run per region set and caps vector
        (``_round_profile``: the least round trip per cost bucket) prices every point whose
        caps are at most those (the same caps, or any larger T), each with its own Little's law
        (``_profile_cost``). A class whose lower end this does not raise is split at its
        midpoint (priced from the profiles), and once narrow, priced again with 4x the buckets.
        A pattern feasible at T is feasible below T, so the least cost is non-decreasing in T
        and a point's cost is carried to the points above it: every point's cost stays a lower
        bound, and the intervals stay valid."""
        profs: dict = {}       # (region set, caps) -> [(delta, profile), level]
        keys: dict = {}        # (region set, T) -> caps at T (flat)
        final = set()

        def key_of(e, T):
            k = keys.get((e[0], T))
            if k is None:
                k = keys[(e[0], T)] = tuple(x for c in self._cap_key(e[4], T) for x in c)
            return k

        def covers(k, kT):
            return all(a >= b for a, b in zip(k, kT))

        def cost_at(e, T, c):
            kT = key_of(e, T)
            for (ci, k), pr in profs.items():
                if ci == e[0] and covers(k, kT):
                    c = max(c, self._profile_cost(pr[0], T, e[6]))
            return c

        def lift(pts):
            run = -INF
            for T in sorted(pts):
                if pts[T][0] < run:
                    pts[T] = (run, pts[T][1])
                else:
                    run = pts[T][0]

        while time.perf_counter() < deadline:
            best = None
            for e in classes:
                for v, lo, hi in _interval_ubs(e[3], mu):
                    if v > goal and lo > 0 and (e[0], lo) not in final and (best is None or v > best[0]):
                        best = (v, lo, hi, e)
            if best is None:
                return
            v, lo, hi, e = best
            ci, _, _, pts, tys, hin, const = e
            k = key_of(e, lo)
            pr = profs.get((ci, k))
            narrow = hi - lo <= 1e-5 * hi
            if pr is None or (pr[1] < 2 and narrow):
                # the largest target among the classes whose lower end has these caps
                cmax = max(h for _, l, h in _interval_ubs(pts, mu) if l > 0 and key_of(e, l) == k) - mu
                level = 1 if pr is None else 2
                prof = self._round_profile(tys, hin, duals, lo, cmax, EXACT_BUCKETS * (4 if level == 2 else 1))
                profs[(ci, k)] = [prof, level]
                for T in pts:
                    if T > 0 and covers(k, key_of(e, T)):
                        c = self._profile_cost(prof, T, const)
                        if c > pts[T][0]:
                            pts[T] = (c, pts[T][1])
                lift(pts)
                continue
            if not narrow:
                mid = math.sqrt(lo * hi)
                pts[mid] = (cost_at(e, mid, pts[lo][0]), None)
                lift(pts)
                continue
            final.add((ci, lo))

    def _cap_key(self, tys, T) -> tuple:
        """Layer caps (middle, first, last) of each type of ``tys`` at throughput T (T > 0), as
        the knapsack's items take them: the exact pass depends on T through these only."""
        inv = 1 / T
        out = []
        for t in tys:
            c = math.floor(t.rate * inv * (1 + 1e-9))
            out.append((min(t.cap[0], c), min(t.cap[1], c),
                        min(t.cap[2], math.floor(t.rate * (inv - t.head_tok) * (1 + 1e-9)))))
        return tuple(out)

    def _constrained_cost(self, tys, hin, price, T, const, target, buckets=None):
        """A lower bound on the least cost (price . GPUs) of a pipeline of >= 2 stages feasible
        at throughput T, with Little's law as a constraint (``_round_profile`` at T, costs in
        buckets of target / buckets; costs of ``target`` and more share the top bucket: the
        result is at most ``target``; inf when no pipeline is feasible)."""
        if not (target > 0) or T <= 0:
            return 0.0
        return self._profile_cost(self._round_profile(tys, hin, price, T, target, buckets), T, const)

    def _profile_cost(self, prof, T, const):
        """The least cost bucket of a round profile whose round trip keeps Little's law at T,
        T (round + const) <= C, times its width: a lower bound on the cost of every pipeline
        feasible at T, for a profile made at T or at any T0 whose layer caps are at least those
        at T (T0 <= T: larger caps only relax the programme). inf when none."""
        delta, f = prof
        ok = np.nonzero(T * (f + const) <= self.C * (1 + 1e-9))[0]
        return float(ok[0]) * delta if len(ok) else INF

    def _round_profile(self, tys, hin, price, T, target, buckets=None):
        """(delta, f): f[b] = the least round trip (seconds, as the knapsack charges it, without
        the region set's constant) of a pipeline of >= 2 stages whose layer caps are those at T
        and whose cost, each item's cost rounded down to a multiple of delta = target / buckets,
        is at most b delta (b = buckets: any cost). A dynamic programme over (first / last
        placed, layers, cost bucket) over the knapsack's items (same layer caps, hops,
        coordinator links and LM head). A small kind's splits are kept apart (grouped by cost
        bucket: the least round per bucket), so its GPU cost and its round trip are those of
        one split. Rounding each item's cost down makes each sum a lower bound. An entry
        (bucket, layers) of an item whose round is not below that of a cheaper bucket at the
        same layers is dropped (it cannot lower any f[b])."""
        L = self.L
        B = buckets or EXACT_BUCKETS
        delta = target / B
        idx = self._IDX.get(L)
        if idx is None:
            self.knapsack(tys, hin, price, T, 0.0)       # builds the index tables
            idx = self._IDX[L]
        ys = idx[0]
        zero = [0.0] * len(self.kinds)
        small = {}
        for t in tys:
            if self.kinds[t.kind].gpus <= SMALL_KIND_GPUS:
                small.setdefault(t.kind, []).append(t)
        blocks = [("kind", kd) for kd in small] + [("type", t) for t in tys if t.kind not in small]
        # f[s, x, b]: least round with flags s, x layers, rounded cost <= b buckets
        f = np.full((4, L + 1, B + 1), INF)
        f[0, 0, :] = 0.0
        for what, item in blocks:
            opts = []      # (flags, [(layers, cost bucket, round)])
            if what == "kind":
                # every split apart, grouped by cost bucket: the least round per bucket, kept
                # where it is below every cheaper bucket's at the same layer count
                for dd, (sidx, gpus, A) in self._kind_table(item, hin, T).items():
                    if not len(sidx):
                        continue
                    bys = np.minimum(np.floor(np.maximum(price[item] * gpus, 0.0) / delta), B).astype(int)
                    run = np.full(L + 1, INF)
                    pairs = []
                    for b in np.unique(bys):
                        row = A[bys == b].min(axis=0)
                        for y in np.nonzero(row < run)[0]:
                            pairs.append((int(y), int(b), float(row[y])))
                        run = np.minimum(run, row)
                    opts.append((dd, pairs))
            else:
                oc = self._type_opts(item, hin, price, T, 0.0, ys)
                orr = self._type_opts(item, hin, zero, T, 1.0, ys)
                for (dd, cc, _), (_, rr, _) in zip(oc, orr):
                    fin = np.isfinite(cc) & np.isfinite(rr)
                    if not dd:
                        fin[0] = False          # not using the type: f stays as it is
                    bys = np.minimum(np.floor(np.maximum(np.where(fin, cc, 0.0), 0.0) / delta), B).astype(int)
                    opts.append((dd, [(int(y), int(bys[y]), float(rr[y])) for y in np.nonzero(fin)[0]]))
            if not any(p for _, p in opts):
                continue
            g = f.copy()       # the item unused
            for src in range(4):
                F = f[src]
                if not np.isfinite(F[:, B]).any():
                    continue
                for dd, pairs in opts:
                    if src & dd:
                        continue
                    G = g[src | dd]
                    for y, by, r in pairs:
                        if by >= B:
                            np.minimum(G[y:, B], F[:L + 1 - y, B] + r, out=G[y:, B])
                            continue
                        np.minimum(G[y:, by:], F[:L + 1 - y, :B + 1 - by] + r, out=G[y:, by:])
                        np.minimum(G[y:, B], F[:L + 1 - y, B] + r, out=G[y:, B])
            f = g
        return delta, f[3, L].copy()


def _interval_ubs(pts, mu):
    """(reduced-cost bound, T_lo, T_hi) per interval of the priced points: a pattern of value in
    (T_lo, T_hi] is feasible at T_lo, so it costs at least the points' cost there; below the
    grid, costs are >= 0."""
    Ts = sorted(pts)
    out = [(Ts[0] - mu, 0.0, Ts[0])]
    for lo, hi in zip(Ts, Ts[1:]):
        c = pts[lo][0]
        out.append((hi - c - mu if math.isfinite(c) else -INF, lo, hi))
    return out


def lagrangian_bound(z: float, P: int, intervals, Z: float) -> float:
    """z* <= z + max sum_p x_p rc_p over plans x (Lagrangian bound at the LP's duals). Every
    pattern p lies in a class i with rc_p <= r_i and u_p >= t_i (``intervals``: (r_i, t_i)),
    and a plan has sum_p x_p <= P and sum_p x_p u_p <= z* <= Z, so
        sum_p x_p rc_p <= max { sum_i n_i r_i : sum_i n_i <= P, sum_i n_i t_i <= Z, n >= 0 }
                       =  min_{beta >= 0}  P max_i (r_i - beta t_i)^+ + beta Z      (LP duality).
    beta = 0 is the textbook bound z + P max_i r_i. Iterated with Z := the new bound."""
    if not intervals:
        return min(Z, z)
    r = np.array([iv[0] for iv in intervals], dtype=float)
    t = np.array([iv[1] for iv in intervals], dtype=float)
    pos = t > 0
    hi = float((r[pos] / t[pos]).max()) if pos.any() else 0.0

    def f(beta, Z):
        return P * max(0.0, float((r - beta * t).max())) + beta * Z

    best = z + P * max(0.0, float(r.max()))
    Z = min(Z, best)
    for _ in range(3):
        lo, up = 0.0, hi
        for _ in range(80):
            m1, m2 = lo + (up - lo) / 3, up - (up - lo) / 3
            if f(m1, Z) <= f(m2, Z):
                up = m2
            else:
                lo = m1
        val = z + min(f(lo, Z), f(0.0, Z))
        if val >= Z - 1e-9 * max(1.0, Z):
            break
        Z = val
    if len(intervals[0]) > 2:
        Z = min(Z, _resource_bound(z, P, r, t, np.array([iv[2] for iv in intervals], dtype=float), Z))
    return Z


def _resource_bound(z, P, r, t, w, Z) -> float:
    """The Lagrangian bound with a third row: a class's patterns cost at least w_i = (least
    pi.g) + mu each, and a plan's sum_p x_p (pi.g_p + mu) <= pi.G + mu P = z (pi, mu >= 0), so
        z* <= z + max { r.n : sum n <= P, t.n <= Z, w.n <= z, n >= 0 }
    (Farley's ratio bound z max_i t_i / w_i is this LP's third row alone). A 3-row LP; iterated
    with Z := the new value. Returns Z when HiGHS fails (the bound stays what it was)."""
    import highspy
    keep = r > 0
    r, t, w = r[keep], t[keep], w[keep]
    if not len(r):
        return min(Z, z)
    n = len(r)
    for _ in range(3):
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n, 3
        lp.col_cost_ = -r
        lp.col_lower_ = np.zeros(n)
        lp.col_upper_ = np.full(n, highspy.kHighsInf)
        lp.row_lower_ = np.full(3, -highspy.kHighsInf)
        lp.row_upper_ = np.array([float(P), float(Z), float(z)])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.arange(0, 3 * n + 1, 3, dtype=np.int32)
        lp.a_matrix_.index_ = np.tile(np.array([0, 1, 2], dtype=np.int32), n)
        lp.a_matrix_.value_ = np.stack([np.ones(n), t, w], axis=1).reshape(-1)
        try:
            h = _run_highs(lp)
        except RuntimeError:
            return Z
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return Z
        # the LP's dual objective bounds its optimum from above whatever the primal tolerance
        y = [max(0.0, -d) for d in h.getSolution().row_dual]
        val = z + y[0] * P + y[1] * Z + y[2] * z
        slack = float((r - (y[0] + y[1] * t + y[2] * w)).max())
        if slack > 0:               # dual slightly infeasible: pay for it on every pipeline
            val += P * slack
        if val >= Z - 1e-9 * max(1.0, Z):
            break
        Z = val
    return Z


# ---------------------------------------------------------------------------------------
# LP and integer masters

def _highs_master(cols, vals, kinds_gpus, K_max, ubs):
    """The master problem as a HiGHS LP (minimising -value): one column per pattern (GPUs per
    kind, plus 1 in the pipeline-count row), at most ``ubs[i]`` copies of pattern i, rows: each
    kind's GPUs and the ``K_max`` pipelines."""
    import highspy
    lp = highspy.HighsLp()
    n, nk = len(cols), len(kinds_gpus)
    lp.num_col_, lp.num_row_ = n, nk + 1
    lp.col_cost_ = np.array([-v for v in vals], dtype=float)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.array([float(u) for u in ubs])
    lp.row_lower_ = np.full(nk + 1, -highspy.kHighsInf)
    lp.row_upper_ = np.array([float(g) for g in kinds_gpus] + [float(K_max)])
    starts, index, value = [], [], []
    for g in cols:
        starts.append(len(index))
        for k in sorted(g):
            if g[k]:
                index.append(k)
                value.append(float(g[k]))
        index.append(nk)
        value.append(1.0)
    starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=float)
    return lp


def ortools_available() -> bool:
    """Whether OR-Tools (GLOP, CP-SAT) can be used in this process. OR-Tools' wheel bundles its
    own HiGHS: with highspy 1.15.x in the same process whichever is loaded second fails with
    undefined symbols (1.11.0 and 1.16.0 load side by side). highspy is imported first so that
    a clash costs OR-Tools (False here, HiGHS is used), never the planner's HiGHS."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        pass
    try:
        from ortools.linear_solver import pywraplp  # noqa: F401
        from ortools.sat.python import cp_model  # noqa: F401,F811
    except ImportError:
        return False
    return True


def _run_highs(lp, time_limit=None):
    """Solve ``lp`` with HiGHS on one thread, as solver/hexplan/solver/milp.py does. HiGHS's
    thread pool is global: once started with another size, run() with threads=1 fails, so
    then run again with the pool as it is."""
    import highspy
    for threads in (True, False):
        with native_stdout_silenced():
            h = highspy.Highs()
            h.setOptionValue("output_flag", False)
            if threads:
                h.setOptionValue("threads", 1)
            if time_limit is not None:
                h.setOptionValue("time_limit", max(0.1, float(time_limit)))
            h.passModel(lp)
            if h.run() != highspy.HighsStatus.kError:
                return h
    raise RuntimeError(f"HiGHS failed: {h.getModelStatus()}")


LP_STATS: dict = {}     # backend -> [solves, seconds] (bench/pattern_lp_bench.py)


def _solve_lp(cols, vals, kinds_gpus, K_max, backend="highs"):
    """max sum vals x s.t. sum_p g_kp x_p <= G_k, sum x <= K_max. Returns (z, x, duals, mu)."""
    t0 = time.perf_counter()
    try:
        return _solve_lp_inner(cols, vals, kinds_gpus, K_max, backend)
    finally:
        st = LP_STATS.setdefault(backend, [0, 0.0])
        st[0] += 1
        st[1] += time.perf_counter() - t0


def _solve_lp_inner(cols, vals, kinds_gpus, K_max, backend):
    nk = len(kinds_gpus)
    if backend in ("glop", "pdlp"):
        if not ortools_available():
            raise RuntimeError(f"the {backend} backend needs OR-Tools (pip install 'hexplan[ortools]')")
        from ortools.linear_solver import pywraplp
        s = pywraplp.Solver.CreateSolver(backend.upper())
        xs = [s.NumVar(0.0, s.infinity(), f"x{i}") for i in range(len(cols))]
        rows = []
        for k in range(nk):
            c = s.Constraint(-s.infinity(), float(kinds_gpus[k]))
            for x, g in zip(xs, cols):
                if g.get(k):
                    c.SetCoefficient(x, float(g[k]))
            rows.append(c)
        ck = s.Constraint(-s.infinity(), float(K_max))
        for x in xs:
            ck.SetCoefficient(x, 1.0)
        obj = s.Objective()
        for x, v in zip(xs, vals):
            obj.SetCoefficient(x, float(v))
        obj.SetMaximization()
        st = s.Solve()
        if st != pywraplp.Solver.OPTIMAL:
            raise RuntimeError(f"{backend.upper()} status {st}")
        return obj.Value(), [x.solution_value() for x in xs], [max(0.0, r.dual_value()) for r in rows], \
            max(0.0, ck.dual_value())
    import highspy
    lp = _highs_master(cols, vals, kinds_gpus, K_max, [highspy.kHighsInf] * len(cols))
    h = _run_highs(lp)
    sol = h.getSolution()
    # minimising -v: row duals are <= 0 for <= rows; the max problem's duals are their negation
    duals = [max(0.0, -d) for d in sol.row_dual]
    return -h.getInfo().objective_function_value, list(sol.col_value), duals[:nk], duals[nk]


def _solve_int(cols, vals, kinds_gpus, K_max, time_limit, backend="cpsat", ubs=None, hint=None):
    """max sum vals y, y integer, same rows. Returns the multiplicities."""
    n = len(cols)
    ubs = ubs or [K_max] * n
    if backend == "cpsat" and not ortools_available():
        backend = "highs"
    if backend == "cpsat":
        from ortools.sat.python import cp_model
        m = cp_model.CpModel()
        ys = [m.NewIntVar(0, int(u), f"y{i}") for i, u in enumerate(ubs)]
        for k, G in enumerate(kinds_gpus):
            terms = [(int(g[k]), y) for y, g in zip(ys, cols) if g.get(k)]
            if terms:
                m.Add(sum(c * y for c, y in terms) <= int(G))
        m.Add(sum(ys) <= int(K_max))
        scale = 1e6 / max(max(vals, default=1.0), 1e-9)
        m.Maximize(sum(int(round(v * scale)) * y for v, y in zip(vals, ys)))
        if hint is not None:
            for y, h in zip(ys, hint):
                m.AddHint(y, int(h))
        s = cp_model.CpSolver()
        s.parameters.max_time_in_seconds = max(0.1, time_limit)
        s.parameters.num_workers = 1
        st = s.Solve(m)
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return [0] * n
        return [int(s.Value(y)) for y in ys]
    import highspy
    lp = _highs_master(cols, vals, kinds_gpus, K_max, ubs)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h = _run_highs(lp, time_limit)
    sol = h.getSolution()
    if not sol.value_valid:
        return [0] * n
    return [int(round(v)) for v in sol.col_value]


# ---------------------------------------------------------------------------------------
# Column generation

@dataclass
class PatternResult:
    bound: float                       # valid upper bound on any plan's throughput
    lp_value: float                    # last restricted master LP value (on upper values)
    patterns: list                     # generated patterns (tuples of (slot type, count))
    x: list                            # last LP solution
    log: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    context: Patterns | None = None
    duals: list | None = None          # last LP duals (per kind) and of the pipeline count
    mu: float = 0.0


def pattern_bound(problem: Problem, time_limit: float = 10.0, lp_backend: str = "highs",
                  progress=None, max_iter: int = 60, start=None, exact_share: float = 0.3) -> PatternResult:
    """Column generation over node kinds. ``result.bound`` is valid at every iteration (the
    smallest seen is kept); ``progress(msg)`` gets one line per iteration. Once the columns
    have converged, up to ``exact_share`` of the time left goes to the exact pass of the
    pricing (``Patterns._tighten``), which only lowers the bound."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    ctx = Patterns(problem)
    say = progress or (lambda msg: None)
    G = [k.gpus for k in ctx.kinds]
    K_max = ctx.P_max if ctx.P_max > 0 else 0
    log = []
    bound = compute_bound(problem)
    if K_max == 0:
        return PatternResult(0.0, 0.0, [], [], ["no pipeline fits"], 0, 0.0, ctx)
    # initial columns: single slots and, per kind, the cheapest full pipelines of its own
    pats: list = []
    seen = set()

    def add(pat):
        pat = tuple(sorted(pat))
        if pat and pat not in seen and ctx.upper_value(pat) > 0:
            seen.add(pat)
            pats.append(pat)

    for pipe in start or ():       # a known plan's pipelines (lists of slots): its patterns first
        pat = ctx.pattern_of(pipe)
        if pat is not None:
            add(pat)
    for p in ctx.seed_patterns():
        add(p)
    z, x = 0.0, []
    it = 0
    nk = len(ctx.kinds)
    n_local = 0
    while it < max_iter:
        if pats:
            cols = [ctx.gpus(p) for p in pats]
            vals = [ctx.upper_value(p) for p in pats]
            z, x, duals, mu = _solve_lp(cols, vals, G, K_max, lp_backend)
        else:
            z, x, duals, mu = 0.0, [], [0.0] * nk, 0.0
        remaining = deadline - time.perf_counter()
        last = remaining < 0.2 * time_limit
        if not last and n_local < LOCAL_ROUNDS and x:
            # cheap pricing first: patterns one group away from the LP's support, valued exactly
            # (u_p); the knapsack pricing (and the bound) only when none of them improves
            support = [p for p, v in zip(pats, x) if v > 1e-6]
            near = [(ctx.upper_value(q) - sum(duals[k] * v for k, v in ctx.gpus(q).items()) - mu, q)
                    for q in neighbour_patterns(ctx, support) if q not in seen]
            near = sorted(((rc, q) for rc, q in near if rc > 1e-6 * max(1.0, z)), reverse=True)[:NEW_COLUMNS]
            if near:
                n_local += 1
                for _, q in near:
                    add(q)
                say(f"patterns: LP {z:.2f}, +{len(near)} neighbouring columns, {time.perf_counter() - t0:.1f}s")
                continue
        it += 1
        goal = EXACT_GOAL * max(1.0, z) / max(1, K_max)
        rc_ub, cands = ctx.price(duals, mu, t0, time.perf_counter() + max(0.05, remaining * (0.8 if last else 0.4)),
                                 exact_until=deadline if last else None, exact_goal=goal,
                                 **(FINE if last else COARSE))
        # any duals >= 0 give pi.G + mu P >= every plan's sum of (u - rc); it is z_RMP for an
        # exact LP solution, and stays valid for approximate duals (PDLP)
        zd = sum(d * g for d, g in zip(duals, G)) + mu * K_max
        b = lagrangian_bound(zd, K_max, ctx.intervals, bound)
        bound = min(bound, b)
        new = sorted(((rc, p) for p, rc in cands.items() if rc > 1e-7 * max(1.0, z) and p not in seen),
                     reverse=True)[:NEW_COLUMNS]
        if not new and not last and rc_ub > 1e-6 * max(1.0, z) and time.perf_counter() < deadline:
            # converged on the columns: spend what is left on a fine pricing for the bound
            now = time.perf_counter()
            rc_ub, cands = ctx.price(duals, mu, t0, deadline, exact_until=now + exact_share * (deadline - now),
                                     exact_goal=goal, **FINE)
            bound = min(bound, lagrangian_bound(zd, K_max, ctx.intervals, bound))
            new = sorted(((rc, p) for p, rc in cands.items() if rc > 1e-7 * max(1.0, z) and p not in seen),
                         reverse=True)[:NEW_COLUMNS]
        for _, p in new:
            add(p)
        line = (f"patterns it {it}: LP {z:.2f}, max reduced cost <= {rc_ub:.3f}, bound {bound:.2f}, "
                f"columns {len(pats)} (+{len(new)}), {time.perf_counter() - t0:.1f}s")
        log.append(line)
        say(line)
        if not new or rc_ub <= 1e-6 * max(1.0, z) or time.perf_counter() > deadline:
            break
    return PatternResult(bound, z, pats, x, log, it, time.perf_counter() - t0, ctx, duals, mu)


def neighbour_patterns(ctx: Patterns, pats) -> set:
    """Patterns one group away from ``pats`` (one fewer, one more, one swapped for another
    type) that fit the cluster."""
    out = set()
    for p in pats:
        cnt = dict(p)
        for j in list(cnt):
            q = dict(cnt)
            q[j] -= 1
            if not q[j]:
                del q[j]
            out.add(tuple(sorted(q.items())))
            for t in ctx.types:
                if t.idx != j:
                    r = dict(q)
                    r[t.idx] = r.get(t.idx, 0) + 1
                    out.add(tuple(sorted(r.items())))
        for t in ctx.types:
            r = dict(cnt)
            r[t.idx] = r.get(t.idx, 0) + 1
            out.add(tuple(sorted(r.items())))
    return {q for q in out if q and ctx.fits(q)}


def _dive(ctx: Patterns, result: PatternResult, deadline: float, lp_backend: str) -> list:
    """Fix pipelines one at a time: the residual LP's largest pattern (a few pricing rounds
    on the GPUs left first), until no pipeline fits. Returns the patterns fixed."""
    pool = list(result.patterns)
    seen = set(pool)
    chosen = []
    P_left = ctx.P_max
    try:
        while P_left > 0 and time.perf_counter() < deadline:
            cols = [p for p in pool if ctx.fits(p) and ctx.upper_value(p) > 0]
            if not cols:
                # nothing generated fits what is left: price from zero duals
                budget = min(1.0, max(0.05, 0.1 * (deadline - time.perf_counter())))
                _, cands = ctx.price([0.0] * len(ctx.kinds), 0.0, 0.0, time.perf_counter() + budget,
                                     rel_tol=0.02, max_points=20, steps=4, ratio=1.5)
                for p, rc in cands.items():
                    if rc > 0 and p not in seen and ctx.fits(p):
                        seen.add(p)
                        pool.append(p)
                        cols.append(p)
                if not cols:
                    break
            x = []
            for _ in range(3):
                vals = [ctx.upper_value(p) for p in cols]
                z, x, duals, mu = _solve_lp([ctx.gpus(p) for p in cols], vals, ctx.caps, P_left, lp_backend)
                if time.perf_counter() > deadline:
                    break
                budget = min(1.0, max(0.05, 0.1 * (deadline - time.perf_counter())))
                _, cands = ctx.price(duals, mu, 0.0, time.perf_counter() + budget, rel_tol=0.02, max_points=20,
                                     steps=4, ratio=1.5)
                new = sorted(((rc, p) for p, rc in cands.items()
                              if rc > 1e-7 * max(1.0, z) and p not in seen and ctx.fits(p)), reverse=True)[:10]
                if not new:
                    break
                for _, p in new:
                    seen.add(p)
                    pool.append(p)
                    cols.append(p)
            order = sorted(range(len(x)), key=lambda i: (-min(1.0, round(x[i], 6)), -ctx.exact_value(cols[i])))
            order = [i for i in order if x[i] > 1e-6 and ctx.exact_value(cols[i]) > 0]
            if not order:
                break
            pick = cols[order[0]]
            if x[order[0]] < 1 - 1e-6 and len(order) > 1:
                # all fractional: one step of look-ahead, the exact value plus the residual LP
                best = -1.0
                for i in order[:5]:
                    p = cols[i]
                    left = list(ctx.caps)
                    for k, g in ctx.gpus(p).items():
                        left[k] -= g
                    rest = [q for q in cols if ctx.fits(q, left)]
                    zr = 0.0
                    if rest and P_left > 1:
                        zr = _solve_lp([ctx.gpus(q) for q in rest], [ctx.upper_value(q) for q in rest],
                                       left, P_left - 1, lp_backend)[0]
                    if ctx.exact_value(p) + zr > best:
                        best, pick = ctx.exact_value(p) + zr, p
            chosen.append(pick)
            for k, g in ctx.gpus(pick).items():
                ctx.caps[k] -= g
            P_left -= 1
    finally:
        ctx.caps = list(ctx.full)
    return chosen


def pattern_plan(problem: Problem, time_limit: float = 10.0, lp_backend: str = "highs",
                 int_backend: str | None = None, progress=None, result: PatternResult | None = None,
                 bound_share: float = 0.65, start=None, exact_share: float = 0.3):
    """(chains, result): integer patterns over the generated columns on their exact values,
    mapped onto concrete nodes (``ChainResult`` list, links shared counted), and the
    column-generation result (``result.bound`` is the valid bound)."""
    t0 = time.perf_counter()
    if result is None:
        result = pattern_bound(problem, time_limit * bound_share, lp_backend, progress, start=start,
                               exact_share=exact_share)
    ctx = result.context
    if int_backend is None:
        int_backend = "cpsat" if ortools_available() else "highs"
    deadline = t0 + 0.93 * time_limit   # the rest: mapping onto nodes, shared links
    G = [k.gpus for k in ctx.kinds]
    duals = result.duals or [0.0] * len(ctx.kinds)
    pool = {p: ctx.exact_value(p) for p in result.patterns}

    def solve(budget):
        ps = [p for p, v in pool.items() if v > 0]
        vs = [pool[p] for p in ps]
        if not ps:
            return [], 0.0
        cols = [ctx.gpus(p) for p in ps]
        # greedy start: the LP's whole pipelines, then the best value per GPU that fits
        lpx = dict(zip(result.patterns, result.x))
        left, k_left = list(G), ctx.P_max
        hint = [0] * len(ps)
        order = sorted(range(len(ps)), key=lambda i: (-math.floor(lpx.get(ps[i], 0.0) + 1e-6),
                                                      -vs[i] / max(1, sum(cols[i].values()))))
        for i in order:
            while k_left > 0 and all(left[k] >= g for k, g in cols[i].items()):
                for k, g in cols[i].items():
                    left[k] -= g
                hint[i] += 1
                k_left -= 1
                if hint[i] >= math.floor(lpx.get(ps[i], 0.0) + 1e-6) and lpx.get(ps[i], 0.0) >= 1:
                    break
        ys = _solve_int(cols, vs, G, ctx.P_max, budget, int_backend, hint=hint)
        if sum(y * v for y, v in zip(ys, vs)) < sum(y * v for y, v in zip(hint, vs)):
            ys = hint
        return [(p, y) for p, y in zip(ps, ys) if y], sum(y * v for y, v in zip(ys, vs))

    def neighbours(ps):
        """Patterns one slot away (one fewer, one more, one swapped), most promising first."""
        out = [q for q in neighbour_patterns(ctx, ps) if q not in pool]
        score = {q: ctx.upper_value(q) - sum(duals[k] * v for k, v in ctx.gpus(q).items()) for q in out}
        return sorted(out, key=lambda q: -score[q])

    chosen, value = solve(max(0.2, 0.2 * (deadline - time.perf_counter())))
    support = [p for p, v in zip(result.patterns, result.x) if v > 1e-6]
    for _ in range(6):
        if time.perf_counter() > deadline - 0.3:
            break
        cand = neighbours(set(support) | {p for p, _ in chosen})
        for q in cand[:200]:
            if time.perf_counter() > deadline - 0.3 * (deadline - t0) * 0.5:
                break
            pool[q] = ctx.exact_value(q)
        new_chosen, new_value = solve(max(0.2, 0.3 * (deadline - time.perf_counter())))
        if new_value <= value * (1 + 1e-9):
            break
        chosen, value = new_chosen, new_value
    say = progress or (lambda msg: None)
    say(f"patterns: integer choice {value:.2f} from {len(pool)} columns ({int_backend}), "
        f"{time.perf_counter() - t0:.1f}s")
    if time.perf_counter() < deadline - 0.2:
        dived = _dive(ctx, result, deadline, lp_backend)
        dv = sum(ctx.exact_value(p) for p in dived)
        say(f"patterns: dive {dv:.2f} ({len(dived)} pipelines), {time.perf_counter() - t0:.1f}s")
        if dv > value * (1 + 1e-9):
            counts: dict = {}
            for p in dived:
                counts[p] = counts.get(p, 0) + 1
            for p in counts:
                pool.setdefault(p, ctx.exact_value(p))
            chosen, value = list(counts.items()), dv
    chosen = [p for p, y in sorted(chosen, key=lambda z: -pool[z[0]]) for _ in range(y)]
    free = {n: ctx.kinds[k].count for n, k in ctx.kind_of.items()}
    chains = []
    for p in chosen:
        slots = ctx.materialize(p, free)
        if slots is None:
            continue
        r = ctx.ev(slots)
        if r is None or r.throughput <= 0:
            for x, d in slots:
                free[x] += d
            continue
        chains.append(r)
    chains = resolve_sharing(problem, chains)
    chains = [c for c in chains if c.throughput > 0]
    return chains, result


def chains_value(chains) -> float:
    return sum(c.throughput for c in chains)
