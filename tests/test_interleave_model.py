"""Interleaving (Liger-style compute/communication overlap) in the cost model, the planner and
the simulator (docs/cost-model.md, section 13; docs/simulator.md, "Interleaving").

* interleave 1 changes nothing: same layer times, stage costs, plans and simulations;
* a comm-bound TP group gains (shorter layer, higher stage rate), a memory-bound one on a fast
  interconnect pays for the re-read weights; hidden communication never exceeds contention x
  compute;
* the simulator at saturation stays within 10% of the cost model's throughput, its step latency
  equals the cost model's flow-shop TPOT, and a prefill step over a slow link is faster in parts;
* the CLI's --interleave on solve and simulate, and its one-line errors.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import hexplan
from hexplan import loads_cluster
from hexplan.costmodel import (CostParams, Workload, decode_layer_split, decode_layer_time, lm_head_time,
                               prefill_layer_split, prefill_layer_time, ring_allreduce_time, stage_cost)
from hexplan.evaluate import CostCache, evaluate_plan_pipelines, flow_time
from hexplan.gpus import CATALOG
from hexplan.models import BUILTIN_MODELS
from hexplan.plan import Pipeline, Plan, Stage
from hexplan.simulator import TraceRequest, WorkloadSpec, simulate
from hexplan.validate import plan_assumptions
from test_simulator import offline, predicted  # noqa: E402  (tests/ is on the path, as for executor_util)

ROOT = Path(__file__).resolve().parent.parent
HEXGEN = ROOT / "cluster_specs" / "hexgen-case.yaml"
M70, M13 = BUILTIN_MODELS["llama-2-70b"], BUILTIN_MODELS["llama-2-13b"]
A100, A10G = CATALOG["A100-80G"], CATALOG["A10G"]


# ---- interleave 1 is what there was ------------------------------------------------------------

def test_interleave_1_changes_nothing():
    w = Workload()
    assert Workload(interleave=1) == w and w.parts == 1
    assert "interleave" not in w.to_dict()                # plans made without it are unchanged
    assert Workload(interleave=2).to_dict()["interleave"] == 2
    for m in (M70, BUILTIN_MODELS["llama-3-8b"]):
        for g in (A100, CATALOG["A6000"], CATALOG["L4"]):
            for tp in (1, 2, 4, 8):
                ic = g.interconnect
                one = decode_layer_split(m, g, tp, 16, 576.5, ic)
                assert one.hidden == 0.0 and decode_layer_time(m, g, tp, 16, 576.5, ic, parts=1) == one.compute + one.comm
                assert prefill_layer_time(m, g, tp, 512, ic) == prefill_layer_time(m, g, tp, 512, ic, parts=1)
                assert lm_head_time(m, g, tp, 16) == lm_head_time(m, g, tp, 16, parts=1)
                sc = stage_cost(m, g, tp, w, ic)
                assert sc.parts == 1 and sc.prefill_whole_s is None and sc.ttft_layer_s == sc.prefill_layer_s
    # Pinned numbers from before interleaving existed (docs/cost-model.md, section 12; README).
    assert decode_layer_time(M70, CATALOG["A100-40G"], 1, 16, 576.5, 0) == pytest.approx(1.6069e-3, rel=1e-4)
    a6000 = CATALOG["A6000"]
    assert decode_layer_time(M70, a6000, 2, 16, 576.5, a6000.interconnect) == \
        decode_layer_split(M70, a6000, 2, 16, 576.5, a6000.interconnect).total
    plan = hexplan.solve(hexplan.load_cluster(HEXGEN), "llama-2-70b", time_limit=5)
    assert plan.throughput == pytest.approx(277.191, abs=1e-3)
    assert "interleave" not in plan.assumptions["workload"]


# ---- the layer time in parts ---------------------------------------------------------------------

def test_parts_formulas():
    """N parts: N rooflines of B/N sequences, the same all-reduce bytes with N times the alpha
    terms, and comm - hidden on top of compute."""
    p, ic, B, ctx, tp = CostParams(), 2e9, 16, 576.5, 4
    for n in (2, 4):
        d1 = decode_layer_split(M13, A10G, tp, B, ctx, ic, p)
        dn = decode_layer_split(M13, A10G, tp, B, ctx, ic, p, n)
        part = decode_layer_split(M13, A10G, tp, B / n, ctx, ic, p)
        assert dn.compute == pytest.approx(n * part.compute, rel=1e-12)
        assert dn.comm - d1.comm == pytest.approx(2 * 2 * (tp - 1) * (n - 1) * p.allreduce_alpha, rel=1e-9)
        assert dn.hidden == pytest.approx(min(dn.comm, p.contention * dn.compute), rel=1e-12)
        assert decode_layer_time(M13, A10G, tp, B, ctx, ic, p, n) == pytest.approx(dn.compute + dn.comm - dn.hidden)
        pre = prefill_layer_split(M13, A10G, tp, 512, ic, p, n)
        assert pre.comm == pytest.approx(n * 2 * ring_allreduce_time(512 / n * 5120 * 2, tp, ic, p.allreduce_alpha))
    # Never more parts than sequences (the executor does not cut a sequence's chunk).
    assert decode_layer_time(M13, A10G, tp, 3, ctx, ic, p, 8) == decode_layer_time(M13, A10G, tp, 3, ctx, ic, p, 3)
    assert Workload(batch_size=4, concurrency=8, interleave=8).parts == 4


def test_measured_profile_in_parts():
    """A measured profile times each part as a step of B/N sequences (prompt tokens / N)."""
    cl = loads_cluster("name: p\ngpu_types:\n  A100-80G: {profiles: {llama-2-70b: {decode_ms: {1: 1.0, 16: 1.3, 32: 1.6}, "
                       "prefill_ms: {256: 3.0, 512: 5.0}}}}\nnodes:\n  - {name: n0, gpu: A100-80G, count: 2}\n")
    g = cl.node("n0").gpu
    d = decode_layer_split(M70, g, 2, 16, 576.5, g.interconnect, parts=2)
    assert d.compute == pytest.approx(2 * 1.14e-3 / 2)     # 2 parts of 8: 1.0 + 0.3 x 7/15 ms each at TP 1, / TP 2
    pre = prefill_layer_split(M70, g, 2, 512, g.interconnect, parts=2)
    assert pre.compute == pytest.approx(2 * 3.0e-3 / 2)


def test_comm_bound_tp_group_gains():
    """4 A10G on a 1 GB/s interconnect (PCIe without peer to peer through a busy host bridge):
    the all-reduces take 1.2x the compute, and 2 parts hide most of them."""
    ic = 1e9
    d1 = decode_layer_split(M13, A10G, 4, 16, 576.5, ic)
    assert d1.comm > d1.compute                              # comm-bound
    d2 = decode_layer_split(M13, A10G, 4, 16, 576.5, ic, parts=2)
    assert d2.total < d1.total                               # 0.905 ms against 1.102
    s1 = stage_cost(M13, A10G, 4, Workload(), ic)
    s2 = stage_cost(M13, A10G, 4, Workload(interleave=2), ic)
    assert s2.decode_layer_s < s1.decode_layer_s and s2.prefill_layer_s < s1.prefill_layer_s
    assert s2.layer_rate > 1.05 * s1.layer_rate              # 5454 against 4929 token-layers/s
    assert s2.ttft_layer_s == s1.prefill_layer_s             # a prompt alone is one chunk: not cut


def test_memory_bound_fast_interconnect_pays():
    """Decode on A100s over NVLink is memory-bound and its all-reduces are tiny: every part
    re-reads the weights, so 2 parts cost nearly twice as much."""
    d1 = decode_layer_split(M70, A100, 2, 16, 576.5, A100.interconnect)
    d2 = decode_layer_split(M70, A100, 2, 16, 576.5, A100.interconnect, parts=2)
    assert d1.comm < 0.1 * d1.compute
    assert d2.total > 1.8 * d1.total
    s1 = stage_cost(M70, A100, 2, Workload(), A100.interconnect)
    s2 = stage_cost(M70, A100, 2, Workload(interleave=2), A100.interconnect)
    assert s2.layer_rate < s1.layer_rate and s2.head_decode_s > s1.head_decode_s


@pytest.mark.parametrize("contention", [0.0, 0.5, 0.8, 1.0])
def test_hidden_comm_never_exceeds_contention_times_compute(contention):
    p = CostParams(contention=contention)
    for g in (A100, A10G, CATALOG["L4"], CATALOG["T4"]):
        for tp in (2, 4, 8):
            for ic in (0.5e9, 4e9, g.interconnect):
                for parts in (2, 3, 4):
                    for lt in (decode_layer_split(M13, g, tp, 16, 576.5, ic, p, parts),
                               decode_layer_split(M13, g, tp, 5, 100.0, ic, p, parts),
                               prefill_layer_split(M13, g, tp, 512, ic, p, parts),
                               prefill_layer_split(M13, g, tp, 37, ic, p, parts)):
                        assert 0.0 <= lt.hidden <= contention * lt.compute * (1 + 1e-12)
                        assert lt.hidden <= lt.comm
                        assert lt.total >= max(lt.compute, lt.comm) * (1 - 1e-12)


# ---- the planner ----------------------------------------------------------------------------------

def test_solve_with_interleave_records_it_and_validates():
    cluster = hexplan.load_cluster(HEXGEN)
    plan = hexplan.solve(cluster, "llama-2-70b", time_limit=5, workload=Workload(interleave=2))
    assert plan.assumptions["workload"]["interleave"] == 2
    assert plan.assumptions["cost_params"]["contention"] == 0.8
    assert hexplan.validate_plan(plan, cluster) == []        # recomputed with interleave 2
    # Memory-bound A6000/A5000/A4000 decode: the re-read weights cost more than the overlap gives.
    assert plan.throughput < 277.19
    assert plan.throughput <= plan.predicted["upper_bound_tokens_per_s"] * (1 + 1e-9)
    # The plan's own figures are the interleaved ones; read back without them they would differ.
    asm = plan_assumptions(hexplan.loads_plan(plan.to_json()))
    assert asm.workload.interleave == 2
    assert predicted(plan, cluster) == pytest.approx(plan.throughput, rel=1e-6)


# ---- the simulator ---------------------------------------------------------------------------------

def four_stage_plan(interleave: int):
    """Llama-2-70B over 4 A100-80G of one node, 20 layers each (tests/test_simulator.py)."""
    cluster = loads_cluster("name: four\nnodes:\n  - {name: n0, gpu: A100-80G, count: 4, interconnect: 300GB/s}\n")
    stages = tuple(Stage("n0", (i,), 1, (20 * i, 20 * i + 20), "A100-80G") for i in range(4))
    return Plan(M70, (Pipeline(stages, 1.0),),
                assumptions={"workload": Workload(interleave=interleave).to_dict()}), cluster


def slow_tp_plan(interleave: int):
    """Llama-2-13B on one TP-4 stage of A10G over a 1 GB/s interconnect (comm-bound)."""
    cluster = loads_cluster("name: slowtp\nnodes:\n  - {name: n0, gpu: A10G, count: 4, interconnect: 1GB/s}\n")
    return Plan(M13, (Pipeline((Stage("n0", (0, 1, 2, 3), 4, (0, 40), "A10G"),), 1.0),),
                assumptions={"workload": Workload(interleave=interleave).to_dict()}), cluster


@pytest.mark.parametrize("make", [four_stage_plan, slow_tp_plan])
def test_saturation_with_interleave_2_matches_the_cost_model(make):
    plan1, cluster = make(1)
    plan2, _ = make(2)
    pred1, pred2 = predicted(plan1, cluster), predicted(plan2, cluster)
    # 1200 s: with fixed lengths and whole prompts (one stage) a short window sees the fill's
    # phase-locked prompts (300 s gives the slow TP plan 147.6 of 135.9, 1200 s and 3000 s 135.1)
    res1, res2 = offline(plan1, cluster, 1200.0), offline(plan2, cluster, 1200.0)
    # four stages: 242.5 of 252.4 tokens/s (interleave 1: 396.2 of 409.9);
    # slow TP: 135.1 of 135.9 (interleave 1: 125.5 of 123.0)
    assert res2.throughput_tokens_per_s == pytest.approx(pred2, rel=0.10)
    assert (res2.throughput_tokens_per_s > res1.throughput_tokens_per_s) == (pred2 > pred1)


def test_slow_link_prefill_step_is_faster_in_parts_and_tpot_is_the_flow_shop():
    """Two A100s behind a 1 Gbps link, 16 requests at once: after the first request's step, one
    step prefills the other 15 prompts whole (prefill budget and chunk 16 x 512), then steps of
    16 decode tokens follow back to back. In 2 parts the prompt step's stages and link overlap
    (TTFT 2.04 s -> 1.40 s); the decode steps re-read the weights (TPOT 26.6 -> 33.8 ms), and
    their simulated latency is the cost model's flow-shop TPOT."""
    cluster = loads_cluster("name: two\nnodes:\n  - {name: a, gpu: A100-80G, count: 1}\n"
                            "  - {name: b, gpu: A100-80G, count: 1}\nnetwork:\n  default: {bandwidth: 1Gbps, latency: 1ms}\n")
    out = {}
    for n in (1, 2):
        w = Workload(512, 128, 16, 16, n)
        stages = (Stage("a", (0,), 1, (0, 20), "A100-80G"), Stage("b", (0,), 1, (20, 40), "A100-80G"))
        plan = Plan(M13, (Pipeline(stages, 1.0),), assumptions={"workload": w.to_dict()})
        model = evaluate_plan_pipelines(cluster, CostCache(M13, w), plan.pipelines)[0]
        trace = (TraceRequest(0.0, 512, 128),) * 16
        for policy in ("fcfs", "mlfq"):
            res = simulate(plan, cluster, WorkloadSpec(arrival="trace", trace=trace), prefill_budget=16 * 512,
                           prefill_chunk=16 * 512, policy=policy)
            assert res.requests_completed == 16
            # 15 of the 16 decode only in steps of 16 (the first also waited for the prompt step)
            assert res.tpot_s.p50 == pytest.approx(model.tpot_s, rel=0.01)
            out[n, policy] = res
    for policy in ("fcfs", "mlfq"):
        assert out[2, policy].ttft_s.p50 < 0.75 * out[1, policy].ttft_s.p50
        assert out[2, policy].tpot_s.p50 > out[1, policy].tpot_s.p50


def test_flow_time():
    # One part: the plain sum. Parts: the slowest server sets the spacing of the later parts.
    assert flow_time(1.0, [2.0, 3.0, 2.0], 0.5, 1) == pytest.approx(8.5)
    assert flow_time(1.0, [2.0, 3.0, 2.0], 0.5, 2) == pytest.approx(1.0 + 3.5 + 0.5 + 1.5)
    assert flow_time(0.0, [4.0], 0.0, 4) == pytest.approx(4.0)      # one server: no gain


def test_mlfq_and_fcfs_run_interleaved_and_pay_the_reads():
    """Both policies below saturation: the same tokens/s at interleave 1 and 2, the stages busier
    at 2 (every part re-reads the weights)."""
    util = {}
    for n in (1, 2):
        plan, cluster = four_stage_plan(n)
        for policy in ("fcfs", "mlfq"):
            res = simulate(plan, cluster, WorkloadSpec(rate=1.0, duration=300), policy=policy)
            assert res.throughput_tokens_per_s == pytest.approx(128.0, rel=0.1)
            util[n, policy] = min(res.stage_utilisation[0])
    for policy in ("fcfs", "mlfq"):
        assert util[2, policy] > util[1, policy]


def test_simulate_override_and_one_stage_tp1_is_not_cut():
    plan, cluster = four_stage_plan(2)
    a = simulate(plan, cluster, WorkloadSpec(rate=1.0, duration=120))
    b = simulate(plan, cluster, WorkloadSpec(rate=1.0, duration=120), interleave=1)
    c = simulate(four_stage_plan(1)[0], cluster, WorkloadSpec(rate=1.0, duration=120))
    assert b.to_dict() == c.to_dict() and a.to_dict() != b.to_dict()
    with pytest.raises(hexplan.SpecError) as e:
        simulate(plan, cluster, WorkloadSpec(rate=1.0, duration=10), interleave=0)
    assert e.value.field == "interleave"
    # One TP-1 stage has nothing to overlap: the executor does not cut its steps, nor does the model.
    one = loads_cluster("name: one\nnodes:\n  - {name: n0, gpu: A100-80G, count: 1}\n")
    p1 = Plan(M13, (Pipeline((Stage("n0", (0,), 1, (0, 40), "A100-80G"),), 1.0),),
              assumptions={"workload": Workload(interleave=2).to_dict()})
    assert predicted(p1, one) == pytest.approx(predicted(replace(p1, assumptions={"workload": Workload().to_dict()}), one))
    r1 = simulate(p1, one, WorkloadSpec(rate=2.0, duration=120))
    r2 = simulate(p1, one, WorkloadSpec(rate=2.0, duration=120), interleave=1)
    assert r1.throughput_tokens_per_s == r2.throughput_tokens_per_s and r1.stage_utilisation == r2.stage_utilisation


# ---- the command line ------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def one_error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_cli_solve_and_simulate_interleave(tmp_path):
    out = tmp_path / "p.json"
    r = cli("solve", HEXGEN, "--model", "llama-2-70b", "--interleave", "2", "--time-limit", "5", "--format", "json",
            "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert "interleave 2" in r.stdout                        # the summary's workload line
    d = json.loads(out.read_text())
    assert d["assumptions"]["workload"]["interleave"] == 2
    pred = d["predicted"]["throughput_tokens_per_s"]
    r = cli("simulate", out, "--cluster", HEXGEN, "--rate", "1", "--duration", "60", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["predicted_throughput_tokens_per_s"] == pytest.approx(pred, rel=1e-5)
    r = cli("simulate", out, "--cluster", HEXGEN, "--rate", "1", "--duration", "60")
    assert r.returncode == 0 and "steps in 2 interleaved parts" in r.stdout.splitlines()[0]
    r = cli("simulate", out, "--cluster", HEXGEN, "--rate", "1", "--duration", "60", "--interleave", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["predicted_throughput_tokens_per_s"] != pytest.approx(pred, rel=1e-3)


@pytest.mark.parametrize("command", ["solve", "simulate"])
@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_cli_bad_interleave(command, value, tmp_path):
    if command == "solve":
        args = ("solve", HEXGEN, "--model", "llama-2-70b", "-o", tmp_path / "x.yaml", "--interleave", value)
    else:
        plan = tmp_path / "p.yaml"
        plan.write_text(four_stage_plan(1)[0].to_yaml())
        cluster = tmp_path / "c.yaml"
        cluster.write_text("name: four\nnodes:\n  - {name: n0, gpu: A100-80G, count: 4, interconnect: 300GB/s}\n")
        args = ("simulate", plan, "--cluster", cluster, "--rate", "1", "--interleave", value)
    line = one_error_line(cli(*args))
    assert "--interleave" in line
    assert not (tmp_path / "x.yaml").exists()


def test_contention_is_read_from_the_plan_and_checked():
    plan, _ = four_stage_plan(2)
    for c, ok in ((0.0, True), (0.5, True), (1.0, True), (1.5, False), (-0.1, False)):
        p = replace(plan, assumptions={**plan.assumptions, "cost_params": {"contention": c}})
        if ok:
            assert plan_assumptions(p).params.contention == c
        else:
            with pytest.raises(hexplan.SpecError) as e:
                plan_assumptions(p)
            assert e.value.field == "assumptions.cost_params.contention"
