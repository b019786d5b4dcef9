"""Shift Parallelism in the cost model, the simulator, the validator and the planner's post-pass.

The step-time and memory numbers are computed by hand from the model shapes and datasheet
figures (docs/cost-model.md, section 14, writes the same formulas); the threshold is checked as
a real crossover with the step functions themselves; the simulator's modes against the rule
applied to the steps the scheduler actually formed.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from hexplan.cluster import cluster_to_dict, loads_cluster
from hexplan.costmodel import (DEFAULT_PARAMS, MAX_SHIFT_THRESHOLD, MIN_SHIFT_THRESHOLD, CostParams, Workload,
                               alltoall_time, decode_layer_split, decode_layer_time, lm_head_time,
                               prefill_layer_split, prefill_layer_time, shift_threshold, stage_cost)
from hexplan.dispatch import Dispatcher
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.gpus import CATALOG, Profile, ProfileTable
from hexplan.models import BUILTIN_MODELS
from hexplan.plan import Pipeline, Plan, Stage, loads_plan
from hexplan.serving.shift import SP_MODE, shift_mode
from hexplan.simulator.engine import Engine, EngineOptions
from hexplan.simulator.workload import RequestStream, WorkloadSpec
from hexplan.solver.assemble import route_and_predict
from hexplan.solver.shift import shift_candidates, shift_plan
from hexplan.validate import validate_plan

EXACT = 1e-9
# Llama-2-70B: H 8192, I 28672, 64 heads, 8 KV heads, head dim 128, fp16; per layer 855,654,400
# params (tests/test_costmodel.py writes the sum out).
H, I, NH, KV, HD, B2 = 8192, 28672, 64, 8, 128, 2
PARAMS = H * NH * HD + 2 * H * KV * HD + NH * HD * H + 3 * H * I + 2 * H
LB = PARAMS * B2
# A100-40G: 1555 GB/s, 312 TFLOPS, NVLink 300 GB/s; default efficiencies and alpha.
BW, F, NVL = 1555e9, 312e12, 300e9
ETA_MEM, ETA_F, ALPHA = 0.7, 0.5, 10e-6


def roofline(nbytes, flops):
    return max(nbytes / (BW * ETA_MEM), flops / (F * ETA_F))


def ring(m, d):
    return 0.0 if d <= 1 else 2 * (d - 1) * (ALPHA + m / (d * NVL))


def a2a(m, sp):
    return (sp - 1) * (ALPHA + m / (sp * NVL))


def m70():
    return BUILTIN_MODELS["llama-2-70b"]


A100 = CATALOG["A100-40G"]
H100 = CATALOG["H100-80G"]


# ---- step times in SP mode, by hand -----------------------------------------------------------

def test_sp_prefill_layer_by_hand():
    # d = 4 GPUs, sp 2 x t 2; a prompt of 512 tokens: each SP rank 256 tokens with TP-2 weights,
    # attention on 64 / 4 = 16 query heads over all 512 tokens with the KV heads of TP 4 (8 // 4 =
    # 2 per GPU: K and V of 2 heads x 128 x 2 B = 1024 B per token), as in TP mode.
    n, t, d, sp, P = 256, 2, 4, 2, 512
    kv_tok = 2 * (KV // d) * HD * B2
    compute = roofline(LB / t + P * kv_tok, 2 * PARAMS / t * n + 2 * P * P * HD * (NH // d))
    qkv = n * (NH // t + 2 * (KV // t)) * HD * B2     # 256 x (32 + 8) x 128 x 2 B
    out = n * (NH // t) * HD * B2
    comm = 2 * ring(n * H * B2, t) + a2a(qkv, sp) + a2a(out, sp)
    lt = prefill_layer_split(m70(), A100, d, P, NVL, sp=sp)
    assert lt.compute == pytest.approx(compute, rel=EXACT)
    assert lt.comm == pytest.approx(comm, rel=EXACT)
    assert prefill_layer_time(m70(), A100, d, P, NVL, sp=sp) == pytest.approx(compute + comm, rel=EXACT)
    # TP mode is today's step, untouched by the sp argument's default
    assert prefill_layer_time(m70(), A100, d, P, NVL, sp=1) == prefill_layer_time(m70(), A100, d, P, NVL)


def test_sp_decode_layer_by_hand():
    # 16 sequences at context 576.5 on d = 8 (sp 4 x t 2): ceil(16 / 4) = 4 tokens per rank;
    # attention reads the KV of all 16 sequences for its 64 / 8 = 8 heads, 1 KV head per GPU.
    B, ctx, d, sp, t = 16, 576.5, 8, 4, 2
    n = math.ceil(B / sp)
    kv_tok = 2 * 1 * HD * B2
    compute = roofline(LB / t + B * ctx * kv_tok, 2 * PARAMS / t * n + 4 * B * ctx * HD * (NH // d))
    qkv = n * (NH // t + 2 * (KV // t)) * HD * B2
    out = n * (NH // t) * HD * B2
    comm = 2 * ring(n * H * B2, t) + a2a(qkv, sp) + a2a(out, sp)
    lt = decode_layer_split(m70(), A100, d, B, ctx, NVL, sp=sp)
    assert lt.compute == pytest.approx(compute, rel=EXACT)
    assert lt.comm == pytest.approx(comm, rel=EXACT)
    # sp = d: no all-reduce left, only the all-to-alls over 8 ranks of 2 tokens each
    lt8 = decode_layer_split(m70(), A100, 8, B, ctx, NVL, sp=8)
    qkv8 = 2 * (NH + 2 * KV) * HD * B2
    assert lt8.comm == pytest.approx(a2a(qkv8, 8) + a2a(2 * NH * HD * B2, 8), rel=EXACT)
    # one sequence in SP mode: one rank does it all with the d/sp-way weights
    assert decode_layer_time(m70(), A100, 8, 1, ctx, NVL, sp=8) > decode_layer_time(m70(), A100, 8, 1, ctx, NVL)


def test_alltoall_is_half_a_ring_allreduce_and_uses_measured_tables():
    m = m70()
    nbytes = 3e6
    assert alltoall_time(m, A100, 4, nbytes, NVL) == pytest.approx(ring(nbytes, 4) / 2, rel=EXACT)
    assert alltoall_time(m, A100, 1, nbytes, NVL) == 0.0
    # measured all-reduce table at TP 2: half the table at the same bytes, scaled (sp-1)/(tp_m-1)
    table = ProfileTable(((1.0, 0.05), (4096.0, 0.45)))
    gpu = replace(A100, profiles=(("llama-2-70b", Profile(allreduce_ms=table, allreduce_tp=2)),))
    rows = nbytes / (H * B2)
    assert alltoall_time(m, gpu, 4, nbytes, NVL) == pytest.approx(0.5 * table.ms(rows) / 1e3 * 3, rel=EXACT)


def test_sp_mode_with_measured_compute_tables():
    # TP-1 tables: the rank's own work ms(n) / t, or its share ms(tokens) / d, whichever is larger
    dec = ProfileTable(((1.0, 1.4), (16.0, 1.5), (128.0, 2.5)))
    pre = ProfileTable(((100.0, 2.0), (1000.0, 8.0), (4000.0, 40.0)))
    gpu = replace(A100, profiles=(("llama-2-70b", Profile(decode_ms=dec, prefill_ms=pre)),))
    lt = decode_layer_split(m70(), gpu, 4, 16, 500, NVL, sp=2)
    assert lt.compute == pytest.approx(max(dec.ms(8) / 2, dec.ms(16) / 4) / 1e3, rel=EXACT)
    lt = prefill_layer_split(m70(), gpu, 4, 4000, NVL, sp=2)
    assert lt.compute == pytest.approx(max(pre.ms(2000) / 2, pre.ms(4000) / 4) / 1e3, rel=EXACT)


def test_lm_head_in_sp_mode():
    m = m70()
    # SP mode gathers the step's hidden states and runs TP mode's d-way head on every row (as the
    # executor does: shift.py)
    assert lm_head_time(m, A100, 8, 16, sp=4) == pytest.approx(lm_head_time(m, A100, 8, 16), rel=EXACT)
    assert lm_head_time(m, A100, 8, 1, sp=2) == pytest.approx(lm_head_time(m, A100, 8, 1), rel=EXACT)


# ---- memory: SP mode's weight shards (TP mode reads views of them) ---------------------------------

def test_shifted_stage_memory_holds_the_sp_mode_shards():
    m, w = m70(), Workload()
    plain = stage_cost(m, A100, 4, w, NVL)
    sh = stage_cost(m, A100, 4, w, NVL, shift_sp=2)
    kv_layer = w.concurrency * w.context * 2 * (KV // 4) * HD * B2
    # W / (d / sp) per layer (SP mode's tp-way shard; TP mode's d-way one is a view of it): LB / 2
    assert sh.mem_per_layer == pytest.approx(LB / 2 + kv_layer, rel=EXACT)
    assert plain.mem_per_layer == pytest.approx(LB / 4 + kv_layer, rel=EXACT)
    # the embedding and the d-way LM head as in a plain stage
    assert sh.embed_bytes == pytest.approx(plain.embed_bytes, rel=EXACT)
    assert sh.head_bytes == pytest.approx(plain.head_bytes, rel=EXACT)
    assert sh.usable_memory == plain.usable_memory
    assert sh.memory_used(10, True, False) == pytest.approx(10 * sh.mem_per_layer + sh.embed_bytes, rel=EXACT)
    # fewer layers fit: floor((usable - extra) / mem_layer)
    assert sh.max_layers() == math.floor(sh.usable_memory / sh.mem_per_layer + 1e-9) < plain.max_layers()
    # capacity counts the layers at the shifted stage's own rate
    assert sh.capacity(5) == pytest.approx(sh.layer_rate / 5, rel=EXACT)


def test_stage_cost_takes_each_step_mode_by_the_rule():
    m, gpu = BUILTIN_MODELS["llama-3-70b"], H100
    p = CostParams(shift_threshold=256)
    w = Workload(prompt_tokens=2048, output_tokens=256, batch_size=16, concurrency=16)
    sc = stage_cost(m, gpu, 8, w, gpu.interconnect, p, shift_sp=2)
    assert sc.shift_threshold == 256
    # decode steps of 16 tokens: TP mode; prompts of 2048: SP mode
    assert sc.decode_layer_s == pytest.approx(decode_layer_time(m, gpu, 8, 16, w.mean_decode_context,
                                                                gpu.interconnect, p), rel=EXACT)
    assert sc.prefill_layer_s == pytest.approx(prefill_layer_time(m, gpu, 8, 2048, gpu.interconnect, p, sp=2),
                                               rel=EXACT)
    assert sc.prefill_layer_s < stage_cost(m, gpu, 8, w, gpu.interconnect, p).prefill_layer_s
    # a threshold above the prompt: everything in TP mode, the same times as the plain stage
    hi = stage_cost(m, gpu, 8, w, gpu.interconnect, CostParams(shift_threshold=4096), shift_sp=2)
    plain = stage_cost(m, gpu, 8, w, gpu.interconnect, CostParams(shift_threshold=4096))
    assert (hi.decode_layer_s, hi.prefill_layer_s) == (plain.decode_layer_s, plain.prefill_layer_s)


# ---- the threshold is the crossover -------------------------------------------------------------

@pytest.mark.parametrize("sp, alpha", [(2, 1e-6), (4, 1e-6), (8, 1e-6), (4, 10e-6), (8, 10e-6)])
def test_threshold_is_a_real_crossover(sp, alpha):
    m, gpu = BUILTIN_MODELS["llama-3-70b"], H100
    p = CostParams(allreduce_alpha=alpha)
    thr = shift_threshold(m, gpu, 8, sp, gpu.interconnect, p)
    assert MIN_SHIFT_THRESHOLD < thr < MAX_SHIFT_THRESHOLD

    def t(n, s):
        return prefill_layer_time(m, gpu, 8, n, gpu.interconnect, p, sp=s)
    # TP mode no slower at the threshold and below it, SP mode faster just above and beyond it
    for n in (MIN_SHIFT_THRESHOLD + 1, thr // 2, thr):
        assert t(n, 1) <= t(n, sp), n
    for n in (thr + 1, 2 * thr, 4 * thr):
        assert t(n, sp) < t(n, 1), n
    # and the rule the executor and the simulator share agrees
    assert shift_mode(thr, thr) != SP_MODE and shift_mode(thr + 1, thr) == SP_MODE


def test_threshold_clamps_and_overrides():
    m, gpu = BUILTIN_MODELS["llama-3-70b"], H100
    # default alpha, sp 2 x tp 4: the model finds SP mode faster even for one token (its 10 us per
    # ring step makes the 8-way all-reduce costly); small steps stay in TP mode anyway
    assert prefill_layer_time(m, gpu, 8, 17, gpu.interconnect, sp=2) < prefill_layer_time(m, gpu, 8, 17, gpu.interconnect)
    assert shift_threshold(m, gpu, 8, 2, gpu.interconnect) == MIN_SHIFT_THRESHOLD
    # compute never binds and the fabric is free: every step is bound by its weight reads, which
    # SP mode doubles (sp 2), so SP mode never wins -> the maximum
    fast = replace(H100, name="fast", fp16_tflops=1e9)
    m7b = BUILTIN_MODELS["llama-2-7b"]
    assert (prefill_layer_time(m7b, fast, 2, MAX_SHIFT_THRESHOLD + 1, 1e18, sp=2)
            > prefill_layer_time(m7b, fast, 2, MAX_SHIFT_THRESHOLD + 1, 1e18))
    assert shift_threshold(m7b, fast, 2, 2, 1e18) == MAX_SHIFT_THRESHOLD
    # an explicit threshold wins, unclamped
    assert shift_threshold(m, gpu, 8, 2, gpu.interconnect, CostParams(shift_threshold=0)) == 0
    assert shift_threshold(m, gpu, 8, 4, gpu.interconnect, CostParams(shift_threshold=512)) == 512


# ---- a plan with shift: YAML, validation, evaluation --------------------------------------------

H100X8 = loads_cluster("name: h100x8\nnodes:\n  - {name: n0, gpu: H100-80G, count: 8}\n")
H100X4 = loads_cluster("name: h100x4\nnodes:\n  - {name: n0, gpu: H100-80G, count: 4}\n")


def one_stage_plan(cluster, tp, sp, w=Workload(), params=DEFAULT_PARAMS, model="llama-3-70b") -> Plan:
    m = BUILTIN_MODELS[model]
    stage = Stage("n0", tuple(range(tp)), tp, (0, m.num_layers), "H100-80G", sp)
    pipelines, predicted = route_and_predict(cluster, CostCache(m, w, params), [Pipeline((stage,))], 0.0)
    return Plan(m, tuple(pipelines), predicted, {"name": "test"},
                {"objective": "throughput", "slo_tpot_ms": None, "slo_ttft_ms": None, "workload": w.to_dict(),
                 "cost_params": params.to_dict()}, cluster_to_dict(H100X8 if tp == 8 else cluster, None, m.name))


def test_plan_with_shift_round_trips_validates_and_evaluates():
    w = Workload(prompt_tokens=2048, output_tokens=256, batch_size=16, concurrency=16)
    plan = one_stage_plan(H100X8, 8, 2, w, CostParams(shift_threshold=256))
    text = plan.to_yaml()
    assert "shift: {sp: 2}" in text and "shift_threshold: 256" in text
    back = loads_plan(text)
    assert back.pipelines[0].stages[0].shift_sp == 2
    assert back.to_dict() == plan.to_dict()
    assert validate_plan(back, H100X8) == []
    [m] = evaluate_plan_pipelines(H100X8, CostCache(back.model, w, CostParams(shift_threshold=256)), back.pipelines)
    [plain] = evaluate_plan_pipelines(H100X8, CostCache(back.model, w, CostParams(shift_threshold=256)),
                                      [Pipeline((replace(back.pipelines[0].stages[0], shift_sp=1),))])
    assert m.fits and m.ttft_s < plain.ttft_s and m.tpot_s == pytest.approx(plain.tpot_s, rel=EXACT)
    model = back.model
    kv = w.concurrency * w.context * model.num_layers * 2 * 1 * model.dim_head * 2
    # the layers' SP-mode shards (tp 4), the embedding and LM head as a plain TP-8 stage's
    assert m.memory_per_gpu[0] == pytest.approx(model.num_layers * model.layer_bytes / 4
                                                + (model.embedding_bytes + model.head_bytes) / 8 + kv, rel=1e-9)


def test_shift_that_does_not_fit_is_a_clear_problem():
    # 70B on 4 H100s at TP 4 takes 35 GB of weights per GPU; shifted (sp 2) its layers take 70 GB
    plan = one_stage_plan(H100X4, 4, 1)
    assert validate_plan(plan, H100X4) == []
    shifted = replace(plan, pipelines=(replace(plan.pipelines[0], stages=(replace(plan.pipelines[0].stages[0],
                                                                                  shift_sp=2),)),))
    problems = validate_plan(shifted, H100X4, check_predictions=False)
    assert len(problems) == 1
    assert "needs" in problems[0] and "weight shards of SP mode" in problems[0] and "shift sp 2" in problems[0]


# ---- the simulator picks each step's mode by the rule -------------------------------------------

def _run_recording(plan, cluster, w, params, spec):
    eng = Engine(plan, cluster, w, params, EngineOptions(), Dispatcher([1.0]))
    made = eng.new_scheduler
    tokens = []

    def recording():
        s = made()
        schedule = s.schedule

        def wrapped(*a, **k):
            step = schedule(*a, **k)
            if step is not None and (step.decode or step.prefill):
                tokens.append(len(step.decode) + sum(c[2] for c in step.prefill))
            return step
        s.schedule = wrapped
        return s
    eng.new_scheduler = recording
    st = eng.run(RequestStream(spec, w.prompt_tokens, w.output_tokens, plan.model.max_position_embeddings, 0),
                 (0.0, spec.horizon), 0)
    return st, tokens


def test_simulator_steps_pick_modes_by_the_rule():
    w = Workload(prompt_tokens=2048, output_tokens=64, batch_size=16, concurrency=16)
    params = CostParams(shift_threshold=256)
    plan = one_stage_plan(H100X8, 8, 2, w, params)
    # saturated: 3x the predicted request rate, long prompts
    spec = WorkloadSpec(arrival="poisson", rate=3 * plan.throughput / w.output_tokens, duration=20.0)
    st, tokens = _run_recording(plan, H100X8, w, params, spec)
    sp_expected = sum(1 for n in tokens if n > 256)
    assert sp_expected > 10 and len(tokens) - sp_expected > 10     # both kinds of step happened
    assert st.shift_steps == {"sp": sp_expected, "tp": len(tokens) - sp_expected}
    assert all(n > 256 for n in tokens if n > 16)  # prefill steps carry a whole prompt, decode steps <= 16
    # the unshifted plan has none
    st0, _ = _run_recording(one_stage_plan(H100X8, 8, 1, w, params), H100X8, w, params, spec)
    assert st0.shift_steps == {}
    # and the shifted stage is faster on the prompt steps: more tokens in the same time
    assert st.tokens_in_window > st0.tokens_in_window


def test_simulator_threshold_defaults_to_the_crossover_and_can_be_overridden():
    w = Workload()
    plan = one_stage_plan(H100X8, 8, 4, w)
    eng = Engine(plan, H100X8, w, DEFAULT_PARAMS, EngineOptions(), Dispatcher([1.0]))
    [kind] = eng.pipes[0].kinds
    assert kind.sp == 4 and kind.threshold == shift_threshold(plan.model, H100, 8, 4, H100.interconnect)
    eng = Engine(plan, H100X8, w, CostParams(shift_threshold=99), EngineOptions(), Dispatcher([1.0]))
    assert eng.pipes[0].kinds[0].threshold == 99


# ---- the planner's post-pass ----------------------------------------------------------------------

def test_shift_candidates():
    assert shift_candidates(BUILTIN_MODELS["llama-3-70b"], 8) == [2, 4, 8]
    assert shift_candidates(BUILTIN_MODELS["llama-3-70b"], 1) == []


def test_post_pass_shifts_where_it_fits_and_helps():
    w = Workload(prompt_tokens=2048, output_tokens=256, batch_size=64, concurrency=64)
    plan = one_stage_plan(H100X8, 8, 1, w)
    out = shift_plan(plan, H100X8)
    [stage] = out.pipelines[0].stages
    assert stage.shift_sp == 2   # sp 4 or 8 would need more than 72 GB of weights per GPU
    assert out.throughput > plan.throughput * 1.02
    assert out.solver["shifted_stages"] == 1 and out.solver["unshifted_tokens_per_s"] == plan.throughput
    assert validate_plan(out, H100X8) == []          # predictions, weights and memory recomputed
    assert loads_plan(out.to_yaml()).pipelines[0].stages[0].shift_sp == 2


def test_post_pass_leaves_a_plan_whose_shift_does_not_fit():
    plan = one_stage_plan(H100X4, 4, 1)
    assert shift_plan(plan, H100X4) is plan


def test_post_pass_never_makes_the_objective_worse_on_a_solved_plan():
    from hexplan.solver import SolveOptions, solve

    cluster = loads_cluster("name: mixed\nnodes:\n  - {name: a, gpu: H100-80G, count: 8}\n"
                            "  - {name: b, gpu: A100-80G, count: 4}\n"
                            "network:\n  default: {bandwidth: 100Gbps, latency: 0.1ms}\n")
    for objective in ("throughput", "latency"):
        opts = SolveOptions(objective=objective, time_limit=3.0, backend="none")
        plan = solve(cluster, BUILTIN_MODELS["llama-3-70b"], opts)
        out = shift_plan(plan, cluster)
        assert out.throughput >= plan.throughput * (1 - 1e-9)
        if objective == "latency":
            assert out.predicted["decode_ms_per_token"] <= plan.predicted["decode_ms_per_token"] * (1 + 1e-9)
        assert validate_plan(out, cluster) == []


def test_post_pass_latency_objective_keeps_tpot_and_the_slo():
    # TP-8 alone, latency objective with its own TPOT as the SLO (as the optimizer records it):
    # shifted, prompts run in SP mode (TTFT falls) while decode steps of 16 stay in TP mode
    w = Workload(prompt_tokens=2048, output_tokens=256, batch_size=16, concurrency=16)
    plan = one_stage_plan(H100X8, 8, 1, w)
    tpot = plan.predicted["decode_ms_per_token"]
    plan = replace(plan, assumptions={**plan.assumptions, "objective": "latency", "slo_tpot_ms": tpot})
    out = shift_plan(plan, H100X8)
    # sp 4 (tp-2 groups: 70 GB of layer weights per GPU) fits too with one weight copy and shortens the
    # prompts most; sp 8 (tp 1, 141 GB) does not fit
    assert out.pipelines[0].stages[0].shift_sp == 4
    assert out.predicted["decode_ms_per_token"] == pytest.approx(tpot, rel=1e-9)
    assert out.predicted["ttft_ms"] < plan.predicted["ttft_ms"] * 0.98
    assert out.throughput >= plan.throughput
    assert validate_plan(out, H100X8) == []
    # a TPOT SLO that neither meets: no shift is acceptable, the plan comes back as it was
    strict = replace(plan, assumptions={**plan.assumptions, "slo_tpot_ms": tpot * 0.5})
    assert shift_plan(strict, H100X8) is strict


# ---- the command line ------------------------------------------------------------------------------

def _hexplan(*args, cwd=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_cli_solve_shift_and_simulate_threshold(tmp_path):
    cluster = tmp_path / "h200.yaml"
    cluster.write_text("name: h200x8\nnodes:\n  - {name: n0, gpu: H200, count: 8}\n")
    common = [cluster, "-m", "llama-3-70b", "--objective", "latency", "--solver", "none", "--time-limit", "5",
              "-q", "--prompt-tokens", "2048", "--output-tokens", "256"]
    off = _hexplan("solve", *common, "-o", tmp_path / "off.yaml")
    on = _hexplan("solve", *common, "--shift", "-o", tmp_path / "on.yaml")
    assert off.returncode == 0 and on.returncode == 0, (off.stderr, on.stderr)
    plan_off, plan_on = loads_plan((tmp_path / "off.yaml").read_text()), loads_plan((tmp_path / "on.yaml").read_text())
    assert not any(s.shifted for p in plan_off.pipelines for s in p.stages)        # --no-shift is the default
    # 70B at TP 4 on H200s: SP mode's TP-2 shards (70 GB) fit in 141 GB, and prompts of 2048 run faster
    assert all(s.shift_sp == 2 for p in plan_on.pipelines for s in p.stages)
    assert "shift sp 2" in on.stdout
    assert plan_on.predicted["ttft_ms"] < plan_off.predicted["ttft_ms"]
    assert plan_on.predicted["decode_ms_per_token"] <= plan_off.predicted["decode_ms_per_token"] * (1 + 1e-9)
    v = _hexplan("validate", cluster, "--plan", tmp_path / "on.yaml")
    assert v.returncode == 0, v.stdout + v.stderr
    bad = _hexplan("simulate", tmp_path / "on.yaml", "--rate", "1", "--duration", "10", "--shift-threshold", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["hexplan: error: --shift-threshold: must be an integer >= 0, got -1"]
    ok = _hexplan("simulate", tmp_path / "on.yaml", "--rate", "1", "--duration", "10", "--shift-threshold", "300",
                  "--json")
    assert ok.returncode == 0, ok.stderr


def test_library_solve_shift_runs_the_post_pass():
    from pathlib import Path

    import hexplan

    node = Path(__file__).resolve().parent.parent / "cluster_specs" / "h200-node.yaml"
    w = Workload(prompt_tokens=2048, output_tokens=256)
    kw = dict(objective="latency", backend="none", time_limit=5, workload=w)
    plain = hexplan.solve(node, "llama-3-70b", **kw)
    shifted = hexplan.solve(node, "llama-3-70b", shift=True, **kw)
    assert not any(s.shifted for p in plain.pipelines for s in p.stages)
    assert any(s.shifted for p in shifted.pipelines for s in p.stages)
    assert shifted.predicted["ttft_ms"] < plain.predicted["ttft_ms"]
    assert validate_plan(shifted, hexplan.load_cluster(node)) == []
