"""The plan validator catches every kind of broken plan, and plans survive YAML/JSON round trips.

The base plans are written by hand (not by the solver) and their predictions are filled in from
``hexplan.evaluate``, so each mutation below is the only thing wrong with the plan it makes.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

import hexplan
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.models import ModelSpec
from hexplan.plan import Pipeline, Plan, Stage, plan_from_dict

HEXGEN = "cluster_specs/hexgen-case.yaml"


def with_predictions(plan: Plan, cluster: hexplan.Cluster) -> Plan:
    """Fill in weights, per-pipeline and total throughput from the cost model (default workload)."""
    metrics = evaluate_plan_pipelines(cluster, CostCache(plan.model, hexplan.Workload()), plan.pipelines)
    total = sum(m.throughput for m in metrics)
    pipes = [replace(p, weight=m.throughput / total, throughput_tokens_per_s=m.throughput,
                     decode_ms_per_token=m.tpot_s * 1e3, ttft_ms=m.ttft_s * 1e3)
             for p, m in zip(plan.pipelines, metrics)]
    return replace(plan, pipelines=tuple(pipes),
                   predicted={"throughput_tokens_per_s": total, "upper_bound_tokens_per_s": total * 1.5})


@pytest.fixture(scope="module")
def hexgen():
    return hexplan.load_cluster(HEXGEN)


@pytest.fixture(scope="module")
def base(hexgen):
    """Llama-2-70B on the HexGen mix: TP-2 stages on the A6000s and on the A5000s."""
    model = hexplan.load_model("llama-2-70b")
    stages = (Stage("n0", (0, 1), 2, (0, 30), "A6000"),
              Stage("n0", (2, 3), 2, (30, 60), "A6000"),
              Stage("n1", (0, 1), 2, (60, 80), "A5000"))
    return with_predictions(Plan(model, (Pipeline(stages),)), hexgen)


def set_stage(plan: Plan, si: int, pi: int = 0, **changes) -> Plan:
    p = plan.pipelines[pi]
    stages = list(p.stages)
    stages[si] = replace(stages[si], **changes)
    pipes = list(plan.pipelines)
    pipes[pi] = replace(p, stages=tuple(stages))
    return plan.with_pipelines(pipes)


def assert_reported(problems: list[str], pattern: str):
    assert problems, "the validator accepted a broken plan"
    assert any(re.search(pattern, m) for m in problems), f"no message matches {pattern!r}: {problems}"


def test_base_plan_is_valid(base, hexgen):
    assert hexplan.validate_plan(base, hexgen) == []
    hexplan.check_plan(base, hexgen)  # does not raise
    assert base.throughput > 0


# name -> (mutation, regex the validator's message must match)
MUTATIONS = {
    "gpu used by two stages": (lambda p: set_stage(p, 1, gpus=(1, 2)), r"GPU n0:1 already used"),
    "gpu listed twice in a stage": (lambda p: set_stage(p, 0, gpus=(0, 0)), r"listed twice"),
    "gap between layer ranges": (lambda p: set_stage(p, 1, layers=(31, 60)),
                                 r"stage 1: layers start at 31, expected 30"),
    "overlapping layer ranges": (lambda p: set_stage(p, 1, layers=(29, 60)),
                                 r"stage 1: layers start at 29, expected 30"),
    "layers not reaching L": (lambda p: set_stage(p, 2, layers=(60, 79)), r"layers end at 79, model has 80"),
    "layers beyond L": (lambda p: set_stage(p, 2, layers=(60, 81)), r"layers end at 81, model has 80"),
    "empty layer range": (lambda p: set_stage(set_stage(p, 1, layers=(30, 30)), 2, layers=(30, 80)),
                          r"empty or reversed layer range \[30, 30\)"),
    "tp degree 3": (lambda p: set_stage(p, 0, tp=3), r"TP degree 3 is not one of"),
    "tp != number of gpus": (lambda p: set_stage(p, 0, tp=2, gpus=(0,)), r"TP 2 but 1 GPUs listed"),
    "gpu index beyond the node": (lambda p: set_stage(p, 2, gpus=(1, 2)), r"GPU index 2 outside node n1 \(0\.\.1\)"),
    "gpu index beyond a 4-gpu node": (lambda p: set_stage(p, 1, gpus=(2, 4)), r"GPU index 4 outside node n0"),
    "unknown node": (lambda p: set_stage(p, 2, node="n9"), r"unknown node 'n9'"),
    "wrong gpu type label": (lambda p: set_stage(p, 2, gpu="A100-80G"), r"says GPU A100-80G but node n1 has A5000"),
    "weights not summing to 1": (lambda p: p.with_pipelines([replace(p.pipelines[0], weight=0.7)]),
                                 r"weights must be non-negative and sum to 1"),
    "tampered predicted throughput": (
        lambda p: replace(p, predicted={**p.predicted, "throughput_tokens_per_s": p.throughput * 1.1}),
        r"predicted throughput .* recomputed"),
    "tampered pipeline throughput": (
        lambda p: p.with_pipelines([replace(p.pipelines[0], throughput_tokens_per_s=p.throughput * 2)]),
        r"pipeline 0: recorded .* recomputed"),
    "throughput above the upper bound": (
        lambda p: replace(p, predicted={**p.predicted, "upper_bound_tokens_per_s": p.throughput * 0.9}),
        r"exceeds the reported upper bound"),
    "tpot slo violated": (lambda p: replace(p, assumptions={"slo_tpot_ms": p.pipelines[0].decode_ms_per_token / 2}),
                          r"pipeline 0: TPOT .* exceeds SLO"),
    "ttft slo violated": (lambda p: replace(p, assumptions={"slo_ttft_ms": p.pipelines[0].ttft_ms / 2}),
                          r"pipeline 0: TTFT .* exceeds SLO"),
    "stage over its memory": (lambda p: set_stage(set_stage(p, 0, layers=(0, 50)), 1, layers=(50, 60)),
                              r"pipeline 0 stage 0: needs .* GB per GPU, only .* GB usable"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_reported(name, base, hexgen):
    mutate, pattern = MUTATIONS[name]
    bad = mutate(base)
    problems = hexplan.validate_plan(bad, hexgen)
    assert_reported(problems, pattern)
    with pytest.raises(hexplan.PlanInvalid) as e:
        hexplan.check_plan(bad, hexgen)
    assert e.value.problems == problems


def test_whole_70b_on_one_t4_exceeds_memory():
    cl = hexplan.loads_cluster("""
nodes:
  - {name: t, gpu: T4, count: 1}
  - {name: a, gpu: A100-80G, count: 8}
""")
    plan = Plan(hexplan.load_model("llama-2-70b"), (Pipeline((Stage("t", (0,), 1, (0, 80), "T4"),), 1.0),))
    assert_reported(hexplan.validate_plan(plan, cl), r"stage 0: needs \d+\.\d+ GB per GPU, only \d+\.\d+ GB usable")
    # the same model on the A100 node, TP 8, fits
    ok = with_predictions(Plan(plan.model, (Pipeline((Stage("a", tuple(range(8)), 8, (0, 80)),)),)), cl)
    assert hexplan.validate_plan(ok, cl) == []


def test_heads_not_divisible_by_tp():
    """llama-30b has 52 attention heads: TP 8 cannot split them (TP 4 can)."""
    cl = hexplan.loads_cluster("nodes:\n  - {name: a, gpu: A100-80G, count: 8}\n")
    model = hexplan.load_model("llama-30b")
    bad = Plan(model, (Pipeline((Stage("a", tuple(range(8)), 8, (0, 60)),), 1.0),))
    assert_reported(hexplan.validate_plan(bad, cl), r"52 attention heads are not divisible by TP 8")
    good = with_predictions(Plan(model, (Pipeline((Stage("a", (0, 1, 2, 3), 4, (0, 60)),)),)), cl)
    assert hexplan.validate_plan(good, cl) == []


def test_gpu_shared_between_pipelines_and_weights_not_matching_flow():
    """Two pipelines: a GPU reused across pipelines, and weights that are not the flow shares."""
    cl = hexplan.loads_cluster("nodes:\n  - {name: a, gpu: A100-80G, count: 4}\n")
    model = hexplan.load_model("llama-2-7b")
    plan = with_predictions(Plan(model, (Pipeline((Stage("a", (0,), 1, (0, 32)),)),
                                        Pipeline((Stage("a", (1, 2), 2, (0, 16)), Stage("a", (3,), 1, (16, 32)))))), cl)
    assert hexplan.validate_plan(plan, cl) == []
    reused = set_stage(plan, 1, pi=1, gpus=(0,))
    assert_reported(hexplan.validate_plan(reused, cl), r"pipeline 1 stage 1: GPU a:0 already used by pipeline 0 stage 0")
    w0, w1 = plan.pipelines[0].weight, plan.pipelines[1].weight
    swapped = plan.with_pipelines([replace(plan.pipelines[0], weight=w1), replace(plan.pipelines[1], weight=w0)])
    assert abs(w0 - w1) > 1e-2
    assert_reported(hexplan.validate_plan(swapped, cl), r"pipeline 0: weight .* share of the flow")


def test_unknown_node_is_reported_without_crashing(base, hexgen):
    """An unknown node stops the checks that need the node (no KeyError from the cost model)."""
    bad = set_stage(set_stage(base, 0, node="nowhere"), 1, node="elsewhere")
    problems = hexplan.validate_plan(bad, hexgen)
    assert_reported(problems, r"stage 0: unknown node 'nowhere'")
    assert_reported(problems, r"stage 1: unknown node 'elsewhere'")


# ---- round trips ---------------------------------------------------------------------------

TINY = ModelSpec(name="tiny-8l", num_layers=8, hidden_size=4096, intermediate_size=11008,
                 num_heads=32, num_kv_heads=32, vocab_size=32000)
TINY_CLUSTER = """
gpu_types:
  Tiny: {memory: 4GB, memory_bandwidth: 300GB/s, fp16_tflops: 30}
  Big:  {memory: 12GB, memory_bandwidth: 400GB/s, fp16_tflops: 40}
nodes:
  - {name: n0, gpu: Big, count: 2, address: "10.0.0.1:50051"}
  - {name: n1, gpu: Tiny, count: 3, region: west}
"""


@pytest.fixture(scope="module")
def solved_plans(hexgen):
    tiny_cl = hexplan.loads_cluster(TINY_CLUSTER)
    return [
        (hexplan.solve(hexgen, model="llama-2-70b", time_limit=5, seed=0), hexgen),
        (hexplan.solve(tiny_cl, model=TINY, time_limit=3, seed=0), tiny_cl),
        (hexplan.solve(tiny_cl, model=TINY, time_limit=3, seed=0, slo_tpot_ms=40.0), tiny_cl),
    ]


def assert_same_plan(a: Plan, b: Plan):
    assert b.model == a.model
    assert len(b.pipelines) == len(a.pipelines)
    for pa, pb in zip(a.pipelines, b.pipelines):
        assert pb.stages == pa.stages
        assert pb.weight == pytest.approx(pa.weight, rel=1e-5, abs=1e-9)
        for k in ("throughput_tokens_per_s", "decode_ms_per_token", "ttft_ms"):
            va, vb = getattr(pa, k), getattr(pb, k)
            assert (va is None) == (vb is None)
            if va is not None:
                assert vb == pytest.approx(va, rel=1e-5)
    assert set(b.predicted) == set(a.predicted)
    for k, v in a.predicted.items():
        assert b.predicted[k] == pytest.approx(v, rel=1e-5, abs=1e-12)
    assert b.assumptions == a.assumptions
    assert b.cluster == a.cluster
    assert set(b.solver) == set(a.solver)


def assert_round_trip(plan: Plan, cl: hexplan.Cluster, fmt: str):
    assert hexplan.validate_plan(plan, cl) == []
    text = plan.dump(fmt)
    back = hexplan.loads_plan(text)
    assert hexplan.validate_plan(back, cl) == []
    assert_same_plan(plan, back)
    # writing what was read gives the same text: the rounding is a fixed point
    assert back.dump(fmt) == text
    assert hexplan.loads_plan(back.dump(fmt)) == back


def test_round_trip_yaml(solved_plans):
    for plan, cl in solved_plans:
        assert_round_trip(plan, cl, "yaml")


def test_round_trip_json_of_hand_built_plan(base, hexgen):
    assert_round_trip(base, hexgen, "json")


def test_round_trip_json_of_solver_plans(solved_plans):
    for plan, cl in solved_plans:
        assert_round_trip(plan, cl, "json")


def test_round_trip_files(tmp_path, solved_plans, base, hexgen):
    cases = [(plan, cl, "yaml") for plan, cl in solved_plans] + [(base, hexgen, "yaml"), (base, hexgen, "json")]
    for i, (plan, cl, fmt) in enumerate(cases):
        path = tmp_path / f"plan{i}.{fmt}"
        path.write_text(plan.dump(fmt), encoding="utf-8")
        back = hexplan.load_plan(path)
        assert_same_plan(plan, back)
        assert hexplan.validate_plan(back, cl) == []


def test_round_trip_embeds_custom_model(solved_plans):
    plan, _ = solved_plans[1]
    d = plan.to_dict()
    assert isinstance(d["model"], dict) and d["model"]["name"] == "tiny-8l"
    assert hexplan.loads_plan(plan.to_yaml()).model == TINY
    # built-in models are written by name
    assert solved_plans[0][0].to_dict()["model"] == "llama-2-70b"


def test_round_trip_of_hand_built_plan(base, hexgen):
    back = hexplan.loads_plan(base.to_yaml())
    assert_same_plan(base, back)
    assert hexplan.validate_plan(back, hexgen) == []
    assert plan_from_dict(base.to_dict()).pipelines[0].stages == base.pipelines[0].stages


def test_hand_written_plan_with_model_and_pipelines_only(hexgen):
    text = """
model: llama-2-70b
pipelines:
  - stages:
      - {node: n0, gpus: [0, 1], tp: 2, layers: [0, 30]}
      - {node: n0, gpus: [2, 3], tp: 2, layers: [30, 60]}
      - {node: n1, gpus: [0, 1], tp: 2, layers: [60, 80]}
"""
    plan = hexplan.loads_plan(text)
    assert plan.model.name == "llama-2-70b"
    assert plan.predicted == {} and plan.solver == {} and plan.assumptions == {} and plan.cluster == {}
    assert len(plan.pipelines) == 1 and plan.pipelines[0].weight == 1.0
    assert [s.layers for s in plan.pipelines[0].stages] == [(0, 30), (30, 60), (60, 80)]
    assert [s.gpu for s in plan.pipelines[0].stages] == ["", "", ""]
    assert hexplan.validate_plan(plan, hexgen) == []


def test_hand_written_plan_tp_defaults_to_gpu_count_and_weights_to_equal_shares():
    text = """
model: llama-2-7b
pipelines:
  - stages: [{node: a, gpus: [0, 1], layers: [0, 32]}]
  - stages: [{node: a, gpus: [2, 3], layers: [0, 32]}]
"""
    plan = hexplan.loads_plan(text)
    assert [s.tp for p in plan.pipelines for s in p.stages] == [2, 2]
    assert [p.weight for p in plan.pipelines] == [0.5, 0.5]
    cl = hexplan.loads_cluster("nodes:\n  - {name: a, gpu: A100-80G, count: 4}\n")
    assert hexplan.validate_plan(plan, cl) == []


@pytest.mark.parametrize("text,pattern", [
    ("pipelines: []\n", r"missing model"),
    ("model: llama-2-70b\n", r"pipelines.*missing or empty"),
    ("model: llama-2-70b\npipelines:\n  - stages: [{node: n0, gpus: [0], layers: [0]}]\n", r"layers.*\[start, end\)"),
    ("model: llama-2-70b\npipelines:\n  - stages: [{node: n0, gpus: [-1], layers: [0, 80]}]\n", r"GPU index must be an integer >= 0"),
    ("model: no-such-model\npipelines:\n  - stages: [{node: n0, gpus: [0], layers: [0, 80]}]\n", r"unknown model"),
])
def test_malformed_plan_text_is_a_spec_error(text, pattern):
    with pytest.raises(hexplan.SpecError, match=pattern):
        hexplan.loads_plan(text)
