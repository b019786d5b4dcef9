"""The placement MILP: groups to pipelines, with fractional layer rates.

Data
    g in G      candidate TP groups: node n(g), degree d(g), copy index j(g) < count_n // d(g)
    p in P      pipeline slots, |P| = K = floor(layer capacity / L)
    r_g         layer rate of g (output tokens x layers / s), from the cost model
    m_g         layers that fit on g (weights + KV cache for the workload's concurrency)
    dec_g       seconds per layer of one decode step of g;  h_g its cheapest incoming hop
    C           sequences in flight per pipeline;  L layers;  U an upper bound on any T_p
Variables
    x[g,p] in {0,1}   g serves pipeline p          y[p] in {0,1}   pipeline p exists
    T[p] >= 0         throughput of p (tokens/s)   w[g,p] >= 0     T[p] * (layers of g in p)
    z[g,p] >= 0       T[p] * x[g,p] (linearised)   v[p,r], multi[p] in [0,1]  regions used
Constraints
    (1) sum_{g on n} d(g) sum_p x[g,p] <= count_n                      GPUs of a node
    (2) sum_p x[g,p] <= 1;  x[g,p] <= y[p]                               one use per group
    (3) sum_g m_g x[g,p] >= L y[p]                                       the model fits
    (4) sum_g w[g,p] = L T[p]                                            every layer is placed
    (5) w[g,p] <= r_g x[g,p]                                             stage compute: T l_g <= r_g
    (6) w[g,p] <= m_g T[p]                                               stage memory:  l_g <= m_g
    (7) z[g,p] >= T[p] - U (1 - x[g,p])
    (8) sum_g rt_g w[g,p] + sum_g h_g z[g,p] + (c0 - h_max) T[p] <= C   Little's law: T * ROUND <= C
        (rt = decode + B/O prefill seconds per layer; h, c0 likewise for hops and coordinator)
    (9) T[p] <= U y[p];  y[p] >= y[p+1];  T[p] >= T[p+1];  u[n,d,j] >= u[n,d,j+1]   symmetry
    (10) regions: v[p,r] >= x[g,p] (g in r);  multi[p] >= v[p,r] + v[p,s] - 1;
         T[p] <= cap_out(r) + U (2 - v[p,r] - multi[p])                  a crossing pipeline is
                                                                         limited by its WAN link
    (11) SLOs: (8)'s left side with C replaced by X T[p] (TPOT) and with prefill times (TTFT)
    (12) optional integer layers: l[g,p] = sum_b 2^b beta[g,p,b] <= m_g x[g,p], sum_g l = L y[p],
         w[g,p] = sum_b 2^b zeta[g,p,b] with zeta = T[p] * beta (exact McCormick at binary beta);
         l[g,p] <= m_g x[g,p] - df_g first[g,p] (and likewise last) where df_g is the layers g
         loses to the embedding (LM head) when it is the first (last) stage; a group is both
         first and last only in a one-stage pipeline
Objective: maximise sum_p T[p].

Interleaving (Workload.parts > 1): ROUND and TPOT are flow-shop times (hexplan.evaluate.flow_time)
that are at least the first link + sum / parts + latencies, so (8) and (11)'s TPOT divide the
stages' seconds and the links' transfer times (not their latencies) by parts; the TTFT keeps a
prompt whole (StageCost.ttft_layer_s). That drops the (parts - 1) / parts * slowest-server term:
a relaxation, as the bound needs.

With fractional layers, (4)-(6) describe a pipeline's throughput exactly (w = T * l); every
other constraint is the exact model's or weaker, so the MILP optimum, and HiGHS's dual bound, is
an upper bound on any plan with integer layers. Decoded solutions get exact integer layers from
solver/hexplan/solver/layers.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hexplan.costmodel import TOKEN_ID_BYTES, hop_decode_time, hop_prefill_time, \
    link_token_capacity, send_time

from .milp import LinearModel
from .problem import Problem


@dataclass
class Formulation:
    model: LinearModel
    cands: list            # candidate groups: (node, tp, j)
    K: int
    x: dict                # (g, p) -> var
    w: dict
    z: dict
    T: list
    y: list
    v: dict
    multi: list
    U: float
    ends: dict = None      # (p, "first"|"last", g) -> var, integer-layer model only
    bits: dict = None      # (g, p) -> [(beta, zeta)], integer-layer model only


def _split(t: float, latency: float, parts: int) -> float:
    """A message's time when it goes as ``parts`` pipelined parts, counted as the flow-shop
    relaxation does: its latency once, its transfer time / parts."""
    return t if parts <= 1 else latency + (t - latency) / parts


def _coord_min(problem: Problem, prefill: bool, parts: int = 1) -> float:
    """Cheapest coordinator link in + link out; with ``parts`` the link out's transfer is split
    (the link in carries the whole step before it is cut)."""
    cl, w = problem.cluster, problem.workload
    coord = cl.coordinator_node.name
    best = math.inf
    for n in problem.nodes:
        a, b = cl.link(coord, n.name), cl.link(n.name, coord)
        if prefill:
            t = send_time(w.prompt_tokens * TOKEN_ID_BYTES, a.bandwidth, a.latency) + _split(send_time(TOKEN_ID_BYTES, b.bandwidth, b.latency), b.latency, parts)
        else:
            t = send_time(w.batch_size * TOKEN_ID_BYTES, a.bandwidth, a.latency) + _split(send_time(w.batch_size * TOKEN_ID_BYTES, b.bandwidth, b.latency), b.latency, parts)
        best = min(best, t)
    return best


def _min_hop(problem: Problem, node: str, prefill: bool, parts: int = 1) -> float:
    cl, m, w = problem.cluster, problem.model, problem.workload
    f = hop_prefill_time if prefill else hop_decode_time
    best = math.inf
    for n in problem.nodes:
        if n.name == node and n.count < 2:
            continue
        lk = cl.link(n.name, node)
        best = min(best, _split(f(m, w, lk.bandwidth, lk.latency), lk.latency, parts))
    return 0.0 if best == math.inf else best


def single_gpu_classes(problem: Problem, cands) -> dict:
    out: dict = {}
    named = {x for rule in problem.cluster.links for x in rule.between}
    coord = problem.cluster.coordinator_node.name
    for g, (node, tp, j) in enumerate(cands):
        n = problem.node_by_name[node]
        if n.count != 1 or n.name in named or n.name == coord:
            continue
        out.setdefault((n.gpu, n.interconnect, n.region), []).append(g)
    return {k: v for k, v in out.items() if len(v) > 1}


def build(problem: Problem, K: int, upper: float, integer_layers: bool = False) -> Formulation:
    lm = LinearModel()
    cands = []
    for n in problem.nodes:
        for d in problem.allowed_tp[n.name]:
            for j in range(n.count // d):
                cands.append((n.name, d, j))
    G = range(len(cands))
    P = range(K)
    r = [problem.rate((c[0], c[1])) for c in cands]
    mcap = [problem.max_layers((c[0], c[1])) for c in cands]
    # Layers lost by the first stage (embedding) and by the last stage (final norm + LM head).
    d_first = [mcap[g] - problem.cost(c[0], c[1]).max_layers(first=True) for g, c in enumerate(cands)]
    d_last = [mcap[g] - problem.cost(c[0], c[1]).max_layers(last=True) for g, c in enumerate(cands)]
    parts = problem.workload.parts      # interleaving: seconds of stages and transfers / parts
    dec = [problem.cost(c[0], c[1]).decode_layer_s / parts for c in cands]
    pre = [problem.cost(c[0], c[1]).prefill_layer_s / parts for c in cands]
    h_dec = {c[0]: _min_hop(problem, c[0], False, parts) for c in cands}
    h_pre = {c[0]: _min_hop(problem, c[0], True, parts) for c in cands}
    hmax_dec = max(h_dec.values(), default=0.0)
    hmax_pre = max(h_pre.values(), default=0.0)
    c0_dec, c0_pre = _coord_min(problem, False, parts), _coord_min(problem, True, parts)
    # TTFT: a prompt alone, not cut into parts
    pre_t = pre if parts == 1 else [problem.cost(c[0], c[1]).ttft_layer_s for c in cands]
    h_pre_t = h_pre if parts == 1 else {c[0]: _min_hop(problem, c[0], True) for c in cands}
    hmax_pre_t = max(h_pre_t.values(), default=0.0)
    c0_pre_t = c0_pre if parts == 1 else _coord_min(problem, True)
    L, C, U = problem.L, problem.workload.concurrency, upper
    share = problem.workload.batch_size / problem.workload.output_tokens
    name = lambda g: f"{cands[g][0]}/tp{cands[g][1]}#{cands[g][2]}"

    T = [lm.var(f"T[p{p}]", 0.0, U) for p in P]
    y = [lm.binary(f"y[p{p}]") for p in P]
    x, w, z = {}, {}, {}
    ends_vars, bits_vars, bits_of = {}, {}, {}
    for g in G:
        for p in P:
            x[g, p] = lm.binary(f"x[{name(g)},p{p}]")
            w[g, p] = lm.var(f"w[{name(g)},p{p}]", 0.0, r[g])
            z[g, p] = lm.var(f"z[{name(g)},p{p}]", 0.0, U)
    # (1) GPUs per node, (2) one use per group, symmetry among copies of a group
    by_node: dict = {}
    for g, c in enumerate(cands):
        by_node.setdefault(c[0], []).append(g)
    for n in problem.nodes:
        coeffs = {}
        for g in by_node.get(n.name, []):
            for p in P:
                coeffs[x[g, p]] = cands[g][1]
        lm.add(coeffs, hi=n.count, name=f"gpus[{n.name}]")
    for g in G:
        lm.add({x[g, p]: 1 for p in P}, hi=1, name=f"once[{name(g)}]")
        if g + 1 < len(cands) and cands[g + 1][:2] == cands[g][:2]:
            c = {x[g, p]: 1 for p in P}
            c.update({x[g + 1, p]: -1 for p in P})
            lm.add(c, lo=0, name=f"sym[{name(g)}]")
    # Interchangeable single-GPU nodes (same GPU type, region, no link rule naming them, not
    # the coordinator) are ordered by the pipeline they serve (unused = K + 1).
    classes = single_gpu_classes(problem, cands)
    for members in classes.values():
        for g1, g2 in zip(members, members[1:]):
            c = {x[g1, p]: (p + 1) - (K + 1) for p in P}
            for p in P:
                c[x[g2, p]] = c.get(x[g2, p], 0) - ((p + 1) - (K + 1))
            lm.add(c, hi=0)
    for p in P:
        for g in G:
            lm.add({x[g, p]: 1, y[p]: -1}, hi=0)
        # (3) memory, (4) layers
        c = {x[g, p]: mcap[g] for g in G}
        c[y[p]] = -L
        lm.add(c, lo=0, name=f"fits[p{p}]")
        c = {w[g, p]: 1 for g in G}
        c[T[p]] = -L
        lm.add(c, lo=0, hi=0, name=f"layers[p{p}]")
        for g in G:
            lm.add({w[g, p]: 1, x[g, p]: -r[g]}, hi=0)              # (5)
            lm.add({w[g, p]: 1, T[p]: -mcap[g]}, hi=0)              # (6)
            lm.add({z[g, p]: 1, T[p]: -1, x[g, p]: -U}, lo=-U)      # (7)
        if integer_layers:
            # (12) integer layers: l = sum_b 2^b beta_b, w = T * l = sum_b 2^b zeta_b with
            # zeta_b = T * beta_b linearised exactly at binary beta_b.
            lsum = {}
            firsts = {g: lm.binary(f"first[{name(g)},p{p}]") for g in G}
            lasts = {g: lm.binary(f"last[{name(g)},p{p}]") for g in G}
            for g in G:
                ends_vars[p, "first", g] = firsts[g]
                ends_vars[p, "last", g] = lasts[g]
            for g in G:
                bits = max(1, int(mcap[g]).bit_length())
                lc, wc = {}, {w[g, p]: 1}
                bits_of[g] = bits_vars[g, p] = []
                for b in range(bits):
                    beta = lm.binary(f"beta[{name(g)},p{p},{b}]")
                    zeta = lm.var(f"zeta[{name(g)},p{p},{b}]", 0.0, U)
                    bits_of[g].append((beta, zeta))
                    lm.add({zeta: 1, beta: -U}, hi=0)
                    lm.add({zeta: 1, T[p]: -1}, hi=0)
                    lm.add({zeta: 1, T[p]: -1, beta: -U}, lo=-U)
                    lc[beta] = 2 ** b
                    wc[zeta] = -(2 ** b)
                    lsum[beta] = 2 ** b
                lm.add(wc, lo=0, hi=0)
                c = dict(lc)
                c[x[g, p]] = -mcap[g]
                lm.add(c, hi=0)                      # l <= m_g x
                for ends, delta in ((firsts, d_first), (lasts, d_last)):
                    lm.add({ends[g]: 1, x[g, p]: -1}, hi=0)
                    if delta[g] > 0:                 # l <= m_g x - delta_g [g is first/last]
                        c = dict(lc)
                        c[x[g, p]] = -mcap[g]
                        c[ends[g]] = delta[g]
                        lm.add(c, hi=0)
                c = dict(lc)
                c[x[g, p]] = -1
                lm.add(c, lo=0)                      # l >= x: a used group holds a layer
            c = dict(lsum)
            c[y[p]] = -L
            lm.add(c, lo=0, hi=0, name=f"int_layers[p{p}]")
            # Every open pipeline has exactly one first and one last stage, and they are the
            # same group only when it is the pipeline's only stage.
            for ends in (firsts, lasts):
                c = {v_: 1 for v_ in ends.values()}
                c[y[p]] = -1
                lm.add(c, lo=0, hi=0)
            n_g = len(cands)
            for g in G:
                c = {x[h, p]: 1 for h in G if h != g}
                c[firsts[g]] = n_g
                c[lasts[g]] = n_g
                lm.add(c, hi=2 * n_g)
        # (8) Little's law on the round trip (decode + B/O of a prefill per round)
        c = {w[g, p]: dec[g] + share * pre[g] for g in G}
        c.update({z[g, p]: h_dec[cands[g][0]] + share * h_pre[cands[g][0]] for g in G})
        c[T[p]] = c0_dec + share * c0_pre - hmax_dec - share * hmax_pre
        lm.add(c, hi=C, name=f"little[p{p}]")
        # (11) SLOs
        if problem.slo_tpot:
            c = {w[g, p]: dec[g] for g in G}
            c.update({z[g, p]: h_dec[cands[g][0]] for g in G})
            c[T[p]] = c0_dec - hmax_dec - problem.slo_tpot
            lm.add(c, hi=0, name=f"slo_tpot[p{p}]")
        if problem.slo_ttft:
            c = {w[g, p]: pre_t[g] for g in G}
            c.update({z[g, p]: h_pre_t[cands[g][0]] for g in G})
            c[T[p]] = c0_pre_t - hmax_pre_t - problem.slo_ttft
            lm.add(c, hi=0, name=f"slo_ttft[p{p}]")
        # (9)
        lm.add({T[p]: 1, y[p]: -U}, hi=0)
        if p + 1 < K:
            lm.add({y[p]: 1, y[p + 1]: -1}, lo=0)
            lm.add({T[p]: 1, T[p + 1]: -1}, lo=0)
    # (10) regions
    v, multi = {}, []
    regions = problem.cluster.regions
    if len(regions) > 1:
        cl, m, wl = problem.cluster, problem.model, problem.workload
        cap_out = {}
        for ra in regions:
            best = 0.0
            for na in problem.nodes:
                if na.region != ra:
                    continue
                for nb in problem.nodes:
                    if nb.region != ra:
                        best = max(best, link_token_capacity(m, wl, cl.link(na.name, nb.name).bandwidth))
            cap_out[ra] = best
        for p in P:
            mu = lm.var(f"multi[p{p}]", 0.0, 1.0)
            multi.append(mu)
            for ra in regions:
                v[p, ra] = lm.var(f"v[p{p},{ra or 'default'}]", 0.0, 1.0)
                for g in G:
                    if problem.node_by_name[cands[g][0]].region == ra:
                        lm.add({v[p, ra]: 1, x[g, p]: -1}, lo=0)
            for i, ra in enumerate(regions):
                for rb in regions[i + 1:]:
                    lm.add({mu: 1, v[p, ra]: -1, v[p, rb]: -1}, lo=-1)
                if cap_out[ra] < U:
                    lm.add({T[p]: 1, v[p, ra]: U, mu: U}, hi=cap_out[ra] + 2 * U)
    lm.objective = {T[p]: 1.0 for p in P}
    return Formulation(lm, cands, K, x, w, z, T, y, v, multi, U, ends_vars, bits_vars)


def warm_start(f: Formulation, problem: Problem, chains) -> list:
    """A feasible point of the MILP from exact chain results (sorted by throughput)."""
    vals = [0.0] * f.model.num_vars
    chains = sorted([c for c in chains if c is not None and c.throughput > 0], key=lambda c: -c.throughput)[:f.K]
    # Relabel interchangeable single-GPU nodes so the symmetry-breaking order holds.
    classes = single_gpu_classes(problem, f.cands)
    class_of = {f.cands[g][0]: k for k, members in classes.items() for g in members}
    next_member = {k: 0 for k in classes}
    relabelled = []
    for ch in chains:
        slots = []
        for node, tp in ch.slots:
            k = class_of.get(node)
            if k is not None:
                node = f.cands[classes[k][next_member[k]]][0]
                next_member[k] += 1
            slots.append((node, tp))
        relabelled.append((ch, slots))
    next_j: dict = {}
    for p, (ch, slots) in enumerate(relabelled):
        T = ch.throughput
        vals[f.T[p]] = T
        vals[f.y[p]] = 1.0
        regions = set()
        k = len(ch.slots)
        for i, ((node, tp), l) in enumerate(zip(slots, ch.layers)):
            j = next_j.get((node, tp), 0)
            next_j[(node, tp)] = j + 1
            g = f.cands.index((node, tp, j))
            vals[f.x[g, p]] = 1.0
            vals[f.w[g, p]] = T * l
            vals[f.z[g, p]] = T
            if f.ends:
                if i == 0:
                    vals[f.ends[p, "first", g]] = 1.0
                if i == k - 1:
                    vals[f.ends[p, "last", g]] = 1.0
                for b, (beta, zeta) in enumerate(f.bits[g, p]):
                    if (l >> b) & 1:
                        vals[beta] = 1.0
                        vals[zeta] = T
            regions.add(problem.node_by_name[node].region)
        if f.multi:
            for r in regions:
                vals[f.v[p, r]] = 1.0
            vals[f.multi[p]] = 1.0 if len(regions) > 1 else 0.0
    return vals


def decode(f: Formulation, values) -> list:
    """Slot lists of the pipelines the MILP solution opens."""
    out = []
    for p in range(f.K):
        if values[f.y[p]] < 0.5:
            continue
        slots = [(f.cands[g][0], f.cands[g][1]) for g in range(len(f.cands)) if values[f.x[g, p]] > 0.5]
        if slots:
            out.append(slots)
    return out
