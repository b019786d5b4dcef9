"""Fast plans without a MILP: greedy construction plus local search on exact chain values.

Construction: for each TP policy (prefer degree d on every node) and each pipeline count K,
deal the groups to K pipelines largest-memory first onto the pipeline with the least memory
(LPT), so every pipeline reaches L layers of capacity. Local search then applies the move that
raises the sum of exact pipeline throughputs (solver/hexplan/solver/layers.py): move a group to another
pipeline or to the free pool, swap two groups, add a free group, change a group's TP degree
(split or merge inside its node). The neighbourhood is scanned in an order shuffled by the
seed, so results are reproducible for a given seed and budget.
"""
from __future__ import annotations

import random
import time

from .bounds import max_pipelines
from .layers import ChainEvaluator
from .problem import Problem


class State:
    def __init__(self, problem: Problem, pipes):
        self.problem = problem
        self.pipes = [list(p) for p in pipes]

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


def construct_by_region(problem: Problem, groups) -> State:
    """Pipelines inside each region first (as many as its memory allows); regions too small
    for a pipeline pool their groups into cross-region pipelines."""
    pipes, pool = [], []
    for region in problem.cluster.regions:
        mine = [g for g in groups if problem.node_by_name[g[0]].region == region]
        K = int(sum(problem.max_layers(g) for g in mine) // problem.L)
        if K == 0:
            pool += mine
        else:
            pipes += construct(problem, mine, K).pipes
    K = int(sum(problem.max_layers(g) for g in pool) // problem.L)
    if K:
        pipes += construct(problem, pool, K).pipes
    return State(problem, pipes)


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
        moves = list(_moves(problem, state))
        rng.shuffle(moves)
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


def _moves(problem: Problem, state: State):
    P = len(state.pipes)
    for p in range(P):
        for i in range(len(state.pipes[p])):
            yield ("remove", p, i)
            for q in range(P):
                if q != p:
                    yield ("move", p, i, q)
            yield ("retp", p, i)
            for q in range(p + 1, P):
                for j in range(len(state.pipes[q])):
                    yield ("swap", p, i, q, j)
    for q in range(P):
        yield ("add", q)
    for p in range(P):
        for q in range(p + 1, P):
            yield ("merge", p, q)


def _try(ev, state: State, vals, mv):
    """Apply move ``mv`` if it raises the total; return (state, vals) or None."""
    problem = ev.problem
    pipes = state.pipes
    kind = mv[0]
    eps = 1e-9 * max(1.0, sum(vals))

    def accept(changes):  # changes: {pipeline index: new slot list}
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
            return accept({p: rest + [other], q: pipes[q][:j] + pipes[q][j + 1:] + [slot]})
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
    return None


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
        if len(problem.cluster.regions) > 1:
            st = construct_by_region(problem, groups)
            starts.append((total_value(ev, st), len(starts), st))
    starts.sort(key=lambda x: (-x[0], x[1]))
    best = None
    best_val = -1.0
    n_polish = 3
    for val, _, st in starts[:n_polish]:
        if time.perf_counter() > deadline:
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
