"""bench/fidelity_bench.py's pure parts: the host terms it takes from the two-loop probe, and the
medians of several saved runs (`--combine`). The runs themselves need minutes of a quiet host and
live in docs/fidelity.md, not here."""
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fidelity_bench as fb  # noqa: E402

from hexplan.cluster import Host  # noqa: E402


def _cluster(cores: int, allreduce_ms: float) -> dict:
    tables = {"decode_ms": {"1": 1.0}, "prefill_ms": {"16": 1.0}, "allreduce_ms": {str(fb.OVERLAP_BATCH): allreduce_ms},
              "allreduce_tp": 2}
    return {"hosts": {"local": {"cores": cores, "contention": 0.0}},
            "gpu_types": {"cpu": {"profiles": {"m": tables}}}}


def _probe(stages, cores, contention, tp_compute_ms, tp1_alone_ms, overlap, allreduce_ms):
    """The two-loop probe a host following ``Host.slowdown`` with ``contention`` would give:
    each TP-1 stage overlapped for ``overlap`` of its compute by the others."""
    workers = sum(tp for _, tp, _, _ in stages)
    threads = max(1, cores // workers)
    shares = [1.0 if tp == 1 else 1.0 - 2 * (b - a) * allreduce_ms / tp_compute_ms for _, tp, a, b in stages]
    host = Host("h", cores, contention)
    one = {"matched": 25, "hops": 5.0}
    two = {"matched": 50, "hops": 5.0 + 3.0 * (len(stages) + 1)}
    for i, (_, tp, _, _) in enumerate(stages):
        k = f"p0s{i}"
        if tp == 1:
            others = tuple((otp, threads, shares[j]) for j, (_, otp, _, _) in enumerate(stages) if j != i)
            full = host.slowdown((1, threads, 1.0), others)
            one[f"compute_{k}"] = tp1_alone_ms
            two[f"compute_{k}"] = tp1_alone_ms * (1.0 + overlap * (full - 1.0))
        else:
            one[f"compute_{k}"] = two[f"compute_{k}"] = tp_compute_ms
        two[f"overlap_{k}"] = overlap
    return {"one_loop": one, "two_loops": two}


@pytest.mark.parametrize("stages", [[("cpu0", 1, 0, 6), ("cpu1", 1, 6, 12)],                        # pp2
                                    [("cpu0", 1, 0, 4), ("cpu1", 1, 4, 8), ("cpu2", 1, 8, 12)]])    # 3 on 2 cores
@pytest.mark.parametrize("contention", [0.0, 0.04, 0.15])
def test_served_host_terms_recover_the_hosts_contention(stages, contention):
    # A TP-1 stage's slowdown beside the others is core sharing (Host.slowdown with no
    # contention; three 1-thread stages on 2 cores share them) times contention: only the
    # contention is taken, so the simulator's rule does not count the core sharing twice.
    ov = _probe(stages, 2, contention, tp_compute_ms=40.0, tp1_alone_ms=50.0, overlap=0.8, allreduce_ms=1.5)
    got = fb.served_host_terms(ov, stages, _cluster(2, 1.5))
    assert got["contention"] == pytest.approx(contention, abs=1e-9)
    assert got["hop_s"] == pytest.approx(3e-3)


def test_served_host_terms_take_no_contention_beside_a_tp_stage():
    # Beside a TP-2 stage a TP-1 stage's loss is not a per-worker cost the ranks pay too (they
    # show none beyond the cores' sharing), so tp2pp's probe gives the hops and no contention.
    stages = [("cpu0", 2, 0, 6), ("cpu1", 1, 6, 12)]
    ov = _probe(stages, 2, 0.1, tp_compute_ms=40.0, tp1_alone_ms=50.0, overlap=0.8, allreduce_ms=1.5)
    got = fb.served_host_terms(ov, stages, _cluster(2, 1.5))
    assert "contention" not in got and got["hop_s"] == pytest.approx(3e-3)


def test_served_host_terms_without_a_host_or_probe():
    stages = [("cpu0", 1, 0, 6), ("cpu1", 1, 6, 12)]
    assert fb.served_host_terms(None, stages, _cluster(2, 1.5)) == {}
    ov = _probe(stages, 2, 0.1, 40.0, 50.0, 0.8, 1.5)
    no_host = {k: v for k, v in _cluster(2, 1.5).items() if k != "hosts"}
    assert set(fb.served_host_terms(ov, stages, no_host)) == {"hop_s"}


def _run(meas_tok: float, sim_tok: float, started: str) -> dict:
    cell = {"offered_rate": 0.5,
            "meas": {"tokens_per_s": meas_tok, "ttft_p50_s": 0.2, "ttft_p90_s": 0.4, "tpot_p50_s": 0.05},
            "sim": {"tokens_per_s": sim_tok, "ttft_p50_s": 0.2, "ttft_p90_s": 0.4, "tpot_p50_s": 0.05},
            "pred": {"tokens_per_s": 50.0, "ttft_p50_s": 0.1, "ttft_p90_s": 0.1, "tpot_p50_s": 0.04}}
    return {"meta": {"sources": ["pred", "sim", "meas"], "started": started, "host": {"contention": 0.0}},
            "results": {"one": {"cells": {"30%": cell}}}}


def test_combine_takes_medians_and_judges_the_target_on_them(tmp_path, capsys):
    # Three runs of one cell: measured 100, 80 and 130 tokens/s, simulated 100 each time. One run
    # alone misses (130: -23%); the medians (100 against 100) meet the target.
    runs = [_run(100.0, 100.0, "a"), _run(80.0, 100.0, "b"), _run(130.0, 100.0, "c")]
    names = []
    for i, r in enumerate(runs):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(r))
        names.append(str(p))
    fb.combine(runs, names)
    out = capsys.readouterr().out
    assert "run1.json: cells within 15% as it ran: sim 0 of 1" in out      # 100 against 80: +25%
    assert "run2.json: cells within 15% as it ran: sim 0 of 1" in out      # 100 against 130: -23%
    assert "| one | 30% | 3 | 100.0 / 80.0 / 130.0 |" in out
    assert "50%, 0%, 0%" in out                                             # (130 - 80) / 100
    assert "target on the medians (sim within 15% of measured on tok/s, P50 TTFT, P50 TPOT): 1 of 1 cells" in out


def test_profiles_merge_to_the_median_and_keep_a_steps_call_with_its_layers(monkeypatch):
    # The host's speed drifts both ways between runs, so each table takes the median of the
    # runs' figures (of two, their mean); but a served step's layers and call come from one
    # measurement (split_call), so each batch takes both from the run whose whole step
    # (layers x PROFILE_LAYERS + call) was the median, or the mean of the two middle runs.
    three = [{"m": {"decode_ms": {1: 2.0, 2: 3.0}, "prefill_ms": {16: 5.0}, "lm_head_ms": {1: 1.0, 2: 1.0},
                    "call_ms": {1: 1.0, 2: 9.0}}},
             {"m": {"decode_ms": {1: 2.5, 2: 2.5}, "prefill_ms": {16: 4.0}, "lm_head_ms": {1: 2.0, 2: 0.5},
                    "call_ms": {1: 0.5, 2: 2.0}}},
             {"m": {"decode_ms": {1: 3.0, 2: 2.0}, "prefill_ms": {16: 6.0}, "lm_head_ms": {1: 3.0, 2: 0.7},
                    "call_ms": {1: 0.2, 2: 1.0}}}]
    runs = iter(three)
    monkeypatch.setattr(fb, "run_profile", lambda *a, **k: next(runs))
    got = fb.get_profile("/ckpt/m", 1, 100, "/tmp", None, runs=3)
    assert got["prefill_ms"] == {16: 5.0} and got["lm_head_ms"] == {1: 2.0, 2: 0.7}
    # batch 1: steps 13, 15.5, 18.2; batch 2: 27, 17, 13: the second run's both times
    assert fb.PROFILE_LAYERS == 6
    assert got["decode_ms"] == {1: 2.5, 2: 2.5} and got["call_ms"] == {1: 0.5, 2: 2.0}
    runs = iter(three[:2])
    got = fb.get_profile("/ckpt/m", 1, 100, "/tmp", None, runs=2)
    assert got["prefill_ms"] == {16: 4.5}
    assert got["decode_ms"] == {1: 2.25, 2: 2.75} and got["call_ms"] == {1: 0.75, 2: 5.5}


def test_step_rows_split_a_step_into_hops_queues_and_compute_that_add_up():
    # One step of 100 ms (3 decodes, so 3 tokens) on two stages, and a step of another loop
    # (5 tokens) that holds stage 1 when this one's call arrives there. Log rows: (compute
    # start, end, tokens, when the Forward arrived).
    steps = [(0.0, 0.100, 3, 600, [], 3, [])]
    logs = {"p0s0": [(1.005, 1.040, 3, 1.002)],
            "p0s1": [(1.030, 1.044, 5, 1.029), (1.045, 1.090, 3, 1.042)]}
    (row,) = fb.step_rows(steps, 1.0, logs)
    s0, s1 = row["stages"]["p0s0"], row["stages"]["p0s1"]
    assert (s0["to"], s0["queued"], s0["inside"], s0["compute"]) == pytest.approx((0.002, 0.0, 0.003, 0.035))
    assert (s1["to"], s1["queued"], s1["inside"], s1["compute"]) == pytest.approx((0.002, 0.002, 0.001, 0.045))
    assert s0["overlap"] == pytest.approx(0.010 / 0.035)        # stage 1's other step, 1.030-1.040
    assert row["back"] == pytest.approx(0.010)
    parts = sum(s[k] for s in (s0, s1) for k in ("to", "queued", "inside", "compute")) + row["back"]
    assert parts == pytest.approx(row["step"])
    # the means keep their meaning: queued from arrival; the rest are the hops
    b = fb.step_breakdown(steps, 1.0, logs)
    assert b["matched"] == 1 and b["queued_p0s1"] == pytest.approx(2.0) and b["hops"] == pytest.approx(18.0)
    # a log from before the arrival was written: the wait counts from the last stage's end
    old = {k: [(a, b, n, None) for a, b, n, _ in v] for k, v in logs.items()}
    (row_old,) = fb.step_rows(steps, 1.0, old)
    assert row_old["stages"]["p0s1"]["to"] == 0.0 and row_old["stages"]["p0s1"]["queued"] == pytest.approx(0.004)
    # a step no stage logged is left out
    assert fb.step_rows([(0.5, 0.01, 1, 100, [], 1, [])], 1.0, logs) == []
    table = fb.step_kinds_table([row])
    assert "| D3 | 1 | 100.0 | 2.0 / 0.0 / 3.0 / 35.0 | 2.0 / 2.0 / 1.0 / 45.0 | 10.0 | - / - |" in table


def test_kinds_sets_each_saved_step_beside_the_simulators_time_for_it(tmp_path, capsys):
    # `--kinds`: a saved run's steps by kind, each stage's compute over the simulator's time for
    # that step alone, from the run's own cluster (profile) and this checkout's simulator.
    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    tables = {"decode_ms": {1: 2.5, 4: 5.0, 8: 7.0}, "prefill_ms": {16: 5.0, 32: 6.0, 64: 8.0, 128: 13.5},
              "lm_head_ms": {1: 5.0, 8: 13.0}}
    stages = [["cpu0", 1, 0, 6], ["cpu1", 1, 6, 12]]
    steps = [[0.0, 0.100, 3, 600, [], 3, []], [0.2, 0.150, 1, 200, [32], 1, [[32, 32, 136, False]]]]
    logs = {"p0s0": [[0.005, 0.040, 3, 0.002], [0.205, 0.250, 33, 0.201]],
            "p0s1": [[0.045, 0.090, 3, 0.042], [0.255, 0.345, 33, 0.252]]}
    results = {"pp2": {"stages": stages, "workload": {"prompt_tokens": 136, "output_tokens": 69},
                       "cluster": fb.base_cluster_dict(ckpt.name, tables),
                       "cells": {"30%": {"meas_detail": {"steps": steps, "step_logs": logs}}}}}
    fb.print_kinds([results, results], str(ckpt), ["a.json", "b.json"])
    out = capsys.readouterr().out
    assert "a.json: pp2 30%: 2 of 2 steps matched" in out and "b.json: pp2 30%" in out
    d3 = next(line for line in out.splitlines() if line.startswith("| D3 |"))
    p1 = next(line for line in out.splitlines() if line.startswith("| P1 |"))
    # stage 0 of the decode step: 35 ms against 6 layers x decode_ms(3) (no call table, no head)
    ratio0 = float(d3.rsplit("|", 2)[-2].split("/")[0])
    assert ratio0 == pytest.approx(35.0 / (6 * (5.0 - (5.0 - 2.5) / 3)), rel=0.01)
    assert "-" not in p1.rsplit("|", 2)[-2]                      # the chunk's detail was there: a model
    # over both runs: each stage's decode steps of 1-3 sequences (two D3 steps) and steps of 1-3
    # decodes and a chunk (two P1 steps), the same ratios as each run's; no other kind of step
    assert "pp2, 2 run(s), every load" in out
    assert "| stage | D1-3 (2) | D4-8 (0) | D9+ (0) | prompts (0) | P1-3 (2) | P4-8 (0) | P9+ (0) |" in out
    s0 = next(line for line in out.splitlines() if line.startswith("| p0s0 |")).split("|")
    assert float(s0[2]) == pytest.approx(ratio0, abs=0.006) and s0[3].strip() == "-"
    assert float(s0[6]) == pytest.approx(float(p1.rsplit("|", 2)[-2].split("/")[0]), abs=0.006)
    # and by overlap: the stages never computed at once here, so every step is in the first column
    assert "pp2, 2 run(s), every load: each stage's compute over the simulator's time for the same steps alone, by how" in out
    assert re.search(r"\| p0s1 \| \d\.\d\d \(4\) \| - \(0\) \| - \(0\) \|", out)


def test_overlap_table_splits_each_stages_ratio_by_how_much_another_stage_ran_beside_it():
    def row(o0, c0, o1, c1):
        return {"stages": {"p0s0": {"overlap": o0, "compute": c0, "model": 0.010},
                           "p0s1": {"overlap": o1, "compute": c1, "model": 0.020}}}
    rows = [row(0.0, 0.011, 1.0, 0.022), row(0.05, 0.009, 0.95, 0.026), row(0.5, 0.012, 0.1, 0.020),
            row(0.95, 0.015, 0.0, 0.021)]
    lines = fb.overlap_table(rows).splitlines()
    assert lines[0] == "| stage | overlapped < 10% | 10%-90% | > 90% |"
    assert lines[2] == "| p0s0 | 1.00 (2) | 1.20 (1) | 1.50 (1) |"        # (11 + 9) / 20; 12 / 10; 15 / 10
    assert lines[3] == "| p0s1 | 1.05 (1) | 1.00 (1) | 1.20 (2) |"        # 21 / 20; 20 / 20; (22 + 26) / 40
    # a stage without a model for its steps shows "-"
    bare = [{"stages": {"p0s0": {"overlap": 0.0, "compute": 0.01}}}]
    assert fb.overlap_table(bare).splitlines()[2] == "| p0s0 | - (1) | - (0) | - (0) |"


def test_a_tp2_groups_own_tables_are_the_served_ones_times_the_lone_ratio():
    served = {"decode_ms": {1: 2.0, 16: 8.0, 64: 20.0}, "prefill_ms": {32: 6.0}, "call_ms": {1: 1.0}}
    lone1 = {"decode_ms": {1: 1.0, 16: 4.0}, "prefill_ms": {16: 4.0, 64: 8.0}}
    lone2 = {"decode_ms": {1: 1.5, 16: 4.4}, "prefill_ms": {16: 5.0, 64: 8.0}}
    own = fb.tp_own_tables(served, lone1, lone2)
    assert list(own) == ["decode_ms", "prefill_ms"]          # the layer tables only; the call stays TP 1's
    assert own["decode_ms"] == {1: 3.0, 16: 8.8, 64: pytest.approx(20.0 * (4.4 + 2.9 * 48 / 15) / (4.0 + 3.0 * 48 / 15),
                                                                   abs=1e-4)}
    assert own["prefill_ms"] == {32: pytest.approx(6.0 * (5.0 + 3.0 * 16 / 48) / (4.0 + 4.0 * 16 / 48), abs=1e-4)}
    # `hexplan profile --tp 2` writes its tables under by_tp.2: the bench reads them at the top
    entry = {"by_tp": {2: lone2}, "allreduce_ms": {1: 0.5}, "allreduce_tp": 2}
    assert fb.lifted(entry, 2) == {**lone2, "allreduce_ms": {1: 0.5}, "allreduce_tp": 2}
    assert fb.lifted(lone1, 1) == lone1


def test_the_served_decode_table_keeps_a_tp_groups_ratio():
    # sim+cal puts the decode table measured in service in place of the profile's; a TP-2
    # group's own table keeps its ratio to TP 1's at every batch
    tables = {"decode_ms": {"1": 2.0, "16": 8.0}, "prefill_ms": {"16": 1.0},
              "by_tp": {"2": {"decode_ms": {"1": 3.0, "16": 8.0}, "prefill_ms": {"16": 1.5}}}}
    base = {"nodes": [{"name": "cpu0", "gpu": "cpu", "count": 2}, {"name": "cpu1", "gpu": "cpu", "count": 1}],
            "network": {"default": {"bandwidth": "10Gbps", "latency": "0.1ms"}},
            "gpu_types": {"cpu": {"profiles": {"m": tables}}}}
    d = fb.calibrated_cluster_dict(base, [("cpu0", 2, 0, 6), ("cpu1", 1, 6, 12)],
                                   {"fixed_s": 0.0, "decode_table": {1: 1.0, 8: 4.0, 16: 10.0}})
    got = d["gpu_types"]["cpu"]["profiles"]["m"]
    assert got["decode_ms"] == {1: 1.0, 8: 4.0, 16: 10.0}
    assert got["by_tp"]["2"]["decode_ms"] == {1: pytest.approx(1.5), 8: pytest.approx(4.0 * (3 + 5 * 7 / 15) / (2 + 6 * 7 / 15)),
                                              16: pytest.approx(10.0)}
    assert got["by_tp"]["2"]["prefill_ms"] == {"16": 1.5}                     # the prefill tables stay the profile's
    assert tables["decode_ms"] == {"1": 2.0, "16": 8.0}                       # the base is not changed
    assert fb.tp_decode_ratio(tables, None, 4) == 1.0


def test_a_p50_miss_is_set_beside_the_measured_p40_and_p60(capsys):
    # 32 requests: 16 decoding alone at 30 ms a token, 16 sharing steps at 50-65 ms. The measured
    # P50 falls between the two groups (40 ms); a simulated 33 ms misses it by 18% but lies
    # between the P40 (30) and the P60 (~53): a few requests changing sides decide the cell.
    tpots = [0.030] * 16 + [0.050 + 0.001 * i for i in range(16)]
    recs = [{"ttft": 0.2, "tpot": t} for t in tpots]
    run = _run(100.0, 100.0, "a")
    cell = run["results"]["one"]["cells"]["30%"]
    cell["meas"]["tpot_p50_s"] = fb.percentile(sorted(tpots), 50)
    cell["sim"]["tpot_p50_s"] = 0.033
    cell["meas_detail"] = {"per_request": recs}
    lo, mid, hi = fb.median_neighbours(cell, "tpot")
    assert (lo, mid, hi) == (pytest.approx(0.030), pytest.approx(0.040), pytest.approx(0.0526, abs=1e-4))
    rows = fb.neighbour_rows([run], ["r.json"], ["sim"])
    assert rows == ["| r.json | one | 30% | sim | TPOT | 30 / 40 / 53 | 33 (-18%) | yes |"]
    cell["sim"]["tpot_p50_s"] = 0.060                                        # +50%: outside P40-P60
    assert fb.neighbour_rows([run], ["r.json"], ["sim"])[0].endswith("| no |")
    cell["sim"]["tpot_p50_s"] = 0.041                                        # within 15%: no row
    assert fb.neighbour_rows([run], ["r.json"], ["sim"]) == []
    del cell["meas_detail"]                                                  # an old run without its requests
    cell["sim"]["tpot_p50_s"] = 0.060
    assert fb.neighbour_rows([run], ["r.json"], ["sim"]) == []


def test_paired_sets_each_request_beside_its_own_simulation():
    # Measured requests saved out of order: paired() sorts them by arrival, as the trace the
    # simulator ran. Simulated TTFT 10% under each request's own, TPOT 20% over; a one-token
    # request has no TPOT on either side and is left out of the TPOT figure.
    meas = [{"id": i, "arrival": 0.5 * i, "ttft": 0.1 * (i + 1), "tpot": 0.02 * (i + 1) if i != 3 else math.nan}
            for i in range(5)]
    sim = [[0.9 * r["ttft"], None if i == 3 else 1.2 * r["tpot"]] for i, r in enumerate(meas)]
    cell = {"sim": {"per_request": sim}, "meas_detail": {"per_request": list(reversed(meas))}}
    ttft, tpot = fb.paired(cell, "sim")
    assert ttft == pytest.approx(-0.1) and tpot == pytest.approx(0.2)
    cell["sim"]["per_request"] = sim[1:] + sim[:1]         # each request beside the next one's simulation
    assert fb.paired(cell, "sim")[0] == pytest.approx(0.2)   # 0.9 x 0.3 / 0.2 - 1, the median of five
    cell["sim"]["per_request"] = sim
    assert fb.paired(cell, "sim+cal") is None              # no such source
    assert fb.paired({"sim": {"per_request": sim[:3]}, "meas_detail": {"per_request": meas}}, "sim") is None
    run = {"results": {"one": {"cells": {"30%": cell}}}}
    old = {"results": {"one": {"cells": {"30%": {"sim": {}, "meas_detail": {"per_request": meas}}}}}}
    assert fb.paired_rows([run, old, run], "sim") == \
        ["| one | 30% | -10 - -10 | **-10%** | +20 - +20 | **+20%** |"]


def test_simulate_trace_keeps_each_request_in_the_traces_order(tmp_path):
    # Four requests far apart, so each runs alone: the per-request figures are in the trace's
    # order (the long prompt's TTFT is the longest) and agree with the cell's P50s.
    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    tables = {"decode_ms": {1: 2.5, 4: 5.0}, "prefill_ms": {16: 5.0, 64: 8.0, 256: 30.0}}
    stages = [["cpu0", 1, 0, 12]]
    plan = fb.plan_for(str(ckpt), stages, {"prompt_tokens": 64, "output_tokens": 16})
    cluster = fb.make_cluster(fb.base_cluster_dict(ckpt.name, tables))
    lens = [(32, 8), (250, 4), (16, 1), (64, 20)]
    trace = [{"arrival": 5.0 * i, "prompt": [0] * p, "output_len": o} for i, (p, o) in enumerate(lens)]
    got = fb.simulate_trace(plan, cluster, trace)
    per = got["per_request"]
    assert len(per) == 4 and per[2][1] is None                       # one output token: no TPOT
    assert max(range(4), key=lambda i: per[i][0]) == 1                # the 250-token prompt
    assert per[0][0] < per[3][0] < per[1][0]                          # 32 < 64 < 250 prompt tokens
    assert got["ttft_p50_s"] == pytest.approx(fb.percentile(sorted(r[0] for r in per), 50))
    assert got["tpot_p50_s"] == pytest.approx(fb.percentile(sorted(r[1] for r in per if r[1] is not None), 50))


def test_ending_back_splits_steps_by_a_request_ending_in_them():
    # steps at t = 0, 1, 2 (0.1 s each, 0.02 s of way back); a request ends inside the second
    # step's way back, another 5 ms after the third step: both of those ended a request
    rows = [{"t": float(i), "step": 0.1, "back": 0.02} for i in range(3)]
    requests = [{"end": 1.09}, {"end": 2.105}, {"end": 0.5}]
    ended, rest = fb.ending_back(rows, requests)
    assert (len(ended), len(rest)) == (2, 1)
    assert fb.ending_back(rows, [{"end": 0.2}]) == ([], [0.02] * 3)   # 100 ms after: not that step's


def test_resimulate_predicts_again_and_without_the_host(tmp_path):
    # `--resimulate`: the saved run's prediction is recomputed with this checkout's cost model
    # (the saturated cell's pred is the capacity, a Poisson cell's the offered tokens/s up to it),
    # and with `--no-host` the two stages are rated on machines of their own: faster than
    # sharing 2 cores with contention, and the same as a cluster that never had the host.
    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    tables = {"decode_ms": {1: 2.5, 4: 5.0, 16: 9.0}, "prefill_ms": {16: 5.0, 64: 8.0, 256: 30.0}}
    stages = [["cpu0", 1, 0, 6], ["cpu1", 1, 6, 12]]
    workload = {"prompt_tokens": 64, "output_tokens": 16}

    def run() -> dict:
        recs = [{"id": f"r{i}", "arrival": 0.5 * i, "prompt_len": 32 + i, "tokens": 8 + 4 * i} for i in range(4)]
        cells = {"30%": {"offered_rate": 0.02, "meas_detail": {"per_request": recs}},
                 "sat": {"offered_rate": None, "meas": {"tokens_per_s": 50.0},
                         "meas_detail": {"per_request": recs}}}
        return {"pp2": {"stages": stages, "workload": workload, "predicted": {"capacity_tokens_per_s": 1.0},
                        "cluster": fb.base_cluster_dict(ckpt.name, tables, {"cores": 2, "contention": 0.1}),
                        "cells": cells}}

    shared, apart = run(), run()
    fb.resimulate(shared, str(ckpt))
    fb.resimulate(apart, str(ckpt), no_host=True)
    cap_shared = shared["pp2"]["predicted"]["capacity_tokens_per_s"]
    cap_apart = apart["pp2"]["predicted"]["capacity_tokens_per_s"]
    assert cap_apart > cap_shared > 1.0
    assert "hosts" not in apart["pp2"]["cluster"] and all("host" not in n for n in apart["pp2"]["cluster"]["nodes"])
    plan = fb.plan_for(str(ckpt), stages, workload)
    alone = fb.predict(plan, fb.make_cluster(fb.base_cluster_dict(ckpt.name, tables)))
    assert cap_apart == pytest.approx(alone["capacity_tokens_per_s"])
    for res, cap in ((shared, cap_shared), (apart, cap_apart)):
        cells = res["pp2"]["cells"]
        assert cells["sat"]["pred"]["tokens_per_s"] == pytest.approx(cap)
        assert cells["30%"]["pred"]["tokens_per_s"] == pytest.approx(0.02 * statistics.mean(8 + 4 * i for i in range(4)))
        assert "sim" in cells["sat"] and len(cells["sat"]["sim"]["per_request"]) == 4
    assert fb.capacity_rows(shared) == [("pp2", cap_shared, shared["pp2"]["predicted"]["bottleneck"], 50.0)]


def test_pooled_profile_is_the_pointwise_median_of_the_runs_profiles(tmp_path):
    # `--resimulate --pool`: a plan is timed by the median, point by point, of the profiles it
    # had in the pooled runs (JSON: string keys), nested tables included; a point missing from
    # one run is left out, a field equal in all (allreduce_tp) is kept as it is.
    a = {"decode_ms": {"1": 2.0, "16": 9.0, "32": 12.0}, "allreduce_tp": 2, "by_tp": {"2": {"decode_ms": {"1": 1.0}}}}
    b = {"decode_ms": {"1": 3.0, "16": 6.0}, "allreduce_tp": 2, "by_tp": {"2": {"decode_ms": {"1": 4.0}}}}
    c = {"decode_ms": {"1": 5.0, "16": 7.0}, "allreduce_tp": 2, "by_tp": {"2": {"decode_ms": {"1": 2.0}}}}
    got = fb.pooled([a, b, c])
    assert got == {"decode_ms": {"1": 3.0, "16": 7.0}, "allreduce_tp": 2, "by_tp": {"2": {"decode_ms": {"1": 2.0}}}}
    assert isinstance(got["allreduce_tp"], int)

    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    stages = [["cpu0", 1, 0, 12]]
    workload = {"prompt_tokens": 64, "output_tokens": 16}
    recs = [{"id": f"r{i}", "arrival": 0.5 * i, "prompt_len": 32 + i, "tokens": 8 + 4 * i} for i in range(4)]

    def run(decode: dict) -> dict:
        tables = {"decode_ms": decode, "prefill_ms": {"16": 5.0, "64": 8.0, "256": 30.0}}
        cells = {"sat": {"offered_rate": None, "meas": {"tokens_per_s": 50.0}, "meas_detail": {"per_request": recs}}}
        d = json.loads(json.dumps({"one": {"stages": stages, "workload": workload, "cluster":
                                           fb.base_cluster_dict(ckpt.name, tables), "profile": tables, "cells": cells}}))
        return d

    fast, slow, mid = run({"1": 1.0, "16": 4.0}), run({"1": 4.0, "16": 16.0}), run({"1": 2.0, "16": 8.0})
    fb.resimulate(fast, str(ckpt), pool=[fast, json.loads(json.dumps(slow)), json.loads(json.dumps(mid))])
    fb.resimulate(mid, str(ckpt))
    for k in ("decode_ms", "prefill_ms"):
        assert fb.plan_tables(fast["one"])[k] == fb.plan_tables(mid["one"])[k] == fast["one"]["profile"][k]
    assert fast["one"]["predicted"] == mid["one"]["predicted"]
    assert fast["one"]["cells"]["sat"]["sim"]["tokens_per_s"] == pytest.approx(mid["one"]["cells"]["sat"]["sim"]["tokens_per_s"])
    other = run({"1": 1.0, "16": 4.0})
    fb.resimulate(other, str(ckpt), pool=[{"pp2": {}}])         # no run of the pool has the plan: its own
    assert fb.plan_tables(other["one"])["decode_ms"] == {"1": 1.0, "16": 4.0}


def test_host_speeds_take_the_served_steps_around_each_load_over_those_at_launch():
    run = {"rpc": {"1": 0.040, "2": 0.050, "8": 0.080}}
    cells = {"30%": {"meas": {"rpc_after": {"1": 0.060, "8": 0.080}}},     # slower after 30%, at B=1 only
             "70%": {"meas": {"rpc_after": {"1": 0.040, "8": 0.160}}},
             "sat": {"meas": {}}}                                          # no probe after: left out
    got = fb.host_speeds(run, cells)
    assert set(got) == {"30%", "70%"}
    assert got["30%"] == pytest.approx(math.sqrt(1.25 * 1.0))              # (40+60)/2/40, (80+80)/2/80
    assert got["70%"] == pytest.approx(math.sqrt(1.25 * 1.5))              # (60+40)/2/40, (80+160)/2/80
    assert fb.host_speeds({}, cells) == {} and fb.host_speeds(run, {"30%": {"meas": {}}}) == {}


def test_sim_cal_with_drift_runs_each_load_at_the_hosts_speed_around_it(tmp_path):
    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    tables = {"decode_ms": {1: 2.5, 4: 5.0, 16: 9.0}, "prefill_ms": {16: 5.0, 64: 8.0, 256: 30.0},
              "lm_head_ms": {1: 3.0, 16: 8.0}, "by_tp": {2: {"decode_ms": {1: 1.5, 16: 5.0}}}}
    d = fb.at_speed(fb.base_cluster_dict(ckpt.name, tables), 2.0)
    got = d["gpu_types"]["cpu"]["profiles"][ckpt.name]
    assert got["decode_ms"] == {"1": 5.0, "4": 10.0, "16": 18.0} and got["lm_head_ms"] == {"1": 6.0, "16": 16.0}
    assert got["by_tp"]["2"]["decode_ms"] == {"1": 3.0, "16": 10.0} and tables["decode_ms"][1] == 2.5   # a copy
    stages = [["cpu0", 1, 0, 12]]
    workload = {"prompt_tokens": 64, "output_tokens": 16}
    trace = [{"arrival": 2.0 * i, "prompt": [0] * 48, "output_len": 12} for i in range(4)]
    pr = {"stages": stages, "workload": workload, "profile": tables,
          "cluster": fb.base_cluster_dict(ckpt.name, tables),
          "measured_run": {"rpc": {1: 0.040, 8: 0.080}},
          "cells": {"30%": {"meas": {"rpc_after": {1: 0.080, 8: 0.160}}}, "70%": {"meas": {}}}}
    cal, cplan, _ = fb.calibrate_terms(pr, str(ckpt))
    fb.calibrated_sims(pr, cal, cplan, {"30%": trace, "70%": trace}, drift=True)
    c30, c70 = pr["cells"]["30%"], pr["cells"]["70%"]
    assert c30["host_speed"] == pytest.approx(1.5) and "host_speed" not in c70
    ratio = c30["sim+cal"]["tpot_p50_s"] / c70["sim+cal"]["tpot_p50_s"]
    assert 1.3 < ratio <= 1.5 + 1e-9                                       # the compute 1.5x, the links not
    fb.calibrated_sims(pr, cal, cplan, {"30%": trace})                    # by default: the launch's speed
    assert "host_speed" not in c30 and c30["sim+cal"]["tpot_p50_s"] == pytest.approx(c70["sim+cal"]["tpot_p50_s"])


def test_sim_at_loads_is_timed_by_the_profile_runs_before_and_after_the_loads(tmp_path, monkeypatch):
    # `--around N`: the plan is profiled again after its loads, and `sim@loads` is the simulator
    # timed by all the runs, before and after (combined_runs: each point's median, a step's layers
    # and call from the same runs). A TP-2 group's own tables are the combined served table times
    # the lone runs' TP-2 / TP-1 ratio; the all-reduce table stays the profile's before.
    def one_run(layer: float, call: float) -> dict:
        return {"m": {"decode_ms": {1: layer, 16: 3 * layer}, "prefill_ms": {16: 5.0, 64: 8.0, 256: 30.0},
                      "lm_head_ms": {1: 3.0, 16: 8.0}, "call_ms": {1: call, 16: call}}}

    runs = iter([one_run(2.0, 1.0), one_run(2.2, 0.5), one_run(1.8, 1.5)])
    monkeypatch.setattr(fb, "run_profile", lambda *a, **k: next(runs))
    before: list = []
    prof = fb.get_profile("/ckpt/m", 1, 100, "/tmp", None, runs=3, runs_out=before)
    assert [t["decode_ms"][1] for t in before] == [2.0, 2.2, 1.8] and prof["decode_ms"][1] == 2.0
    after = [one_run(4.0, 1.0)["m"], one_run(4.4, 1.0)["m"], one_run(3.6, 1.0)["m"]]

    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    stages = [["cpu0", 2, 0, 6], ["cpu1", 1, 6, 12]]
    workload = {"prompt_tokens": 64, "output_tokens": 16}
    lone = {"tp1": {"decode_ms": {1: 1.0, 16: 3.0}, "prefill_ms": {16: 1.0, 256: 1.0}},
            "tp2": {"decode_ms": {1: 1.5, 16: 3.0}, "prefill_ms": {16: 1.2, 256: 1.2}}}
    tables = dict(prof, allreduce_ms={1: 0.3, 16: 0.5}, allreduce_tp=2, by_tp={2: fb.tp_own_tables(prof, **{
        "lone1": lone["tp1"], "lone2": lone["tp2"]})})
    pr = json.loads(json.dumps({"stages": stages, "workload": workload, "profile": tables,
                                "cluster": fb.base_cluster_dict(ckpt.name, tables, {"cores": 2, "contention": 0.1}),
                                "profile_runs": {"before": before, "after": after}, "tp_lone": lone,
                                "cells": {"sat": {}}}))
    got = fb.around_tables(pr)
    # six runs per point: 1.8 2.0 2.2 | 3.6 4.0 4.4 -> the middle two (2.2 and 3.6), layers and call alike
    assert got["decode_ms"]["1"] == pytest.approx(2.9) and got["decode_ms"]["16"] == pytest.approx(8.7)
    assert got["call_ms"]["1"] == pytest.approx(0.75)                   # the 2.2 run's 0.5 and the 3.6 run's 1.0
    assert got["allreduce_ms"] == {"1": 0.3, "16": 0.5} and got["allreduce_tp"] == 2
    assert got["by_tp"][2]["decode_ms"]["1"] == pytest.approx(2.9 * 1.5)  # the lone ratio at one sequence
    assert got["by_tp"][2]["decode_ms"]["16"] == pytest.approx(8.7)       # 1.0 at 16

    trace = [{"arrival": 0.005 * i, "prompt": [0] * 48, "output_len": 12} for i in range(6)]
    plan = fb.plan_for(str(ckpt), stages, workload)
    fb.around_sims(pr, plan, {"sat": trace})
    sim = fb.simulate_trace(plan, fb.make_cluster(pr["cluster"]), trace)
    c = pr["cells"]["sat"]
    assert pr["profile_around"] == got and "hosts" in pr["cluster"]
    assert c["sim@loads"]["tpot_p50_s"] > 1.2 * sim["tpot_p50_s"]       # the layers 1.45x slower
    assert fb.plan_tables(pr)["decode_ms"]["1"] == 2.0                   # the plan's own cluster unchanged
    # the report's rows: each run's served step (6 layers + call) before and after, and the ratio
    assert fb.around_rows({"p": pr}, batches=(1,)) == ["| p | 1 | 13.0, 13.7, 12.3 | 25.0, 27.4, 22.6 | 1.92 |"]
    # the lone TP trio taken again after the loads: each lone table the mean of the two trios
    pr["tp_lone_after"] = {"tp1": {"decode_ms": {"1": 1.0, "16": 3.0}, "prefill_ms": {"16": 1.0, "256": 1.0}},
                           "tp2": {"decode_ms": {"1": 2.5, "16": 3.0}, "prefill_ms": {"16": 1.2, "256": 1.2}}}
    assert fb.around_tables(pr)["by_tp"][2]["decode_ms"]["1"] == pytest.approx(2.9 * 2.0)   # (1.5 + 2.5) / 2
    del pr["profile_runs"]["after"][:]
    c.pop("sim@loads")
    fb.around_sims(pr, plan, {"sat": trace})                             # no runs after: no sim@loads
    assert "sim@loads" not in c


def _repeat_run(meas_tok: float, sim_tok: float, rate: float | None, seed: int | None = None) -> dict:
    r = _run(meas_tok, sim_tok, "x")
    r["results"]["one"]["cells"]["30%"].update(offered_rate=rate, requests=32)
    if seed is not None:
        r["meta"]["seed"] = seed
    return r


def test_the_measurement_is_set_against_itself_over_runs_that_offered_the_same_trace(tmp_path, capsys):
    # Three runs offered the same trace (rate 0.5, seed 0: one saved before the seed was kept)
    # and measured 100, 110 and 130 tokens/s: 110/100 agrees, 130/100 and 130/110 (1.18) do not.
    # A run at another rate and one with another seed are other traces: alone, no pair.
    runs = [_repeat_run(100.0, 100.0, 0.5), _repeat_run(110.0, 100.0, 0.5, seed=0), _repeat_run(130.0, 100.0, 0.5, 0),
            _repeat_run(100.0, 100.0, 0.6, 0), _repeat_run(100.0, 100.0, 0.5, 1)]
    rows, totals = fb.repeat_rows(runs, ["sim"])
    assert rows == ["| one | 30% | 0.500 | 3 | 1 of 3 | 2 of 3 |"]   # sim 100 against 130: -23%
    assert totals == {"meas": [1, 3], "sim": [2, 3]}
    assert fb.agree({k: 1.15 for k in fb.CHECKED}, {k: 1.0 for k in fb.CHECKED})
    assert not fb.agree({k: 1.0 for k in fb.CHECKED}, {k: 1.16 for k in fb.CHECKED})
    # one run with a source the others did not take: counted over the run that has it only
    runs[0]["meta"]["sources"] = ["pred", "sim", "sim+cal", "meas"]
    runs[0]["results"]["one"]["cells"]["30%"]["sim+cal"] = dict(runs[0]["results"]["one"]["cells"]["30%"]["sim"])
    names = [str(tmp_path / f"r{i}.json") for i in range(len(runs))]
    fb.combine(runs, names)
    out = capsys.readouterr().out
    assert "| one | 30% | 0.500 | 3 | 1 of 3 | 2 of 3 | 1 of 1 |" in out
    assert ("measured against measured: 1 of 3 pairs agree; sim against measured: 2 of 3 cells; "
            "sim+cal against measured: 1 of 1 cells") in out
    assert "r0.json: cells within 15% as it ran: sim 1, sim+cal 1 of 1" in out
    assert "r1.json: cells within 15% as it ran: sim 1 of 1" in out           # no sim+cal 0 of 1


def test_rates_from_offers_a_saved_runs_rates_for_the_same_traces(tmp_path, monkeypatch, capsys):
    saved = {"meta": {"n_poisson": 32, "seed": 0},
             "results": {"one": {"cells": {"30%": {"offered_rate": 0.25}, "70%": {"offered_rate": 0.6},
                                           "sat": {"offered_rate": None}}}}}
    rates = fb.saved_rates(saved, 0, 32)
    assert rates == {"one": {"30%": 0.25, "70%": 0.6}}
    assert fb.load_rates(2.0, rates["one"]) == {"30%": 0.25, "70%": 0.6, "sat": None}
    assert fb.load_rates(2.0) == {"30%": pytest.approx(0.6), "70%": pytest.approx(1.4), "sat": None}
    with pytest.raises(ValueError, match="seed 0 there, 3 here"):
        fb.saved_rates(saved, 3, 32)
    with pytest.raises(ValueError, match="12 here"):
        fb.saved_rates(saved, 0, 12)
    del saved["meta"]["seed"]                       # saved before the seed was kept: the default
    assert fb.saved_rates(saved, 0, 32) == rates
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved))
    for argv, said in ((["--rates-from", str(tmp_path / "none.json")], "none.json"),
                       (["--rates-from", str(path), "--seed", "2"], "seed 0 there, 2 here"),
                       (["--rates-from", str(path), "--resimulate", str(path)], "keeps the saved run's traces")):
        monkeypatch.setattr(sys, "argv", ["fidelity_bench.py", "--no-measure", *argv])
        with pytest.raises(SystemExit) as e:
            fb.main()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("fidelity_bench.py: error: --rates-from") and said in err
