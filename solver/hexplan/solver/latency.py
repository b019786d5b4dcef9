"""Minimum-latency pipeline: the placement with the lowest time per output token (or TTFT).

MILP (small: one pipeline):
    x_g in {0,1}, l_g integer      group g is a stage holding l_g layers
    min  sum_g t_g l_g + sum_g h_g x_g - h_max + sum_g (in_g first_g + out_g last_g)
         (t = decode or prefill seconds per layer, h = cheapest hop into g, in/out = the
         coordinator's links to g's node, out also the LM head on g)
    s.t. sum_{g on n} d_g x_g <= count_n;  x_g <= l_g <= m_g x_g;  sum_g l_g = L;
         first_g, last_g <= x_g;  sum_g first_g = sum_g last_g = 1
Its optimum is a lower bound on any pipeline's latency (hops and ends are relaxed); the decoded
pipeline is then ordered and given its exact layers, and a short local search polishes it.
With interleaving (Workload.parts > 1) a decode step flows through the pipeline in parts
(hexplan.evaluate.flow_time), so for TPOT the stage seconds, the LM head and the transfer times
after the first link are divided by parts (a lower bound again); a prompt alone (TTFT) is not cut.
"""
from __future__ import annotations


from hexplan.costmodel import TOKEN_ID_BYTES, hop_decode_time, hop_prefill_time, send_time
from hexplan.evaluate import evaluate_pipeline

from . import milp
from .formulation import _min_hop, _split
from .layers import candidate_orders, order_slots
from .problem import Problem


def _fill_min_latency(problem: Problem, ordered, kind: str):
    """Layers minimising TPOT (or TTFT) for stages in this order; None if they do not fit."""
    k, L = len(ordered), problem.L
    costs = [problem.cost(*s) for s in ordered]
    caps = [c.max_layers(first=(i == 0), last=(i == k - 1)) for i, c in enumerate(costs)]
    if min(caps) < 1 or sum(caps) < L or k > L:
        return None
    t = [c.decode_layer_s if kind == "tpot" else c.ttft_layer_s for c in costs]
    l = [1] * k
    rem = L - k
    for i in sorted(range(k), key=lambda i: (t[i], i)):
        add = min(rem, caps[i] - 1)
        l[i] += add
        rem -= add
    m = evaluate_pipeline(problem.cluster, problem.costs, [s[0] for s in ordered], [s[1] for s in ordered], l)
    return (m.tpot_s if kind == "tpot" else m.ttft_s), l


def chain_latency(problem: Problem, slots, kind: str = "tpot"):
    """(latency in s, ordered slots, layers) of the best order, or None."""
    best = None
    for order in candidate_orders(problem, order_slots(problem, slots)):
        r = _fill_min_latency(problem, order, kind)
        if r and (best is None or r[0] < best[0]):
            best = (r[0], order, r[1])
    return best


def min_latency(problem: Problem, kind: str = "tpot", time_limit: float = 10.0, seed: int = 0,
                backend: str = "highs"):
    """Return (latency s, ordered slots, layers, lower bound s) of the fastest single pipeline."""
    cands = []
    for n in problem.nodes:
        for d in problem.allowed_tp[n.name]:
            for j in range(n.count // d):
                cands.append((n.name, d, j))
    lm = milp.LinearModel()
    prefill = kind == "ttft"
    parts = 1 if prefill else problem.workload.parts   # interleaving: decode steps go in parts
    t = [(problem.cost(c[0], c[1]).ttft_layer_s if prefill else problem.cost(c[0], c[1]).decode_layer_s / parts)
         for c in cands]
    h = [_min_hop(problem, c[0], prefill, parts) for c in cands]
    hmax = max(h, default=0.0)
    x = [lm.binary(f"x[{c[0]}/tp{c[1]}#{c[2]}]") for c in cands]
    l = [lm.var(f"l[{c[0]}/tp{c[1]}#{c[2]}]", 0, problem.max_layers((c[0], c[1])), integer=True) for c in cands]
    for n in problem.nodes:
        lm.add({x[g]: c[1] for g, c in enumerate(cands) if c[0] == n.name}, hi=n.count)
    for g, c in enumerate(cands):
        lm.add({l[g]: 1, x[g]: -problem.max_layers((c[0], c[1]))}, hi=0)
        lm.add({l[g]: 1, x[g]: -1}, lo=0)
        if g + 1 < len(cands) and cands[g + 1][:2] == c[:2]:
            lm.add({x[g]: 1, x[g + 1]: -1}, lo=0)
    lm.add({v: 1 for v in l}, lo=problem.L, hi=problem.L)
    # The first stage receives from the coordinator, the last runs the LM head and answers it.
    cl, w = problem.cluster, problem.workload
    coord = cl.coordinator_node.name
    ids_in = w.prompt_tokens if prefill else w.batch_size
    ids_out = 1 if prefill else w.batch_size
    first = [lm.binary(f"first[{c[0]}/tp{c[1]}#{c[2]}]") for c in cands]
    last = [lm.binary(f"last[{c[0]}/tp{c[1]}#{c[2]}]") for c in cands]
    for g in range(len(cands)):
        lm.add({first[g]: 1, x[g]: -1}, hi=0)
        lm.add({last[g]: 1, x[g]: -1}, hi=0)
    lm.add({v: 1 for v in first}, lo=1, hi=1)
    lm.add({v: 1 for v in last}, lo=1, hi=1)
    n_g = len(cands)
    for g in range(n_g):  # one group is both first and last only when it is the only stage
        c = {x[h_]: 1 for h_ in range(n_g) if h_ != g}
        c[first[g]] = n_g
        c[last[g]] = n_g
        lm.add(c, hi=2 * n_g)
    obj = {}
    # A pipeline spanning regions has an inter-stage hop across regions.
    regions = cl.regions
    if len(regions) > 1:
        f = hop_prefill_time if prefill else hop_decode_time
        cross = min((_split(f(problem.model, w, cl.link(a.name, b.name).bandwidth, cl.link(a.name, b.name).latency),
                            cl.link(a.name, b.name).latency, parts)
                     for a in problem.nodes for b in problem.nodes if a.region != b.region), default=0.0)
        if cross > hmax:
            multi = lm.var("multi_region", 0.0, 1.0)
            v = {r: lm.var(f"v[{r or 'default'}]", 0.0, 1.0) for r in regions}
            for g, c in enumerate(cands):
                lm.add({v[problem.node_by_name[c[0]].region]: 1, x[g]: -1}, lo=0)
            for i, ra in enumerate(regions):
                for rb in regions[i + 1:]:
                    lm.add({multi: 1, v[ra]: -1, v[rb]: -1}, lo=-1)
            obj[multi] = -(cross - hmax)
    for g, c in enumerate(cands):
        a, b = cl.link(coord, c[0]), cl.link(c[0], coord)
        sc = problem.cost(c[0], c[1])
        obj[l[g]] = -t[g]
        obj[x[g]] = -h[g]
        obj[first[g]] = -send_time(ids_in * TOKEN_ID_BYTES, a.bandwidth, a.latency)
        obj[last[g]] = -(_split(send_time(ids_out * TOKEN_ID_BYTES, b.bandwidth, b.latency), b.latency, parts)
                         + (sc.head_prefill_s if prefill else sc.head_decode_s / parts))
    lm.objective = obj  # maximise the negated latency
    res = milp.solve(lm, backend, time_limit, seed)
    lower = None
    if res.bound is not None:
        lower = -res.bound - hmax
    best = None
    if res.values is not None:
        slots = [(c[0], c[1]) for g, c in enumerate(cands) if res.values[x[g]] > 0.5]
        best = chain_latency(problem, slots, kind)
    # Greedy alternative and polish: fastest groups first, then drop/swap while it helps.
    greedy = _greedy(problem, kind)
    if greedy and (best is None or greedy[0] < best[0]):
        best = greedy
    if best is None:
        return None
    best = _polish(problem, best, kind)
    if lower is not None:
        lower = min(lower, best[0])
    return best[0], best[1], best[2], lower


def _greedy(problem: Problem, kind: str):
    best = None
    for prefer in (8, 4, 2, 1):
        groups = []
        for n in problem.nodes:
            rem = n.count
            for d in sorted(problem.allowed_tp[n.name], reverse=True):
                if d > prefer:
                    continue
                while rem >= d:
                    groups.append((n.name, d))
                    rem -= d
        speed = lambda s: problem.cost(*s).decode_layer_s if kind == "tpot" else problem.cost(*s).ttft_layer_s
        groups.sort(key=lambda s: (speed(s), s))
        chosen, cap = [], 0
        for g in groups:
            chosen.append(g)
            cap += problem.max_layers(g)
            if cap >= problem.L + 2:
                break
        r = chain_latency(problem, chosen, kind)
        if r and (best is None or r[0] < best[0]):
            best = r
    return best


def _polish(problem: Problem, best, kind: str, rounds: int = 20):
    lat, order, layers = best
    slots = list(order)
    for _ in range(rounds):
        improved = False
        used: dict = {}
        for s in slots:
            used[s[0]] = used.get(s[0], 0) + s[1]
        free = [(n.name, d) for n in problem.nodes for d in problem.allowed_tp[n.name]
                if n.count - used.get(n.name, 0) >= d]
        trials = [slots[:i] + slots[i + 1:] for i in range(len(slots))]
        trials += [slots[:i] + slots[i + 1:] + [f] for i in range(len(slots)) for f in free if f[0] != slots[i][0] or True]
        trials += [slots + [f] for f in free]
        for cand in trials:
            cnt: dict = {}
            ok = True
            for s in cand:
                cnt[s[0]] = cnt.get(s[0], 0) + s[1]
                if cnt[s[0]] > problem.node_by_name[s[0]].count:
                    ok = False
                    break
            if not ok or not cand:
                continue
            r = chain_latency(problem, cand, kind)
            if r and r[0] < lat * (1 - 1e-9):
                lat, order, layers = r
                slots = list(order)
                improved = True
                break
        if not improved:
            break
    return lat, order, layers
