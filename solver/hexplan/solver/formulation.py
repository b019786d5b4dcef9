"""The placement MILP: groups to pipelines, with fractional layer rates.

Data
    g in G      candidate TP groups: node n(g), degree d(g), copy index j(g) < count_n // d(g)
    p in P      pipeline slots, |P| = K = floor(layer capacity / L)
    r_g         layer rate of g (output tokens x layers / s), from the cost model
    m_g         layers that fit on g (weights + KV cache for the workload's concurrency)
    rt_g        seconds per layer of one round (decode + B/O prefill) of g
    h_g         cheapest hop into g: from another node, or from g's own node when another
                group fits beside g (a group that fills its node never gets the intra-node hop)
    a_g, b_g    the coordinator's link into / out of g's node (exact)
    S           the groups on the coordinator's node
    C           sequences in flight per pipeline;  L layers
    U           an upper bound on any one T_p: min(compute bound, max_g r_g, C / (L min_g rt_g))
Variables
    x[g,p] in {0,1}   g serves pipeline p          y[p] in {0,1}   pipeline p exists
    T[p] >= 0         throughput of p (tokens/s)   w[g,p] >= 0     T[p] * (layers of g in p)
    z[g,p] >= 0       T[p] * x[g,p] (linearised)   v[p,r], multi[p] in [0,1]  regions used
    qc[p] >= 0        T[p] * [p uses a group of S]  zr, zo, ze       region crossings (10b)
Constraints
    (1) sum_{g on n} d(g) sum_p x[g,p] <= count_n                      GPUs of a node
    (2) sum_p x[g,p] <= 1;  x[g,p] <= y[p]                               one use per group
    (3) sum_g m_g x[g,p] >= L y[p]                                       the model fits
    (4) sum_g w[g,p] = L T[p]                                            every layer is placed
    (5) w[g,p] <= r_g x[g,p]                                             stage compute: T l_g <= r_g
    (6) w[g,p] <= m_g z[g,p];  w[g,p] >= z[g,p]                          1 <= l_g <= m_g when used
    (7) z[g,p] >= T[p] - U (1 - x[g,p]);  z[g,p] <= T[p];  z[g,p] <= min(U, r_g, cap_g) x[g,p]   (z = T x)
        cap_g: region limits of any pipeline using g (group_cap)
    (8) sum_g rt_g w[g,p] + sum_g h_g z[g,p] + c T[p] - Delta qc[p] <= C      Little's law
        with c = b_o - delta_o, b_o = min_{g not in S} b_g, delta_o = max_{g not in S} (h_g - a_g)
        (every stage is entered by a hop except the first, entered by the coordinator's link
        in; the last sends to the coordinator), Delta >= 0 what a group of S can lower c by;
        qc[p] <= T[p], qc[p] <= U sum_{g in S} x[g,p]
    (9) T[p] <= U y[p];  y[p] >= y[p+1];  T[p] >= T[p+1];  u[n,d,j] >= u[n,d,j+1]   symmetry;
        interchangeable single-GPU nodes ordered by pipeline, interchangeable multi-GPU nodes
        by the GPUs they use
    (10) regions: v[p,r] >= x[g,p] (g in r);  multi[p] >= v[p,r] + v[p,s] - 1;
         T[p] <= cap_out(r) + U (2 - v[p,r] - multi[p])                  a crossing pipeline is
                                                                         limited by its WAN link
    (10b) sum_g rt_g w[g,p] + 2 X_1 zo[p] + X_hop ze[p] <= C: a round trip that visits k >= 2
         regions (the coordinator's counted) crosses a boundary >= k times, at most two of them
         on coordinator links (X_1: cheapest crossing message; X_hop: cheapest crossing hop);
         zr[p,r] >= T[p] - U (1 - v[p,r]) (r not the coordinator's region), zo >= zr[p,r],
         ze >= sum_r zr[p,r] - T[p]
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
    qc: list = None        # p -> var (T[p] when p uses the coordinator's node) or None
    cross: dict = None     # p -> (zr {region: var}, zo, ze): region crossings
    node_classes: dict = None   # interchangeable multi-GPU nodes


def _split(t: float, latency: float, parts: int) -> float:
    """A message's time when it goes as ``parts`` pipelined parts, counted as the flow-shop
    relaxation does: its latency once, its transfer time / parts."""
    return t if parts <= 1 else latency + (t - latency) / parts


def _min_hop(problem: Problem, node: str, prefill: bool, parts: int = 1, tp: int | None = None) -> float:
    """Cheapest hop into a group on ``node``. The node's own fabric counts only when another
    group fits beside it (with ``tp`` given: ``count - tp`` GPUs hold a group of an allowed
    degree), so a group that fills its node is charged the cheapest link from another node."""
    cl, m, w = problem.cluster, problem.model, problem.workload
    f = hop_prefill_time if prefill else hop_decode_time
    best = math.inf
    for n in problem.nodes:
        if n.name == node:
            room = n.count - (tp if tp is not None else 1)
            degs = problem.allowed_tp.get(n.name) or [1]
            if room < min(degs):
                continue
        lk = cl.link(n.name, node)
        best = min(best, _split(f(m, w, lk.bandwidth, lk.latency), lk.latency, parts))
    return 0.0 if best == math.inf else best


def _coord_links(problem: Problem, node: str, parts: int = 1) -> dict:
    """The coordinator's messages to and from ``node``: seconds of the link in (decode step,
    prompt; never cut) and of the link out (decode step, first token; transfer split into
    ``parts``)."""
    cl, w = problem.cluster, problem.workload
    coord = cl.coordinator_node.name
    a, b = cl.link(coord, node), cl.link(node, coord)
    return {
        "in_dec": send_time(w.batch_size * TOKEN_ID_BYTES, a.bandwidth, a.latency),
        "in_pre": send_time(w.prompt_tokens * TOKEN_ID_BYTES, a.bandwidth, a.latency),
        "out_dec": _split(send_time(w.batch_size * TOKEN_ID_BYTES, b.bandwidth, b.latency), b.latency, parts),
        "out_pre": _split(send_time(TOKEN_ID_BYTES, b.bandwidth, b.latency), b.latency, parts),
    }


def fixed_terms(problem: Problem, cands, weights: tuple, parts: int = 1) -> dict:
    """The fixed (non-layer) seconds of a pipeline in one of (8)'s or (11)'s sums, charged at
    the least they can cost. ``weights`` = (decode weight, prefill weight): (1, B/O) for the
    round trip (8), (1, 0) for TPOT, (0, 1) for TTFT.

    Every stage is entered once, by a hop (at least h_g, the cheapest hop into g) or, for the
    first stage, by the coordinator's link in (a_g, exact for g's node); the last stage sends to
    the coordinator (b_g, exact). So, with S the groups on the coordinator's node,
        fixed >= sum_{g in p} h_g - max_{g in p} (h_g - a_g) + min_{g in p} b_g
              >= sum_{g in p} h_g + (b_o - delta_o)                 if p uses no group of S
              >= sum_{g in p} h_g + (b_o - delta_o) - Delta         otherwise,
    delta_o = max_{g not in S}(h_g - a_g), b_o = min_{g not in S} b_g, and Delta the most a
    group of S can lower the pair. Returns h (per group), c = b_o - delta_o and Delta >= 0."""
    wd, wp = weights
    coord = problem.cluster.coordinator_node.name
    h, a, b = [], [], []
    cache: dict = {}
    for c in cands:
        key = (c[0], c[1])
        if key not in cache:
            hd = _min_hop(problem, c[0], False, parts, c[1]) if wd else 0.0
            hp = _min_hop(problem, c[0], True, parts, c[1]) if wp else 0.0
            cl_ = _coord_links(problem, c[0], parts)
            cache[key] = (wd * hd + wp * hp, wd * cl_["in_dec"] + wp * cl_["in_pre"],
                          wd * cl_["out_dec"] + wp * cl_["out_pre"])
        hg, ag, bg = cache[key]
        h.append(hg)
        a.append(ag)
        b.append(bg)
    inS = [c[0] == coord for c in cands]
    other = [g for g in range(len(cands)) if not inS[g]]
    mine = [g for g in range(len(cands)) if inS[g]]

    def pair(gs):
        return (min(b[g] for g in gs), max(h[g] - a[g] for g in gs)) if gs else (math.inf, -math.inf)

    b_o, d_o = pair(other)
    b_s, d_s = pair(mine)
    if not other:       # every group is on the coordinator's node
        return {"h": h, "c": b_s - d_s, "delta": 0.0, "S": inS}
    c_o = b_o - d_o
    c_any = min(b_o, b_s) - max(d_o, d_s)
    return {"h": h, "c": c_o, "delta": max(0.0, c_o - c_any), "S": inS}


def _cross_costs(problem: Problem, weights: tuple, parts: int = 1) -> tuple[float, float]:
    """(X_1, X_hop): the least a message that crosses a region boundary can cost, over every
    message (coordinator links included), and over hops only (activations)."""
    cl, m, w = problem.cluster, problem.model, problem.workload
    wd, wp = weights
    coord = cl.coordinator_node
    x_hop = math.inf
    for na in problem.nodes:
        for nb in problem.nodes:
            if na.region != nb.region:
                lk = cl.link(na.name, nb.name)
                t = (wd * _split(hop_decode_time(m, w, lk.bandwidth, lk.latency), lk.latency, parts)
                     + wp * _split(hop_prefill_time(m, w, lk.bandwidth, lk.latency), lk.latency, parts))
                x_hop = min(x_hop, t)
    x_coord = math.inf
    for n in problem.nodes:
        if n.region != coord.region:
            c = _coord_links(problem, n.name, parts)
            x_coord = min(x_coord, wd * c["in_dec"] + wp * c["in_pre"], wd * c["out_dec"] + wp * c["out_pre"])
    x1 = min(x_hop, x_coord)
    return (0.0 if x1 == math.inf else x1), (0.0 if x_hop == math.inf else x_hop)


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


def multi_gpu_classes(problem: Problem) -> dict:
    """Interchangeable multi-GPU nodes: same GPU type, count, fabric and region, no link rule
    naming them, not the coordinator. Swapping two of them maps plans onto plans of the same
    value, so they can be ordered by the GPUs they use."""
    named = {x for rule in problem.cluster.links for x in rule.between}
    coord = problem.cluster.coordinator_node.name
    out: dict = {}
    for n in problem.nodes:
        if n.count < 2 or n.name in named or n.name == coord:
            continue
        out.setdefault((n.gpu, n.count, n.interconnect, n.region), []).append(n.name)
    return {k: v for k, v in out.items() if len(v) > 1}


def pipeline_upper(problem: Problem, cands, upper: float) -> float:
    """An upper bound on one pipeline's throughput: every used group holds >= 1 layer, so
    T <= r_g <= max_g r_g; and Little's law with only the layers' own seconds, T <= C / (L
    min_g rt_g)."""
    share = problem.workload.batch_size / problem.workload.output_tokens
    parts = problem.workload.parts
    best_rt = min((problem.cost(c[0], c[1]).decode_layer_s + share * problem.cost(c[0], c[1]).prefill_layer_s)
                  / parts for c in cands)
    u = min(upper, max(problem.rate((c[0], c[1])) for c in cands))
    if best_rt > 0:
        u = min(u, problem.workload.concurrency / (problem.L * best_rt))
    return u


def group_cap(problem: Problem, cand, share: float, parts: int) -> float:
    """An upper bound on the throughput of any pipeline that uses group ``cand``, from regions
    (z[g,p] <= this * x[g,p], and then w <= m_g z: strong even in the LP relaxation):

    * g's region cannot hold a copy of the model (its nodes' layer capacity < L): the pipeline
      has a stage outside the region, so a hop into or out of it, and T <= the fastest link
      across the region's border (in either direction);
    * g is outside the coordinator's region: the round trip crosses a border at least twice,
      T <= C / (L min_g rt_g + 2 X_1)."""
    cache = getattr(problem, "_group_cap", None)
    if cache is None:
        cache = problem._group_cap = {}
    n = problem.node_by_name[cand[0]]
    if n.region in cache:
        return cache[n.region]
    cl, m, w = problem.cluster, problem.model, problem.workload
    cap = math.inf
    if len(cl.regions) > 1:
        mine = [x for x in problem.nodes if x.region == n.region]
        if sum(problem.best_partition_rate(x.name)[1] for x in mine) < problem.L:
            best = 0.0
            for na in mine:
                for nb in problem.nodes:
                    if nb.region != n.region:
                        best = max(best, link_token_capacity(m, w, cl.link(na.name, nb.name).bandwidth),
                                   link_token_capacity(m, w, cl.link(nb.name, na.name).bandwidth))
            cap = best
        if n.region != cl.coordinator_node.region:
            x1, _ = _cross_costs(problem, (1.0, share), parts)
            rt = min((problem.cost(x.name, d).decode_layer_s + share * problem.cost(x.name, d).prefill_layer_s) / parts
                     for x in problem.nodes for d in problem.allowed_tp[x.name])
            if rt * problem.L + 2 * x1 > 0:
                cap = min(cap, w.concurrency / (rt * problem.L + 2 * x1))
    cache[n.region] = cap
    return cap


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
    share = problem.workload.batch_size / problem.workload.output_tokens
    # Fixed seconds (hops, coordinator links) of the round trip, TPOT and TTFT (a prompt alone,
    # not cut into parts), charged at the least they can cost (fixed_terms).
    fx_round = fixed_terms(problem, cands, (1.0, share), parts)
    fx_tpot = fixed_terms(problem, cands, (1.0, 0.0), parts) if problem.slo_tpot else None
    fx_ttft = fixed_terms(problem, cands, (0.0, 1.0), 1) if problem.slo_ttft else None
    pre_t = pre if parts == 1 else [problem.cost(c[0], c[1]).ttft_layer_s for c in cands]
    L, C = problem.L, problem.workload.concurrency
    U = pipeline_upper(problem, cands, upper)
    zub = [min(U, r[g], group_cap(problem, c, share, parts)) for g, c in enumerate(cands)]
    name = lambda g: f"{cands[g][0]}/tp{cands[g][1]}#{cands[g][2]}"

    T = [lm.var(f"T[p{p}]", 0.0, U) for p in P]
    y = [lm.binary(f"y[p{p}]") for p in P]
    x, w, z = {}, {}, {}
    ends_vars, bits_vars, bits_of = {}, {}, {}
    for g in G:
        for p in P:
            x[g, p] = lm.binary(f"x[{name(g)},p{p}]")
            w[g, p] = lm.var(f"w[{name(g)},p{p}]", 0.0, r[g])
            z[g, p] = lm.var(f"z[{name(g)},p{p}]", 0.0, zub[g])
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
    # Interchangeable multi-GPU nodes: the first of a class uses at least as many GPUs as the next.
    node_classes = multi_gpu_classes(problem)
    for members in node_classes.values():
        for n1, n2 in zip(members, members[1:]):
            c = {}
            for g in by_node.get(n1, []):
                for p in P:
                    c[x[g, p]] = c.get(x[g, p], 0) + cands[g][1]
            for g in by_node.get(n2, []):
                for p in P:
                    c[x[g, p]] = c.get(x[g, p], 0) - cands[g][1]
            lm.add(c, lo=0, name=f"symnode[{n1},{n2}]")
    # qc[p] >= T[p] when p uses a group on the coordinator's node (the only way its coordinator
    # links can be cheaper than c): qc <= T, qc <= U sum_{g in S} x[g,p].
    S = [g for g in G if fx_round["S"][g]]
    deltas = [fx["delta"] for fx in (fx_round, fx_tpot, fx_ttft) if fx is not None]
    qc = [None] * K
    if S and max(deltas) > 0:
        for p in P:
            qc[p] = lm.var(f"qc[p{p}]", 0.0, U)
            lm.add({qc[p]: 1, T[p]: -1}, hi=0)
            c = {qc[p]: 1}
            c.update({x[g, p]: -U for g in S})
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
            lm.add({w[g, p]: 1, z[g, p]: -mcap[g]}, hi=0)           # (6) l_g <= m_g: w <= m_g T x
            lm.add({z[g, p]: 1, T[p]: -1, x[g, p]: -U}, lo=-U)      # (7) z = T x (McCormick)
            lm.add({z[g, p]: 1, T[p]: -1}, hi=0)
            lm.add({z[g, p]: 1, x[g, p]: -zub[g]}, hi=0)
            lm.add({w[g, p]: 1, z[g, p]: -1}, lo=0)                 # l_g >= 1 when used
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
        def fixed(c, fx, extra=0.0):
            c.update({z[g, p]: fx["h"][g] for g in G})
            c[T[p]] = fx["c"] + extra
            if qc[p] is not None and fx["delta"] > 0:
                c[qc[p]] = -fx["delta"]
            return c
        c = fixed({w[g, p]: dec[g] + share * pre[g] for g in G}, fx_round)
        lm.add(c, hi=C, name=f"little[p{p}]")
        # (11) SLOs
        if problem.slo_tpot:
            c = fixed({w[g, p]: dec[g] for g in G}, fx_tpot, -problem.slo_tpot)
            lm.add(c, hi=0, name=f"slo_tpot[p{p}]")
        if problem.slo_ttft:
            c = fixed({w[g, p]: pre_t[g] for g in G}, fx_ttft, -problem.slo_ttft)
            lm.add(c, hi=0, name=f"slo_ttft[p{p}]")
        # (9)
        lm.add({T[p]: 1, y[p]: -U}, hi=0)
        if p + 1 < K:
            lm.add({y[p]: 1, y[p + 1]: -1}, lo=0)
            lm.add({T[p]: 1, T[p + 1]: -1}, lo=0)
    # (10) regions
    v, multi, cross = {}, [], {}
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
        # (10b) the round trip crosses region boundaries: with k regions visited (the
        # coordinator's included) at least k crossings when k >= 2, each a message of at least
        # X_1 seconds, and all but two of them hops (at least X_hop):
        #   sum_g rt_g w[g,p] + 2 X_1 zo[p] + X_hop ze[p] <= C
        # with zr[p,r] = T v[p,r] (r not the coordinator's region), zo = T [some such r],
        # ze = T (#such r - 1)+, all linearised from below.
        r0 = problem.cluster.coordinator_node.region
        x1, xh = _cross_costs(problem, (1.0, share), parts)
        far = [ra for ra in regions if ra != r0]
        if (x1 > 0 or xh > 0) and far:
            for p in P:
                zr = {}
                for ra in far:
                    zr[ra] = lm.var(f"zr[p{p},{ra or 'default'}]", 0.0, U)
                    lm.add({zr[ra]: 1, T[p]: -1, v[p, ra]: -U}, lo=-U)
                zo = lm.var(f"zo[p{p}]", 0.0, U)
                for ra in far:
                    lm.add({zo: 1, zr[ra]: -1}, lo=0)
                ze = lm.var(f"ze[p{p}]", 0.0, U * len(far))
                c = {ze: 1, T[p]: 1}
                c.update({zr[ra]: -1 for ra in far})
                lm.add(c, lo=0)
                cross[p] = (zr, zo, ze)
                c = {w[g, p]: dec[g] + share * pre[g] for g in G}
                c[zo] = 2 * x1
                c[ze] = xh
                lm.add(c, hi=C, name=f"cross[p{p}]")
    lm.objective = {T[p]: 1.0 for p in P}
    return Formulation(lm, cands, K, x, w, z, T, y, v, multi, U, ends_vars, bits_vars, qc, cross, node_classes)


def warm_start(f: Formulation, problem: Problem, chains) -> list:
    """A feasible point of the MILP from exact chain results (sorted by throughput)."""
    vals = [0.0] * f.model.num_vars
    chains = sorted([c for c in chains if c is not None and c.throughput > 0], key=lambda c: -c.throughput)[:f.K]
    # Relabel interchangeable single-GPU nodes so the symmetry-breaking order holds.
    classes = single_gpu_classes(problem, f.cands)
    class_of = {f.cands[g][0]: k for k, members in classes.items() for g in members}
    next_member = {k: 0 for k in classes}
    # Interchangeable multi-GPU nodes: the most used first (the order symnode[...] asks for).
    rename = {}
    for members in (f.node_classes or {}).values():
        used = {n: sum(tp for ch in chains for node, tp in ch.slots if node == n) for n in members}
        for src, dst in zip(sorted(members, key=lambda n: (-used[n], members.index(n))), members):
            rename[src] = dst
    relabelled = []
    for ch in chains:
        slots = []
        for node, tp in ch.slots:
            node = rename.get(node, node)
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
        if f.qc and f.qc[p] is not None:
            coord = problem.cluster.coordinator_node.name
            vals[f.qc[p]] = T if any(node == coord for node, _ in slots) else 0.0
        if f.cross and p in f.cross:
            zr, zo, ze = f.cross[p]
            for r, var in zr.items():
                vals[var] = T if r in regions else 0.0
            m = sum(1 for r in zr if r in regions)
            vals[zo] = T if m else 0.0
            vals[ze] = T * max(0, m - 1)
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
