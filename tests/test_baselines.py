"""Baseline planners (solver/hexplan/solver/baselines*.py): valid plans in hexplan's format, each mechanism's
shape, hexplan at least as good as all of them, and one hand-checkable instance per baseline.

The two real clusters are HexGen's case (4 A6000 + 2 A5000 + 2 A4000) and Helix's 24 nodes,
with Llama-2-70B and the default workload. Every plan of either cluster is computed once (module
fixture); the solver-based baselines get 5 s, hexplan 20 s ("fair": on helix-24 the optimizer's
first MILP incumbent comes after about 2 s, and 20 s leaves room for a loaded machine).
"""
from __future__ import annotations

import functools

import pytest

import hexplan
from hexplan.errors import InfeasibleError, SpecError
from hexplan.models import ModelSpec
from hexplan.solver import SolveOptions
from hexplan.solver.baselines import BASELINES, plan_with
from hexplan.solver.baselines_common import make_problem, tp1_slots
from hexplan.solver.baselines_grid import grid_chains
from hexplan.solver.problem import Problem

CLUSTERS = ("hexgen-case", "helix-24")
BASELINE_LIMIT = 5.0
HEXPLAN_LIMIT = 20.0
LLAMA70 = hexplan.load_model("llama-2-70b")


@functools.lru_cache(maxsize=None)
def cluster(name: str) -> hexplan.Cluster:
    return hexplan.load_cluster(f"cluster_specs/{name}.yaml")


@functools.lru_cache(maxsize=None)
def outcome(cname: str, baseline: str):
    """The plan, or the InfeasibleError, of one baseline on one cluster."""
    limit = HEXPLAN_LIMIT if baseline == "hexplan" else BASELINE_LIMIT
    try:
        return plan_with(baseline, cluster(cname), LLAMA70, SolveOptions(time_limit=limit))
    except InfeasibleError as e:
        return e


def plan_of(cname: str, baseline: str) -> hexplan.Plan:
    res = outcome(cname, baseline)
    assert not isinstance(res, InfeasibleError), f"{baseline} on {cname}: {res}"
    return res


def layer_counts(p: hexplan.Pipeline) -> list[int]:
    return [s.num_layers for s in p.stages]


def describe(plan: hexplan.Plan) -> list:
    """Pipelines as lists of (node, gpus, tp, layer range), for literal comparisons."""
    return [[(s.node, s.gpus, s.tp, s.layers) for s in p.stages] for p in plan.pipelines]


# ---- every baseline on the real clusters ----------------------------------------------

@pytest.mark.parametrize("cname", CLUSTERS)
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_valid_plan_in_hexplan_format(cname, baseline):
    """On both clusters every mechanism finds a plan (none is honestly infeasible there: the
    infeasible variants are pinned below); it passes the independent validator, names its
    baseline, and survives a YAML round trip."""
    cl = cluster(cname)
    plan = plan_of(cname, baseline)
    assert hexplan.validate_plan(plan, cl) == []
    assert plan.solver["name"] == baseline
    assert plan.throughput > 0
    again = hexplan.loads_plan(plan.to_yaml())
    assert hexplan.validate_plan(again, cl) == []
    assert again.solver["name"] == baseline


@pytest.mark.parametrize("cname", CLUSTERS)
def test_hexplan_at_least_as_good_as_every_baseline(cname):
    best = plan_of(cname, "hexplan").throughput
    for baseline in BASELINES:
        assert plan_of(cname, baseline).throughput <= best * (1 + 1e-9), baseline


@pytest.mark.parametrize("cname", CLUSTERS)
def test_symmetric_plans_are_symmetric(cname):
    plan = plan_of(cname, "symmetric")
    tps = {s.tp for p in plan.pipelines for s in p.stages}
    assert len(tps) == 1
    for p in plan.pipelines:
        counts = layer_counts(p)
        assert max(counts) - min(counts) <= 1
        assert counts == sorted(counts, reverse=True)  # the first L mod k stages get one more
        assert len(p.stages) == plan.solver["baseline_detail"]["stages"]
    assert len({tuple(layer_counts(p)) for p in plan.pipelines}) == 1
    assert plan.solver["baseline_detail"]["tp"] == tps.pop()


@pytest.mark.parametrize("cname", CLUSTERS)
def test_uniform_is_tp1_with_even_layers(cname):
    plan = plan_of(cname, "uniform")
    for p in plan.pipelines:
        assert all(s.tp == 1 for s in p.stages)
        counts = layer_counts(p)
        assert max(counts) - min(counts) <= 1
    assert len({len(p.stages) for p in plan.pipelines}) == 1


@pytest.mark.parametrize("cname", CLUSTERS)
def test_helix_is_tp1_everywhere(cname):
    plan = plan_of(cname, "helix")
    assert {s.tp for p in plan.pipelines for s in p.stages} == {1}
    assert plan.solver["baseline_detail"] == {"tp_degrees": [1]}


@pytest.mark.parametrize("cname", CLUSTERS)
def test_homogeneous_uses_one_gpu_type(cname):
    plan = plan_of(cname, "homogeneous")
    types = {s.gpu for p in plan.pipelines for s in p.stages}
    detail = plan.solver["baseline_detail"]
    assert types == {detail["gpu_type"]}
    assert detail["per_type"][detail["gpu_type"]] == pytest.approx(plan.throughput)
    # The gateway stays where the cluster puts it, so the figures are this cluster's.
    assert plan.cluster["coordinator"] == cluster(cname).coordinator_node.name


@pytest.mark.parametrize("cname", CLUSTERS)
@pytest.mark.parametrize("baseline", ["petals", "swarm"])
def test_petals_and_swarm_chains_are_contiguous_from_layer_0(cname, baseline):
    plan = plan_of(cname, baseline)
    for p in plan.pipelines:
        assert p.stages[0].layers[0] == 0
        assert all(a.layers[1] == b.layers[0] for a, b in zip(p.stages, p.stages[1:]))
        assert p.stages[-1].layers[1] == LLAMA70.num_layers
        assert all(s.tp == 1 for s in p.stages)
    if baseline == "swarm":  # equal stages, the same k in every chain
        assert len({tuple(layer_counts(p)) for p in plan.pipelines}) == 1
        counts = layer_counts(plan.pipelines[0])
        assert max(counts) - min(counts) <= 1


def test_petals_stages_lie_inside_their_servers_windows():
    plan = plan_of("helix-24", "petals")
    windows = {node: (a, b) for node, a, b in plan.solver["baseline_detail"]["windows"]}  # one GPU per node
    for p in plan.pipelines:
        for s in p.stages:
            a, b = windows[s.node]
            assert a <= s.layers[0] and s.layers[1] <= b


# ---- honest infeasibility on the real clusters -------------------------------------------

def test_symmetric_records_why_tp8_is_impossible_on_hexgen():
    """TP 8 needs 8 GPUs in one node; HexGen's largest node has 4. TP 1, 2 and 4 each have plans
    (TP 4: the four A6000s as one stage holding all 80 layers)."""
    per_tp = plan_of("hexgen-case", "symmetric").solver["baseline_detail"]["per_tp"]
    assert per_tp["tp8"] == "no node has 8 GPUs (the largest has 4)"
    assert all(isinstance(per_tp[f"tp{d}"], float) for d in (1, 2, 4))
    with pytest.raises(InfeasibleError, match=r"baseline symmetric: .*TP 8: no node has 8 GPUs"):
        plan_with("symmetric", cluster("hexgen-case"), LLAMA70, SolveOptions(tp_degrees=(8,)))


def test_naive_pp8_runs_out_of_memory_on_hexgen():
    """HexGen reports that naive PP over all 8 GPUs runs out of memory: 10 layers do not fit on an
    A4000 (16 GB) with the KV cache. Uniform therefore uses the four A6000s only."""
    problem = make_problem(cluster("hexgen-case"), LLAMA70, SolveOptions())
    assert grid_chains(problem, tp1_slots(problem), 8) == []
    plan = plan_of("hexgen-case", "uniform")
    assert describe(plan) == [[("n0", (i,), 1, (20 * i, 20 * i + 20)) for i in range(4)]]


def test_homogeneous_a100s_alone_cannot_hold_llama70b():
    """Helix's four A100-40G hold 4 x 19 = 76 of 80 layers with the workload's KV cache."""
    cl = cluster("helix-24")
    detail = plan_of("helix-24", "homogeneous").solver["baseline_detail"]
    assert detail["per_type"]["A100-40G"].startswith("infeasible: llama-2-70b does not fit")
    a100s = tuple(n.name for n in cl.nodes if n.gpu.name == "A100-40G")
    with pytest.raises(InfeasibleError, match=r"baseline homogeneous: no GPU type can hold the model .*A100-40G"):
        plan_with("homogeneous", cl, LLAMA70, SolveOptions(time_limit=2, nodes=a100s))


def test_unknown_baseline_and_bad_options():
    cl = cluster("hexgen-case")
    with pytest.raises(SpecError, match="unknown baseline 'vllm'"):
        plan_with("vllm", cl, LLAMA70, SolveOptions())
    with pytest.raises(SpecError, match="tp_degrees"):
        plan_with("symmetric", cl, LLAMA70, SolveOptions(tp_degrees=(3,)))
    with pytest.raises(SpecError, match="unknown node"):
        plan_with("uniform", cl, LLAMA70, SolveOptions(nodes=("n9",)))


def test_solve_options_hooks():
    cl = cluster("hexgen-case")
    p = Problem(cl, LLAMA70, SolveOptions(tp_degrees=(1, 4), nodes=("n0", "n2")))
    assert [n.name for n in p.nodes] == ["n0", "n2"]
    assert p.allowed_tp == {"n0": [1, 4], "n2": [1]}
    assert p.cluster.coordinator_node.name == "n0"


# ---- hand-checkable instances ------------------------------------------------------------
# Llama-2-7B-shaped layers, 8 of them (as in tests/test_optimizer.py). With the default workload
# one layer takes about 1.07 GB per GPU at TP 1 (weights + KV cache for 64 x 640 tokens) and the
# embedding or the LM head another 0.26 GB: a Quarter GPU (5.6 GB) holds 4 layers even with both,
# a Whole GPU (10.5 GB) the whole model. QuarterFast has Quarter's memory and twice its speed.

M8 = ModelSpec(name="tiny-8l", num_layers=8, hidden_size=4096, intermediate_size=11008,
               num_heads=32, num_kv_heads=32, vocab_size=32000)
GPU_TYPES = """
gpu_types:
  Quarter: {memory: 5.6GB, memory_bandwidth: 300GB/s, fp16_tflops: 30}
  QuarterFast: {memory: 5.6GB, memory_bandwidth: 600GB/s, fp16_tflops: 60}
  Whole: {memory: 10.5GB, memory_bandwidth: 900GB/s, fp16_tflops: 90}
"""
HAND_OPTIONS = SolveOptions(time_limit=3)


def tiny(nodes: str) -> hexplan.Cluster:
    return hexplan.loads_cluster(GPU_TYPES + "nodes:\n" + "".join(f"  - {n}\n" for n in nodes.strip().splitlines()))


def hand_plan(baseline: str, cl: hexplan.Cluster) -> hexplan.Plan:
    plan = plan_with(baseline, cl, M8, HAND_OPTIONS)
    assert hexplan.validate_plan(plan, cl) == []
    return plan


def test_hand_capacities():
    """The premises of the instances below."""
    cl = tiny("{name: a, gpu: Quarter, count: 1}\n{name: b, gpu: Whole, count: 1}")
    p = Problem(cl, M8, SolveOptions())
    assert p.cost("a", 1).max_layers(first=True, last=True) == 4 and p.cost("a", 1).max_layers() == 4
    assert p.cost("b", 1).max_layers(first=True, last=True) == 8


def test_hand_hexplan_two_replicas():
    """Two nodes that each hold the model: two one-stage replicas, half the requests each."""
    plan = hand_plan("hexplan", tiny("{name: a, gpu: Whole, count: 1}\n{name: b, gpu: Whole, count: 1}"))
    assert sorted(describe(plan)) == [[("a", (0,), 1, (0, 8))], [("b", (0,), 1, (0, 8))]]
    assert [p.weight for p in plan.pipelines] == pytest.approx([0.5, 0.5])


def test_hand_homogeneous_keeps_the_type_that_holds_the_model():
    """The Quarter GPU cannot hold 8 layers alone, so the homogeneous plan is the Whole GPU alone
    (hexplan itself does better by putting both to work)."""
    cl = tiny("{name: a, gpu: Whole, count: 1}\n{name: b, gpu: Quarter, count: 1}")
    plan = hand_plan("homogeneous", cl)
    assert describe(plan) == [[("a", (0,), 1, (0, 8))]]
    detail = plan.solver["baseline_detail"]
    assert detail["gpu_type"] == "Whole"
    assert detail["per_type"]["Quarter"].startswith("infeasible: tiny-8l does not fit in cluster")
    assert hand_plan("hexplan", cl).throughput > plan.throughput


def test_hand_symmetric_prefers_replicas():
    """Two Whole GPUs and a Quarter, one GPU per node. k = 1 gives two replicas on the Whole GPUs
    (the Quarter cannot hold a copy); k = 2 gives one pipeline of two 4-layer stages, which has
    the same compute but pays the LM head on one GPU instead of two and adds a hop; TP >= 2 needs
    a node with 2 GPUs. So: two replicas, the Quarter left idle."""
    cl = tiny("{name: a, gpu: Whole, count: 1}\n{name: b, gpu: Whole, count: 1}\n{name: c, gpu: Quarter, count: 1}")
    plan = hand_plan("symmetric", cl)
    assert describe(plan) == [[("a", (0,), 1, (0, 8))], [("b", (0,), 1, (0, 8))]]
    detail = plan.solver["baseline_detail"]
    assert (detail["tp"], detail["stages"], detail["pipelines"]) == (1, 1, 2)
    assert detail["per_tp"]["tp2"] == "no node has 2 GPUs (the largest has 1)"


def test_hand_uniform_most_pipelines():
    """Four Quarter GPUs, 8 layers: one stage per pipeline does not fit, two stages of 4 layers
    give two pipelines, three or four stages only one. Fastest first with ties in the cluster's
    order: (n0, n1) and (n2, n3)."""
    cl = tiny("\n".join(f"{{name: n{i}, gpu: Quarter, count: 1}}" for i in range(4)))
    plan = hand_plan("uniform", cl)
    assert describe(plan) == [[("n0", (0,), 1, (0, 4)), ("n1", (0,), 1, (4, 8))],
                              [("n2", (0,), 1, (0, 4)), ("n3", (0,), 1, (4, 8))]]


def test_hand_petals_windows_and_chains():
    """The Whole GPU (fastest) joins first and takes all 8 blocks. Every 4-block window then has
    the same coverage, so the first Quarter takes the lowest, [0, 4); the second takes the now
    least-covered [4, 8). Chains: the Whole GPU alone reaches layer 8 from 0; then q0 + q1."""
    cl = tiny("{name: big, gpu: Whole, count: 1}\n{name: q0, gpu: Quarter, count: 1}\n"
              "{name: q1, gpu: Quarter, count: 1}")
    plan = hand_plan("petals", cl)
    assert plan.solver["baseline_detail"]["windows"] == [["big", 0, 8], ["q0", 0, 4], ["q1", 4, 8]]
    assert describe(plan) == [[("big", (0,), 1, (0, 8))],
                              [("q0", (0,), 1, (0, 4)), ("q1", (0,), 1, (4, 8))]]


def test_hand_swarm_balanced_stages():
    """Two fast and two slow GPUs, each holding 4 layers: k = 2 (k = 1 does not fit; k = 3 or 4
    leave a stage with one server, hence one chain). Fast f0 and f1 fill the two empty stages;
    stage 1 then has less capacity (it also runs the LM head), so the first slow GPU, s0, joins
    stage 1 and s1 joins stage 0. Chains pair the i-th fastest of each stage."""
    cl = tiny("{name: f0, gpu: QuarterFast, count: 1}\n{name: f1, gpu: QuarterFast, count: 1}\n"
              "{name: s0, gpu: Quarter, count: 1}\n{name: s1, gpu: Quarter, count: 1}")
    plan = hand_plan("swarm", cl)
    assert describe(plan) == [[("f0", (0,), 1, (0, 4)), ("f1", (0,), 1, (4, 8))],
                              [("s1", (0,), 1, (0, 4)), ("s0", (0,), 1, (4, 8))]]
    assert plan.solver["baseline_detail"]["servers_per_stage"] == [2, 2]


def test_hand_helix_splits_a_node_into_tp1_stages():
    """One node of two Quarter GPUs: hexplan may use one TP-2 stage; Helix has TP 1 only, and each
    GPU holds at most 4 layers, so: two stages of 4 layers."""
    plan = hand_plan("helix", tiny("{name: a, gpu: Quarter, count: 2}"))
    assert describe(plan) == [[("a", (0,), 1, (0, 4)), ("a", (1,), 1, (4, 8))]]


def test_slos_and_latency_objective_reach_the_fixed_layer_baselines():
    """HexGen's case with a 150 ms TPOT SLO: symmetric falls back to two TP-2 stages of 40 layers
    on the A6000s (135 ms); naive PP over four A6000 stages (261 ms) meets no SLO. With the
    latency objective symmetric picks the lowest TPOT: one TP-4 stage."""
    cl = cluster("hexgen-case")
    plan = plan_with("symmetric", cl, LLAMA70, SolveOptions(slo_tpot_ms=150))
    assert hexplan.validate_plan(plan, cl) == []
    assert [[(s.tp, s.num_layers) for s in p.stages] for p in plan.pipelines] == [[(2, 40), (2, 40)]]
    with pytest.raises(InfeasibleError, match="baseline uniform: .* meets the SLOs"):
        plan_with("uniform", cl, LLAMA70, SolveOptions(slo_tpot_ms=150))
    fastest = plan_with("symmetric", cl, LLAMA70, SolveOptions(objective="latency"))
    assert hexplan.validate_plan(fastest, cl) == []
    assert describe(fastest) == [[("n0", (0, 1, 2, 3), 4, (0, 80))]]
