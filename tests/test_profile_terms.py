"""The profile's LM-head and all-reduce tables (`lm_head_ms`, `allreduce_ms` with `allreduce_tp`):
read and checked by the cluster parser (one-line errors naming the field), written back as a
plan's cluster section writes them, and used by the cost model, the pipeline evaluation and the
simulator in place of the LM head's roofline and the ring all-reduce formula. No torch: fast.

Expected numbers are plain arithmetic on the tables written below."""
from __future__ import annotations

import dataclasses

import pytest

from hexplan.cluster import cluster_from_dict, cluster_to_dict, loads_cluster
from hexplan.costmodel import (DEFAULT_PARAMS, Workload, allreduce_time, decode_layer_split, decode_layer_time,
                               lm_head_time, prefill_layer_time, ring_allreduce_time, stage_cost)
from hexplan.errors import SpecError
from hexplan.evaluate import CostCache, evaluate_pipeline
from hexplan.gpus import CATALOG
from hexplan.models import BUILTIN_MODELS
from hexplan.yamlio import Locator

M = BUILTIN_MODELS["llama-2-7b"]          # H 4096, fp16: 8192 bytes per row of hidden state
NVL = CATALOG["A100-40G"].interconnect    # 300 GB/s

TABLES = """\
name: measured
gpu_types:
  A100-40G:
    profiles:
      llama-2-7b:
        decode_ms: {1: 0.5, 16: 0.6}
        prefill_ms: {512: 2.0}
        lm_head_ms: {1: 0.8, 16: 2.4}       # ms per step of 1 / 16 logits rows, TP 1
        allreduce_ms: {1: 0.1, 16: 0.3, 512: 1.1}
        allreduce_tp: 2
nodes:
  - {name: n0, gpu: A100-40G, count: 8}
"""


def gpus():
    """(the GPU with the tables, the same without them)."""
    return loads_cluster(TABLES).node("n0").gpu, CATALOG["A100-40G"]


# ---- the parser --------------------------------------------------------------------------------

def test_tables_are_read_and_written_back():
    c = loads_cluster(TABLES)
    prof = c.node("n0").gpu.profile_for("llama-2-7b")
    assert prof.lm_head_ms.points == ((1.0, 0.8), (16.0, 2.4))
    assert prof.allreduce_ms.points == ((1.0, 0.1), (16.0, 0.3), (512.0, 1.1))
    assert prof.allreduce_tp == 2
    # a plan's cluster section carries them (cluster_to_dict), and reads back to the same profile
    d = cluster_to_dict(c, model="llama-2-7b")
    written = d["gpu_types"]["A100-40G"]["profiles"]["llama-2-7b"]
    assert written == {"decode_ms": {1: 0.5, 16: 0.6}, "prefill_ms": {512: 2.0}, "lm_head_ms": {1: 0.8, 16: 2.4},
                       "allreduce_ms": {1: 0.1, 16: 0.3, 512: 1.1}, "allreduce_tp": 2}
    assert cluster_from_dict(d, Locator(None, {})).node("n0") == c.node("n0")
    # each table is optional on its own
    only_head = TABLES.replace("        allreduce_ms: {1: 0.1, 16: 0.3, 512: 1.1}\n        allreduce_tp: 2\n", "")
    prof = loads_cluster(only_head).node("n0").gpu.profile_for("llama-2-7b")
    assert prof.lm_head_ms is not None and prof.allreduce_ms is None and prof.allreduce_tp == 0
    assert "allreduce_tp" not in cluster_to_dict(loads_cluster(only_head))["gpu_types"]["A100-40G"]["profiles"][
        "llama-2-7b"]


FIELD = "gpu_types.A100-40G.profiles.llama-2-7b."


@pytest.mark.parametrize("old, new, line, field, message", [
    ("lm_head_ms: {1: 0.8, 16: 2.4}", "lm_head_ms: {1: -0.8}", 8, "lm_head_ms[1]",
     "milliseconds must be positive, got -0.8"),
    ("lm_head_ms: {1: 0.8, 16: 2.4}", "lm_head_ms: {}", 8, "lm_head_ms", "expected a mapping like"),
    ("lm_head_ms: {1: 0.8, 16: 2.4}", "lm_head_ms: {rows: 0.8}", 8, "lm_head_ms.rows",
     "batch/tokens must be a number, got 'rows'"),
    ("lm_head_ms: {1: 0.8, 16: 2.4}", "lm_head_ms: 0.8", 8, "lm_head_ms", "expected a mapping like"),
    ("allreduce_ms: {1: 0.1, 16: 0.3, 512: 1.1}", "allreduce_ms: {1: 0}", 9, "allreduce_ms[1]",
     "milliseconds must be positive, got 0"),
    ("allreduce_tp: 2", "allreduce_tp: 1", 10, "allreduce_tp", "must be an integer >= 2"),
    ("allreduce_tp: 2", "allreduce_tp: 2.5", 10, "allreduce_tp", "must be an integer >= 2"),
    ("allreduce_tp: 2", "allreduce_tp: true", 10, "allreduce_tp", "must be an integer >= 2"),
    ("allreduce_tp: 2", "", 9, "allreduce_ms", "needs allreduce_tp"),
    ("allreduce_ms: {1: 0.1, 16: 0.3, 512: 1.1}", "", 10, "allreduce_tp", "given without allreduce_ms"),
    ("lm_head_ms:", "lm_head:", 8, "lm_head", "unknown field 'lm_head'; expected one of allreduce_ms, "
                                              "allreduce_tp, by_tp, call_ms, decode_ms, lm_head_ms, prefill_ms"),
])
def test_bad_tables_are_one_line_naming_the_field(old, new, line, field, message):
    assert old in TABLES
    with pytest.raises(SpecError) as ei:
        loads_cluster(TABLES.replace(old, new), file="c.yaml")
    text = str(ei.value)
    assert "\n" not in text
    assert text.startswith(f"c.yaml:{line}: {FIELD}{field}: "), text
    assert message in text, text


# ---- the cost model --------------------------------------------------------------------------------

def test_lm_head_time_is_the_table():
    g, plain = gpus()
    assert lm_head_time(M, g, 1, 1) == pytest.approx(0.8e-3)
    assert lm_head_time(M, g, 1, 16) == pytest.approx(2.4e-3)
    assert lm_head_time(M, g, 1, 4) == pytest.approx((0.8 + 1.6 * 3 / 15) * 1e-3)      # interpolated: 1.12 ms
    assert lm_head_time(M, g, 1, 32) == pytest.approx((2.4 + 1.6 * 16 / 15) * 1e-3)    # extrapolated
    assert lm_head_time(M, g, 2, 16) == pytest.approx(1.2e-3)                          # TP 2: halved
    assert lm_head_time(M, g, 1, 16, parts=2) == pytest.approx(2 * (0.8 + 1.6 * 7 / 15) * 1e-3)   # 2 parts of 8
    # not the roofline (which the plain catalog part keeps: 16 rows of a 7B head on an A100, ~0.2 ms)
    assert lm_head_time(M, plain, 1, 16) < 0.5e-3
    # a stage's head costs: a decode step of B rows, a prompt's last token (1 row)
    sc = stage_cost(M, g, 1, Workload(batch_size=16), NVL)
    assert sc.head_decode_s == pytest.approx(2.4e-3) and sc.head_prefill_s == pytest.approx(0.8e-3)


def test_allreduce_time_is_the_table_scaled_by_ring_steps():
    g, plain = gpus()
    assert allreduce_time(M, g, 1, 16, NVL) == 0.0
    assert allreduce_time(M, g, 2, 16, NVL) == pytest.approx(0.3e-3)
    assert allreduce_time(M, g, 2, 8, NVL) == pytest.approx((0.1 + 0.2 * 7 / 15) * 1e-3)
    # at TP 4 the ring has 2 (4 - 1) steps against 2 (2 - 1) where it was measured: x 3
    assert allreduce_time(M, g, 4, 16, NVL) == pytest.approx(0.9e-3)
    assert allreduce_time(M, g, 8, 512, NVL) == pytest.approx(7 * 1.1e-3)
    # without the table: the ring formula with the default alpha
    assert allreduce_time(M, plain, 2, 16, NVL) == pytest.approx(
        ring_allreduce_time(16 * 4096 * 2, 2, NVL, DEFAULT_PARAMS.allreduce_alpha))


def test_tp_layers_charge_the_measured_all_reduces():
    g, plain = gpus()
    # decode of 16 at TP 2: 0.6 / 2 ms + 2 x 0.3 ms; TP 4: 0.6 / 4 + 2 x 0.9
    assert decode_layer_time(M, g, 2, 16, 500, NVL) == pytest.approx((0.3 + 0.6) * 1e-3)
    assert decode_layer_time(M, g, 4, 16, 500, NVL) == pytest.approx((0.15 + 1.8) * 1e-3)
    assert decode_layer_time(M, g, 1, 16, 500, NVL) == pytest.approx(0.6e-3)           # TP 1: none
    # prefill of 512 at TP 2: 2.0 / 2 + 2 x 1.1
    assert prefill_layer_time(M, g, 2, 512, NVL) == pytest.approx((1.0 + 2.2) * 1e-3)
    # interleaved in 2 parts of 8: 2 x 2 all-reduces of 8 rows
    lt = decode_layer_split(M, g, 2, 16, 500, NVL, parts=2)
    assert lt.comm == pytest.approx(2 * 2 * (0.1 + 0.2 * 7 / 15) * 1e-3)
    # the roofline's ring all-reduces on NVLink are far cheaper than these measured ones
    assert decode_layer_time(M, plain, 2, 16, 500, NVL) < 0.5e-3


def test_the_pipeline_evaluation_uses_the_tables():
    """One TP-2 stage of all 32 layers: TPOT = 32 decode layers + the head's 16-row step; the same
    cluster without the two tables predicts less (fails if either table were ignored)."""
    c = loads_cluster(TABLES)
    w = Workload(prompt_tokens=512, output_tokens=128, batch_size=16, concurrency=16)
    m = evaluate_pipeline(c, CostCache(M, w), ["n0"], [2], [32])
    layer = (0.6 / 2 + 2 * 0.3) * 1e-3
    head = 2.4e-3 / 2
    hops = 2 * 5e-6                                 # the coordinator (n0 itself) in and out: 5 us each
    assert m.tpot_s == pytest.approx(32 * layer + head + hops, rel=1e-4)
    for cut in ("        lm_head_ms: {1: 0.8, 16: 2.4}       # ms per step of 1 / 16 logits rows, TP 1\n",
                "        allreduce_ms: {1: 0.1, 16: 0.3, 512: 1.1}\n        allreduce_tp: 2\n"):
        assert cut in TABLES
        other = evaluate_pipeline(loads_cluster(TABLES.replace(cut, "")), CostCache(M, w), ["n0"], [2], [32])
        assert other.tpot_s < m.tpot_s - 1e-4


def test_the_simulator_uses_the_lm_head_table():
    """The simulator's last stage adds lm_head_time of the step's logits rows: a slower head table
    slows every simulated step by its difference."""
    import hexplan
    from hexplan.plan import plan_from_dict
    from hexplan.simulator.workload import TraceRequest, WorkloadSpec

    plan = plan_from_dict({"model": "llama-2-7b", "pipelines": [{"weight": 1.0, "stages": [
        {"node": "n0", "gpus": [0], "tp": 1, "layers": [0, 32]}]}]})
    trace = tuple(TraceRequest(0.0, 512, 20) for _ in range(4))
    spec = WorkloadSpec(arrival="trace", trace=trace, duration=None, warmup=0.0, trace_name="t")

    def tpot(text):
        r = hexplan.simulate(plan, loads_cluster(text), spec, seed=0)
        return sorted(r.samples["tpot_s"])[0]
    base = tpot(TABLES)
    slow = tpot(TABLES.replace("lm_head_ms: {1: 0.8, 16: 2.4}", "lm_head_ms: {1: 10.8, 16: 12.4}"))
    assert slow - base == pytest.approx(10e-3, rel=1e-3)     # every 4-row decode step: 10 ms more


# ---- a TP degree's own tables (by_tp) --------------------------------------------------------------

BY_TP = TABLES.replace("        allreduce_tp: 2\n", """\
        allreduce_tp: 2
        by_tp:                              # hexplan profile --tp d: the slowest rank's compute x d
          2: {decode_ms: {1: 0.7, 16: 0.9}, prefill_ms: {512: 2.6}}
          4:
            decode_ms: {1: 1.0, 16: 1.2}
            prefill_ms: {512: 3.0}
            lm_head_ms: {1: 1.6, 16: 4.0}
""")


def test_each_degree_is_charged_its_own_tables():
    g = loads_cluster(BY_TP).node("n0").gpu
    ar = lambda rows, tp: allreduce_time(M, g, tp, rows, NVL)   # noqa: E731
    # TP 1: the profile's own tables; TP 2 and 3: degree 2's; TP 4 and 8: degree 4's
    for tp, dec16, pre in ((1, 0.6, 2.0), (2, 0.9, 2.6), (3, 0.9, 2.6), (4, 1.2, 3.0), (8, 1.2, 3.0)):
        if M.tp_degree_ok(tp):
            continue
        assert decode_layer_time(M, g, tp, 16, 512, NVL) == pytest.approx(dec16 / 1e3 / tp + 2 * ar(16, tp)), tp
        assert prefill_layer_time(M, g, tp, 512, NVL) == pytest.approx(pre / 1e3 / tp + 2 * ar(512, tp)), tp
    # a table a degree lacks comes from the largest degree below it that has one
    assert lm_head_time(M, g, 2, 16) == pytest.approx(2.4e-3 / 2)      # degree 2 has no head table: TP 1's
    assert lm_head_time(M, g, 4, 16) == pytest.approx(4.0e-3 / 4)
    # and a planned pipeline's stage of TP 4 decodes at degree 4's table
    w = Workload(batch_size=16)
    m = evaluate_pipeline(loads_cluster(BY_TP), CostCache(M, w), ["n0"], [4], [32])
    m2 = evaluate_pipeline(loads_cluster(TABLES), CostCache(M, w), ["n0"], [4], [32])
    assert m.tpot_s - m2.tpot_s == pytest.approx(32 * (1.2 - 0.6) / 4e3 + (4.0 - 2.4) / 4e3, rel=1e-6)


def test_without_tp1_tables_every_degree_takes_the_nearest_measured():
    prof = loads_cluster(BY_TP).node("n0").gpu.profile_for("llama-2-7b")
    only = dataclasses.replace(prof, decode_ms=None, prefill_ms=None, lm_head_ms=None)
    assert only.at_tp(1).decode_ms == prof.by_tp[0][1].decode_ms      # the smallest measured degree, 2
    assert only.at_tp(1).lm_head_ms == prof.by_tp[1][1].lm_head_ms    # the head only at degree 4
    assert only.at_tp(2).lm_head_ms == prof.by_tp[1][1].lm_head_ms
    assert prof.at_tp(2).by_tp == () and prof.at_tp(2).allreduce_ms == prof.allreduce_ms
    assert prof.at_tp(2) is prof.at_tp(2)                              # computed once per degree
    plain = loads_cluster(TABLES).node("n0").gpu.profile_for("llama-2-7b")
    assert plain.at_tp(4) is plain


def test_by_tp_is_written_back():
    c = loads_cluster(BY_TP)
    d = cluster_to_dict(c, model="llama-2-7b")
    written = d["gpu_types"]["A100-40G"]["profiles"]["llama-2-7b"]["by_tp"]
    assert written == {2: {"decode_ms": {1: 0.7, 16: 0.9}, "prefill_ms": {512: 2.6}},
                       4: {"decode_ms": {1: 1.0, 16: 1.2}, "prefill_ms": {512: 3.0}, "lm_head_ms": {1: 1.6, 16: 4.0}}}
    assert cluster_from_dict(d, Locator(None, {})).node("n0") == c.node("n0")
    # a plan's JSON cluster section has string keys: "2" reads as degree 2
    js = {**d, "gpu_types": {"A100-40G": {"profiles": {"llama-2-7b": {
        **d["gpu_types"]["A100-40G"]["profiles"]["llama-2-7b"], "by_tp": {str(k): v for k, v in written.items()}}}}}}
    assert cluster_from_dict(js, Locator(None, {})).node("n0") == c.node("n0")


@pytest.mark.parametrize("old, new, line, field, message", [
    ("          2: {", "          1: {", 12, "by_tp[1]", "a TP degree must be an integer >= 2"),
    ("          2: {", "          two: {", 12, "by_tp.two", "a TP degree must be an integer >= 2 (the TP-1 tables are the profile's own), got 'two'"),
    ("          4:\n", "          2:\n", 13, "by_tp.2", "duplicate key '2'"),
    ("            prefill_ms: {512: 3.0}", "            call_ms: {1: 3.0}", 15, "by_tp[4].call_ms",
     "unknown field 'call_ms'; expected one of decode_ms, lm_head_ms, prefill_ms"),
    ("          2: {decode_ms: {1: 0.7, 16: 0.9}, prefill_ms: {512: 2.6}}", "          2: {}", 12, "by_tp[2]",
     "expected {decode_ms"),
    ("          2: {decode_ms: {1: 0.7, 16: 0.9}, prefill_ms: {512: 2.6}}", "          2: {decode_ms: {1: -1}}", 12,
     "by_tp[2].decode_ms[1]", "milliseconds must be positive"),
])
def test_bad_by_tp_is_one_line_naming_the_field(old, new, line, field, message):
    assert old in BY_TP
    with pytest.raises(SpecError) as ei:
        loads_cluster(BY_TP.replace(old, new), file="c.yaml")
    text = str(ei.value)
    assert "\n" not in text and text.startswith(f"c.yaml:{line}: {FIELD}{field}: "), text
    assert message in text, text
