"""A call's own cost (the profile's ``call_ms``, from `hexplan profile --served`): what one Forward
to a stage costs beyond its layers and LM head. Read from the cluster file, charged once per
stage a step visits by the cost model, the plan's prediction and the simulator."""
from __future__ import annotations

import pytest

import hexplan
from hexplan import SpecError, loads_cluster
from hexplan.cluster import cluster_from_dict, cluster_to_dict
from hexplan.costmodel import Workload, call_time
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.plan import Pipeline, Plan, Stage
from hexplan.simulator import TraceRequest, WorkloadSpec, simulate
from hexplan.yamlio import Locator

W = Workload(512, 128, 16, 32)
TABLES = ("        decode_ms: {1: 2.5, 16: 7.5}\n"
          "        prefill_ms: {16: 5.5, 512: 60.0}\n"
          "        lm_head_ms: {1: 3.0, 16: 8.0}\n")


def cluster(call: str | None):
    extra = f"        call_ms: {call}\n" if call else ""
    return loads_cluster("name: cpu\ngpu_types:\n  A100-80G:\n    profiles:\n      llama-2-13b:\n" + TABLES + extra
                         + "nodes:\n  - {name: a, gpu: A100-80G, count: 1}\n  - {name: b, gpu: A100-80G, count: 1}\n"
                         "network:\n  default: {bandwidth: 100Gbps, latency: 0.01ms}\n")


def plan(split: bool) -> Plan:
    if split:
        stages = (Stage("a", (0,), 1, (0, 20), "A100-80G"), Stage("b", (0,), 1, (20, 40), "A100-80G"))
    else:
        stages = (Stage("a", (0,), 1, (0, 40), "A100-80G"),)
    return Plan(hexplan.load_model("llama-2-13b"), (Pipeline(stages, 1.0),), assumptions={"workload": W.to_dict()})


def test_the_table_reads_back_and_a_bad_one_names_itself():
    c = cluster("{1: 2.0, 16: 6.0}")
    model = hexplan.load_model("llama-2-13b")
    gpu = c.node("a").gpu
    assert call_time(model, gpu, 1) == pytest.approx(2.0e-3)
    assert call_time(model, gpu, 4) == pytest.approx((2.0 + 4.0 * 3 / 15) * 1e-3)   # interpolated in sequences
    assert call_time(model, cluster(None).node("a").gpu, 4) == 0.0                   # no table: no call cost
    assert call_time(hexplan.load_model("llama-2-7b"), gpu, 4) == 0.0                # another model's profile
    again = cluster_from_dict(cluster_to_dict(c), Locator(None, {}))
    assert again.node("a").gpu.profile_for("llama-2-13b").call_ms == gpu.profile_for("llama-2-13b").call_ms
    with pytest.raises(SpecError, match=r"line 9: .*profiles\.llama-2-13b\.call_ms\[4\]: milliseconds must be positive"):
        cluster("{1: 2.0, 4: -1}")


def test_the_simulator_charges_it_once_per_stage_a_step_visits():
    # One request alone: its TPOT is one decode step's time. A constant 3 ms call adds 3 ms per
    # stage the step visits: once on one stage, twice on two.
    trace = (TraceRequest(0.0, W.prompt_tokens, W.output_tokens),)
    spec = WorkloadSpec(arrival="trace", trace=trace, duration=60.0, warmup=0.0)
    for split, stages in ((False, 1), (True, 2)):
        without = simulate(plan(split), cluster(None), spec)
        with_call = simulate(plan(split), cluster("{1: 3.0, 64: 3.0}"), spec)
        assert with_call.steps == without.steps
        assert with_call.tpot_s.p50 - without.tpot_s.p50 == pytest.approx(stages * 3e-3, rel=1e-6)
        assert with_call.ttft_s.p50 > without.ttft_s.p50


def test_the_plan_prediction_charges_it_once_per_stage():
    for split, stages in ((False, 1), (True, 2)):
        p = plan(split)
        [without] = evaluate_plan_pipelines(cluster(None), CostCache(p.model, W), p.pipelines)
        [with_call] = evaluate_plan_pipelines(cluster("{1: 3.0, 64: 3.0}"), CostCache(p.model, W), p.pipelines)
        assert with_call.tpot_s - without.tpot_s == pytest.approx(stages * 3e-3)
        assert with_call.ttft_s - without.ttft_s == pytest.approx(stages * 3e-3)
        # each stage's capacity pays its call per output token: 1/B of a decode step's, 1/O of a prompt's
        for cap0, cap1 in zip(without.stage_capacity, with_call.stage_capacity):
            assert 1 / cap1 - 1 / cap0 == pytest.approx(3e-3 / W.batch_size + 3e-3 / W.output_tokens)


def test_on_a_shared_host_a_tp_stages_ranks_do_not_compute_together_during_its_call():
    # A TP stage's compute share (what its ranks compute together, for Host.slowdown) leaves
    # out its all-reduces and now its call too, which rank 0 takes alone.
    from hexplan.costmodel import CostParams, allreduce_time
    from hexplan.serving.step import Step
    from hexplan.simulator.engine import Engine, EngineStats

    def engine(call):
        extra = f"        call_ms: {call}\n" if call else ""
        c = loads_cluster("name: cpu\nhosts:\n  box: {cores: 2, contention: 0.0}\ngpu_types:\n  A100-80G:\n"
                          "    profiles:\n      llama-2-13b:\n" + TABLES + "        allreduce_ms: {1: 0.2, 512: 1.0}\n"
                          "        allreduce_tp: 2\n" + extra
                          + "nodes:\n  - {name: a, gpu: A100-80G, count: 2, host: box}\n"
                          "  - {name: b, gpu: A100-80G, count: 1, host: box}\n")
        stages = (Stage("a", (0, 1), 2, (0, 20), "A100-80G"), Stage("b", (0,), 1, (20, 40), "A100-80G"))
        p = Plan(hexplan.load_model("llama-2-13b"), (Pipeline(stages, 1.0),), assumptions={"workload": W.to_dict()})
        eng = Engine(p, c, W, CostParams())
        eng.stats = EngineStats(window=(0.0, 1.0))
        eng.prompt = [512] * 8
        return eng

    step = Step(0, 0, decode=(0, 1, 2, 3), decode_context=4 * 600, logits=4)
    shares = []
    for call in (None, "{1: 3.0, 64: 3.0}"):
        eng = engine(call)
        pipe = eng.pipes[0]
        _, unit = eng._service(pipe, step, 1)
        d = unit[0]                                   # the TP stage's service time of the step
        comm = 20 * 2 * allreduce_time(eng.model, pipe.kinds[0].gpu, 2, 4, pipe.kinds[0].ic, eng.params)
        want = 1.0 - (comm + (3e-3 if call else 0.0)) / d
        assert eng._share(pipe, 0, d, step) == pytest.approx(want)
        assert eng._share(pipe, 1, unit[2], step) == 1.0          # a TP-1 stage: its one worker takes the call
        shares.append(want)
    assert shares[1] < shares[0]


def test_the_last_stage_runs_the_lm_head_on_every_chunk_even_one_whose_logits_go_unused():
    # The executor's last stage computes logits for each chunk's last token (model.py
    # _finish_part), a prompt's chunk before its last one included: a step of one decode and
    # such a chunk pays the head for two rows, though it yields one token (Step.logits == 1).
    from hexplan.costmodel import DEFAULT_PARAMS, lm_head_time
    from hexplan.serving.step import Step
    from hexplan.simulator.engine import Engine

    c, p = cluster("{1: 2.0, 16: 6.0}"), plan(split=True)
    engine = Engine(p, c, W, DEFAULT_PARAMS)
    gpu = c.node("b").gpu
    step = Step(0, 0, decode=(0,), prefill=((1, 0, 256, False),), decode_context=600, logits=1)
    (first, call0), (last, call1) = engine.step_service(step, [0, 512])
    assert call0 == pytest.approx(call_time(p.model, gpu, 2)) and call1 == pytest.approx(call0)
    head = lm_head_time(p.model, gpu, 1, 2, DEFAULT_PARAMS)
    assert head != pytest.approx(lm_head_time(p.model, gpu, 1, 1, DEFAULT_PARAMS))
    assert last - first == pytest.approx(head)          # both stages have 20 layers of the same GPU
    whole = Step(0, 0, decode=(0,), prefill=((1, 0, 512, True),), decode_context=600, logits=2)
    (f2, _), (l2, _) = engine.step_service(whole, [0, 512])
    assert l2 - f2 == pytest.approx(head)
