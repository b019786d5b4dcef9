"""The simulator's skip-join MLFQ policy (FastServe) against fcfs: docs/simulator.md,
"Scheduling policies: fcfs and mlfq".

* Low load: nothing to preempt, so mlfq gives fcfs's latencies (exactly, one request at a time).
* Many short requests and a few long ones at 85% of the fcfs saturation rate: mlfq cuts the
  median end-to-end latency by far at the same throughput.
* Skip-join, demotion (exact counts for a request alone), promotion, KV offload under a small
  cache (every request still completes, and the swap-ins cost time), plumbing and bad input.
"""
from __future__ import annotations

import json
import subprocess
import sys
import pytest

import hexplan
from hexplan import SpecError, loads_cluster
from hexplan.costmodel import Workload
from hexplan.plan import Pipeline, Plan, Stage
from hexplan.simulator import Slo, TraceRequest, WorkloadSpec, simulate, sweep_rate
from hexplan.simulator.engine import Engine, EngineOptions, skip_join_level
from hexplan.validate import plan_assumptions

ONE_GPU = "name: one\nnodes:\n  - {name: n0, gpu: A100-80G, count: 1}\n"


def one_gpu_plan(batch: int = 16, concurrency: int = 64):
    """Llama-2-13B on one A100-80G (one stage, 40 layers); the plan's workload sets the batch,
    the concurrency and so the KV cache (concurrency x (512 + 128) tokens)."""
    cluster = loads_cluster(ONE_GPU)
    plan = Plan(hexplan.load_model("llama-2-13b"),
                (Pipeline((Stage("n0", (0,), 1, (0, 40), "A100-80G"),), 1.0),),
                assumptions={"workload": Workload(512, 128, batch, concurrency).to_dict()})
    return plan, cluster


def four_gpu_plan():
    """Llama-2-70B over 4 A100-80G of one node, 20 layers each: 4 stages, 4 loops, chunked prefill."""
    cluster = loads_cluster("name: four\nnodes:\n  - {name: n0, gpu: A100-80G, count: 4, interconnect: 300GB/s}\n")
    stages = tuple(Stage("n0", (i,), 1, (20 * i, 20 * i + 20), "A100-80G") for i in range(4))
    plan = Plan(hexplan.load_model("llama-2-70b"), (Pipeline(stages, 1.0),),
                assumptions={"workload": Workload().to_dict()})
    return plan, cluster


def engine(plan, cluster, **options) -> Engine:
    asm = plan_assumptions(plan)
    return Engine(plan, cluster, asm.workload, asm.params, EngineOptions(policy="mlfq", **options))


def alone(plan, cluster, prompt: int, output: int, **kw):
    spec = WorkloadSpec(arrival="trace", trace=(TraceRequest(0.0, prompt, output),), duration=120.0, warmup=0.0)
    return simulate(plan, cluster, spec, policy="mlfq", **kw)


# ---- low load: nothing to preempt ---------------------------------------------------------------

def test_low_load_mlfq_gives_fcfs_latencies():
    plan, cluster = four_gpu_plan()
    # One request every 60 s: each is alone, and both policies run the same steps.
    trace = tuple(TraceRequest(60.0 * i, 300 + 40 * i, 50 + 10 * i) for i in range(10))
    spec = WorkloadSpec(arrival="trace", trace=trace, duration=600.0, warmup=0.0)
    f, m = (simulate(plan, cluster, spec, policy=p) for p in ("fcfs", "mlfq"))
    assert m.requests_completed == f.requests_completed == 10
    assert m.samples == f.samples                      # every latency, to the last bit
    assert m.scheduler["preemptions"] == m.kv_offloads == 0 and m.scheduler["demotions"] > 0
    # Poisson at about a fifth of what the plan serves, lengths 128-1024 / 32-256: requests
    # overlap, but the batches never fill, so mlfq hardly ever has anyone to preempt.
    spec = WorkloadSpec(rate=0.5, duration=1200.0, prompt_len="128-1024", output_len="32-256")
    f, m = (simulate(plan, cluster, spec, seed=4, policy=p) for p in ("fcfs", "mlfq"))
    assert f.requests_completed > 400
    assert m.requests_completed == f.requests_completed
    assert m.throughput_tokens_per_s == pytest.approx(f.throughput_tokens_per_s, rel=0.005)
    for q in ("p50", "p90"):
        assert getattr(m.e2e_s, q) == pytest.approx(getattr(f.e2e_s, q), rel=0.02)
        assert getattr(m.ttft_s, q) == pytest.approx(getattr(f.ttft_s, q), rel=0.05)
    assert m.kv_offloads == 0


# ---- many short requests, a few long ones ------------------------------------------------------

MIX = tuple([TraceRequest(0.0, 256, 16)] * 9 + [TraceRequest(0.0, 256, 1000)])   # lengths only


def mix_spec(rate: float, duration: float) -> WorkloadSpec:
    return WorkloadSpec(rate=rate, duration=duration, prompt_len="trace", output_len="trace", trace=MIX)


@pytest.fixture(scope="module")
def small_batch():
    """One A100 serving 8 sequences at a time (one loop of 8), and the rate fcfs completes
    under heavy overload on the mix: 1.79 requests/s. (With 64 in flight the pipeline is 64
    servers, and at 85-90% load fcfs hardly ever queues: the median is a short request's own
    service time under either policy; docs/simulator.md.)"""
    plan, cluster = one_gpu_plan(batch=8, concurrency=8)
    sat = simulate(plan, cluster, mix_spec(10.0, 1200.0))
    assert sat.requests_unfinished > 1000          # an overload
    return plan, cluster, sat.requests_per_s


def test_mlfq_cuts_the_median_latency_of_a_short_and_long_mix(small_batch):
    plan, cluster, sat = small_batch
    spec = mix_spec(0.85 * sat, 2400.0)
    f, m = (simulate(plan, cluster, spec, policy=p) for p in ("fcfs", "mlfq"))
    # fcfs: P50 e2e 15.1 s (the short requests queue behind long ones holding the 8 slots);
    # mlfq: 0.39 s, about a short request's own prefill and 15 decode steps.
    assert m.e2e_s.p50 < 0.2 * f.e2e_s.p50
    assert m.ttft_s.p50 < 0.2 * f.ttft_s.p50
    assert m.e2e_s.mean < 0.8 * f.e2e_s.mean         # mean job completion time: 18.3 -> 10.4 s
    assert m.throughput_tokens_per_s == pytest.approx(f.throughput_tokens_per_s, rel=0.03)
    assert m.requests_completed >= 0.98 * f.requests_completed
    sc = m.scheduler
    assert sc["policy"] == "mlfq" and sc["preemptions"] > 0 and m.kv_offloads > 0
    assert f.scheduler == {"policy": "fcfs"} and f.kv_offloads == 0


# ---- skip-join, demotion, promotion -------------------------------------------------------------

def test_skip_join_picks_the_first_queue_whose_quantum_covers_the_prefill():
    assert [skip_join_level(t, 0.1, 5) for t in (0.0, 0.05, 0.1, 0.1001, 0.2, 0.35, 0.8, 1.6, 1.61, 50.0)] == \
        [0, 0, 0, 1, 1, 2, 3, 4, 4, 4]
    assert skip_join_level(50.0, 0.1, 1) == 0 and skip_join_level(0.15, 0.1, 2) == 1
    plan, cluster = one_gpu_plan()
    e = engine(plan, cluster)
    levels = [e.join_level(0, p) for p in (16, 256, 512, 1024, 4000)]
    assert levels[0] == 0 and levels[-1] == 4                    # a long prompt joins a lower queue
    assert levels == sorted(levels) and levels[1] < levels[3]
    q0 = e.scheduler.pipes[0].q0
    for p, lv in zip((16, 256, 512, 1024, 4000), levels):         # the estimate is the cost model's
        est = e.prefill_estimate(0, p)
        assert est == pytest.approx(40 * e.pipes[0].kinds[0].prefill(p))
        assert est <= q0 * 2 ** lv or lv == 4
        assert lv == 0 or est > q0 * 2 ** (lv - 1)
    # The top quantum defaults to one decode step of B sequences through the pipeline; an
    # explicit one moves the joins.
    assert e.join_level(0, 1024) > engine(plan, cluster, mlfq_quantum_s=10 * q0).join_level(0, 1024)


def test_demotions_of_a_request_alone():
    # A 16-token prompt joins queue 0 (its prefill is under one decode step). Quanta of 1, 2,
    # 4, 8 decode tokens: it drops to queue 1 after its 1st decode token, to 2 after its 3rd,
    # to 3 after its 7th, to 4 after its 15th; the last token is not charged.
    plan, cluster = one_gpu_plan()
    assert engine(plan, cluster).join_level(0, 16) == 0
    demotions = {o: alone(plan, cluster, 16, o).scheduler["demotions"] for o in (2, 3, 4, 8, 9, 16, 17, 200)}
    assert demotions == {2: 0, 3: 1, 4: 1, 8: 2, 9: 3, 16: 3, 17: 4, 200: 4}
    assert alone(plan, cluster, 16, 200, mlfq_levels=2).scheduler["demotions"] == 1
    assert alone(plan, cluster, 16, 200, mlfq_levels=1).scheduler["demotions"] == 0
    # Skip-join in the run: a longer prompt starts lower, so it has fewer queues left to drop.
    e = engine(plan, cluster)
    joins = {p: e.join_level(0, p) for p in (256, 1024, 4000)}
    assert sorted(set(joins.values())) == list(joins.values()) and joins[4000] == 4
    assert {p: alone(plan, cluster, p, 90).scheduler["demotions"] for p in joins} == {p: 4 - lv for p, lv in joins.items()}


def test_promotion_lifts_starved_long_requests(small_batch):
    plan, cluster, sat = small_batch
    spec = mix_spec(0.85 * sat, 1200.0)
    never = simulate(plan, cluster, spec, policy="mlfq", mlfq_promote_s=1e9)
    often = simulate(plan, cluster, spec, policy="mlfq", mlfq_promote_s=2.0)
    assert never.scheduler["promotions"] == 0
    assert often.scheduler["promotions"] > 100
    # Long requests no longer wait for every short one: the tail shrinks, the median grows.
    assert often.e2e_s.p99 < 0.8 * never.e2e_s.p99
    assert often.e2e_s.p50 > never.e2e_s.p50


# ---- KV pressure --------------------------------------------------------------------------------

def test_kv_offload_under_pressure_and_every_request_completes():
    # 4 sequences at a time and a KV cache of 4 x 640 = 2560 tokens: three long requests
    # (200 + 600) fill it, so short ones (100 + 20) get in by offloading preempted long ones.
    plan, cluster = one_gpu_plan(batch=4, concurrency=4)
    trace = tuple(TraceRequest(0.5 * i, 200, 600) if i % 4 == 0 else TraceRequest(0.5 * i, 100, 20)
                  for i in range(40))
    spec = WorkloadSpec(arrival="trace", trace=trace, duration=600.0, warmup=0.0)
    f = simulate(plan, cluster, spec, policy="fcfs")
    m = simulate(plan, cluster, spec, policy="mlfq")
    for r in (f, m):
        assert r.requests_completed == r.requests_arrived == 40 and r.requests_unfinished == 0
    assert f.kv_offloads == 0
    assert m.kv_offloads > 0 and m.scheduler["kv_swap_ins"] == m.kv_offloads   # all brought back
    assert m.to_dict()["kv_offloads"] == m.kv_offloads
    assert m.e2e_s.p50 < 0.2 * f.e2e_s.p50                 # the short ones no longer wait
    # The swap-ins cost time: over a 100 MB/s host link a long request's 800 tokens of KV
    # (0.8 MB per token on llama-2-13b) take 6.5 s instead of 41 ms.
    slow = simulate(plan, cluster, spec, policy="mlfq", offload_bandwidth=1e8)
    assert slow.requests_completed == 40 and slow.kv_offloads > 0
    assert slow.e2e_s.mean > m.e2e_s.mean + 2.0


# ---- plumbing and bad input ---------------------------------------------------------------------

def test_bad_policy_options_name_the_field():
    plan, cluster = one_gpu_plan()
    spec = WorkloadSpec(rate=1.0, duration=10.0)
    for kw, field in ((dict(policy="bogus"), "policy"), (dict(policy="mlfq", mlfq_levels=0), "mlfq_levels"),
                      (dict(policy="mlfq", mlfq_quantum_s=-1.0), "mlfq_quantum_s"),
                      (dict(policy="mlfq", mlfq_promote_s=float("inf")), "mlfq_promote_s"),
                      (dict(policy="mlfq", offload_bandwidth=0), "offload_bandwidth")):
        with pytest.raises(SpecError) as e:
            simulate(plan, cluster, spec, **kw)
        assert e.value.field == field, kw
    with pytest.raises(SpecError) as e:
        sweep_rate(plan, cluster, spec, Slo(tpot_s=0.05), policy="FCFS")
    assert e.value.field == "policy"
    asm = plan_assumptions(plan)
    with pytest.raises(ValueError, match="policy"):
        Engine(plan, cluster, asm.workload, asm.params, EngineOptions(policy="lifo"))


def test_sweep_rate_with_mlfq():
    plan, cluster = one_gpu_plan()
    sw = sweep_rate(plan, cluster, WorkloadSpec(rate=1.0, duration=120.0), Slo(tpot_s=0.05), max_probes=3,
                    policy="mlfq")
    assert len(sw.probes) == 3 and all(p.result.scheduler["policy"] == "mlfq" for p in sw.probes)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlfq")
    plan, _ = one_gpu_plan()
    (d / "plan.yaml").write_text(plan.to_yaml())
    (d / "cluster.yaml").write_text(ONE_GPU)
    return d / "plan.yaml", d / "cluster.yaml"


def test_cli_policy(files):
    plan, cluster = files
    r = cli("simulate", plan, "--cluster", cluster, "--rate", "1", "--duration", "60", "--policy", "bogus")
    assert "Traceback" not in r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hexplan: error: --policy: "), r.stderr
    assert "'fcfs' or 'mlfq'" in lines[0] and "bogus" in lines[0]
    r = cli("simulate", plan, "--cluster", cluster, "--rate", "2", "--duration", "120", "--policy", "mlfq", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["scheduler"]["policy"] == "mlfq" and d["kv_offloads"] == 0 and d["requests_completed"] > 100
    r = cli("simulate", plan, "--cluster", cluster, "--rate", "2", "--duration", "120", "--policy", "mlfq")
    assert r.returncode == 0, r.stderr
    assert "scheduler mlfq (whole run):" in r.stdout and "KV offloads" in r.stdout
