"""The pricing's exact pass (solver/hexplan/solver/patterns.py, ``Patterns._round_profile`` and
``Patterns._tighten``) against an exhaustive enumeration of single pipelines.

The exact pass runs its dynamic programme once per layer-caps vector (the caps at the lowest T
of a run of grid points with the same caps) and applies Little's law afterwards, at each point's
own T; it also drops an item's (cost bucket, layers) entries whose round trip is not below a
cheaper bucket's. Both must keep it a lower bound on the cost of every pipeline feasible at that
T. Here every pipeline of tiny clusters (tests/test_optimizer.py's cases and seeded random ones:
every set of TP groups, every stage order, the best integer layer split, as tests/bruteforce.py
scores it) is priced at random kind prices, and every profile made at its own throughput or at a
lower T (looser caps) in its region set, evaluated at its throughput, must not exceed its cost.
"""
from __future__ import annotations

import itertools
import random
import time

import pytest

import hexplan
from hexplan.evaluate import hop_shares
from hexplan.solver import patterns
from hexplan.solver.problem import Problem, SolveOptions

from bruteforce import BruteForce  # noqa: E402
from test_optimizer import CASES, GPU_TYPES, M8, brute, case_cluster  # noqa: E402

REL = 1e-9
NAMES = ["one-node-4gpu", "mixed-3-nodes", "slow-link", "two-regions", "two-regions-3-pipelines",
         "four-plus-one", "five-singles", "gqa-3-pipelines", "big-plus-4-fast"]


def random_cluster(seed: int) -> hexplan.Cluster:
    """3 to 5 nodes of the tiny GPU types (1 or 2 GPUs, at most 6 in all), one or two regions,
    a random default link and sometimes a slow one between two nodes."""
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    lines, total = [], 0
    for i in range(n):
        count = rng.choice([1, 1, 2]) if total + 2 <= 6 else 1
        total += count
        lines.append(f"  - {{name: n{i}, gpu: {rng.choice(['Tiny', 'Mid', 'Fast', 'Big'])}, "
                     f"count: {count}, region: r{rng.randint(0, 1)}}}")
    bw = rng.choice(["1Gbps", "10Gbps"])
    lat = rng.choice(["0.5ms", "2ms"])
    links = [f"    - {{between: [r0, r1], bandwidth: 200Mbps, latency: {rng.choice(['5ms', '30ms'])}}}"]
    if rng.random() < 0.5:
        a, b = rng.sample(range(n), 2)
        links.append(f"    - {{between: [n{a}, n{b}], bandwidth: 100Mbps, latency: 1ms}}")
    text = ("nodes:\n" + "\n".join(lines) + f"\nnetwork:\n  default: {{bandwidth: {bw}, latency: {lat}}}\n"
            "  links:\n" + "\n".join(links) + "\n")
    return hexplan.loads_cluster(GPU_TYPES + text)


def every_pipeline(bf: BruteForce):
    """(ordered (node, tp) stages, best throughput) of every single pipeline of >= 2 stages
    that fits: every subset of every set of TP groups, in every order."""
    seen = set()
    for groups in bf.group_sets():
        for k in range(2, len(groups) + 1):
            for ordered in itertools.permutations(groups, k):
                if ordered in seen:
                    continue
                seen.add(ordered)
                nodes = [s[0] for s in ordered]
                sh = hop_shares(bf.cluster, [nodes])
                skey = tuple(sh.get((a, b), 1) if a != b else 1 for a, b in zip(nodes, nodes[1:]))
                thr, _, _ = bf._scan(ordered, skey, None)
                if thr > 0:
                    yield ordered, thr


def pipelines_by_region_set(ctx, bf) -> dict:
    """Every pipeline of ``bf`` (just under its throughput), grouped by the set of regions it
    uses, in a stable order: the pass prices each region set on its own."""
    by_ctx: dict = {}
    for ordered, thr in every_pipeline(bf):
        regions = frozenset(ctx.kinds[ctx.kind_of[node]].region for node, _ in ordered)
        by_ctx.setdefault(regions, []).append((ordered, thr * (1 - 1e-7)))
    return dict(sorted(by_ctx.items(), key=lambda kv: sorted(kv[0])))


def check_profiles(cluster, model, bf, seed):
    """Every pipeline's cost is at least the exact pass's cost at its throughput, from profiles
    made at lower throughputs (its own among them) in its region set, for random prices: as
    the pass uses them, one profile prices every point at or above the T it was made at."""
    ctx = patterns.Patterns(Problem(cluster, model, SolveOptions()))
    rng = random.Random(seed)
    by_ctx = pipelines_by_region_set(ctx, bf)
    checked = 0
    for regions, pipes in by_ctx.items():
        ctx_kinds = [k.idx for k in ctx.kinds if k.region in regions]
        tys, hin, const, _ = ctx.context_data(ctx_kinds, len(regions))
        Ts = sorted(T for _, T in pipes)
        for _ in range(2):
            price = [rng.uniform(0.1, 5.0) for _ in ctx.kinds]
            costs = [sum(price[ctx.kind_of[node]] * tp for node, tp in ordered) for ordered, _ in pipes]
            target = 2 * max(costs) + 1.0
            T0s = {Ts[0] * rng.uniform(0.3, 1.0)} | set(rng.sample(Ts, min(6, len(Ts))))
            for T0 in sorted(T0s):
                prof = ctx._round_profile(tys, hin, price, T0, target, 64)
                for (ordered, T), cost in zip(pipes, costs):
                    if T >= T0:
                        c = ctx._profile_cost(prof, T, const)
                        assert c <= cost * (1 + REL) + REL, (ordered, T, T0, c, cost)
                        checked += 1
    return checked


@pytest.mark.parametrize("name", NAMES)
def test_round_profile_is_below_every_pipeline(name):
    model, _ = CASES[name]
    assert check_profiles(case_cluster(name), model, brute(name), 11) > 0


@pytest.mark.parametrize("seed", range(6))
def test_round_profile_is_below_every_pipeline_of_random_clusters(seed):
    cl = random_cluster(seed)
    assert check_profiles(cl, M8, BruteForce(cl, M8), seed) > 0


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_valid_with_the_exact_pass_on_random_clusters(seed, monkeypatch):
    """The bound with the exact pass run to the end (goal 0) is at least the exhaustive
    optimum of random tiny clusters."""
    monkeypatch.setattr(patterns, "EXACT_GOAL", 0.0)
    cl = random_cluster(seed)
    best = BruteForce(cl, M8).solve()
    res = patterns.pattern_bound(Problem(cl, M8, SolveOptions()), time_limit=3.0, exact_share=1.0)
    assert res.bound >= best.throughput * (1 - 1e-6), (seed, res.bound, best.describe(), res.log)


def test_profile_caps_key_matches_the_items():
    """``_cap_key`` is what the dynamic programme's items depend on: two throughputs with the
    same key give the same profile (so one profile serves both), different ones may not."""
    cl = case_cluster("five-singles")
    ctx = patterns.Patterns(Problem(cl, CASES["five-singles"][0], SolveOptions()))
    tys, hin, const, _ = ctx.context_data([k.idx for k in ctx.kinds], 1)
    price = [1.0 + k.idx for k in ctx.kinds]
    Ts = sorted({ctx.t_cap * x / 64 for x in range(1, 64)})
    by_key: dict = {}
    for T in Ts:
        by_key.setdefault(ctx._cap_key(tys, T), []).append(T)
    shared = [v for v in by_key.values() if len(v) >= 2]
    assert shared
    for v in shared[:3]:
        a = ctx._round_profile(tys, hin, price, v[0], 50.0, 64)
        b = ctx._round_profile(tys, hin, price, v[-1], 50.0, 64)
        assert a[0] == b[0] and list(a[1]) == list(b[1])


def check_tighten(cluster, model, bf, seed):
    """``Patterns._tighten`` run from zero costs on a grid of throughputs (the pipelines' own
    among them) leaves every point's cost at most the cost of every
    pipeline of its region set that is feasible there (throughput at or above the point)."""
    ctx = patterns.Patterns(Problem(cluster, model, SolveOptions()))
    rng = random.Random(seed)
    by_ctx = pipelines_by_region_set(ctx, bf)
    checked = 0
    for ci, (regions, pipes) in enumerate(by_ctx.items()):
        ctx_kinds = [k.idx for k in ctx.kinds if k.region in regions]
        tys, hin, const, _ = ctx.context_data(ctx_kinds, len(regions))
        Ts = sorted(T for _, T in pipes)
        # prices of the scale of throughput per GPU (as LP duals are), so that costs are of the
        # scale of the classes' targets and the pass's buckets resolve them
        per_gpu = sorted(T / sum(tp for _, tp in o) for o, T in pipes)[len(pipes) // 2]
        price = [per_gpu * rng.uniform(0.2, 1.5) for _ in ctx.kinds]
        grid = {Ts[0] * 0.5 * (Ts[-1] * 2.4 / Ts[0]) ** (i / 39) for i in range(40)}
        grid |= set(rng.sample(Ts, min(20, len(Ts))))
        pts = {T: (0.0, None) for T in grid}
        ctx._tighten([(ci, ctx_kinds, len(regions), pts, tys, hin, const)], price, 0.0,
                     time.perf_counter() + 1.0, 0.02 * Ts[0])
        assert any(c > 0 for c, _ in pts.values())        # the pass did raise something
        for ordered, T in pipes:
            cost = sum(price[ctx.kind_of[node]] * tp for node, tp in ordered)
            for P, (c, _) in pts.items():
                if P <= T:
                    assert c <= cost * (1 + REL) + REL, (ordered, T, P, c, cost)
                    checked += 1
    return checked


@pytest.mark.parametrize("name", ["mixed-3-nodes", "two-regions", "five-singles", "gqa-3-pipelines",
                                  "big-plus-4-fast"])
def test_tightened_costs_are_below_every_feasible_pipeline(name):
    model, _ = CASES[name]
    assert check_tighten(case_cluster(name), model, brute(name), 5) > 0


@pytest.mark.parametrize("seed", range(6))
def test_tightened_costs_are_below_every_feasible_pipeline_of_random_clusters(seed):
    cl = random_cluster(seed)
    assert check_tighten(cl, M8, BruteForce(cl, M8), seed) > 0
