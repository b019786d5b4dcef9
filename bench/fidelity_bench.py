"""Fidelity benchmark: the cost model's prediction, the simulator and the real executor, side by side.

    python bench/fidelity_bench.py [--quick] [--only one,pp2,tp2pp] [--json out.json]
                                   [--checkpoint DIR] [--profile FILE] [--no-calibrate] [--wait-quiet S]
                                   [--lone-profile] [--contention F | --no-host] [--around N] [--rates-from RUN.json]
    python bench/fidelity_bench.py --resimulate RUN.json --checkpoint DIR [--tp-tables TP1.yaml TP2.yaml | --no-tp-tables]
                                   [--no-host] [--drift] [--pool RUN.json ...]
    python bench/fidelity_bench.py --combine RUN1.json RUN2.json ...

The model of bench/executor_bench.py (a random-weight Llama, hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000, 512 positions, float32) on the local CPU cluster of
cluster_specs/local-cpu.yaml (nodes cpu0 with 2 "GPUs" and cpu1 with 1, `gpu: cpu`), whose `cpu`
type gets a profile of that model measured on this machine by `hexplan profile` (a subprocess;
`--profile FILE` reuses a saved one): per-layer decode and prefill tables and the LM head's table
at the plan's worker thread count, the decode and prefill tables timed through a served worker
and a call's own cost per stage apart from them (`--served`: `call_ms`; `--lone-profile`: in the
profiling process, as before, no call) and, for a plan with a TP stage, the all-reduce table of
a `hexplan profile --tp 2` run and the TP-2 group's own tables (`by_tp: {2: ...}`: the served
TP-1 tables times that run's over a lone TP-1 run's, `tp_own_tables`). Three hand-written plans:

  one    one stage holding layers 0-11 on cpu0 (1 worker, 2 threads)
  pp2    two pipeline stages, layers 0-5 on cpu0 and 6-11 on cpu1 (2 workers x 1 thread)
  tp2pp  a TP-2 stage with layers 0-5 on cpu0, then a TP-1 stage with 6-11 on cpu1 (3 workers x 1 thread)

cpu0 and cpu1 are one machine here, so both simulations put them on one shared host (`hosts:
{local: {cores, contention}}`, docs/cluster-format.md): the cores of this machine and the
contention measured at the start (`measure_contention`: a 1-thread decode step while another
1-thread process steps beside it, in alternate phases, against alone; `--contention F` gives it,
`--no-host` simulates two separate machines).
Each plan has the plan workload the executor benchmark writes (assumptions.workload: the trace's mean
prompt and output, micro-batches of 16, concurrency 16 per stage), which the gateway and the
simulator both schedule by. Three loads per plan: Poisson arrivals (seeded) at 30% and 70% of the
predicted capacity (hexplan.simulator.run.capacity_rate: the plan's predicted output tokens/s over
the mean output length) and saturated (every request at once, 5 ms apart in trace order: SAT_SPACING_S). Prompts uniform 16..256 tokens,
outputs 16..128 (executor_bench.make_workload). For each (plan, load):

  predicted  the cost model (hexplan.evaluate): throughput min(offered, capacity); TTFT and TPOT the
             plan's no-queueing values (so P50 = P90)
  simulated  hexplan.simulate on the same trace (arrivals, prompt and output lengths), run until
             every request finished (its duration bisected to the makespan)
  measured   Launch (`hexplan launch`: gateway here, node executors and stage workers as processes)
             serving the same trace, one client thread per request streaming over gRPC

Throughput is output tokens over the makespan (first arrival to last token) in all three, TTFT is
from arrival to first token, TPOT per request (e2e - TTFT) / (tokens - 1). The simulator runs
twice: `sim` on the cluster as specified (the profile's decode, prefill, LM-head, all-reduce
and call tables, default CostParams), and `sim+cal` on the same cluster with what the profile still leaves
out measured in service and fed in as cluster fields (`calibrate_terms`; --no-calibrate skips it):
the decode table as served (decode steps of 1..16 sequences sent straight to the launched plan's
first stage, less the profile's LM head, all-reduces and calls and the links), the gateway's own cost
per step (the same step through the gateway, as latency on the coordinator's links), and from two
loops of decode steps sent at once (`overlap_probe`) the hops of a step between busy processes
(as latency on every link) and the host's contention as the stages' compute shows it in service
(`served_host_terms`). After each load the first probe's steps (1 and 8 sequences) run again,
and the report prints the host's speed around each load: the steps just before and after it
over those at launch (`host_speeds`). `--resimulate --drift` runs `sim+cal` of each load at
that speed (the profile's tables that much longer, `at_speed`); it did not help on the
development VM, whose speed moves from second to second more than a 1-2 s probe can average
(docs/fidelity.md). Target: simulated within 15% of measured on throughput, P50 TTFT and P50
TPOT in every cell. The probes' table (served step against the model's, per batch) is printed
after the main one, then where the measured steps' time went: the stage workers log each
forward's compute (HEXPLAN_STEP_LOG, docs/executor.md), and each gateway step is split into each
stage's compute, the wait for a stage busy with the other loop, and the hops, with each stage's
decode compute against the profile's time for it alone (`step_breakdown`), and its compute over
the simulator's time for that same step, for the steps without and with a prompt chunk
(`StepModel`). `--json` keeps every request and every gateway step (their composition, chunks
and duration), the workers' compute logs, the CPU each process group used per load
(`cores_busy`) and the breakdown; `--kinds JSON [JSON ...] --checkpoint DIR` prints saved runs'
steps by kind (n decodes, with or without a chunk), each stage's hop, queue and compute beside
the simulator's (`step_kinds_table`), then each plan's stages over all the runs
(`kinds_summary_table`).

`--around N` profiles each plan again, N runs, once its loads are served, and adds a column,
`sim@loads`: the simulator timed by all the plan's profile runs, the three before its loads and
the N after (`combined_runs`), so that the profile's moments bracket the loads it times, as a
shared host's level moves over minutes; a plan with a TP stage also takes its lone TP-1 / TP-2
trio again (`lone_tp_runs`), and its TP-2 group's own tables take the mean of the two trios.
The loads' rates stay those the profile before gave; `sim` stays the profile before alone. The
report prints each run's served step before and after the loads (`around_rows`).

`--resimulate` runs a saved run's traces through this checkout's cost model and simulator again
(a change checked on measurements already taken; `--no-host` without the shared host,
`--drift` with `sim+cal` at the host's speed around each load, `--pool RUN.json ...` with each
plan timed by the pointwise median of the profiles it had in those runs, a profile taken over
as long as the runs rather than minutes before the plan's loads); `--combine` prints the medians of several saved
runs (run them with the plan order alternated, `--only tp2pp,pp2,one`), the measured figures'
own spread between runs, and the target judged on the medians: one run on a shared host moves a
cell by up to 23% (docs/fidelity.md), more than the target. `--rates-from RUN.json` offers each
plan's Poisson loads at a saved run's rates rather than at shares of this run's predicted
capacity, so that runs share all nine traces (saturated they always do); `--combine` then sets
the measurement against itself (`repeat_rows`): the pairs of runs whose measurements of a cell
with the same trace agree within the target, beside the simulator's count over the same runs.

Progress on stderr, markdown tables on stdout. About 30-35 minutes in full (45 with --around 3)
on the 2-core development machine when it is otherwise idle (--wait-quiet S waits for that
before the profile and each plan), about 3 with --quick (plan `one`, 12 Poisson and 16
saturated requests).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_bench import (MODEL, benchmark_checkpoint, calibrate, decode_sequence, log,  # noqa: E402
                            make_workload, percentile, replay, time_rpc)

from hexplan.cluster import Host, cluster_from_dict  # noqa: E402
from hexplan.costmodel import call_time, decode_layer_time, lm_head_time  # noqa: E402
from hexplan.evaluate import CostCache, evaluate_plan_pipelines  # noqa: E402
from hexplan.gpus import ProfileTable  # noqa: E402
from hexplan.plan import plan_from_dict  # noqa: E402
from hexplan.validate import plan_assumptions  # noqa: E402
from hexplan.yamlio import Locator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CPU = ROOT / "cluster_specs" / "local-cpu.yaml"

# (node, tp, first layer, end layer) per stage
PLANS = {
    "one": ("1 stage, layers 0-11", [("cpu0", 1, 0, 12)]),
    "pp2": ("2 stages, 0-5 | 6-11", [("cpu0", 1, 0, 6), ("cpu1", 1, 6, 12)]),
    "tp2pp": ("TP-2 0-5 | TP-1 6-11", [("cpu0", 2, 0, 6), ("cpu1", 1, 6, 12)]),
}
LOADS = (("30%", 0.3), ("70%", 0.7), ("sat", None))
# Saturated: the requests arrive this far apart, in trace order. At the same instant the client
# threads would reach the gateway in whatever order they happen to run, the gateway would admit
# them in that order, and the simulator (trace order) would admit others first: with prompts of
# 16-256 tokens that alone moved P50 TTFT by half (2.41 s simulated against 1.60 s measured).
SAT_SPACING_S = 0.005
PROMPT_RANGE, OUTPUT_RANGE = (16, 256), (16, 128)
TARGET = 0.15


# ---- the profile ---------------------------------------------------------------------------------

ALLREDUCE_BATCHES = ",".join(map(str, range(1, 17)))


PROFILE_LAYERS = 6       # layers `hexplan profile` loads (the plans' stages hold 6 or 12)
SERVED_PROFILE = True    # TP-1 profiles: decode through a served worker (`hexplan profile --served`)


def run_profile(ckpt: str, threads: int, context: int, out: Path, tp: int = 1, lone: bool = False,
                batches: str | None = None) -> dict:
    """``hexplan profile --checkpoint CKPT --device cpu -o OUT`` with ``threads`` torch threads per
    process (a worker's), decode at ``context`` (the plan workload's mean decode context: a
    profiled decode step does not depend on context in the cost model, so it must be measured at
    the one served), 6 layers (a stage of these plans holds 6 or 12), median of 5, the default
    grid (decode 1..16, 32, 64; the LM head at the same rows); at ``tp`` 2 for the all-reduce
    table (decode 1..16 only). ``lone``: in the profiling process (no --served) at TP 1 too;
    ``batches``: the decode batches. Returns the `cpu` type's profiles in OUT ({model name:
    {decode_ms, prefill_ms, lm_head_ms[, allreduce_ms, allreduce_tp]}}; a TP-2 run's own tables
    are lifted out of its by_tp.2)."""
    cmd = [sys.executable, "-m", "hexplan.cli", "profile", "--checkpoint", ckpt, "--device", "cpu", "-o", str(out),
           "--threads", str(threads), "--context", str(context), "--layers", str(PROFILE_LAYERS), "--repeats", "5",
           "--tp", str(tp)]
    if batches or tp > 1:
        cmd += ["--decode-batches", batches or ALLREDUCE_BATCHES]
    if tp == 1 and SERVED_PROFILE and not lone:
        cmd += ["--served"]
    log(f"  hexplan {' '.join(cmd[3:])}")
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"hexplan profile failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    log(f"  profiled in {time.perf_counter() - t:.0f} s")
    return {name: lifted(entry, tp) for name, entry in read_profile(out).items()}


def lifted(entry: dict, tp: int) -> dict:
    """A profile entry of `hexplan profile --tp ``tp```, which writes its layer tables as
    by_tp.tp, with them at the top, where the bench reads a run's tables."""
    out = {k: v for k, v in entry.items() if k != "by_tp"}
    out.update((entry.get("by_tp") or {}).get(tp, {}))
    return out


def read_profile(path: Path) -> dict:
    """{model name: {"decode_ms": {...}, "prefill_ms": {...}, ...}} of the `cpu` type of a cluster
    YAML (fragment) with gpu_types: {cpu: {profiles: {...}}}."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    prof = ((data.get("gpu_types") or {}).get("cpu") or {}).get("profiles") or {}
    if not prof:
        raise RuntimeError(f"{path}: no gpu_types.cpu.profiles")
    return prof


TABLES = ("decode_ms", "prefill_ms", "lm_head_ms", "allreduce_ms")   # the median of the runs' figures


def get_profile(ckpt: str, threads: int, context: int, tmp: str, saved: str | None, runs: int = 3,
                tp: int = 1, lone: bool = False, batches: str | None = None, runs_out: list | None = None) -> dict:
    """This model's tables ({decode_ms, prefill_ms, lm_head_ms, call_ms}; at ``tp`` 2 also
    allreduce_ms, allreduce_tp) for workers of ``threads`` torch threads (plan one's worker has 2, the others'
    1: the same layer is slower): ``runs`` runs of `hexplan profile`, the median of each point
    (the mean of two; ``combined_runs``); or the saved ones (``--profile``). ``runs_out``, if
    given, gets each run's own tables.

    Not the smallest: this host's speed drifts both ways over minutes (a 32-token prompt took
    5.6 to 7.0 ms a layer in twelve runs), the loads are served at its usual speed, and with
    each point's fastest run the steps with a prompt chunk came out 20% above the model in
    service (docs/fidelity.md, "Steps with a prompt chunk")."""
    name = Path(ckpt).name
    if saved:
        if saved.endswith(".json"):
            data = json.loads(Path(saved).read_text())
            p = _get(data["by_threads"], threads)
        else:
            p = read_profile(Path(saved))
        return p.get(name) or next(iter(p.values()))
    tables = []
    for k in range(runs):
        log(f"profiling {name} with {threads} thread(s) at TP {tp}{' (lone)' if lone and tp == 1 else ''}, "
            f"run {k + 1}/{runs}")
        p = run_profile(ckpt, threads, context, Path(tmp) / f"profile-{threads}t-tp{tp}-{k}{'-lone' * lone}.yaml", tp,
                        lone, batches)
        tables.append(p.get(name) or next(iter(p.values())))
    for t in tables:
        log("  run: " + "; ".join(f"{k} {t[k]}" for k in TABLES + ("call_ms",) if k in t))
    if runs_out is not None:
        runs_out.extend(tables)
    return combined_runs(tables)


def combined_runs(tables: list) -> dict:
    """One profile from the tables of several `hexplan profile` runs: the median of each point
    (the mean of the middle two of an even count); a served step's layers and call from the
    same run(s)."""
    out: dict = {}
    for kind in TABLES:
        if kind in tables[0]:
            keys = tables[0][kind].keys()
            out[kind] = {x: statistics.median(t[kind][x] for t in tables) for x in keys}
    if all("call_ms" in t for t in tables):
        # a served step splits into its layers and the call's own cost: take both from the run
        # (or the two runs, averaged) whose step (PROFILE_LAYERS layers + call) was the median at
        # that batch, not each's own median, which would pair one run's layers with another's call
        out["call_ms"] = {}
        for x in tables[0]["call_ms"]:
            ranked = sorted(tables, key=lambda t: PROFILE_LAYERS * t["decode_ms"][x] + t["call_ms"][x])
            mid = ranked[(len(ranked) - 1) // 2:len(ranked) // 2 + 1]
            out["decode_ms"][x] = statistics.mean(t["decode_ms"][x] for t in mid)
            out["call_ms"][x] = statistics.mean(t["call_ms"][x] for t in mid)
    if "allreduce_tp" in tables[0]:
        out["allreduce_tp"] = tables[0]["allreduce_tp"]
    return out


def _table(d: dict) -> ProfileTable:
    return ProfileTable(tuple(sorted((float(k), float(v)) for k, v in d.items())))


TP_TABLES = ("decode_ms", "prefill_ms")   # the layer tables a TP-2 group gets its own of


def tp_own_tables(served: dict, lone1: dict, lone2: dict) -> dict:
    """A TP-2 group's own tables (``by_tp: {2: ...}``): the served TP-1 table at each of its
    points times what a lone `hexplan profile --tp 2` (compute x 2) measured over a lone
    `hexplan profile --tp 1` beside it (``lone1``, ``lone2``: their tables, interpolated). The
    served tables carry what a served step costs beyond a lone one, which the lone runs do not;
    the lone pair, measured the same way back to back, carries what TP 2 loses to splitting a
    layer (on this CPU 1.0-1.5x the TP-1 compute, not the cost model's perfect halving)."""
    out = {}
    for kind in TP_TABLES:
        t1, t2 = _table(lone1[kind]), _table(lone2[kind])
        out[kind] = {x: round(float(v) * t2.ms(float(x)) / t1.ms(float(x)), 4) for x, v in served[kind].items()}
    return out


def with_tp_tables(tables: dict, ckpt: str, threads: int, context: int, tmp: str, saved: str | None,
                   lone: dict) -> dict:
    """``tables`` (a TP-1 profile) with, from a `hexplan profile --tp 2` run at ``threads`` per rank
    between two lone TP-1 runs on the same grid: the all-reduce table, and the TP-2 group's own
    tables (``tp_own_tables`` over the lone runs, TP-1's the mean of the two). The lone tables go
    into ``lone`` (the --json's ``meta.tp_lone``, for --resimulate --tp-tables). Unchanged when
    they have both already or ``saved`` lacks them (then the ring formula and the TP-1 tables /
    2 stand in)."""
    if "allreduce_ms" in tables and "by_tp" in tables:
        return tables
    if saved:
        log("  the saved profile has no allreduce_ms or by_tp: TP stages get the ring formula or the TP-1 tables / 2")
        return tables
    lone1, lone2, tp2 = lone_tp_runs(ckpt, threads, context, tmp)
    lone.update(tp1=lone1, tp2=lone2)
    own = tp_own_tables(tables, lone1, lone2)
    log("  TP-2 compute x 2 over TP-1, lone runs: " + "; ".join(
        f"{k} " + ", ".join(f"{x}: {own[k][x] / float(tables[k][x]):.2f}" for x in tables[k]) for k in TP_TABLES))
    return {**tables, "allreduce_ms": tp2["allreduce_ms"], "allreduce_tp": tp2["allreduce_tp"], "by_tp": {2: own}}


def lone_tp_runs(ckpt: str, threads: int, context: int, tmp: str) -> tuple[dict, dict, dict]:
    """A lone `hexplan profile --tp 2` run between two lone `--tp 1` runs on the same grid: the
    TP-1 tables (the mean of the two), the TP-2 ones, and the TP-2 run's whole profile."""
    grid = ",".join(map(str, list(range(1, 17)) + [32, 64]))
    runs = [get_profile(ckpt, threads, context, tmp, None, runs=1, tp=tp, lone=True, batches=grid) for tp in (1, 2, 1)]
    lone1 = {k: {x: statistics.mean(float(_get(r[k], x)) for r in (runs[0], runs[2])) for x in runs[0][k]}
             for k in TP_TABLES}
    return lone1, {k: runs[1][k] for k in TP_TABLES}, runs[1]


# ---- the host's contention ---------------------------------------------------------------------------

def _contention_worker(ckpt: str, batch: int, layers: int, seconds: float, timed: bool, go, on, out) -> None:
    """One 1-thread process running decode steps of ``batch`` sequences on ``layers`` layers (the
    stage's own forward, as a worker runs it) from ``go`` for ``seconds``. ``timed``: step
    continuously and put [(ms, whether ``on`` was set all through the step)]; else step only
    while ``on`` is set (the other process's company)."""
    torch.set_num_threads(1)
    from hexplan.executor.distributed import TPContext
    from hexplan.executor.model import SeqCache, SeqChunk, ShardSpec, StageModel
    m = StageModel.load(ckpt, ShardSpec(0, layers, False, False), TPContext(0, 1))
    kv, hd, ctx = MODEL["num_key_value_heads"], MODEL["hidden_size"] // MODEL["num_attention_heads"], 171
    ids = []
    for i in range(batch):
        c = SeqCache(layers, kv, hd, torch.float32, "cpu")
        c.reserve(ctx + 1)
        c.k.normal_()
        c.v.normal_()
        c.length = ctx
        m.caches[f"s{i}"] = c
        ids.append(f"s{i}")
    chunks, x = [SeqChunk(r, ctx, 1) for r in ids], torch.randn(batch, MODEL["hidden_size"])
    go.wait()
    end = time.monotonic() + seconds
    ts = []
    while time.monotonic() < end:
        if not timed and not on.wait(timeout=0.05):
            continue
        for r in ids:
            m.caches[r].length = ctx
        before = on.is_set()
        t = time.perf_counter()
        m.forward_batch(chunks, x)
        ts.append(((time.perf_counter() - t) * 1e3, before, on.is_set()))
    # the steps wholly inside one kind of phase: (ms, the other process stepping beside it)
    out.put([(ms, a) for ms, a, b in ts[3:] if a == b] if timed else [])


def measure_contention(ckpt: str, batch: int = 8, layers: int = 6, cycles: int = 10, phase_s: float = 0.6) -> dict:
    """The host's ``contention`` (docs/cluster-format.md, "Shared machines"): how much slower a
    1-thread decode step is while another 1-thread process runs the same steps on the other core
    than alone. One process steps all the time; the other steps in alternate phases of
    ``phase_s`` (``cycles`` of each), so slow drifts of a shared host hit both sides alike. The
    ratio of the medians of the steps wholly inside each kind of phase, less 1."""
    import multiprocessing as mp
    spawn = mp.get_context("spawn")
    out, go, on = spawn.Queue(), spawn.Event(), spawn.Event()
    seconds = 2 * cycles * phase_s + 1.0
    ps = [spawn.Process(target=_contention_worker, args=(ckpt, batch, layers, seconds, timed, go, on, out),
                        daemon=True) for timed in (True, False)]
    for p in ps:
        p.start()
    time.sleep(8)          # loaded, caches filled
    go.set()
    time.sleep(0.5)        # warm-up steps, alone
    for _ in range(cycles):
        on.set()
        time.sleep(phase_s)
        on.clear()
        time.sleep(phase_s)
    rows = [r for _ in ps for r in out.get(timeout=180)]
    for p in ps:
        p.join(timeout=30)
    alone = [ms for ms, both in rows if not both]
    together = [ms for ms, both in rows if both]
    if len(alone) < 5 or len(together) < 5:
        raise RuntimeError(f"contention: too few steps ({len(alone)} alone, {len(together)} together)")
    a, b = statistics.median(alone), statistics.median(together)
    return {"batch": batch, "layers": layers, "alone_ms": round(a, 3), "alone_steps": len(alone),
            "together_ms": round(b, 3), "together_steps": len(together), "contention": max(0.0, b / a - 1.0)}


# ---- cluster and plans -----------------------------------------------------------------------------

def base_cluster_dict(model_name: str, tables: dict, host: dict | None = None) -> dict:
    """cluster_specs/local-cpu.yaml with the `cpu` type carrying this model's profile; with
    ``host`` ({cores, contention}), its two nodes on one shared machine (`hosts: {local: ...}`)."""
    d = yaml.safe_load(LOCAL_CPU.read_text())
    for n in d["nodes"]:
        n.pop("address", None)
        if host:
            n["host"] = "local"
    if host:
        d["hosts"] = {"local": dict(host)}
    d["name"] = "local-cpu-fidelity"
    d["gpu_types"] = {"cpu": {"profiles": {model_name: tables}}}
    return d


def calibrated_cluster_dict(base: dict, stages, cal: dict) -> dict:
    """The same cluster with the terms measured in service as cluster fields (``cal``, see
    ``calibrate_terms``):

    * a coordinator node "gw" (the gateway; no stage on it) whose links to cpu0 and cpu1 each
      have half the measured fixed cost of a step as latency (a step crosses both, in and out);
    * the `cpu` type's decode table replaced by the one measured as served (``decode_table``,
      ms per layer at TP 1 against batch). Its LM head and all-reduce tables stay the profile's;
    * with two loops measured at once (``overlap_probe``): ``hop_s`` more latency on every link
      (the cost of a hop between processes busy computing), and the host's ``contention`` as
      the stages' compute showed it beside each other in service."""
    d = json.loads(json.dumps(base))
    d["nodes"].append({"name": "gw", "gpu": "cpu", "count": 1})
    d["coordinator"] = "gw"
    links = d["network"].setdefault("links", [])
    half = max(0.0, cal["fixed_s"]) / 2
    hop = max(0.0, cal.get("hop_s", 0.0))
    base_lat = make_cluster(base).default_link.latency
    for n in ("cpu0", "cpu1"):
        links.append({"between": ["gw", n], "bandwidth": "10Gbps", "latency": f"{(half + hop) * 1e3:.4f}ms"})
    if hop:
        links.append({"between": ["cpu0", "cpu1"], "bandwidth": "10Gbps", "latency": f"{(base_lat + hop) * 1e3:.4f}ms"})
    if cal.get("contention") is not None and d.get("hosts"):
        for h in d["hosts"].values():
            h["contention"] = round(cal["contention"], 4)
    cpu = d["gpu_types"]["cpu"]
    if cal.get("decode_table"):
        for tables in cpu["profiles"].values():
            for own in (tables.get("by_tp") or {}).values():   # a TP degree's own table keeps its ratio to TP 1's
                if "decode_ms" in own:
                    own["decode_ms"] = {b: v * tp_decode_ratio(tables, own, b) for b, v in cal["decode_table"].items()}
            tables["decode_ms"] = dict(cal["decode_table"])
    return d


def tp_decode_ratio(tables: dict, own: dict | None, batch) -> float:
    """A TP degree's own decode table (``own``, from by_tp) over the profile's TP-1 one at
    ``batch`` (1 without one)."""
    if not own or "decode_ms" not in own:
        return 1.0
    return _table(own["decode_ms"]).ms(float(batch)) / _table(tables["decode_ms"]).ms(float(batch))


def make_cluster(d: dict):
    return cluster_from_dict(d, Locator(None, {}))


def plan_for(ckpt: str, stages, workload: dict, cost_params: dict | None = None):
    st = [{"node": n, "gpus": list(range(tp)), "tp": tp, "layers": [a, b]} for n, tp, a, b in stages]
    asm = {"workload": workload}
    if cost_params:
        asm["cost_params"] = cost_params
    return plan_from_dict({"model": ckpt, "pipelines": [{"weight": 1.0, "stages": st}], "assumptions": asm})


def plan_workload(reqs: list, stages) -> dict:
    """As executor_bench writes it: mean prompt and output of the trace, micro-batches of 16, one
    micro-batch per stage in flight."""
    return {"prompt_tokens": round(statistics.mean(len(r["prompt"]) for r in reqs)),
            "output_tokens": round(statistics.mean(r["output_len"] for r in reqs)),
            "batch_size": 16, "concurrency": 16 * len(stages)}


# ---- predicted --------------------------------------------------------------------------------------

def predict(plan, cluster) -> dict:
    asm = plan_assumptions(plan)
    m = evaluate_plan_pipelines(cluster, CostCache(plan.model, asm.workload, asm.params), plan.pipelines)[0]
    return {"capacity_tokens_per_s": m.throughput, "tpot_s": m.tpot_s, "ttft_s": m.ttft_s,
            "bottleneck": m.bottleneck, "round_s": m.round_s, "stage_capacity": list(m.stage_capacity)}


def capacity_requests(plan, cluster) -> float:
    """Predicted requests/s: hexplan.simulator.run.capacity_rate with outputs uniform 16..128."""
    from hexplan.simulator.run import capacity_rate
    from hexplan.simulator.workload import WorkloadSpec

    spec = WorkloadSpec(rate=1.0, duration=1.0, prompt_len=f"{PROMPT_RANGE[0]}-{PROMPT_RANGE[1]}",
                        output_len=f"{OUTPUT_RANGE[0]}-{OUTPUT_RANGE[1]}")
    return capacity_rate(plan, cluster, spec)


def predicted_cell(pred: dict, offered_tokens_per_s: float | None) -> dict:
    cap = pred["capacity_tokens_per_s"]
    tput = cap if offered_tokens_per_s is None else min(offered_tokens_per_s, cap)
    return {"tokens_per_s": tput, "ttft_p50_s": pred["ttft_s"], "ttft_p90_s": pred["ttft_s"],
            "tpot_p50_s": pred["tpot_s"]}


# ---- simulated ----------------------------------------------------------------------------------------

def simulate_trace(plan, cluster, reqs: list) -> dict:
    """hexplan.simulate on the trace until every request finished: with arrivals spread out the
    simulation stops at its duration, so the duration is bisected to the makespan (the run whose
    window ends at the last token), which makes its window the gateway's (first arrival to last
    token)."""
    import hexplan
    from hexplan.simulator.workload import TraceRequest, WorkloadSpec

    trace = tuple(TraceRequest(r["arrival"], len(r["prompt"]), r["output_len"]) for r in reqs)
    n = len(trace)
    last = max(t.arrival_s for t in trace)

    def run(duration):
        spec = WorkloadSpec(arrival="trace", trace=trace, duration=duration, warmup=0.0, trace_name="fidelity")
        return hexplan.simulate(plan, cluster, spec, seed=0)

    if last == 0:
        res = run(None)
        span = res.window_s[1] - res.window_s[0]
    else:
        hi = last + 10.0
        res = run(hi)
        while res.requests_completed < n:
            hi *= 2
            res = run(hi)
        lo = last
        while hi - lo > max(1e-4, 1e-5 * hi):
            mid = (lo + hi) / 2
            r = run(mid)
            if r.requests_completed < n:
                lo = mid
            else:
                hi, res = mid, r
        span = hi
    if res.requests_completed != n:
        raise RuntimeError(f"simulated {res.requests_completed} of {n} requests")
    ttft = sorted(res.samples["ttft_s"])
    tpot = sorted(res.samples["tpot_s"])
    tokens = sum(t.output_tokens for t in trace)
    per = [None] * n                       # request by request, in the trace's order: [TTFT, TPOT or None]
    for r, f, e in zip(res.samples["request"], res.samples["ttft_s"], res.samples["e2e_s"]):
        o = trace[r].output_tokens
        per[r] = [f, (e - f) / (o - 1) if o > 1 else None]
    return {"tokens_per_s": tokens / span, "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
            "tpot_p50_s": percentile(tpot, 50), "makespan_s": span, "steps": res.steps,
            "stage_utilisation": [list(u) for u in res.stage_utilisation], "per_request": per}


# ---- measured -------------------------------------------------------------------------------------

def instrument(gateway, t0_ref: list) -> list:
    """Record every gateway step as (start s, seconds, decode sequences, decode context sum,
    prefill chunk tokens, logits rows, [[chunk start, tokens, prompt tokens, last]]), wrapping
    the step runner's ``run(step)``."""
    runner = gateway.runner
    orig = runner.run
    steps: list = []

    def timed(step, *args, **kwargs):          # (step[, epoch]: whatever the runner passes)
        prompt = gateway.scheduler.prompt
        chunks = [[c[1], c[2], prompt[c[0]], bool(c[3])] for c in step.prefill]
        t = time.perf_counter()
        ok = orig(step, *args, **kwargs)
        steps.append((t - t0_ref[0], time.perf_counter() - t, len(step.decode), step.decode_context,
                      [c[2] for c in step.prefill], step.logits, chunks))
        return ok
    runner.run = timed
    return steps


OVERLAP_BATCH = 8
OVERLAP_STEPS = 30


def overlap_probe(addrs: list, prompt: int, vocab: int, seed: int, token: str, logdir: str, step_model) -> dict:
    """Decode steps of ``OVERLAP_BATCH`` sequences straight to the first stage, one loop and then
    two loops at once (two clients), matched to the stages' compute (HEXPLAN_STEP_LOG,
    ``step_breakdown``): each stage's compute alone and beside the other loop, the share of it
    that overlapped another stage's, and the hops per step (the step less compute and queueing)."""
    import threading

    def run(loops: int) -> dict:
        stamps: list = [[] for _ in range(loops)]
        # the loops differ by a sequence, so a forward's size tells its loop
        sizes = [OVERLAP_BATCH + i for i in range(loops)]
        seqs = [decode_sequence(prompt, OVERLAP_STEPS, sizes[i], f"ov{loops}-{i}", 512) for i in range(loops)]
        ts = [threading.Thread(target=time_rpc, args=(addrs[0], addrs[1:], seqs[i], vocab, seed + i, token, stamps[i]))
              for i in range(loops)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ctx = prompt + OVERLAP_STEPS / 2
        steps = sorted((t, d, n, n * ctx, [], n) for st, n in zip(stamps, sizes) for t, d in st[5:])
        return step_breakdown(steps, 0.0, read_step_logs(logdir), step_model)
    return {"one_loop": run(1), "two_loops": run(2)}


def read_step_logs(logdir: str) -> dict:
    """The stage workers' compute log (HEXPLAN_STEP_LOG): {stage id: [(start, end, tokens,
    arrived)]} (arrived: when the Forward call came in; None in a log from before it was
    written), rank 0 of each stage, in time order."""
    out: dict = {}
    for f in sorted(Path(logdir).glob("s.*")):
        sid = f.name.split(".")[1]
        rows = []
        for line in f.read_text().splitlines():
            v = [float(x) for x in line.split()]
            if v:
                rows.append((v[0], v[1], v[2], v[4] if len(v) > 4 else None))
        out.setdefault(sid, []).extend(rows)
    return {k: sorted(v) for k, v in sorted(out.items())}


def cell_step_logs(logs: dict, t0: float, steps: list) -> dict:
    """The stage workers' compute log rows inside one load's steps, on the steps' clock (seconds
    from the load's start): {stage id: [[start, end, tokens, arrived]]}, kept in ``--json`` so
    that the steps can be split again later (``step_breakdown(steps, 0.0, ...)``)."""
    if not steps:
        return {}
    end = t0 + max(s[0] + s[1] for s in steps) + 1.0
    return {k: [[round(a - t0, 6), round(b - t0, 6), n, None if r is None else round(r - t0, 6)]
                for a, b, n, r in v if t0 - 1.0 <= a <= end] for k, v in logs.items()}


def saved_step_logs(detail: dict) -> dict:
    """A saved cell's ``meas_detail`` step logs as ``read_step_logs`` gives them (tuples)."""
    return {k: [tuple(r) for r in v] for k, v in detail["step_logs"].items()}


def stage_model_s(plan, cluster, batch: int, context: float, params=None) -> list:
    """The profile's time of a decode step of ``batch`` sequences at ``context`` on each stage
    of the plan's pipeline, alone (no host slowdown, no links): its layers (all-reduces
    included) and, on the last, the LM head: what a worker's step log times (the call's own
    cost, ``call_time``, is outside it, in the hops). ``params``: the plan's cost parameters unless given."""
    p = params or plan_assumptions(plan).params
    stages = plan.pipelines[0].stages
    out = []
    for i, s in enumerate(stages):
        node = cluster.node(s.node)
        t = s.num_layers * decode_layer_time(plan.model, node.gpu, s.tp, batch, context, node.interconnect, p)
        if i == len(stages) - 1:
            t += lm_head_time(plan.model, node.gpu, s.tp, batch, p)
        out.append(t)
    return out


def step_rows(steps: list, t0: float, logs: dict, step_model=None) -> list:
    """Each gateway step (``instrument``'s rows) matched to its compute on every stage of the
    first pipeline (the first forward of its tokens inside the step, HEXPLAN_STEP_LOG), split in
    time order into, per stage: ``to`` (from the step's start, or the last stage's compute end,
    to the Forward call's arrival: the gateway's or the stage's sending, gRPC, the hop), ``queued``
    (after arrival, the time that stage computed another loop's step), ``inside`` (the rest
    between arrival and compute: decoding the request, waking the compute thread), ``compute``
    and ``overlap`` (the share of the compute during which another stage computed too); then
    ``back`` (from the last compute's end to the step's end: the logits' way back, sampling).
    Steps not found on every stage are left out. Times in seconds; each row also has ``t``,
    ``step``, ``decode`` (sequences), ``context`` (their summed context) and ``chunks`` (prompt
    chunk tokens); with ``step_model`` (``StepModel``), each stage's ``model`` (its modelled
    compute, seconds) where the step has the detail for it."""
    import bisect

    sids = [k for k in logs if k.startswith("p0s")]
    starts = {k: [r[0] for r in logs[k]] for k in sids}

    def busy_in(k, a, b, skip):
        v, i, tot = logs[k], max(0, bisect.bisect_left(starts[k], a) - 1), 0.0
        while i < len(v) and v[i][0] < b:
            if v[i][0] != skip:
                tot += max(0.0, min(b, v[i][1]) - max(a, v[i][0]))
            i += 1
        return tot

    rows = []
    for s in steps:
        a, b = t0 + s[0], t0 + s[0] + s[1]
        tokens = s[2] + sum(s[4])
        found = []
        for k in sids:
            v, i = logs[k], bisect.bisect_left(starts[k], a)
            while i < len(v) and v[i][0] < b and not (int(v[i][2]) == tokens and v[i][1] <= b + 1e-3):
                i += 1
            if i < len(v) and v[i][0] < b:
                found.append((k, v[i]))
        if len(found) != len(sids):
            continue
        prev = a
        stages = {}
        for k, row in found:
            c0, c1 = row[0], row[1]
            arrived = prev if len(row) < 4 or row[3] is None else min(c0, max(prev, row[3]))   # (older logs: none)
            q = busy_in(k, arrived, c0, c0)
            stages[k] = {"to": arrived - prev, "queued": q, "inside": max(0.0, c0 - arrived - q), "compute": c1 - c0,
                         "overlap": sum(busy_in(o, c0, c1, -1.0) for o in sids if o != k) / max(1e-9, c1 - c0)}
            prev = c1
        model = step_model(s) if step_model is not None else None
        if model is not None:
            for k, (m, _) in zip(sids, model):
                stages[k]["model"] = m
        rows.append({"t": s[0], "step": s[1], "decode": s[2], "context": s[3], "chunks": list(s[4]),
                     "stages": stages, "back": b - prev})
    return rows


class StepModel:
    """The simulator's time for a measured step (an ``instrument`` row) on each stage of the
    plan's first pipeline, alone (``Engine.step_service``; no queue, no shared host): [(the
    stage's time less its call's own cost, which the workers' step log leaves out (it lies in
    the hops), the call)], seconds; None for a row without its chunks' detail (older runs)."""

    def __init__(self, plan, cluster):
        from hexplan.simulator.engine import Engine
        asm = plan_assumptions(plan)
        self.engine = Engine(plan, cluster, asm.workload, asm.params)

    def __call__(self, row) -> list | None:
        from hexplan.serving.step import Step
        detail = row[6] if len(row) > 6 else []
        if len(detail) != len(row[4]):
            return None
        n = row[2]
        chunks = tuple((n + j, c[0], c[1], c[3]) for j, c in enumerate(detail))
        prompts = [0] * n + [c[2] for c in detail]
        step = Step(0, 0, decode=tuple(range(n)), prefill=chunks, decode_context=row[3], logits=row[5])
        return [(t - call, call) for t, call in self.engine.step_service(step, prompts)]


def step_kind(decode: int, chunks: list) -> str:
    """A step's kind for grouping: "D<n>" (n sequences decoding, 6 and more as "D6+") or, with
    a prompt chunk, "P<n>" (n sequences decoding beside it)."""
    n = f"{decode}" if decode < 6 else "6+"
    return ("P" if chunks else "D") + n


def step_kinds_table(rows: list) -> str:
    """``step_rows`` by kind of step (``step_kind``): how many, the median step, and the means
    of each part of it (ms): per stage the hop to it, the wait for the other loop, the rest
    before its compute, its compute; the way back."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(step_kind(r["decode"], r["chunks"]), []).append(r)
    if not groups:
        return ""
    sids = list(rows[0]["stages"])
    head = " | ".join(f"{k}: to / queued / inside / compute" for k in sids)
    lines = [f"| kind | steps | step ms (median) | {head} | back ms | per stage: compute / model |",
             "|---|---|---|" + "---|" * len(sids) + "---|---|"]

    def order(k):
        return (k[0] == "P", int(k[1:].rstrip("+")))
    for kind in sorted(groups, key=order):
        g = groups[kind]
        parts = []
        for k in sids:
            parts.append(" / ".join(f"{statistics.mean(r['stages'][k][part] for r in g) * 1e3:.1f}"
                                    for part in ("to", "queued", "inside", "compute")))
        lines.append(f"| {kind} | {len(g)} | {statistics.median(r['step'] for r in g) * 1e3:.1f} | "
                     + " | ".join(parts) + f" | {statistics.mean(r['back'] for r in g) * 1e3:.1f} | "
                     + " / ".join(_ratio_text(_model_ratio(g, k)) for k in sids) + " |")
    return "\n".join(lines)


def _model_ratio(rows: list, stage: str) -> float | None:
    """Summed compute over summed model of ``rows`` on ``stage``; None without a model."""
    m = [(r["stages"][stage]["compute"], r["stages"][stage]["model"]) for r in rows if "model" in r["stages"][stage]]
    total = sum(x[1] for x in m)
    return sum(x[0] for x in m) / total if m and total > 0 else None


def _ratio_text(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def step_breakdown(steps: list, t0: float, logs: dict, step_model=None) -> dict:
    """Where the gateway's steps' time went (``step_rows``): means over the steps matched, ms,
    of each stage's compute, its wait for a stage busy with another loop's step, and the rest
    (hops: gRPC, serialisation, waking threads; the gateway's own work); ``overlap``: the share
    of each stage's compute during which another stage of the plan computed too. With
    ``step_model`` (``StepModel``): ``vs_model_decode_STAGE`` and ``vs_model_prompt_STAGE``, the
    stage's summed compute over the simulator's summed time for the same steps alone, for the
    steps without and with a prompt chunk."""
    sids = [k for k in logs if k.startswith("p0s")]
    acc = {"step": [], "hops": [], **{f"compute_{k}": [] for k in sids}, **{f"queued_{k}": [] for k in sids},
           **{f"overlap_{k}": [] for k in sids}}
    rows = step_rows(steps, t0, logs, step_model)
    for r in rows:
        st = r["stages"]
        rest = r["step"]
        for k in sids:
            acc[f"compute_{k}"].append(st[k]["compute"])
            acc[f"queued_{k}"].append(st[k]["queued"])
            acc[f"overlap_{k}"].append(st[k]["overlap"])
            rest -= st[k]["compute"] + st[k]["queued"]
        acc["step"].append(r["step"])
        acc["hops"].append(rest)
    n = len(rows)
    out = {"steps": len(steps), "matched": n}
    if n:
        out.update({k: statistics.mean(v) * (1.0 if k.startswith("overlap") else 1e3) for k, v in acc.items()})
        for name, g in (("decode", [r for r in rows if not r["chunks"]]), ("prompt", [r for r in rows if r["chunks"]])):
            for k in sids:
                ratio = _model_ratio(g, k)
                if ratio is not None:
                    out[f"vs_model_{name}_{k}"] = ratio
    return out


def tree_cpu_s(pids: dict) -> dict:
    """CPU seconds (user + system) of each process in ``pids`` ({name: pid}) with all its
    descendants, from one pass over /proc (0 where there is no /proc): a node executor and the
    stage workers it started."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    kids: dict = {}
    cpu: dict = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(d))
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    out = {}
    for name, pid in pids.items():
        total, todo = 0.0, [pid]
        while todo:
            p = todo.pop()
            total += cpu.get(p, 0.0)
            todo.extend(kids.get(p, ()))
        out[name] = total
    return out


def cpu_snapshot(launch) -> dict:
    """CPU seconds so far: this process (the gateway and the replaying clients) and each node's
    process tree (its stage workers)."""
    return {"gateway": time.process_time(),
            **tree_cpu_s({n: launch.node_process(n).pid for n in launch.nodes})}


def cpu_used(before: dict, after: dict, wall: float) -> dict:
    """Cores busy on average over ``wall`` seconds, per process group, from two snapshots."""
    return {k: (after[k] - before[k]) / wall for k in before}


def uninstrument(gateway) -> None:
    if "run" in vars(gateway.runner):
        del gateway.runner.run


def schedule_of(gateway) -> dict:
    """The schedule the gateway chose for pipeline 0 (hexplan.serving.setup)."""
    c = gateway.scheduler.configs[0]
    return {k: getattr(c, k) for k in ("loops", "batch", "concurrency", "chunk", "whole", "kv_tokens")}


def measured_cell(records: list) -> dict:
    wall = max(r["end"] for r in records)
    ttft = sorted(r["ttft"] for r in records)
    tpot = sorted(r["tpot"] for r in records if not math.isnan(r["tpot"]))
    return {"tokens_per_s": sum(r["tokens"] for r in records) / wall, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90), "tpot_p50_s": percentile(tpot, 50), "makespan_s": wall}


def probe(address: str, batch: int, prompt_len: int, out_len: int, vocab: int, seed: int) -> float:
    """Median gap between tokens of ``batch`` sequences decoding together (same prompt length,
    all at t = 0): one decode step of ``batch`` through the whole launched pipeline, gateway and
    gRPC included. Gaps of the steps that also prefill a prompt are the upper ones; the median
    of the second half of each stream is pure decode."""
    import random

    rng = random.Random(seed)
    reqs = [{"id": f"probe{batch}-{j}", "arrival": 0.0, "prompt": [rng.randrange(vocab) for _ in range(prompt_len)],
             "output_len": out_len} for j in range(batch)]
    recs = replay(address, reqs, f"probe x{batch}")
    gaps = [g for r in recs for g in r["gaps"][len(r["gaps"]) // 2:]]
    return statistics.median(gaps)


def model_step_s(plan, cluster, batch: int, context: float, params=None) -> float:
    """The simulator's time for one decode step of ``batch`` sequences at ``context`` through
    the plan's pipeline, no queueing: every stage's layers (and all-reduces) and call (the
    profile's ``call_ms``), LM head, links in and out and between stages (latency + bytes), as
    hexplan/simulator/engine.py adds them up."""
    from hexplan.costmodel import TOKEN_ID_BYTES, send_time

    model = plan.model
    stages = plan.pipelines[0].stages
    coord = cluster.coordinator_node.name
    hops = [(coord, stages[0].node)] + [(a.node, b.node) for a, b in zip(stages, stages[1:])] + [(stages[-1].node, coord)]
    t = 0.0
    for i, (a, b) in enumerate(hops):
        lk = cluster.link(a, b)
        nbytes = (batch * model.activation_bytes_per_token if 0 < i < len(hops) - 1 else batch * TOKEN_ID_BYTES)
        t += send_time(nbytes, lk.bandwidth, lk.latency)
    calls = sum(call_time(model, cluster.node(s.node).gpu, batch) for s in stages)
    return t + calls + sum(stage_model_s(plan, cluster, batch, context, params))


def run_plan_measured(name: str, ckpt: str, stages, plan, loads: dict, probes: bool, vocab: int,
                      seed: int, probe_prompt: int = 128, step_model=None) -> dict:
    """One Launch of the plan; every load's trace served in turn; the probe steps first."""
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    workers = sum(tp for _, tp, _, _ in stages)
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(1)
    out: dict = {"workers": workers, "threads_per_worker": threads, "cells": {}, "probe": {}}
    t = time.perf_counter()
    logdir = tempfile.mkdtemp(prefix="hexplan-steplog-")
    os.environ["HEXPLAN_STEP_LOG"] = os.path.join(logdir, "s")   # the workers' compute (worker.open_step_log)
    try:
        launch = Launch(plan, ckpt, listen="127.0.0.1:0", threads=threads)
    finally:
        del os.environ["HEXPLAN_STEP_LOG"]
    with launch as L:
        out["launch_s"] = time.perf_counter() - t
        gw = L.gateway
        sched = schedule_of(gw)
        out["schedule"] = sched
        log(f"  {name}: launched {workers} worker(s) x {threads} thread(s) in {out['launch_s']:.1f} s; "
            f"schedule {sched}")
        generate(L.address, token_ids=list(range(1, 9)), max_new_tokens=4, timeout=300)   # warm-up
        out["calibration_gflops"] = calibrate(os.cpu_count() or 1, 0.5)
        addrs = list(gw.pipelines[0].stages)
        if probes:
            # decode steps sent straight to the first stage worker (compute, gRPC, hops,
            # all-reduces, the logits back; no gateway): the served decode table
            out["rpc"] = served_steps(addrs, PROBE_BATCHES, probe_prompt, vocab, seed, L.auth_token, "rpc")
            # two loops of decode steps at once, straight to the first stage: each stage's compute
            # beside the other's (and the gRPC work of the other loop) against one loop alone
            out["overlap"] = overlap_probe(addrs, probe_prompt, vocab, seed, L.auth_token, logdir, step_model)
            log(f"  {name}: two loops at once: " + json.dumps(out["overlap"]))
            # the same through the gateway (sampling, streaming, scheduler)
            for b in (1, 16):
                out["probe"][b] = probe(L.address, b, probe_prompt, 24 if b == 1 else 32, vocab, seed + b)
            log(f"  {name}: decode step ms straight to the first stage "
                + ", ".join(f"x{b} {v * 1e3:.1f}" for b, v in out["rpc"].items())
                + "; through the gateway " + ", ".join(f"x{b} {v * 1e3:.1f}" for b, v in out["probe"].items()))
        for load, reqs in loads.items():
            log(f"  {name} {load}: {len(reqs)} requests over {reqs[-1]['arrival']:.1f} s")
            t0_ref = [0.0]
            steps = instrument(gw, t0_ref)
            cpu0, w0 = cpu_snapshot(L), time.perf_counter()
            recs = replay(L.address, reqs, f"{name} {load}", t0_ref)
            cores = cpu_used(cpu0, cpu_snapshot(L), time.perf_counter() - w0)
            uninstrument(gw)
            cell = measured_cell(recs)
            cell["cores_busy"] = cores
            cell["per_request"] = [{k: v for k, v in r.items() if k != "gaps"} for r in recs]
            cell["steps"] = steps
            logs = read_step_logs(logdir)
            cell["breakdown"] = step_breakdown(steps, t0_ref[0], logs, step_model)
            cell["step_logs"] = cell_step_logs(logs, t0_ref[0], steps)
            if probes:   # the same served steps again: how fast the host ran around this load (host_speeds)
                cell["rpc_after"] = served_steps(addrs, DRIFT_BATCHES, probe_prompt, vocab, seed, L.auth_token,
                                                 f"drift-{load}")
            out["cells"][load] = cell
            log(f"  {name} {load}: {cell['tokens_per_s']:.1f} tokens/s, TTFT P50 {cell['ttft_p50_s']:.2f} s, "
                f"TPOT P50 {cell['tpot_p50_s'] * 1e3:.0f} ms, makespan {cell['makespan_s']:.1f} s; cores busy "
                + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
        out["calibration_after_gflops"] = calibrate(os.cpu_count() or 1, 0.5)
    shutil.rmtree(logdir, ignore_errors=True)
    return out


def served_steps(addrs: list, batches, prompt: int, vocab: int, seed: int, token: str, tag: str) -> dict:
    """Seconds per decode step of B sequences sent straight to the first stage (the median of
    the last 20 of 25), for each B of ``batches``."""
    return {b: statistics.median(time_rpc(addrs[0], addrs[1:], decode_sequence(prompt, 25, b, f"{tag}{b}", 512),
                                          vocab, seed, token)[5:]) for b in batches}


# ---- measured terms the profile leaves out -----------------------------------------------------------

DRIFT_BATCHES = (1, 8)


def host_speeds(run: dict, cells: dict) -> dict:
    """How slow the host ran around each load against when the plan was calibrated: per load,
    the served decode steps just before it and just after it (their mean; before the first load,
    the probe at launch ``run["rpc"]``; after each, ``rpc_after``) over the probe at launch, the
    geometric mean over ``DRIFT_BATCHES``. 1.2: the host ran the same steps 20% slower around
    that load. Loads without the probes (a run saved before them) are left out."""
    launch = {int(k): v for k, v in (run.get("rpc") or {}).items()}
    before, out = launch, {}
    for load, _ in LOADS:
        after = cells.get(load, {}).get("meas", {}).get("rpc_after")
        if not after or not launch:
            break
        after = {int(k): v for k, v in after.items()}
        bs = [b for b in after if b in before and b in launch]
        if not bs:
            break
        out[load] = math.exp(statistics.mean(math.log((before[b] + after[b]) / 2 / launch[b]) for b in bs))
        before = after
    return out


def at_speed(d: dict, speed: float) -> dict:
    """A cluster dict whose `cpu` profile tables (every ``*_ms`` table, a TP degree's own ones
    included) are ``speed`` times as long: the host running that much slower."""
    d = json.loads(json.dumps(d))
    for tables in d["gpu_types"]["cpu"]["profiles"].values():
        for t in [tables] + list((tables.get("by_tp") or {}).values()):
            for k, v in t.items():
                if k.endswith("_ms") and isinstance(v, dict):
                    t[k] = {b: x * speed for b, x in v.items()}
    return d


def calibrated_sims(pr: dict, cal: dict, plan, loads: dict, drift: bool = False) -> None:
    """``sim+cal`` of every load's trace (``loads``): the calibrated plan and cluster
    (``calibrate_terms``); with ``drift``, at the host's speed around that load (``host_speeds``,
    recorded in the cell as ``host_speed``). Off by default: on the development VM the 1-2 s
    probes around a load sample the host's second-to-second noise, and ``sim+cal`` at their
    speeds met the target no more often than without (docs/fidelity.md, session 33)."""
    speeds = host_speeds(pr.get("measured_run", {}), pr["cells"]) if drift else {}
    for load, trace in loads.items():
        c = pr["cells"][load]
        f = speeds.get(load)
        c.pop("host_speed", None)
        if f is not None:
            c["host_speed"] = f
        d = cal["cluster"] if f is None else at_speed(cal["cluster"], f)
        c["sim+cal"] = simulate_trace(plan, make_cluster(d), trace)


def around_tables(pr: dict) -> dict:
    """The profile of a plan whose runs were taken both before and after its loads
    (``pr["profile_runs"]``, ``--around``): ``combined_runs`` over all of them, so its moments
    bracket the loads it times. A TP stage's own tables (``by_tp``) take the lone TP-1 / TP-2 runs
    before the loads (``pr["tp_lone"]``) and, where taken, after them (``pr["tp_lone_after"]``),
    each table the mean of the two (``tp_own_tables``); the all-reduce table stays the profile's
    before."""
    runs = pr["profile_runs"]
    tables = combined_runs(list(runs["before"]) + list(runs["after"]))
    prof = pr.get("profile", {})
    for k in ("allreduce_ms", "allreduce_tp"):
        if k in prof:
            tables[k] = prof[k]
    lone = pr.get("tp_lone")
    if lone and "by_tp" in prof:
        if pr.get("tp_lone_after"):
            lone = pooled([lone, pr["tp_lone_after"]])
        tables["by_tp"] = {2: tp_own_tables(tables, lone["tp1"], lone["tp2"])}
    return tables


def with_profile_tables(d: dict, tables: dict) -> dict:
    """A copy of cluster dict ``d`` whose `cpu` type has ``tables`` for its (one) model."""
    out = json.loads(json.dumps(d))
    profiles = out["gpu_types"]["cpu"]["profiles"]
    profiles[next(iter(profiles))] = tables
    return out


def around_sims(pr: dict, plan, loads: dict) -> None:
    """``sim@loads`` of every load's trace (``loads``): the simulator on the plan's cluster timed
    by ``around_tables``. Nothing when the plan has no runs after its loads."""
    if not pr.get("profile_runs", {}).get("after"):
        return
    pr["profile_around"] = tables = around_tables(pr)
    cluster = make_cluster(with_profile_tables(pr["cluster"], tables))
    for load, trace in loads.items():
        pr["cells"][load]["sim@loads"] = simulate_trace(plan, cluster, trace)


def around_rows(results: dict, batches=(1, 4, 16)) -> list:
    """Table rows, per plan with runs after its loads (``--around``) and per batch in
    ``batches``: the served step of each profile run (``PROFILE_LAYERS`` layers and the call, ms)
    before the loads and after them, and the median after over the median before."""
    rows = []
    for p, pr in results.items():
        runs = pr.get("profile_runs", {})
        if not runs.get("after"):
            continue
        for b in batches:
            step = {when: [PROFILE_LAYERS * float(_get(t["decode_ms"], b)) + float(_get(t.get("call_ms", {b: 0}), b))
                           for t in runs[when]] for when in ("before", "after")}
            rows.append(f"| {p} | {b} | " + " | ".join(", ".join(f"{v:.1f}" for v in step[w]) for w in ("before", "after"))
                        + f" | {statistics.median(step['after']) / statistics.median(step['before']):.2f} |")
    return rows


# ---- report -------------------------------------------------------------------------------------------

METRICS = (("tokens_per_s", "tok/s", 1.0, "{:.1f}"), ("ttft_p50_s", "TTFT P50 s", 1.0, "{:.2f}"),
           ("ttft_p90_s", "TTFT P90 s", 1.0, "{:.2f}"), ("tpot_p50_s", "TPOT P50 ms", 1e3, "{:.0f}"))
CHECKED = ("tokens_per_s", "ttft_p50_s", "tpot_p50_s")


def err(sim: float, meas: float) -> float:
    return (sim - meas) / meas if meas else math.nan


def within(cell: dict, source: str) -> bool:
    """Whether ``source`` is within TARGET of the measurement on every CHECKED figure of ``cell``."""
    return all(abs(err(cell[source][k], cell["meas"][k])) <= TARGET for k in CHECKED)


def table(results: dict, sources) -> str:
    head = "| plan | load | offered req/s |"
    sep = "|---|---|---|"
    for _, label, _, _ in METRICS:
        head += f" {label} ({' / '.join(sources)}) |"
        sep += "---|"
    for s in sources[1:-1]:
        head += f" {s} vs meas (tok/s, TTFT50, TPOT50) |"
        sep += "---|"
    lines = [head, sep]
    for pname, pr in results.items():
        for load, c in pr["cells"].items():
            row = f"| {pname} | {load} | {c['offered_rate']:.2f} |" if c["offered_rate"] else f"| {pname} | {load} | burst (5 ms apart) |"
            for key, _, scale, fmt in METRICS:
                row += " " + " / ".join(fmt.format(c[s][key] * scale) if s in c else "-" for s in sources) + " |"
            for s in sources[1:-1]:
                if s in c and "meas" in c:
                    es = [err(c[s][k], c["meas"][k]) for k in CHECKED]
                    row += " " + ", ".join(f"{e * 100:+.0f}%" + ("" if abs(e) <= TARGET else "!") for e in es) + " |"
                else:
                    row += " - |"
            lines.append(row)
    return "\n".join(lines)


def calibrate_terms(pr: dict, ckpt: str) -> dict:
    """Terms measured in service, beyond the profile, and the calibrated cluster they give:

    1. The decode table as served: decode steps of B sequences sent straight to the launched
       plan's first stage (``rpc``), minus what the model adds besides the layers' compute (the
       profile's LM head, all-reduces and calls, links), over the plan's layers (sum of layers / tp):
       per layer at TP 1. The prefill table stays the profile's (mixed steps match it).
    2. The gateway's own cost per step (through the gateway minus straight to the stage, one
       sequence): half of it as latency on each coordinator link."""
    cal: dict = {"fixed_s": 0.0}
    cost_params: dict = {}
    run = pr.get("measured_run", {})
    rpc = {int(k): v for k, v in (run.get("rpc") or {}).items()}
    gwp = {int(k): v for k, v in (run.get("probe") or {}).items()}
    plan = plan_for(ckpt, pr["stages"], pr["workload"], cost_params or None)
    out: dict = {"cost_params": cost_params}
    if rpc:
        cluster = make_cluster(calibrated_cluster_dict(pr["cluster"], pr["stages"], cal))
        tables = next(iter(pr["cluster"]["gpu_types"]["cpu"]["profiles"].values()))
        by_tp = tables.get("by_tp") or {}
        ctx = probe_prompt_for(pr["workload"]) + 15
        table, rows = {}, []
        prof = _table(pr["profile"]["decode_ms"])
        for b, meas in sorted(rpc.items()):
            # the plan's layers at TP 1's table: a TP-d stage's own table is TP 1's times its ratio
            span = sum((hi - lo) / tp * tp_decode_ratio(tables, by_tp.get(tp, by_tp.get(str(tp))), b)
                       for _, tp, lo, hi in pr["stages"])
            # the model's step with a zero decode table: LM head, all-reduces, links (the profile's)
            zero = dict(cal, decode_table={b: 1e-6})
            rest = model_step_s(plan, make_cluster(calibrated_cluster_dict(pr["cluster"], pr["stages"], zero)), b, ctx)
            table[b] = round(max(1e-3, (meas - rest) * 1e3 / span), 4)
            rows.append({"batch": b, "rpc_ms": meas * 1e3, "model_ms": model_step_s(plan, cluster, b, ctx) * 1e3,
                         "non_layer_ms": rest * 1e3, "profile_ms_per_layer": prof.ms(b),
                         "served_ms_per_layer": table[b]})
        cal["decode_table"] = table
        if 1 in gwp and 1 in rpc:
            cal["fixed_s"] = max(0.0, gwp[1] - rpc[1])
        cal.update(served_host_terms(run.get("overlap"), pr["stages"], pr["cluster"]))
        out["probe"] = {"rows": rows, "gateway_ms": {b: v * 1e3 for b, v in gwp.items()},
                        "fixed_ms": cal["fixed_s"] * 1e3}
    d = calibrated_cluster_dict(pr["cluster"], pr["stages"], cal)
    out["terms"] = cal
    out["cluster"] = d
    return out, plan, make_cluster(d)


def served_host_terms(ov: dict | None, stages, cluster: dict) -> dict:
    """From ``overlap_probe``: ``hop_s``, what the hops of a step with two loops in flight add to
    a lone step's, over the links the model has (one each way and one between stages:
    ``len(stages) + 1``), as latency on each; and, on a plan of 1-worker stages only, the
    host's ``contention``, from each stage's compute beside the other loop against alone: its
    slowdown over the time it overlapped, less what ``Host.slowdown`` gives it for sharing the
    cores, per other worker on the host. Beside a TP stage none is taken: what a 1-worker stage
    loses there is not a per-worker cost the TP ranks pay too (they show none beyond the cores'
    sharing: docs/fidelity.md, "A lone worker beside a TP group")."""
    if not ov or not ov.get("two_loops", {}).get("matched") or not ov.get("one_loop", {}).get("matched"):
        return {}
    one, two = ov["one_loop"], ov["two_loops"]
    # the hops of a lone step are in the served decode table already (the probe's step less the
    # model's compute): what two loops add, per link, on top of the links' own latency
    out = {"hop_s": max(0.0, (two["hops"] - one["hops"]) / 1e3 / (len(stages) + 1))}
    workers = len(stages)
    if not cluster.get("hosts") or workers < 2 or any(tp > 1 for _, tp, _, _ in stages):
        return out
    cores = next(iter(cluster["hosts"].values()))["cores"]
    threads = max(1, cores // workers)
    shared = Host("probe", cores, 0.0).slowdown((1, threads, 1.0), ((1, threads, 1.0),) * (workers - 1))
    cs = []
    for i in range(workers):
        k = f"p0s{i}"
        share = two.get(f"overlap_{k}", 0.0)
        if share >= 0.3 and one.get(f"compute_{k}"):
            full = 1.0 + (two[f"compute_{k}"] / one[f"compute_{k}"] - 1.0) / share   # all through beside the others
            cs.append((full / shared - 1.0) / (workers - 1))
    if cs:
        out["contention"] = max(0.0, statistics.mean(cs))
    return out


PROBE_BATCHES = (1, 2, 4, 8, 12, 16)


def probe_prompt_for(workload: dict) -> int:
    """Prompt of the probe steps: their decode steps (25, the median at +15) then attend to about
    the workload's mean decode context, P + (O + 1) / 2, where the profile is measured too."""
    return max(16, round(workload["prompt_tokens"] + (workload["output_tokens"] + 1) / 2) - 15)
def wait_quiet(limit_s: float, gflops: float, cores: int, what: str) -> float:
    """This host is shared: wait up to ``limit_s`` seconds until a 0.5 s matmul reaches ``gflops``
    (someone else's job would slow every number here). Returns the last reading."""
    g = calibrate(cores, 0.5)
    deadline = time.monotonic() + limit_s
    told = False
    while g < gflops and time.monotonic() < deadline:
        if not told:
            log(f"  the host is busy ({g:.0f} GFLOPS < {gflops:.0f}): waiting up to {limit_s:.0f} s before {what}")
            told = True
        time.sleep(10)
        g = calibrate(cores, 0.5)
    if g < gflops:
        log(f"  warning: still busy ({g:.0f} GFLOPS) at {what}; its numbers are slowed")
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="one,pp2,tp2pp", help="comma-separated plans: one, pp2, tp2pp")
    ap.add_argument("--quick", action="store_true", help="plan `one` only, 12 Poisson and 16 saturated requests")
    ap.add_argument("--requests", type=int, default=None, help="requests per Poisson load (default 32; 12 quick)")
    ap.add_argument("--saturated", type=int, default=None, help="requests of the saturated load (default 64; 16 quick)")
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--profile", help="reuse a profile: a cluster YAML from `hexplan profile`, or a --json file of an "
                                      "earlier run (its profiles per thread count)")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the measured terms and the sim+cal column")
    ap.add_argument("--lone-profile", action="store_true",
                    help="profile decode in the profiling process (`hexplan profile` without --served), as before")
    ap.add_argument("--no-measure", action="store_true", help="predicted and simulated only (no Launch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of a saved --json file")
    ap.add_argument("--resimulate", metavar="JSON",
                    help="simulate the traces of a saved --json run again with this checkout's simulator (its "
                         "clusters, profiles and measured terms; needs --checkpoint for the model) and print the "
                         "tables against the run's measurements")
    ap.add_argument("--tp-tables", nargs=2, metavar=("TP1.yaml", "TP2.yaml"),
                    help="with --resimulate: a lone `hexplan profile --tp 1` and a `--tp 2` one (same grid, back to "
                         "back) that give a run without them its TP-2 group's own tables (tp_own_tables)")
    ap.add_argument("--no-tp-tables", action="store_true",
                    help="with --resimulate: drop the runs' TP-2 group tables (by_tp), charging the TP-2 stage the "
                         "TP-1 tables / 2 as before they were measured")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="print the medians over saved --json runs (alternate their plan order with --only), the "
                         "measurement's own spread between runs and the target judged on the medians")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before the profile and each plan, wait up to S seconds for the shared host to be quiet "
                         "(a 0.5 s matmul at --quiet-gflops)")
    ap.add_argument("--quiet-gflops", type=float, default=120.0)
    ap.add_argument("--contention", type=float, default=None, metavar="F",
                    help="the host's contention for the simulator (default: measured: a 1-thread decode step "
                         "with another process stepping beside it, against alone; 0 with --no-host)")
    ap.add_argument("--no-host", action="store_true",
                    help="simulate cpu0 and cpu1 as separate machines (no `hosts`), as before; with "
                         "--resimulate, predict and simulate a saved run's traces that way")
    ap.add_argument("--drift", action="store_true",
                    help="with --resimulate: sim+cal of each load at the host's speed measured around it "
                         "(host_speeds), not at the speed of the plan's calibration")
    ap.add_argument("--around", type=int, default=0, metavar="N",
                    help="after each plan's loads, N more `hexplan profile` runs; `sim@loads` is the simulator "
                         "timed by all the plan's runs, before and after its loads (the loads' rates stay the "
                         "profile before's). Not with --profile")
    ap.add_argument("--pool", metavar="JSON", nargs="+",
                    help="with --resimulate: time each plan by the pointwise median of the profiles it was given "
                         "in these saved runs (the run itself among them or not), not by its own")
    ap.add_argument("--rates-from", metavar="JSON",
                    help="offer each plan's Poisson loads at the rates of a saved --json run (the same seed and "
                         "request counts: the same traces), not at 30%% and 70%% of this run's predicted capacity; "
                         "runs that share their traces measure the measurement's own repeatability (--combine)")
    ap.add_argument("--kinds", metavar="JSON", nargs="+",
                    help="only print, for every plan and load of saved --json runs, the measured steps by kind "
                         "(step_kinds_table: each stage's hop, queue and compute; compute over the simulator's "
                         "time for the same step), then each plan's stages over all the runs and loads "
                         "(kinds_summary_table); needs --checkpoint")
    args = ap.parse_args()
    global SERVED_PROFILE
    SERVED_PROFILE = not args.lone_profile
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["meta"], saved["results"])
        return 0
    if args.combine:
        combine([json.loads(Path(f).read_text()) for f in args.combine], args.combine)
        return 0
    if args.kinds:
        if not args.checkpoint:
            ap.error("--kinds needs --checkpoint (the benchmark model's folder)")
        print_kinds([json.loads(Path(f).read_text())["results"] for f in args.kinds], args.checkpoint, args.kinds)
        return 0
    if args.around < 0:
        ap.error(f"--around: {args.around} runs; give 0 or more")
    if args.around and (args.profile or args.no_measure):
        ap.error("--around profiles again after the loads: not with --profile or --no-measure")
    if args.pool and not args.resimulate:
        ap.error("--pool goes with --resimulate")
    rates_from = None
    if args.rates_from:
        if args.resimulate:
            ap.error("--rates-from sets a new run's loads: --resimulate keeps the saved run's traces")
        try:
            rates_from = saved_rates(json.loads(Path(args.rates_from).read_text()), args.seed,
                                     args.requests or (12 if args.quick else 32))
        except (OSError, ValueError) as e:
            ap.error(f"--rates-from {args.rates_from}: {e}")
        except KeyError as e:
            ap.error(f"--rates-from {args.rates_from}: not a --json run of this bench (no {e})")
    if args.resimulate:
        if not args.checkpoint:
            ap.error("--resimulate needs --checkpoint (the benchmark model's folder)")
        if args.tp_tables and args.no_tp_tables:
            ap.error("--tp-tables and --no-tp-tables contradict each other")
        saved = json.loads(Path(args.resimulate).read_text())
        tp_tables = None
        if args.tp_tables:
            tp_tables = tuple(lifted(next(iter(read_profile(Path(f)).values())), tp)
                              for f, tp in zip(args.tp_tables, (1, 2)))
        pool = [json.loads(Path(f).read_text())["results"] for f in args.pool or ()]
        resimulate(saved["results"], args.checkpoint, tp_tables, args.no_tp_tables, args.no_host, args.drift, pool)
        if any("profile_around" in pr for pr in saved["results"].values()) and "sim@loads" not in saved["meta"]["sources"]:
            saved["meta"]["sources"].insert(2, "sim@loads")
        if args.no_host:
            saved["meta"].pop("host", None)
        report(saved["meta"], saved["results"])
        if args.json:
            Path(args.json).write_text(json.dumps(saved, indent=1))
        return 0

    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    only = ["one"] if args.quick else [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in only if p not in PLANS]
    if bad:
        ap.error(f"--only: unknown plan(s) {', '.join(bad)}; use {', '.join(PLANS)}")
    n_poisson = args.requests or (12 if args.quick else 32)
    n_sat = args.saturated or (16 if args.quick else 64)
    cores = os.cpu_count() or 1
    calibrating = not args.no_calibrate and not args.no_measure
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.executable).name] + sys.argv),
            "cores": cores, "torch": torch.__version__, "python": platform.python_version(), "n_poisson": n_poisson,
            "n_saturated": n_sat, "seed": args.seed, "rates_from": args.rates_from,
            "sources": ["pred", "sim"] + (["sim@loads"] if args.around else []) + (["sim+cal"] if calibrating else [])
            + ([] if args.no_measure else ["meas"])}
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="hexplan-fidelity-")
    results: dict = {}
    try:
        ckpt = benchmark_checkpoint(args.checkpoint, tmp.name)
        model_name = Path(ckpt).name
        vocab = MODEL["vocab_size"]
        sat = make_workload(n_sat, PROMPT_RANGE, OUTPUT_RANGE, vocab, args.seed, None)
        for i, r in enumerate(sat):   # one order for the gateway and the simulator (SAT_SPACING_S)
            r["arrival"] = i * SAT_SPACING_S
        w0 = plan_workload(sat, [None])
        context = round(w0["prompt_tokens"] + (w0["output_tokens"] + 1) / 2)
        meta["calibration_gflops_start"] = wait_quiet(args.wait_quiet, args.quiet_gflops, cores, "the start")
        host = None
        if not args.no_host:
            if args.contention is None:
                log("measuring the host's contention (a 1-thread decode step with another process stepping beside it, and alone)")
                meta["contention"] = measure_contention(ckpt)
                log(f"  alone {meta['contention']['alone_ms']} ms, together {meta['contention']['together_ms']} ms: "
                    f"contention {meta['contention']['contention']:.3f}")
            host = {"cores": cores, "contention": round(meta["contention"]["contention"], 4)
                    if args.contention is None else args.contention}
            meta["host"] = host
        profiles: dict = {}
        before_runs: dict = {}   # per thread count: the runs of the profile last taken (--around)
        for pname in only:
            label, stages = PLANS[pname]
            threads = max(1, cores // sum(tp for _, tp, _, _ in stages))
            if not args.no_measure:
                wait_quiet(args.wait_quiet, args.quiet_gflops, cores, f"plan {pname}")
            # profiled just before the plan runs: the host's speed drifts as others use it
            if threads not in profiles or not args.no_measure:
                before_runs[threads] = []
                profiles[threads] = get_profile(ckpt, threads, context, tmp.name, args.profile,
                                                runs_out=before_runs[threads])
            lone = None
            if any(tp > 1 for _, tp, _, _ in stages):
                lone = meta.setdefault("tp_lone", {}).setdefault(threads, {})
                profiles[threads] = with_tp_tables(profiles[threads], ckpt, threads, context, tmp.name, args.profile,
                                                   lone)
            log(f"[{pname}] profile, {threads} thread(s): " + "; ".join(
                f"{k} {profiles[threads][k]}" for k in TABLES + ("call_ms", "by_tp") if k in profiles[threads]))
            results[pname] = run_plan(pname, label, stages, ckpt, model_name, profiles, sat, n_poisson, args,
                                      cores, vocab, calibrating, host, before_runs.get(threads), lone, context,
                                      tmp.name, (rates_from or {}).get(pname))
            log(f"[{pname}] done at {time.perf_counter() - t_all:.0f} s")
    finally:
        tmp.cleanup()
    meta["total_s"] = time.perf_counter() - t_all
    report(meta, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "by_threads": {t: {model_name: p} for t, p in
                                                                            profiles.items()},
                                               "results": results}, indent=1, default=str))
        # (by_threads: the last profile per thread count, for --profile FILE.json)
        log(f"wrote {args.json}")
    return 0


def saved_rates(run: dict, seed: int, n_poisson: int) -> dict:
    """{plan: {load: requests/s}} of a saved run's Poisson loads, for --rates-from: the same seed
    and request count make the same traces. ValueError where they differ (a run saved before
    the seed was kept ran the default, 0)."""
    meta = run["meta"]
    if meta.get("seed", 0) != seed:
        raise ValueError(f"seed {meta.get('seed', 0)} there, {seed} here")
    if meta["n_poisson"] != n_poisson:
        raise ValueError(f"{meta['n_poisson']} requests per Poisson load there, {n_poisson} here (--requests)")
    return {pname: {load: c["offered_rate"] for load, c in pr["cells"].items() if c.get("offered_rate")}
            for pname, pr in run["results"].items()}


def load_rates(cap_rate: float, rates: dict | None = None) -> dict:
    """{load: requests/s} of a plan's loads: each Poisson load a share of the capacity predicted
    here (LOADS), or the saved run's rate for it (``rates``, --rates-from); saturated None."""
    return {load: (rates or {}).get(load, share * cap_rate) if share else None for load, share in LOADS}


def run_plan(pname, label, stages, ckpt, model_name, profiles, sat, n_poisson, args, cores, vocab,
             calibrating, host=None, before_runs=None, lone=None, context=None, tmp=None,
             rates: dict | None = None) -> dict:
    workers = sum(tp for _, tp, _, _ in stages)
    threads = max(1, cores // workers)
    workload = plan_workload(sat, stages)
    base = base_cluster_dict(model_name, profiles[threads], host)
    pr_profile = profiles[threads]
    cluster = make_cluster(base)
    plan = plan_for(ckpt, stages, workload)
    pred = predict(plan, cluster)
    cap_rate = capacity_requests(plan, cluster)
    log(f"[{pname}] {label}: predicted {pred['capacity_tokens_per_s']:.1f} tokens/s ({pred['bottleneck']}), "
        f"{cap_rate:.3f} requests/s, TTFT {pred['ttft_s']:.3f} s, TPOT {pred['tpot_s'] * 1e3:.1f} ms; workload {workload}")
    offered = load_rates(cap_rate, rates)
    if args.rates_from and not rates:
        log(f"[{pname}] {args.rates_from} has no {pname}: its Poisson loads are shares of this capacity")
    if rates:
        log(f"[{pname}] Poisson loads at the saved run's rates: " + ", ".join(
            f"{load} {r:.3f} requests/s ({r / cap_rate:.0%} of this capacity)" for load, r in offered.items() if r))
    loads = {}
    for li, (load, share) in enumerate(LOADS):
        loads[load] = sat if share is None else make_workload(n_poisson, PROMPT_RANGE, OUTPUT_RANGE, vocab,
                                                              args.seed + 1000 * (li + 1), offered[load])
    pr: dict = {"label": label, "stages": stages, "workload": workload, "threads_per_worker": threads,
                "predicted": pred, "capacity_requests_per_s": cap_rate, "cluster": base, "profile": pr_profile,
                "cells": {}}
    mean_out = statistics.mean(r["output_len"] for r in sat)
    for load, share in LOADS:
        rate = offered[load]
        pr["cells"][load] = {"offered_rate": rate, "requests": len(loads[load]),
                             "pred": predicted_cell(pred, rate * mean_out if rate else None),
                             "sim": simulate_trace(plan, cluster, loads[load])}
    if args.no_measure:
        return pr
    probe_prompt = probe_prompt_for(workload)
    m = run_plan_measured(pname, ckpt, stages, plan, loads, calibrating, vocab, args.seed, probe_prompt,
                          StepModel(plan, cluster))
    pr["measured_run"] = {k: v for k, v in m.items() if k != "cells"}
    for load, c in m["cells"].items():
        pr["cells"][load]["meas"] = {k: v for k, v in c.items() if k not in ("per_request", "steps", "step_logs")}
        pr["cells"][load]["meas_detail"] = {"per_request": c["per_request"], "steps": c["steps"],
                                            "step_logs": c["step_logs"]}
    if args.around and before_runs:
        # the same profile again once the loads are served: with the runs taken before them, a
        # profile whose moments bracket the loads (`sim@loads`; the loads' rates stay the ones
        # the profile before gave)
        log(f"[{pname}] profiling again after the loads ({args.around} run(s))")
        after: list = []
        get_profile(ckpt, threads, context, tmp, None, runs=args.around, runs_out=after)
        pr["profile_runs"] = {"before": before_runs, "after": after}
        if lone:
            pr["tp_lone"] = lone
            lone1, lone2, _ = lone_tp_runs(ckpt, threads, context, tmp)   # the lone TP trio again too
            pr["tp_lone_after"] = {"tp1": lone1, "tp2": lone2}
        around_sims(pr, plan, loads)
    if calibrating:
        try:
            cal, cplan, ccluster = calibrate_terms(pr, ckpt)
        except Exception as e:   # noqa: BLE001 - keep the measured cells
            log(f"[{pname}] calibration failed: {type(e).__name__}: {e}")
            return pr
        pr["calibration"] = cal
        cpred = predict(cplan, ccluster)
        pr["predicted_calibrated"] = cpred
        log(f"[{pname}] calibrated: {cal.get('probe')}; terms {cal['terms']}, cost params {cal['cost_params']}; "
            f"predicted {cpred['capacity_tokens_per_s']:.1f} tokens/s ({cpred['bottleneck']}), TTFT "
            f"{cpred['ttft_s']:.3f} s, TPOT {cpred['tpot_s'] * 1e3:.1f} ms")
        calibrated_sims(pr, cal, cplan, loads)
    return pr


def by_arrival(recs: list) -> list:
    """Measured requests in the order of the trace the simulator runs (``saved_trace``, ``paired``)."""
    return sorted(recs, key=lambda r: (r["arrival"], r["id"]))


def saved_trace(cell: dict) -> list:
    """A measured cell's trace as the simulator takes it: every request's arrival, prompt length
    and output tokens, in arrival order."""
    recs = by_arrival(cell["meas_detail"]["per_request"])
    return [{"arrival": r["arrival"], "prompt": [0] * r["prompt_len"], "output_len": r["tokens"]} for r in recs]


def print_kinds(runs: list, ckpt: str, names: list | None = None) -> None:
    """Each saved run's cells' measured steps by kind (``step_kinds_table``), beside the
    simulator's time for each step alone (``StepModel``, this checkout's), then, per plan, its
    stages over all the runs and loads (``kinds_summary_table``), on stdout. ``runs``: saved
    runs' ``results``."""
    everything: dict = {}
    for i, results in enumerate(runs):
        name = names[i] if names else f"run {i + 1}"
        for pname, pr in results.items():
            model = StepModel(plan_for(ckpt, pr["stages"], pr["workload"]), make_cluster(pr["cluster"]))
            for load, c in pr["cells"].items():
                md = c.get("meas_detail") or {}
                if not md.get("step_logs"):
                    log(f"[{name} {pname} {load}] no step logs saved (a run before they were kept)")
                    continue
                rows = step_rows(md["steps"], 0.0, saved_step_logs(md), model)
                everything.setdefault(pname, []).extend(rows)
                print(f"\n{name}: {pname} {load}: {len(rows)} of {len(md['steps'])} steps matched; ms (means; the "
                      "step's median), per stage: the hop to it, the wait for the other loop, the rest before its "
                      "compute, its compute; then the way back\n")
                print(step_kinds_table(rows))
                if not md.get("per_request"):
                    continue
                ended, rest = ending_back(rows, md["per_request"])
                print("\nThe way back, ms (mean, steps): " + "; ".join(
                    f"{what} {statistics.mean(v) * 1e3:.1f} ({len(v)}), {sum(v):.2f} s in all" if v else f"{what} - (0)"
                    for what, v in (("steps in which a request ended", ended), ("the others", rest))))
    for pname, rows in everything.items():
        print(f"\n{pname}, {len(runs)} run(s), every load: each stage's compute over the simulator's time for the "
              "same steps, by kind\n")
        print(kinds_summary_table(rows))
        print(f"\n{pname}, {len(runs)} run(s), every load: each stage's compute over the simulator's time for the "
              "same steps alone, by how much of it another stage computed too\n")
        print(overlap_table(rows))


def ending_back(rows: list, requests: list) -> tuple[list, list]:
    """``step_rows``' way back (``back``, seconds) of the steps in which a request ended (a
    request's end, as its client saw it, between the last stage's compute end and 10 ms after
    the step's end: the stream ends after the step's release) and of the others."""
    import bisect

    ends = sorted(r["end"] for r in requests)
    ended, rest = [], []
    for r in rows:
        e = r["t"] + r["step"]
        i = bisect.bisect_left(ends, e - r["back"])
        (ended if i < len(ends) and ends[i] <= e + 0.01 else rest).append(r["back"])
    return ended, rest


KIND_BUCKETS = ((1, 3), (4, 8), (9, None))   # decodes in a step: 1-3, 4-8, 9 and more


def _bucket(prefix: str, lo: int, hi: int | None) -> str:
    return f"{prefix}{lo}-{hi}" if hi else f"{prefix}{lo}+"


def kinds_summary_table(rows: list) -> str:
    """``step_rows`` with a model (``StepModel``), per stage: summed compute over summed
    simulated time of decode steps (``D``) and of steps with a prompt chunk (``P``) by the
    decodes in them (``KIND_BUCKETS``), and of steps of prompts alone. A step kind whose ratio
    differs from the stage's decode steps is a term the model gets wrong for it."""
    if not rows:
        return ""
    sids = list(rows[0]["stages"])
    groups: dict = {}
    for r in rows:
        n = r["decode"]
        if n == 0:
            name = "prompts"
        else:
            name = next(_bucket("P" if r["chunks"] else "D", lo, hi) for lo, hi in KIND_BUCKETS
                        if n >= lo and (hi is None or n <= hi))
        groups.setdefault(name, []).append(r)
    names = ([_bucket("D", lo, hi) for lo, hi in KIND_BUCKETS] + ["prompts"]
             + [_bucket("P", lo, hi) for lo, hi in KIND_BUCKETS])
    head = " | ".join(f"{n} ({len(groups.get(n, []))})" for n in names)
    lines = [f"| stage | {head} |", "|---|" + "---|" * len(names)]
    for k in sids:
        lines.append(f"| {k} | " + " | ".join(_ratio_text(_model_ratio(groups.get(n, []), k)) for n in names) + " |")
    return "\n".join(lines)


OVERLAP_SPLIT = (0.1, 0.9)


def overlap_table(rows: list) -> str:
    """``step_rows`` with a model, per stage: summed compute over summed simulated time alone
    (``StepModel``: no shared host) of the steps another stage overlapped for under 10% of this
    stage's compute, for 10-90%, and for over 90%, with their counts. What the shared-host rule
    (``Host.slowdown``) should give a stage beside the others is the last over the first."""
    if not rows:
        return ""
    lo, hi = OVERLAP_SPLIT
    sids = list(rows[0]["stages"])
    lines = [f"| stage | overlapped < {lo:.0%} | {lo:.0%}-{hi:.0%} | > {hi:.0%} |", "|---|---|---|---|"]
    for k in sids:
        parts = [[r for r in rows if r["stages"][k]["overlap"] < lo],
                 [r for r in rows if lo <= r["stages"][k]["overlap"] <= hi],
                 [r for r in rows if r["stages"][k]["overlap"] > hi]]
        lines.append(f"| {k} | " + " | ".join(f"{_ratio_text(_model_ratio(g, k))} ({len(g)})" for g in parts) + " |")
    return "\n".join(lines)


def without_host(d: dict) -> dict:
    """A cluster dict with its nodes on separate machines: no ``hosts``, no node ``host``."""
    d = {k: v for k, v in d.items() if k != "hosts"}
    d["nodes"] = [{k: v for k, v in n.items() if k != "host"} for n in d.get("nodes", [])]
    return d


def pooled(values: list):
    """The pointwise median of profile tables (nested dicts of numbers, as ``by_tp``): each
    point present in all of ``values``; a field equal in all of them (``allreduce_tp``) kept."""
    v0 = values[0]
    if isinstance(v0, dict):
        keys = [k for k in v0 if all(k in v or str(k) in v for v in values)]
        return {k: pooled([_get(v, k) for v in values]) for k in keys}
    if all(v == v0 for v in values) or isinstance(v0, bool) or not isinstance(v0, (int, float)):
        return v0
    return statistics.median(values)


def plan_tables(pr: dict) -> dict:
    """The profile tables a saved plan's cluster gives its `cpu` type."""
    return next(iter(pr["cluster"]["gpu_types"]["cpu"]["profiles"].values()))


def pool_profiles(results: dict, pool: list[dict]) -> None:
    """Each plan of ``results`` timed by the pointwise median (``pooled``) of the profiles that
    plan was given in every run of ``pool`` (saved ``results``; the run itself among them or
    not): one profile taken over as long as the runs, in place of the three taken minutes
    before the plan's own loads. A plan no run of ``pool`` has keeps its own."""
    for pname, pr in results.items():
        tables = [plan_tables(run[pname]) for run in pool if pname in run]
        if not tables:
            continue
        merged = pooled(tables)
        tables = plan_tables(pr)
        tables.clear()
        tables.update(merged)
        pr["profile"] = json.loads(json.dumps(merged))
        log(f"[{pname}] profile: the median of {len([1 for run in pool if pname in run])} runs' profiles")


def resimulate(results: dict, ckpt: str, tp_tables: tuple[dict, dict] | None = None, drop_tp: bool = False,
               no_host: bool = False, drift: bool = False, pool: list[dict] | None = None) -> None:
    """``pred``, ``sim`` and ``sim+cal`` of a saved run again, on its clusters (profile, host) and
    its measured terms, with this checkout's cost model and simulator: a change to either checked
    against measurements already taken (a run on a shared host moves by up to 20% between hours).
    The traces stay the ones the run offered (their rates came from the run's own prediction).
    ``tp_tables``: (a lone TP-1 profile, a TP-2 one) giving a plan with a TP stage whose profile
    has no ``by_tp`` its TP-2 group's own tables (``tp_own_tables``), as a run now measures them;
    ``drop_tp``: without them (the TP-1 tables / 2, as before they were measured);
    ``no_host``: the plan's nodes on separate machines (the cluster without ``hosts``);
    ``drift``: ``sim+cal`` at the host's speed around each load where the run measured it;
    ``pool``: saved runs' ``results`` whose profiles, pooled, time the plans (``pool_profiles``)."""
    if pool:
        pool_profiles(results, pool)
    for pname, pr in results.items():
        if no_host:
            pr["cluster"] = without_host(pr["cluster"])
        tables = plan_tables(pr)
        if drop_tp:
            tables.pop("by_tp", None)
            pr.get("profile", {}).pop("by_tp", None)
        if tp_tables and any(tp > 1 for _, tp, _, _ in pr["stages"]) and "by_tp" not in tables:
            tables["by_tp"] = {2: tp_own_tables(tables, *tp_tables)}
            pr["profile"]["by_tp"] = tables["by_tp"]
            log(f"[{pname}] TP-2 group's own tables from --tp-tables: {tables['by_tp'][2]}")
        plan = plan_for(ckpt, pr["stages"], pr["workload"])
        cluster = make_cluster(pr["cluster"])
        pr["predicted"] = pred = predict(plan, cluster)
        cal = None
        if "calibration" in pr:
            cal, cplan, _ = calibrate_terms(pr, ckpt)
            pr["calibration"] = cal
        sat = pr["cells"].get("sat", {})
        mean_out = statistics.mean(r["output_len"] for r in saved_trace(sat)) if "meas_detail" in sat else None
        for load, c in pr["cells"].items():
            if "meas_detail" not in c:
                continue
            trace = saved_trace(c)
            offered = c.get("offered_rate")
            if offered is None or mean_out is not None:   # the offered tokens/s as run_plan reckons them
                c["pred"] = predicted_cell(pred, offered * mean_out if offered else None)
            c["sim"] = simulate_trace(plan, cluster, trace)
            md = c["meas_detail"]
            if md.get("step_logs"):   # the measured steps split again, beside this checkout's model
                c["meas"]["breakdown"] = step_breakdown(md["steps"], 0.0, saved_step_logs(md), StepModel(plan, cluster))
        traces = {load: saved_trace(c) for load, c in pr["cells"].items() if "meas_detail" in c}
        if cal is not None:
            calibrated_sims(pr, cal, cplan, traces, drift)
        around_sims(pr, plan, traces)
        log(f"[{pname}] predicted and simulated again" + (" without the shared host" if no_host else ""))


def _get(d: dict, k):
    """d[k] whether the key is k or, read back from JSON, str(k)."""
    return d[k] if k in d else d[str(k)]


def _median(x) -> float:
    """A median saved as a number, or the values of an older run."""
    return float(x) if isinstance(x, (int, float)) else statistics.median(x)


def breakdown_table(results: dict) -> str:
    """Where the measured steps' time went (``step_breakdown``), per plan and load."""
    lines = []
    for p, pr in results.items():
        for load, c in pr["cells"].items():
            b = c.get("meas", {}).get("breakdown")
            if not b or not b.get("matched"):
                continue
            sids = sorted(k[len("compute_"):] for k in b if k.startswith("compute_"))
            if not lines:
                lines = ["| plan | load | steps matched | step ms | per stage: compute ms (share overlapped) | "
                         "per stage: waiting for the other loop ms | hops and the rest ms | per stage: compute / "
                         "simulated, steps without a prompt chunk; with one |", "|---|---|---|---|---|---|---|---|"]
            lines.append(f"| {p} | {load} | {b['matched']} / {b['steps']} | {b['step']:.1f} | "
                         + " / ".join(f"{b['compute_' + k]:.1f} ({b['overlap_' + k]:.2f})" for k in sids) + " | "
                         + " / ".join(f"{b['queued_' + k]:.1f}" for k in sids) + f" | {b['hops']:.1f} | "
                         # (an older run has only its decode steps' served / profile, the same figure)
                         + "; ".join(" / ".join(_ratio_text(b.get(f"vs_model_{w}_{k}", b.get(f"served_vs_model_{k}")
                                                                  if w == "decode" else None)) for k in sids)
                                     for w in ("decode", "prompt")) + " |")
    return "\n".join(lines)


def capacity_rows(results: dict) -> list:
    """(plan, predicted capacity tokens/s, bottleneck, measured saturated tokens/s) per plan that
    was measured saturated."""
    out = []
    for p, pr in results.items():
        meas = pr["cells"].get("sat", {}).get("meas")
        if meas and pr.get("predicted"):
            out.append((p, pr["predicted"]["capacity_tokens_per_s"], pr["predicted"]["bottleneck"],
                        meas["tokens_per_s"]))
    return out


def report(meta: dict, results: dict) -> None:
    sources = meta["sources"]
    print(f"\nfidelity bench, started {meta['started']}; {meta['n_poisson']} Poisson requests per load, "
          f"{meta['n_saturated']} saturated; {meta['cores']} cores, torch {meta['torch']}; "
          f"{meta.get('total_s', 0):.0f} s in all\n")
    host = meta.get("host")
    if host:
        c = meta.get("contention")
        print(f"cpu0 and cpu1 simulated as one shared host: {host['cores']} cores, contention {host['contention']:.3f}"
              + (f" (measured: a 1-thread decode step of {c['batch']} on {c['layers']} layers, alone "
                 f"{_median(c['alone_ms']):.1f} ms, another process stepping beside it "
                 f"{_median(c['together_ms']):.1f} ms)" if c else " (given)") + "\n")
    print(table(results, sources))
    caps = capacity_rows(results)
    if caps:
        print("\nPredicted capacity against the measured saturated throughput (the loads' shares are of the "
              "prediction):\n\n| plan | predicted tokens/s | bottleneck | measured saturated | predicted / measured - 1 |"
              "\n|---|---|---|---|---|")
        for p, cap, neck, meas in caps:
            print(f"| {p} | {cap:.1f} | {neck} | {meas:.1f} | {(cap / meas - 1) * 100:+.0f}% |")
    speed_rows = [(p, pr, host_speeds(pr.get("measured_run", {}), pr["cells"])) for p, pr in results.items()]
    speed_rows = [r for r in speed_rows if r[2]]
    if speed_rows:
        print("\nThe host's speed around each load: decode steps of B sequences straight to the first stage "
              "(ms; at launch, then after each load), and the mean of those just before and after a load over "
              "those at launch (geometric mean over B; `--resimulate --drift` runs sim+cal of each load at it):\n")
        loads = [l for l, _ in LOADS]
        print("| plan | B | at launch | " + " | ".join(f"after {l}" for l in loads) + " | "
              + " | ".join(f"speed {l}" for l in loads) + " |\n|---|---|---|" + "---|" * (2 * len(loads)))
        for p, pr, speeds in speed_rows:
            launch = pr["measured_run"]["rpc"]
            after = [pr["cells"].get(l, {}).get("meas", {}).get("rpc_after") for l in loads]
            for i, b in enumerate(DRIFT_BATCHES):
                print(f"| {p} | {b} | {_get(launch, b) * 1e3:.1f} | "
                      + " | ".join("-" if a is None else f"{_get(a, b) * 1e3:.1f}" for a in after) + " | "
                      + " | ".join((f"{speeds[l]:.2f}" if i == 0 and l in speeds else "") for l in loads) + " |")
    rows = around_rows(results)
    if rows:
        print(f"\nThe profile before the loads and after them (--around): each run's served step ({PROFILE_LAYERS} "
              "layers and the call, ms) and the median after over the median before:\n\n"
              "| plan | B | before | after | after / before |\n|---|---|---|---|---|\n" + "\n".join(rows))
    rows = [(p, pr) for p, pr in results.items() if pr.get("calibration", {}).get("probe")]
    if rows:
        print("\nDecode steps of B sequences at the workload's mean decode context sent straight to the launched plan's first stage (served), against the "
              "model's step (the profile's layer, LM-head and all-reduce tables, links); per layer: the "
              "profile's ms and the served ms (the served step less LM head, all-reduces and links, over "
              "sum(layers / tp)); the gateway's own cost per step (through the gateway less straight to the "
              "stage, 1 sequence):\n")
        print("| plan | B | served step ms | model step ms | served / model | profile ms/layer | served ms/layer "
              "| through gateway ms |\n|---|---|---|---|---|---|---|---|")
        for p, pr in rows:
            c = pr["calibration"]["probe"]
            gw = c.get("gateway_ms", {})
            for r in c["rows"]:
                g = _get(gw, r["batch"]) if (r["batch"] in gw or str(r["batch"]) in gw) else None
                print(f"| {p} | {r['batch']} | {r['rpc_ms']:.1f} | {r['model_ms']:.1f} | "
                      f"{r['rpc_ms'] / r['model_ms']:.2f} | {float(r['profile_ms_per_layer']):.2f} | "
                      f"{r['served_ms_per_layer']:.2f} | " + (f"{g:.1f}" if g is not None else "-") + " |")
        for p, pr in rows:
            c = pr["calibration"]
            prof = pr.get("profile", {})
            head = {b: _get(prof["lm_head_ms"], b) for b in (1, 16)} if "lm_head_ms" in prof else \
                _get(meta.get("terms", {}).get("lm_head_ms", {}), pr["threads_per_worker"])   # (a run before the table)
            ar = prof.get("allreduce_ms") if any(tp > 1 for _, tp, _, _ in pr["stages"]) else None
            print(f"\n{p}: gateway cost per step {c['probe']['fixed_ms']:.1f} ms; LM head "
                  + ("(profile) " if "lm_head_ms" in prof else "(measured in process) ")
                  + ", ".join(f"x{b} {float(v):.1f} ms" for b, v in head.items())
                  + ("; all-reduce (profile, TP 2) " + ", ".join(f"x{b} {float(_get(ar, b)) * 1e3:.0f} us"
                                                                  for b in (1, 16)) if ar else ""))
    bt = breakdown_table(results)
    if bt:
        print("\nWhere the measured steps' time went (each gateway step matched to its forward on every stage, "
              "from the workers' HEXPLAN_STEP_LOG; means):\n")
        print(bt)
    for p, pr in results.items():
        ms = pr.get("measured_run")
        if ms:
            print(f"\n{p}: launched schedule {ms.get('schedule')}; matmul {ms.get('calibration_gflops', 0):.0f} GFLOPS "
                  f"before the loads, {ms.get('calibration_after_gflops', 0):.0f} after")
    cells = [(p, l, c) for p, pr in results.items() for l, c in pr["cells"].items() if "meas" in c]
    for s in sources[1:-1]:
        ok = [within(c, s) for _, _, c in cells if s in c]
        if ok:
            print(f"\ntarget ({s} within {TARGET:.0%} of measured on tok/s, P50 TTFT, P50 TPOT): {sum(ok)} of "
                  f"{len(ok)} cells")
    pr_rows = [(p, l, [paired(c, s) for s in sources[1:-1]]) for p, l, c in cells]
    if any(g is not None for _, _, gs in pr_rows for g in gs):
        print("\nRequest by request: the median over a cell's requests of simulated / measured - 1, each request "
              "beside its own simulation (a P50 miss with a small figure here is a few requests crossing a gap, "
              "not the model):\n")
        print("| plan | load | " + " | ".join(f"{s}: TTFT, TPOT" for s in sources[1:-1]) + " |")
        print("|---|---|" + "---|" * len(sources[1:-1]))
        for p, l, gs in pr_rows:
            print(f"| {p} | {l} | " + " | ".join("-" if g is None else f"{g[0] * 100:+.0f}%, {g[1] * 100:+.0f}%"
                                                 for g in gs) + " |")


def median_neighbours(c: dict, key: str, q: float = 10.0) -> tuple[float, float, float] | None:
    """The measured ``key`` ("ttft" or "tpot") of a cell's requests at P(50 - q), P50 and
    P(50 + q) (None without its requests): how far a few requests changing sides (three of 32
    at q = 10) move the P50. At 30% load the TPOTs split in two groups (requests decoding mostly alone, and those
    sharing steps with others' prompts), and the P50 of 32 falls between them."""
    recs = c.get("meas_detail", {}).get("per_request")
    if not recs:
        return None
    v = sorted(r[key] for r in recs if not math.isnan(r[key]))
    return percentile(v, 50 - q), percentile(v, 50), percentile(v, 50 + q)


def paired(c: dict, source: str) -> tuple[float, float] | None:
    """``source``'s error request by request: the median over the cell's requests of simulated /
    measured - 1 for TTFT and for TPOT, each request set beside itself (the trace's order: measured
    requests by arrival, as ``saved_trace``); None without both sides' requests. A P50 compares two
    order statistics and moves when a few requests cross a gap between groups of requests (see
    ``median_neighbours``); this pairs each request with its own simulation, so what is left is
    the model's bias."""
    sim = c.get(source, {}).get("per_request")
    recs = c.get("meas_detail", {}).get("per_request")
    if not sim or not recs or len(sim) != len(recs):
        return None
    recs = by_arrival(recs)
    out = []
    for i, key in enumerate(("ttft", "tpot")):
        v = [s[i] / r[key] - 1.0 for r, s in zip(recs, sim)
             if s is not None and s[i] is not None and r[key] and not math.isnan(r[key])]
        out.append(statistics.median(v) if v else math.nan)
    return out[0], out[1]


def paired_rows(runs: list, source: str) -> list:
    """A table row per cell: ``paired`` (TTFT, TPOT) in each run, and their medians over the runs."""
    rows = []
    for p in PLANS:
        for load, _ in LOADS:
            got = []
            for r in runs:
                c = r["results"].get(p, {}).get("cells", {}).get(load)
                got.append(paired(c, source) if c else None)
            have = [g for g in got if g is not None]
            if not have:
                continue
            meds = [statistics.median(g[i] for g in have) for i in (0, 1)]
            rows.append(f"| {p} | {load} | " + " | ".join(
                " ".join("-" if g is None else f"{g[i] * 100:+.0f}" for g in got) + f" | **{meds[i] * 100:+.0f}%**"
                for i in (0, 1)) + " |")
    return rows


def neighbour_rows(runs: list, names: list, sources: list) -> list:
    """For each run's cell that a simulator source misses by more than TARGET on P50 TTFT or
    TPOT: the measured P40 / P50 / P60 and the source's P50, and whether it lies between P40 and
    P60 (then moving about three of the 32 requests across the P50 would put it within)."""
    rows = []
    for n, r in zip(names, runs):
        for p, pr in r["results"].items():
            for load, c in pr["cells"].items():
                if "meas" not in c:
                    continue
                for s in sources:
                    for key, k in (("ttft", "ttft_p50_s"), ("tpot", "tpot_p50_s")):
                        if s not in c or abs(err(c[s][k], c["meas"][k])) <= TARGET:
                            continue
                        nb = median_neighbours(c, key)
                        if nb is None:
                            continue
                        inside = nb[0] <= c[s][k] <= nb[2]
                        rows.append(f"| {Path(n).name} | {p} | {load} | {s} | {key.upper()} | "
                                    + " / ".join(f"{x * 1e3:.0f}" for x in nb) + f" | {c[s][k] * 1e3:.0f} "
                                    f"({err(c[s][k], c['meas'][k]) * 100:+.0f}%) | {'yes' if inside else 'no'} |")
    return rows


def trace_key(run: dict, cell: dict) -> tuple:
    """What makes two runs' traces for a cell the same: the seed, the request count and the
    offered rate (None saturated). A run saved before the seed was kept ran the default, 0."""
    rate = cell.get("offered_rate")
    return run["meta"].get("seed", 0), cell.get("requests"), None if rate is None else round(rate, 9)


def agree(a: dict, b: dict) -> bool:
    """Whether two measurements of a cell agree within TARGET on every CHECKED figure, the larger
    over the smaller (the symmetric form of ``within``'s error)."""
    return all(max(a[k], b[k]) <= (1 + TARGET) * min(a[k], b[k]) for k in CHECKED)


def repeat_rows(runs: list, sources: list) -> tuple[list, dict]:
    """The measurement against itself: per cell, the pairs of runs that offered it the same trace
    (``trace_key``) whose measurements ``agree``, beside each source's cells within TARGET of
    their own run's measurement, over the same runs. Returns the table's rows and the totals
    {"meas": [agreeing, pairs], source: [within, cells]}; a cell no two runs offered alike has no row."""
    rows, totals = [], {"meas": [0, 0], **{s: [0, 0] for s in sources}}
    for p in [p for p in PLANS if any(p in r["results"] for r in runs)]:
        for load, _ in LOADS:
            groups: dict = {}
            for r in runs:
                c = r["results"].get(p, {}).get("cells", {}).get(load)
                if c and "meas" in c:
                    groups.setdefault(trace_key(r, c), []).append(c)
            for key, cs in groups.items():
                if len(cs) < 2:
                    continue
                pairs = [(a, b) for i, a in enumerate(cs) for b in cs[i + 1:]]
                ok = sum(agree(a["meas"], b["meas"]) for a, b in pairs)
                totals["meas"][0] += ok
                totals["meas"][1] += len(pairs)
                row = f"| {p} | {load} | {'burst' if key[2] is None else f'{key[2]:.3f}'} | {len(cs)} | {ok} of {len(pairs)} |"
                for s in sources:
                    have = [within(c, s) for c in cs if s in c]
                    totals[s][0] += sum(have)
                    totals[s][1] += len(have)
                    row += f" {sum(have)} of {len(have)} |" if have else " - |"
                rows.append(row)
    return rows, totals


def combine(runs: list, names: list) -> None:
    """Several saved runs as one: each figure of each cell is the median over the runs that have
    the cell (a shared host moves a single run's cell by up to 23%, more than the target), the
    target judged on those medians; with each run's own count, and how far the measured figures
    of a cell spread between runs ((max - min) / median), which bounds what any model can match."""
    sources: list = []   # every run's, in order (a run with --around has sim@loads too)
    for r in runs:
        for i, src in enumerate(r["meta"]["sources"]):
            if src not in sources:
                sources.insert(min(i, len(sources)), src)
    print(f"\nfidelity bench, {len(runs)} runs combined: " + ", ".join(
        f"{Path(n).name} ({r['meta']['started']}, plans {', '.join(r['results'])}, contention "
        f"{r['meta'].get('host', {}).get('contention', 0):.3f})" for n, r in zip(names, runs)) + "\n")
    for n, r in zip(names, runs):
        cells = [c for pr in r["results"].values() for c in pr["cells"].values() if "meas" in c]
        counts = [f"{s} {sum(within(c, s) for c in cells if s in c)}" for s in sources[1:-1]
                  if s in r["meta"]["sources"]]   # a source this run did not take (sim@loads): none
        print(f"{Path(n).name}: cells within {TARGET:.0%} as it ran: " + ", ".join(counts) + f" of {len(cells)}")
    med: dict = {}
    spread_rows = ["| plan | load | runs | measured tok/s | TTFT P50 s | TPOT P50 ms | spread (tok/s, TTFT50, TPOT50) |",
                   "|---|---|---|---|---|---|---|"]
    plans = [p for p in PLANS if any(p in r["results"] for r in runs)]
    for p in plans:
        for load, _ in LOADS:
            cs = [r["results"][p]["cells"][load] for r in runs if p in r["results"] and load in r["results"][p]["cells"]]
            cs = [c for c in cs if "meas" in c]
            if not cs:
                continue
            offered = [c["offered_rate"] for c in cs if c["offered_rate"]]
            cell = {"offered_rate": statistics.median(offered) if offered else None}
            for s in sources:
                have = [c[s] for c in cs if s in c]
                if have:
                    cell[s] = {k: statistics.median(h[k] for h in have) for k, *_ in METRICS}
            med.setdefault(p, {"cells": {}})["cells"][load] = cell
            m = [c["meas"] for c in cs]
            spread = [(max(x[k] for x in m) - min(x[k] for x in m)) / statistics.median(x[k] for x in m)
                      for k in CHECKED]
            spread_rows.append(f"| {p} | {load} | {len(cs)} | " + " | ".join(
                " / ".join(fmt.format(x[k] * sc) for x in m) for k, _, sc, fmt in METRICS if k in CHECKED) + " | "
                + ", ".join(f"{v * 100:.0f}%" for v in spread) + " |")
    print("\nMedians over the runs:\n")
    print(table(med, sources))
    print("\nThe measured figures of each run, and their spread between runs:\n")
    print("\n".join(spread_rows))
    cells = [c for pr in med.values() for c in pr["cells"].values()]
    for s in sources[1:-1]:
        ok = [within(c, s) for c in cells if s in c]
        print(f"\ntarget on the medians ({s} within {TARGET:.0%} of measured on tok/s, P50 TTFT, P50 TPOT): "
              f"{sum(ok)} of {len(ok)} cells")
    rows, totals = repeat_rows(runs, sources[1:-1])
    if rows:
        print(f"\nThe measurement against itself: per cell, the pairs of runs that offered it the same trace (the "
              f"same rate, or saturated; `--rates-from`) whose measured tok/s, P50 TTFT and P50 TPOT all agree within "
              f"{TARGET:.0%} (the larger over the smaller), beside the same runs' cells within {TARGET:.0%} of their "
              f"own measurement\n")
        print("| plan | load | offered req/s | runs | measured pairs that agree | "
              + " | ".join(f"{s} within" for s in sources[1:-1]) + " |")
        print("|---|---|---|---|---|" + "---|" * len(sources[1:-1]))
        print("\n".join(rows))
        print(f"\nmeasured against measured: {totals['meas'][0]} of {totals['meas'][1]} pairs agree; " + "; ".join(
            f"{s} against measured: {a} of {b} cells" for s, (a, b) in totals.items() if s != "meas" and b))
    rows = neighbour_rows(runs, names, sources[1:-1])
    if rows:
        print("\nThe runs' P50 misses beside the measured P40 / P50 / P60 of the same requests (ms): where the "
              "simulated P50 lies between P40 and P60, about three of the 32 requests changing sides decide the "
              "cell\n")
        print("| run | plan | load | source | figure | measured P40 / P50 / P60 | simulated P50 | between P40 and P60 |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        inside = sum(r.endswith("| yes |") for r in rows)
        print(f"\n{inside} of {len(rows)} P50 misses lie between the measured P40 and P60")
    for s in sources[1:-1]:
        rows = paired_rows(runs, s)
        if not rows:
            continue
        print(f"\n{s}, request by request (``paired``): the median over each cell's requests of simulated / "
              f"measured - 1, in each run ({', '.join(Path(n).name for n in names)}), then the median over the "
              f"runs (a run without the simulated requests, saved before they were kept: -)\n")
        print("| plan | load | TTFT, run by run (%) | TTFT, median | TPOT, run by run (%) | TPOT, median |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
