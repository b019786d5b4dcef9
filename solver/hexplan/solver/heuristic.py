"""Fast plans without a MILP: greedy construction plus local search on exact chain values.

Construction: for each TP policy (prefer degree d on every node) and each pipeline count K,
deal the groups to K pipelines largest-memory first onto the pipeline with the least memory
(LPT), so every pipeline reaches L layers of capacity. Local search then applies the move that
raises the sum of exact pipeline throughputs (solver/hexplan/solver/layers.py): move a group to another
pipeline or to the free pool, swap two groups, add a free group, change a group's TP degree
(split or merge inside its node). The neighbourhood is scanned in an order shuffled by the
seed, so results are reproducible for a given seed and budget. Above MOVE_LIST_LIMIT moves (hundreds of
pipelines) they are streamed pipeline by pipeline instead of listed, so memory stays O(pipelines).
"""
from __future__ import annotations

import random
import time

from .bounds import max_pipelines
from .layers import ChainEvaluator
from .problem import Problem

MOVE_LIST_LIMIT = 200_000   # moves above which local search streams them instead of listing them


class State:
    def __init__(self, problem: Problem, pipes, region_start: bool = False):
        self.problem = problem
        self.pipes = [list(p) for p in pipes]
        self.region_start = region_start

    def free(self) -> dict:
        used = {n.name: 0 for n in self.problem.nodes}
        for p in self.pipes:
            for node, tp in p:
                used[node] += tp
        return {n.name: n.count - used[n.name] for n in self.problem.nodes}

    def copy(self) -> "State":
        return State(self.problem, self.pipes)


def tp_policy_groups(problem: Problem, prefer: int | None) -> list:
    """Groups when every node uses its largest allowed degree <= ``prefer`` (None: largest)."""
    out = []
    for n in problem.nodes:
        degs = sorted(problem.allowed_tp[n.name], reverse=True)
        remaining = n.count
        for d in degs:
            if prefer is not None and d > prefer:
                continue
            while remaining >= d:
                out.append((n.name, d))
                remaining -= d
    return out


def construct(problem: Problem, groups, K: int) -> State:
    pipes = [[] for _ in range(K)]
    mem = [0.0] * K
    for g in sorted(groups, key=lambda s: (-problem.max_layers(s), -problem.rate(s), s)):
        i = min(range(K), key=lambda j: (mem[j], j))
        pipes[i].append(g)
        mem[i] += problem.max_layers(g)
    return State(problem, pipes)


def construct_by_region(problem: Problem, groups, ev: ChainEvaluator | None = None,
                        shed: bool = False) -> State:
    """Pipelines inside each region first (as many as its memory allows); regions too small
    for a pipeline pool their groups into cross-region pipelines.

    ``shed`` (with ``ev``): each region-local pipeline then gives up, slowest first, the groups
    it does not need (its exact value does not drop), and those join the pool, so a region that
    holds a copy and a half lends the half to the pipelines that must cross regions."""
    pipes, pool = [], []
    for region in problem.cluster.regions:
        mine = [g for g in groups if problem.node_by_name[g[0]].region == region]
        K = int(sum(problem.max_layers(g) for g in mine) // problem.L)
        if K == 0:
            pool += mine
            continue
        local = construct(problem, mine, K).pipes
        if shed and ev is not None:
            for i, p in enumerate(local):
                kept, extra = _shed(ev, p)
                local[i] = kept
                pool += extra
        pipes += local
    K = int(sum(problem.max_layers(g) for g in pool) // problem.L)
    if K:
        pipes += construct(problem, pool, K).pipes
    return State(problem, pipes, region_start=True)


def _shed(ev: ChainEvaluator, p) -> tuple[list, list]:
    """Drop groups from ``p``, lowest layer rate first, while its value does not drop."""
    problem = ev.problem
    p = list(p)
    v = ev.value(p)
    extra = []
    for g in sorted(set(p), key=lambda s: (problem.rate(s), s)):
        while g in p and len(p) > 1:
            i = p.index(g)
            cand = p[:i] + p[i + 1:]
            if ev.value(cand) >= v * (1 - 1e-9) and v > 0:
                p, v = cand, ev.value(cand)
                extra.append(g)
            else:
                break
    return p, extra


def free_groups(problem: Problem, state: "State") -> list:
    """The free GPUs as groups, each node's largest allowed degree first."""
    out = []
    for node, f in state.free().items():
        for d in sorted(problem.allowed_tp[node], reverse=True):
            while f >= d:
                out.append((node, d))
                f -= d
    return out


def total_value(ev: ChainEvaluator, state: State) -> float:
    return sum(ev.value(p) for p in state.pipes)


def local_search(ev: ChainEvaluator, state: State, rng: random.Random, deadline: float,
                 max_rounds: int = 50) -> State:
    problem = ev.problem
    vals = [ev.value(p) for p in state.pipes]
    for _ in range(max_rounds):
        if time.perf_counter() > deadline:
            break
        improved = False
        if _move_count(state) <= MOVE_LIST_LIMIT:
            moves = list(_moves(problem, state))
            rng.shuffle(moves)
            # Moves that change the number of pipelines first: few, and the largest gains.
            moves.sort(key=lambda mv: mv[0] not in ("open", "split", "redeal", "merge"))
        else:   # hundreds of pipelines: the same moves, streamed (memory O(P), not O(P^2))
            moves = _moves_streamed(problem, state, rng)
        for mv in moves:
            if time.perf_counter() > deadline:
                break
            res = _try(ev, state, vals, mv)
            if res is not None:
                state, vals = res
                improved = True
        if not improved:
            break
    # Drop pipelines that carry nothing (their GPUs return to the free pool).
    state.pipes = [p for p, v in zip(state.pipes, vals) if v > 0]
    return state


def slot_kinds(problem: Problem) -> dict:
    """node -> a key shared by interchangeable nodes (same GPU type, count, fabric, region; not
    named by a link rule, not the coordinator): moving or swapping one of them is worth trying
    once per kind, not once per node."""
    kinds = getattr(problem, "_slot_kinds", None)
    if kinds is None:
        named = {x for rule in problem.cluster.links for x in rule.between}
        coord = problem.cluster.coordinator_node.name
        kinds = {}
        for n in problem.nodes:
            if n.name in named or n.name == coord:
                kinds[n.name] = ("node", n.name)
            else:
                kinds[n.name] = ("kind", n.gpu.name, n.count, n.interconnect, n.region)
        problem._slot_kinds = kinds
    return kinds


def _slot_moves(problem: Problem, state: State, p: int, P: int, kinds: dict):
    """The moves of pipeline p's groups: remove, move to another pipeline, re-degree, fuse
    with a group of the same node, swap with a group of a later pipeline."""
    def kind(slot):
        return kinds[slot[0]], slot[1]

    seen_i = set()
    for i in range(len(state.pipes[p])):
        ki = kind(state.pipes[p][i])
        if ki in seen_i:
            continue     # an interchangeable group of this pipeline was tried already
        seen_i.add(ki)
        yield ("remove", p, i)
        for q in range(P):
            if q != p:
                yield ("move", p, i, q)
        yield ("retp", p, i)
        for j in range(i + 1, len(state.pipes[p])):
            if state.pipes[p][j][0] == state.pipes[p][i][0]:
                yield ("fuse", p, i, j)
        for q in range(p + 1, P):
            seen_j = {ki}
            for j in range(len(state.pipes[q])):
                kj = kind(state.pipes[q][j])
                if kj not in seen_j:
                    seen_j.add(kj)
                    yield ("swap", p, i, q, j)


def _moves(problem: Problem, state: State):
    P = len(state.pipes)
    kinds = slot_kinds(problem)
    for p in range(P):
        yield from _slot_moves(problem, state, p, P, kinds)
    for q in range(P):
        yield ("add", q)
    for p in range(P):
        for q in range(p + 1, P):
            yield ("merge", p, q)
    # Moves that change the number of pipelines: open new ones from the free GPUs, split one
    # pipeline (with the free GPUs) into two or more, re-deal two into three or more.
    yield ("open",)
    for p in range(P):
        yield ("split", p)
    if P <= 24:
        for p in range(P):
            for q in range(p + 1, P):
                yield ("redeal", p, q)


def _move_count(state: State) -> int:
    """An upper estimate of the number of moves ``_moves`` yields (P pipelines, S groups)."""
    P = len(state.pipes)
    sizes = [len(p) for p in state.pipes]
    S = sum(sizes)
    return S * (P + 2) + (S * S + sum(n * n for n in sizes)) // 2 + P * P + 2 * P + 1


def _moves_streamed(problem: Problem, state: State, rng: random.Random):
    """The moves of ``_moves`` (but re-dealing, which it offers only up to 24 pipelines), never
    all in memory: those that change the number of pipelines first (open, split, merge), then
    pipeline by pipeline in a shuffled order, each pipeline's moves shuffled. Local search over
    hundreds of pipelines would otherwise hold O(P^2) move tuples (about 500 MB at 4096 GPUs)."""
    P = len(state.pipes)
    kinds = slot_kinds(problem)
    order = list(range(P))
    rng.shuffle(order)
    yield ("open",)
    for p in order:
        yield ("split", p)
    for p in order:
        qs = list(range(p + 1, P))
        rng.shuffle(qs)
        for q in qs:
            yield ("merge", p, q)
    for p in order:
        mine = list(_slot_moves(problem, state, p, P, kinds)) + [("add", p)]
        rng.shuffle(mine)
        yield from mine


def _try(ev, state: State, vals, mv):
    """Apply move ``mv`` if it raises the total; return (state, vals) or None."""
    problem = ev.problem
    pipes = state.pipes
    kind = mv[0]
    eps = 1e-9 * max(1.0, sum(vals))

    def accept(changes):  # changes: {pipeline index: new slot list}
        # Exact pruning before any evaluation: a pipeline carries at most sum(rate) / L, and
        # nothing without room for the model.
        if sum(_upper(problem, s) for s in changes.values()) <= sum(vals[q] for q in changes) + eps:
            return None
        new_vals = {q: ev.value(s) for q, s in changes.items()}
        delta = sum(new_vals[q] - vals[q] for q in changes)
        if delta > eps:
            for q, s in changes.items():
                pipes[q] = s
                vals[q] = new_vals[q]
            return state, vals
        return None

    if kind in ("remove", "move", "retp", "swap"):
        p, i = mv[1], mv[2]
        if p >= len(pipes) or i >= len(pipes[p]):
            return None
        slot = pipes[p][i]
        rest = pipes[p][:i] + pipes[p][i + 1:]
        if kind == "remove":
            return accept({p: rest})
        if kind == "move":
            q = mv[3]
            return accept({p: rest, q: pipes[q] + [slot]})
        if kind == "swap":
            q, j = mv[3], mv[4]
            if j >= len(pipes[q]) or pipes[q][j] == slot:
                return None
            other = pipes[q][j]
            new_q = pipes[q][:j] + pipes[q][j + 1:] + [slot]
            return accept({p: rest + [other], q: new_q})
        # retp: replace the group by groups of another degree on the same node
        node, tp = slot
        free = state.free()[node] + tp
        best = None
        for d in problem.allowed_tp[node]:
            if d == tp:
                continue
            n_new = max(1, tp // d) if d < tp else 1
            if n_new * d > free:
                continue
            for cnt in sorted({1, n_new}):
                cand = rest + [(node, d)] * cnt
                r = accept({p: cand})
                if r is not None:
                    return r
        return best
    if kind == "fuse":
        # two groups of one node become one group of their combined degree
        p, i, j = mv[1], mv[2], mv[3]
        if p >= len(pipes) or j >= len(pipes[p]):
            return None
        (n1, d1), (n2, d2) = pipes[p][i], pipes[p][j]
        if n1 != n2 or d1 + d2 not in problem.allowed_tp[n1]:
            return None
        rest = [s for k, s in enumerate(pipes[p]) if k not in (i, j)]
        return accept({p: rest + [(n1, d1 + d2)]})
    if kind == "add":
        q = mv[1]
        free = state.free()
        for node, f in free.items():
            for d in problem.allowed_tp[node]:
                if d <= f:
                    r = accept({q: pipes[q] + [(node, d)]})
                    if r is not None:
                        return r
        return None
    if kind == "merge":
        p, q = mv[1], mv[2]
        if p >= len(pipes) or q >= len(pipes):
            return None
        return accept({p: pipes[p] + pipes[q], q: []})
    if kind in ("open", "split", "redeal"):
        old = [q for q in mv[1:] if q < len(pipes)]
        if len(old) != len(mv) - 1:
            return None
        pool = [g for q in old for g in pipes[q]] + free_groups(problem, state)
        kmax = int(sum(problem.max_layers(g) for g in pool) // problem.L)
        if kmax <= len(old) and kind != "open" or kmax < 1:
            return None
        base = sum(vals[q] for q in old)
        for K in range(len(old) + 1, min(kmax, len(old) + 2) + 1):
            for new in _deals(ev, pool, K):
                new = [n for n in new if n]
                new_vals = [ev.value(n) for n in new]
                if sum(new_vals) - base > eps:
                    # reuse the old indices, append the rest (emptied pipelines are dropped later)
                    for i, q in enumerate(old):
                        pipes[q], vals[q] = (new[i], new_vals[i]) if i < len(new) else ([], 0.0)
                    for n, v_ in zip(new[len(old):], new_vals[len(old):]):
                        pipes.append(n)
                        vals.append(v_)
                    return state, vals
        return None
    return None


def _upper(problem: Problem, slots) -> float:
    """An upper bound on a pipeline's value: T l_s <= rate_s and sum l_s = L give
    T <= sum rate / L; 0 when its groups cannot hold the model."""
    if not slots or sum(problem.max_layers(g) for g in slots) < problem.L:
        return 0.0
    return sum(problem.rate(g) for g in slots) / problem.L


def _deals(ev: ChainEvaluator, pool, K: int):
    """Ways to deal ``pool`` into K pipelines: by memory (LPT), then by rate (each pipeline's
    compute balanced)."""
    problem = ev.problem
    yield construct(problem, pool, K).pipes
    pipes = [[] for _ in range(K)]
    mem, rate = [0.0] * K, [0.0] * K
    for g in sorted(pool, key=lambda s: (-problem.rate(s), s)):
        # the pipeline that most needs memory, else the one with the least compute
        short = [j for j in range(K) if mem[j] < problem.L]
        i = min(short or range(K), key=lambda j: (rate[j], mem[j], j))
        pipes[i].append(g)
        mem[i] += problem.max_layers(g)
        rate[i] += problem.rate(g)
    yield pipes
    yield fill(ev, pool, K)


def fill(ev: ChainEvaluator, pool, K: int) -> list:
    """Fill K pipelines one after the other, largest memory first, each until it fits; the
    group that completes a pipeline is the smallest that makes it fit. Pipelines made of few,
    large groups (short round trips) come first; groups left over stay free."""
    problem = ev.problem
    mem = problem.max_layers
    rest = sorted(pool, key=lambda s: (-mem(s), -problem.rate(s), s))
    pipes = []
    for _ in range(K):
        p, m = [], 0.0
        while rest:
            if m >= problem.L and ev.value(p) > 0:
                break
            done = False
            if rest and m + mem(rest[0]) >= problem.L:
                seen = set()
                for g in sorted(rest, key=lambda s: (mem(s), -problem.rate(s), s)):
                    n = problem.node_by_name[g[0]]
                    kind = (n.gpu.name, g[1], n.region, n.count)
                    if kind in seen or m + mem(g) < problem.L:
                        continue
                    seen.add(kind)
                    if ev.value(p + [g]) > 0:
                        p.append(g)
                        rest.remove(g)
                        done = True
                        break
            if done:
                break
            g = rest.pop(0)
            p.append(g)
            m += mem(g)
        pipes.append(p)
    return pipes


def prune(ev: ChainEvaluator, state: State) -> State:
    """Drop stages whose removal costs no throughput (a link-bound pipeline does not need
    every GPU it was given); frees GPUs without changing the objective."""
    pipes = []
    for p in state.pipes:
        p = list(p)
        v = ev.value(p)
        changed = True
        while changed and len(p) > 1:
            changed = False
            for i in sorted(range(len(p)), key=lambda i: (-p[i][1], i)):  # widest groups first
                cand = p[:i] + p[i + 1:]
                if ev.value(cand) >= v * (1 - 1e-9):
                    p, v, changed = cand, ev.value(cand), True
                    break
        pipes.append(p)
    return State(state.problem, pipes)


def heuristic_solve(problem: Problem, ev: ChainEvaluator, deadline: float, seed: int = 0,
                    progress=None) -> State:
    """Best state over TP policies and pipeline counts, polished by local search."""
    rng = random.Random(seed)
    kmax = max(1, max_pipelines(problem))
    if problem.options.max_pipelines:
        kmax = min(kmax, problem.options.max_pipelines)
    policies = []
    for prefer in (None, 8, 4, 2, 1):
        g = tp_policy_groups(problem, prefer)
        if g and g not in policies:
            policies.append(g)
    starts = []
    for groups in policies:
        for K in range(1, kmax + 1):
            if starts and time.perf_counter() > deadline:
                break
            st = construct(problem, groups, K)
            starts.append((total_value(ev, st), len(starts), st))
            if K >= kmax - 2:   # (fill evaluates as it goes: only for the largest counts)
                st = State(problem, [p for p in fill(ev, groups, K) if p])
                starts.append((total_value(ev, st), len(starts), st))
        if len(problem.cluster.regions) > 1:
            for shed in (False, True):
                st = construct_by_region(problem, groups, ev, shed)
                starts.append((total_value(ev, st), len(starts), st))
    starts.sort(key=lambda x: (-x[0], x[1]))
    uniq, seen = [], set()
    for x in starts:
        key = tuple(sorted(tuple(sorted(p)) for p in x[2].pipes))
        if key not in seen:
            seen.add(key)
            uniq.append(x)
    best = None
    best_val = -1.0
    n_polish = 3
    # The three best starts and the region-local ones (the best cross-region deal often looks
    # better before the search than after) are always polished; the others while half the
    # time is left.
    t_start = time.perf_counter()
    half = t_start + 0.5 * max(0.0, deadline - t_start)
    first = uniq[:n_polish] + [x for x in uniq[n_polish:] if x[2].region_start][:2]
    chosen = first + [x for x in uniq if x not in first]
    for k, (val, _, st) in enumerate(chosen):
        if time.perf_counter() > deadline or (k >= len(first) and time.perf_counter() > half):
            break
        st = local_search(ev, st.copy(), rng, deadline)
        v = total_value(ev, st)
        if v > best_val + 1e-9:
            best, best_val = st, v
            if progress:
                progress("heuristic", throughput=v)
    if best is None:
        best = starts[0][2] if starts else State(problem, [])
    return best
