"""The discrete-event simulator against the cost model, Little's law, and its inputs.

* Low load (one request at a time): TTFT and TPOT equal evaluate_pipeline's within 1%.
* Overload (an offline batch of requests at t=0 with the plan's own lengths): throughput reaches
  the plan's prediction within 5% where the cost model's assumptions hold; where they do not
  (the HexGen case plan), a strict xfail records the numbers. An offline batch of identical
  requests lines the prompts of all micro-batches up in the same rounds, the best case for a
  multi-stage pipeline; saturated throughput does not depend on how overloaded the pipeline
  is, only, with fixed lengths, on how it filled (docs/simulator.md, "Fixed lengths").
* Little's law, determinism, trace parsing, the CLI's JSON and its one-line errors.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import hexplan
from hexplan import SpecError, load_cluster, loads_cluster
from hexplan.costmodel import Workload
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.plan import Pipeline, Plan, Stage
from hexplan.simulator import LengthDist, Slo, TraceRequest, WorkloadSpec, parse_trace, simulate, sweep_rate
from hexplan.validate import plan_assumptions

ROOT = Path(__file__).resolve().parent.parent
HEXGEN = ROOT / "cluster_specs" / "hexgen-case.yaml"
TRACE = ROOT / "bench" / "traces" / "conversation_sample.jsonl"
DEFAULT = Workload()   # P 512, O 128, B 16, C 64


def one_gpu_plan():
    """Llama-2-13B on one A100-80G: one stage, the whole model (40 layers)."""
    cluster = loads_cluster("name: one\nnodes:\n  - {name: n0, gpu: A100-80G, count: 1}\n")
    plan = Plan(hexplan.load_model("llama-2-13b"),
                (Pipeline((Stage("n0", (0,), 1, (0, 40), "A100-80G"),), 1.0),),
                assumptions={"workload": DEFAULT.to_dict()})
    return plan, cluster


def four_gpu_plan():
    """Llama-2-70B over 4 A100-80G of one node, 20 layers each: 4 stages, 4 loops of 16 = C."""
    cluster = loads_cluster("name: four\nnodes:\n  - {name: n0, gpu: A100-80G, count: 4, interconnect: 300GB/s}\n")
    stages = tuple(Stage("n0", (i,), 1, (20 * i, 20 * i + 20), "A100-80G") for i in range(4))
    plan = Plan(hexplan.load_model("llama-2-70b"), (Pipeline(stages, 1.0),),
                assumptions={"workload": DEFAULT.to_dict()})
    return plan, cluster


@pytest.fixture(scope="module")
def hexgen():
    cluster = load_cluster(HEXGEN)
    return hexplan.solve(cluster, "llama-2-70b", time_limit=5), cluster


def metrics(plan, cluster, workload=None):
    asm = plan_assumptions(plan)
    return evaluate_plan_pipelines(cluster, CostCache(plan.model, workload or asm.workload, asm.params),
                                   plan.pipelines)


def predicted(plan, cluster) -> float:
    return sum(m.throughput for m in metrics(plan, cluster))


def offline(plan, cluster, duration: float, **kw):
    """Enough requests at t=0 (the plan's own lengths) to keep every pipeline busy for ``duration``."""
    w = plan_assumptions(plan).workload
    n = int(2 * predicted(plan, cluster) * duration / w.output_tokens) + 64
    trace = (TraceRequest(0.0, w.prompt_tokens, w.output_tokens),) * n
    res = simulate(plan, cluster, WorkloadSpec(arrival="trace", trace=trace, duration=duration), **kw)
    assert res.requests_unfinished > 0, "the batch ran dry: not an overload"
    return res


# ---- low load: the cost model's latencies ------------------------------------------------------

@pytest.mark.parametrize("which", ["one-gpu", "hexgen"])
def test_low_load_latency_equals_cost_model(which, hexgen):
    plan, cluster = one_gpu_plan() if which == "one-gpu" else hexgen
    w = plan_assumptions(plan).workload
    # One request every 60 s: each is alone in the pipeline (a request takes ~1 s + 127 TPOT).
    trace = tuple(TraceRequest(60.0 * i, w.prompt_tokens, w.output_tokens) for i in range(20))
    res = simulate(plan, cluster, WorkloadSpec(arrival="trace", trace=trace, duration=1200.0, warmup=0.0))
    assert res.requests_completed == 20
    # Alone, a request decodes in batches of 1: compare with the cost model at batch_size 1
    # (TTFT does not depend on the batch). The cost model averages the context over O steps,
    # the simulation over the O - 1 decode steps: half a token apart.
    alone = metrics(plan, cluster, Workload(w.prompt_tokens, w.output_tokens, 1, 1))[0]
    assert res.ttft_s.p50 == pytest.approx(alone.ttft_s, rel=0.01)
    assert res.ttft_s.max == pytest.approx(alone.ttft_s, rel=0.01)
    assert res.tpot_s.mean == pytest.approx(alone.tpot_s, rel=0.01)
    assert res.e2e_s.p50 == pytest.approx(alone.ttft_s + (w.output_tokens - 1) * alone.tpot_s, rel=0.01)


# ---- overload: the plan's throughput ----------------------------------------------------------

def test_saturation_one_stage():
    plan, cluster = one_gpu_plan()
    res = offline(plan, cluster, 300.0)
    pred = predicted(plan, cluster)            # 473.0 tokens/s, stage 0 compute
    # 469.6 (0.993): one stage takes whole prompts (Workload.prefill_chunk(1) = P).
    assert res.throughput_tokens_per_s == pytest.approx(pred, rel=0.05)
    assert res.stage_utilisation[0][0] > 0.99


def test_saturation_four_stages_compute_bound():
    # 4 stages, 4 loops of 16 sequences = concurrency 64; compute-bound (410 tokens/s) with the
    # concurrency bound far above (650). Chunked prefill (B P / O = 64 prompt tokens per step)
    # keeps the micro-batches alike, which is what the cost model's amortised prefill
    # (t_pre / O per token) assumes.
    plan, cluster = four_gpu_plan()
    res = offline(plan, cluster, 300.0)
    pred = predicted(plan, cluster)
    assert res.throughput_tokens_per_s == pytest.approx(pred, rel=0.05)   # 396.1 of 409.9


def test_saturation_hexgen_reaches_predicted_throughput(hexgen):
    # The HexGen plan is balanced: four stages at 277-283 tokens/s and the concurrency bound
    # C / round trip (64 / (TPOT + B/O TTFT)) = 277.2 all meet, so any step that takes longer
    # than its neighbours delays the steps behind it at every stage. Chunked prefill keeps the
    # steps alike: 267.3 tokens/s, 96.4% of 277.2 (whole prompts in one step: 258.8, 93%;
    # docs/simulator.md, "Chunked prefill").
    plan, cluster = hexgen
    res = offline(plan, cluster, 600.0)
    pred = predicted(plan, cluster)
    assert 0.95 * pred <= res.throughput_tokens_per_s <= 1.01 * pred
    assert min(res.stage_utilisation[0]) > 0.95


def test_saturation_on_a_shared_link():
    # Two pipelines a[i] -> b[i] share the ordered pair a->b (200 Mbps): the cost model gives
    # each half of the link, 25e6 B/s / (10240 B x (1 + 512/128)) / 2 = 244.1 tokens/s. Run with
    # the cost model's scheduling (C / B loops, one prompt per step); long enough that the
    # start (requests prefilled during the warm-up) does not tilt the window.
    cluster = loads_cluster("name: shared\nnodes:\n  - {name: a, gpu: A100-80G, count: 2}\n"
                            "  - {name: b, gpu: A100-80G, count: 2}\nnetwork:\n  default: {bandwidth: 200Mbps, latency: 1ms}\n")
    pipes = tuple(Pipeline((Stage("a", (i,), 1, (0, 20), "A100-80G"), Stage("b", (i,), 1, (20, 40), "A100-80G")), 0.5)
                  for i in range(2))
    plan = Plan(hexplan.load_model("llama-2-13b"), pipes, assumptions={"workload": DEFAULT.to_dict()})
    assert [m.bottleneck for m in metrics(plan, cluster)] == ["link a->b"] * 2
    res = offline(plan, cluster, 1200.0, loops=4, prefill_budget=512)
    assert res.throughput_tokens_per_s == pytest.approx(predicted(plan, cluster), rel=0.05)   # 486.0 of 488.3
    assert res.link_utilisation["a->b"] > 0.99


def poisson_trace(rate: float, duration: float, prompt: int, output: int, seed: int = 0) -> list:
    rng, t, out = random.Random(seed), 0.0, []
    while (t := t + rng.expovariate(rate)) < duration:
        out.append(TraceRequest(t, prompt, output))
    return out


def test_saturated_throughput_does_not_depend_on_the_overload(hexgen):
    # Output lengths 64-192 (mean 128): once the pipeline is full (64 in flight and a queue),
    # the throughput is the same whether requests arrive at 2.5/s (2x what it serves), 8.6/s
    # (7x) or all at t=0: 244.4, 243.2 and 243.6 tokens/s (whole prompts in one step: about 160).
    plan, cluster = hexgen
    spec = WorkloadSpec(rate=2.5, duration=1200.0, output_len="64-192")
    rng = random.Random(0)
    batch = tuple(TraceRequest(0.0, 512, rng.randint(64, 192)) for _ in range(6000))
    runs = [simulate(plan, cluster, spec), simulate(plan, cluster, replace(spec, rate=8.6)),
            simulate(plan, cluster, WorkloadSpec(arrival="trace", trace=batch, duration=1200.0))]
    assert all(r.requests_unfinished > 64 for r in runs)     # saturated: a queue to the end
    tput = [r.throughput_tokens_per_s for r in runs]
    assert max(tput) <= 1.02 * min(tput)


def test_chunked_prefill_frees_the_throughput_from_how_the_pipeline_filled(hexgen):
    # Every request 512/128 and a queue: a loop refills a finished sequence's slot in its next
    # step and the newcomer finishes exactly 128 steps later, so each slot keeps its phase for
    # good. With whole prompts in one step, which rounds of the four micro-batches carry a
    # prompt is frozen by how the pipeline filled, and a round where one micro-batch carries a
    # prompt lasts about as long as one where all four do: Poisson filling gives 191.5 tokens/s,
    # 64 requests at once 258.8. With chunked prefill every step carries about 64 prompt
    # tokens, and both reach 95-97% of the predicted 277.2 (docs/simulator.md, "Chunked prefill").
    plan, cluster = hexgen
    pred = predicted(plan, cluster)

    def run(trace, **kw):
        spec = WorkloadSpec(arrival="trace", trace=tuple(sorted(trace)), duration=1200.0)
        return simulate(plan, cluster, spec, **kw).throughput_tokens_per_s

    poisson = poisson_trace(2.5, 1200.0, 512, 128)            # full after about 30 s
    burst = [TraceRequest(0.0, 512, 128)] * 64 + poisson        # filled at once, then the same arrivals
    whole = run(poisson, prefill_chunk=512)                     # 191.5
    assert whole == pytest.approx(run(poisson + [TraceRequest(60.0, 512, 128)] * 5000, prefill_chunk=512),
                                  rel=0.005)                    # 5000 more queued change nothing
    assert run(burst, prefill_chunk=512) > 1.2 * whole          # 258.8
    chunked = [run(poisson), run(burst)]                        # 263.4, 267.5
    assert min(chunked) > 0.95 * pred
    assert max(chunked) <= 1.02 * min(chunked)


# ---- Little's law, determinism, results -------------------------------------------------------

@pytest.mark.parametrize("which, rate", [("one-gpu", 2.5), ("hexgen", 0.3)])
def test_littles_law(which, rate, hexgen):
    plan, cluster = one_gpu_plan() if which == "one-gpu" else hexgen
    res = simulate(plan, cluster, WorkloadSpec(rate=rate, duration=4000.0), seed=1)
    assert res.requests_completed > 500
    # L = lambda W: time-average requests in the system vs completion rate x mean latency.
    assert res.mean_in_system == pytest.approx(res.requests_per_s * res.e2e_s.mean, rel=0.03)


def test_same_seed_same_result_other_seed_differs(hexgen):
    plan, cluster = hexgen
    spec = WorkloadSpec(arrival="gamma", rate=0.3, cv=2.0, duration=600.0,
                        prompt_len=LengthDist.parse("128-1024"), output_len=LengthDist.parse("64-256"))
    a, b = (simulate(plan, cluster, spec, seed=7).to_dict() for _ in range(2))
    assert a == b
    assert simulate(plan, cluster, spec, seed=8).to_dict() != a
    assert hexplan.simulate is simulate


def test_result_fields_and_slo(hexgen):
    plan, cluster = hexgen
    res = simulate(plan, cluster, WorkloadSpec(rate=0.2, duration=900.0), slo=Slo(ttft_s=2.0, tpot_s=0.3))
    d = json.loads(json.dumps(res.to_dict()))
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert d[key]["p50"] <= d[key]["p90"] <= d[key]["p99"]
    assert set(d["slo_attainment"]) == {"ttft", "tpot", "all"}
    assert 0 <= d["slo_attainment"]["all"] <= min(d["slo_attainment"]["ttft"], d["slo_attainment"]["tpot"]) <= 1
    assert len(d["stage_utilisation"]) == 1 and len(d["stage_utilisation"][0]) == len(plan.pipelines[0].stages)
    assert all(0 < u <= 1 for u in d["stage_utilisation"][0])
    assert d["throughput_tokens_per_s"] == pytest.approx(0.2 * 128, rel=0.15)   # it keeps up


def test_sample_trace_lengths_and_cap():
    # bench/traces/make_trace.py: log-normal, median prompt ~320, output ~180, capped at 4096.
    reqs = parse_trace(TRACE.read_text(), str(TRACE))
    assert len(reqs) >= 2000
    p = sorted(r.prompt_tokens for r in reqs)
    o = sorted(r.output_tokens for r in reqs)
    assert 200 <= p[len(p) // 2] <= 500 and p[int(0.99 * len(p))] > 2000
    assert 100 <= o[len(o) // 2] <= 250
    assert max(r.prompt_tokens + r.output_tokens for r in reqs) <= 4096


def test_trace_lengths_with_poisson_and_context_cap(hexgen):
    plan, cluster = hexgen
    trace = (TraceRequest(0.0, 4000, 500),)        # 4500 tokens > Llama-2's 4096
    spec = WorkloadSpec(rate=0.05, duration=200.0, prompt_len="trace", output_len="trace", trace=trace)
    res = simulate(plan, cluster, spec, seed=3)
    assert res.requests_arrived > 0 and res.requests_truncated == res.requests_arrived


def test_sweep_finds_a_rate_between_passing_and_failing_probes():
    plan, cluster = one_gpu_plan()
    sw = sweep_rate(plan, cluster, WorkloadSpec(rate=1.0, duration=300.0), Slo(tpot_s=0.05), max_probes=8)
    assert sw.best_rate is not None
    assert all(p.rate <= sw.best_rate for p in sw.probes if p.ok)
    assert any(not p.ok and p.rate > sw.best_rate for p in sw.probes)
    assert sw.best.result.tpot_s.p90 <= 0.05


# ---- bad input (library) ----------------------------------------------------------------------

@pytest.mark.parametrize("text, line, field", [
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3}\n{"arrival_s": 1, "prompt_tokens": 5\n', 2, None),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3}\n\n[1, 2]\n', 3, None),
    ('{"arrival_s": -1, "prompt_tokens": 5, "output_tokens": 3}\n', 1, "arrival_s"),
    ('{"arrival_s": 0, "prompt_tokens": 5.5, "output_tokens": 3}\n', 1, "prompt_tokens"),
    ('{"arrival_s": 0, "prompt_tokens": 5}\n', 1, "output_tokens"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 0}\n', 1, "output_tokens"),
])
def test_trace_errors_name_file_line_and_field(text, line, field):
    with pytest.raises(SpecError) as e:
        parse_trace(text, "t.jsonl")
    assert (e.value.file, e.value.line, e.value.field) == ("t.jsonl", line, field)
    assert str(e.value).startswith(f"t.jsonl:{line}: ")


def test_bad_specs_name_the_field():
    cases = [(dict(rate=-1.0, duration=10), "rate"), (dict(rate=1.0, duration=-5), "duration"),
             (dict(rate=float("nan"), duration=5), "rate"), (dict(rate=1.0), "duration"),
             (dict(arrival="gamma", rate=1.0, cv=0, duration=5), "cv"),
             (dict(rate=1.0, duration=10, warmup=10), "warmup"),
             (dict(rate=1.0, duration=10, prompt_len="trace"), "prompt_len"),
             (dict(arrival="trace"), "workload")]
    for kw, field in cases:
        with pytest.raises(SpecError) as e:
            WorkloadSpec(**kw)
        assert e.value.field == field, kw
    for text in ("abc", "0", "10-5", "-3", "1.5", ""):
        with pytest.raises(SpecError):
            LengthDist.parse(text, "prompt_len")
    assert LengthDist.parse("128-1024") == LengthDist("uniform", 128, 1024)
    assert LengthDist.parse(" 512 ") == LengthDist("fixed", 512, 512)


def test_plan_that_does_not_match_the_cluster(hexgen):
    plan, _ = hexgen
    with pytest.raises(SpecError) as e:
        simulate(plan, load_cluster(ROOT / "cluster_specs" / "helix-24.yaml"), WorkloadSpec(rate=1.0, duration=10))
    assert e.value.field == "plan" and "unknown node" in str(e.value)
    p1, c1 = one_gpu_plan()
    zero = replace(p1, pipelines=(replace(p1.pipelines[0], weight=0.0),))
    with pytest.raises(SpecError, match="weight 0"):
        simulate(zero, c1, WorkloadSpec(rate=1.0, duration=10))


# ---- the command line ---------------------------------------------------------------------------

def cli(*args, env_python=None):
    cmd = [sys.executable, "-m", "hexplan.cli", *map(str, args)] if env_python is None else \
        [sys.executable, "-c", env_python, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def one_error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hexplan: error: "), r.stderr
    return lines[0][len("hexplan: error: "):]


@pytest.fixture(scope="module")
def plan_file(hexgen, tmp_path_factory):
    p = tmp_path_factory.mktemp("sim") / "hexgen.plan.yaml"
    p.write_text(hexgen[0].to_yaml())
    return p


def test_cli_json(plan_file):
    r = cli("simulate", plan_file, "--cluster", HEXGEN, "--rate", "0.2", "--duration", "300",
            "--prompt-len", "256-768", "--output-len", "128", "--seed", "3", "--slo-ttft-ms", "3000", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["throughput_tokens_per_s"] > 0 and d["requests_completed"] > 0
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert {"p50", "p90", "p99"} <= set(d[key]) and all(isinstance(d[key][q], float) for q in ("p50", "p90", "p99"))
    assert d["workload"]["prompt_tokens"] == "256-768" and d["seed"] == 3
    assert set(d["slo_attainment"]) == {"ttft", "all"}


def test_cli_table_trace_replay_and_sweep(plan_file):
    r = cli("simulate", plan_file, "--cluster", HEXGEN, "--workload", TRACE, "--duration", "300")
    assert r.returncode == 0, r.stderr
    assert "lengths from the trace" in r.stdout and "TTFT (s)" in r.stdout and "stage utilisation" in r.stdout
    r = cli("simulate", plan_file, "--cluster", HEXGEN, "--sweep-rate", "--duration", "300", "--slo-tpot-ms", "500",
            "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["best_rate_per_s"] > 0 and len(d["probes"]) == len(r.stderr.splitlines())
    assert all(line.startswith("rate ") for line in r.stderr.splitlines())


@pytest.mark.parametrize("args, fragment", [
    (["--rate", "-1"], "--rate: must be positive"),
    (["--rate", "1", "--duration", "-5"], "--duration: must be positive"),
    (["--rate", "1", "--prompt-len", "12x"], "--prompt-len: expected a length N, a range A-B or 'trace'"),
    (["--rate", "1", "--output-len", "900-100"], "--output-len: empty range"),
    (["--rate", "1", "--prompt-len", "trace"], "--prompt-len: 'trace' lengths need a trace file"),
    (["--sweep-rate"], "--sweep-rate: a rate sweep needs an objective"),
    (["--rate", "1", "--slo-ttft-ms", "0"], "--slo-ttft-ms: must be a positive number"),
    (["--rate", "1", "--loops", "0"], "--loops: must be an integer >= 1"),
])
def test_cli_bad_arguments(plan_file, args, fragment):
    assert fragment in one_error_line(cli("simulate", plan_file, "--cluster", HEXGEN, *args))


def test_cli_bad_files(plan_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3}\n{"arrival_s": 1, "prompt_tokens": "x", '
                   '"output_tokens": 3}\n')
    msg = one_error_line(cli("simulate", plan_file, "--cluster", HEXGEN, "--workload", bad))
    assert msg.startswith(f"{bad}:2: prompt_tokens: must be an integer")
    msg = one_error_line(cli("simulate", plan_file, "--cluster", HEXGEN, "--workload", tmp_path / "missing.jsonl"))
    assert "missing.jsonl" in msg and "cannot read" in msg
    msg = one_error_line(cli("simulate", plan_file, "--cluster", ROOT / "cluster_specs" / "two-regions.yaml",
                             "--rate", "1"))
    assert msg.startswith(f"{plan_file}: plan: does not match cluster 'two-regions': the plan was made for "
                          "'hexgen-case' (")


def test_cli_plot_without_matplotlib(plan_file, tmp_path):
    # Make matplotlib unimportable in the child, then run the CLI: one line, exit 2, nothing written.
    block = "import sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'hexplan'; " \
            "from hexplan.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "x.png"
    msg = one_error_line(cli("simulate", plan_file, "--cluster", HEXGEN, "--rate", "1", "--plot", out,
                             env_python=block))
    assert "matplotlib" in msg and "hexplan[plot]" in msg and not out.exists()


def test_cli_plot_writes_png(plan_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cdf.png"
    r = cli("simulate", plan_file, "--cluster", HEXGEN, "--rate", "0.2", "--duration", "300", "--plot", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
