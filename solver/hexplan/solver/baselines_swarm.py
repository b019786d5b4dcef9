"""Baselines from decentralised serving: "petals" (servers on block windows) and "swarm"
(equal stages with load-balanced servers).

Both systems let each server (a GPU at TP 1) serve many requests' paths at once and route
requests stochastically or by shortest path across whichever servers hold the next blocks.
hexplan's plan format has disjoint pipelines, so their placements are turned into disjoint
chains afterwards (documented per baseline); a server that Petals or Swarm would share between
several paths serves one chain here. docs/baselines.md discusses what that costs them.
"""
from __future__ import annotations

import time
from dataclasses import replace

from hexplan.cluster import Cluster
from hexplan.models import ModelSpec
from hexplan.plan import Plan

from .baselines_common import FixedChain, better, even_layers, fastest_first, finish, infeasible, make_problem, \
    tp1_slots
from .problem import Problem, SolveOptions


# ---- Petals -----------------------------------------------------------------------------

def petals_windows(problem: Problem, servers) -> list[tuple]:
    """``(slot, start, end)`` per server, in the given order (Petals: servers join one by one).

    A server holds as many blocks as fit in its memory (``n``, a middle stage's capacity). It
    takes the window whose sorted coverage is lexicographically smallest, i.e. the window
    around the least-served block, ties to the lowest start (petals/server/block_selection.py,
    ``_choose_best_start``). Coverage of a block is the sum of its servers' throughput, each
    server counting its per-block rate over the average span a request uses on it,
    rate / ((n + 1) / 2) (petals/server/throughput.py).
    """
    L = problem.L
    cov = [0.0] * L
    out = []
    for g in servers:
        c = problem.cost(*g)
        n = min(L, c.max_layers())
        if n < 1:
            continue
        start = min(range(L - n + 1), key=lambda i: (sorted(cov[i:i + n]), i))
        t = c.layer_rate / ((n + 1) / 2)
        for b in range(start, start + n):
            cov[b] += t
        out.append((g, start, start + n))
    return out


def _usable_end(problem: Problem, slot, window_end: int, pos: int) -> int:
    """How far a server whose window ends at ``window_end`` can carry a chain from ``pos``:
    a stage starting at layer 0 also holds the embedding, one ending at L the LM head."""
    c, L = problem.cost(*slot), problem.L
    first = pos == 0
    if window_end == L and L - pos <= c.max_layers(first=first, last=True):
        return L
    return min(window_end, pos + c.max_layers(first=first), L - 1)


def petals_chains(problem: Problem, windows) -> list[FixedChain]:
    """Disjoint chains from layer 0 to L, built one after the other until one cannot be closed.
    Each step takes, among the unused servers whose window holds the next layer, the one that
    carries the chain farthest (ties: the earlier server, i.e. the faster); the stage holds the
    part of the window it is used for."""
    L = problem.L
    free = list(range(len(windows)))
    chains = []
    while True:
        pos, used, slots, layers = 0, [], [], []
        while pos < L:
            pick, reach = None, pos
            for w in free:
                g, a, b = windows[w]
                if w not in used and a <= pos < b:
                    e = _usable_end(problem, g, b, pos)
                    if e > reach:
                        pick, reach = w, e
            if pick is None:
                return chains
            used.append(pick)
            slots.append(windows[pick][0])
            layers.append(reach - pos)
            pos = reach
        chains.append(FixedChain(tuple(slots), tuple(layers)))
        free = [w for w in free if w not in used]


def petals_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """Petals (Borzunov et al., ACL 2023 demo / NeurIPS 2023): each server (a GPU at TP 1, fastest
    first) loads the contiguous window of blocks it can hold that has the least coverage
    (``petals_windows``); chains from layer 0 to L are then formed greedily from servers whose
    windows continue the chain, each server used once (``petals_chains``), as many as can be
    closed. The windows are recorded in ``baseline_detail``.
    """
    t0 = time.perf_counter()
    problem = make_problem(cluster, model, options)
    windows = petals_windows(problem, fastest_first(problem, tp1_slots(problem)))
    if not windows:
        raise infeasible("petals", "no GPU can hold a layer at TP 1")
    chains = petals_chains(problem, windows)
    if not chains:
        covered = set().union(*(range(a, b) for _, a, b in windows))
        gap = next((b for b in range(problem.L) if b not in covered), None)
        why = (f"no server's window holds layer {gap}" if gap is not None
               else "the windows cover every layer, but no chain of distinct servers reaches the last one")
        raise infeasible("petals", f"{len(windows)} server(s) cannot form a pipeline: {why}")
    detail = {"servers": len(windows), "pipelines": len(chains),
              "windows": [[g[0], a, b] for g, a, b in windows]}
    plan = finish(problem, "petals", chains, detail, t0)
    if plan is None:
        raise infeasible("petals", f"none of its {len(chains)} chain(s) meets the SLOs")
    return plan


# ---- Swarm ------------------------------------------------------------------------------

def swarm_stages(problem: Problem, servers, k: int) -> tuple[list[list], list]:
    """Servers per stage for k equal stages, and the servers dropped. Servers join fastest first,
    each to the stage with the least total capacity so far among the stages it can hold (ties:
    the lowest stage); one that holds no stage is dropped."""
    layers = even_layers(problem.L, k)
    stages: list[list] = [[] for _ in range(k)]
    cap = [0.0] * k
    dropped = []
    for g in servers:
        c = problem.cost(*g)
        fit = [j for j in range(k) if c.max_layers(first=(j == 0), last=(j == k - 1)) >= layers[j]]
        if not fit:
            dropped.append(g)
            continue
        j = min(fit, key=lambda j: (cap[j], j))
        stages[j].append(g)
        cap[j] += c.capacity(layers[j], last=(j == k - 1))
    return stages, dropped


def swarm_chains(problem: Problem, servers, k: int) -> list[FixedChain]:
    """Chain i takes the i-th fastest server of every stage (servers join fastest first, so that
    is the i-th of each stage's list); servers beyond the smallest stage's count stay unused."""
    stages, _ = swarm_stages(problem, servers, k)
    layers = tuple(even_layers(problem.L, k))
    return [FixedChain(tuple(st[i] for st in stages), layers) for i in range(min(len(st) for st in stages))]


def swarm_plan(cluster: Cluster, model: ModelSpec, options: SolveOptions = SolveOptions()) -> Plan:
    """SWARM parallelism (Ryabinin et al., ICML 2023): the model is cut into k equal stages;
    servers (GPUs at TP 1) join the stage with the least total throughput so far
    (``swarm_stages``); here disjoint pipelines pair the i-th fastest server of each stage
    (``swarm_chains``). SWARM fixes k by hand; every k is tried and the best plan by predicted
    throughput (or TPOT, for the latency objective) is kept.
    """
    t0 = time.perf_counter()
    problem = make_problem(cluster, model, options)
    servers = fastest_first(problem, tp1_slots(problem))
    if not servers:
        raise infeasible("swarm", "no GPU can hold a layer at TP 1")
    best, built = None, False
    for k in range(1, min(problem.L, len(servers)) + 1):
        chains = swarm_chains(problem, servers, k)
        if not chains:
            continue
        built = True
        stages, dropped = swarm_stages(problem, servers, k)
        detail = {"stages": k, "pipelines": len(chains), "servers_per_stage": [len(s) for s in stages],
                  "dropped": len(dropped)}
        plan = finish(problem, "swarm", chains, detail, t0)
        if plan is not None and better(plan, best, options.objective):
            best = plan
    if best is None:
        raise infeasible("swarm", "no plan meets the SLOs" if built else
                         f"no stage count k leaves every one of k equal stages with a server that holds it "
                         f"({len(servers)} GPU(s), the largest holds {max(problem.max_layers(g) for g in servers)} "
                         f"of {problem.L} layers)")
    return replace(best, solver={**best.solver, "seconds": time.perf_counter() - t0})
