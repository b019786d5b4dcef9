"""Nodes that share one machine (`hosts:` and a node's `host:`): the cluster field and the
simulator's slowdown of stages that run at once on it (hexplan.simulator.engine, "Shared hosts")."""
from __future__ import annotations

import pytest

import hexplan
from hexplan import SpecError, loads_cluster
from hexplan.cluster import Host, cluster_to_dict
from hexplan.costmodel import Workload
from hexplan.plan import Pipeline, Plan, Stage
from hexplan.simulator import TraceRequest, WorkloadSpec, simulate

W = Workload(512, 128, 16, 32)   # 2 loops of 16 on a two-stage pipeline


def cluster(host: str | None, cores: int = 2, contention: float = 0.2):
    hosts = f"hosts:\n  box: {{cores: {cores}, contention: {contention}}}\n" if host else ""
    on = ", host: box" if host else ""
    return loads_cluster(f"name: shared\n{hosts}nodes:\n"
                         f"  - {{name: a, gpu: A100-80G, count: 2{on}}}\n"
                         f"  - {{name: b, gpu: A100-80G, count: 1{on}}}\n"
                         "network:\n  default: {bandwidth: 100Gbps, latency: 0.01ms}\n")


def two_stages(tp0: int = 1):
    stages = (Stage("a", tuple(range(tp0)), tp0, (0, 20), "A100-80G"), Stage("b", (0,), 1, (20, 40), "A100-80G"))
    return Plan(hexplan.load_model("llama-2-13b"), (Pipeline(stages, 1.0),), assumptions={"workload": W.to_dict()})


def saturated(plan, c, duration=120.0):
    trace = (TraceRequest(0.0, W.prompt_tokens, W.output_tokens),) * 3000
    res = simulate(plan, c, WorkloadSpec(arrival="trace", trace=trace, duration=duration))
    assert res.requests_unfinished > 0, "the batch ran dry: not an overload"
    return res


def alone(plan, c):
    """One request every 30 s: a single loop, the stages never run at once."""
    trace = tuple(TraceRequest(30.0 * i, W.prompt_tokens, W.output_tokens) for i in range(10))
    return simulate(plan, c, WorkloadSpec(arrival="trace", trace=trace, duration=300.0, warmup=0.0))


def test_the_fields_read_back_and_bad_ones_name_themselves():
    c = cluster("box", cores=4, contention=0.15)
    assert c.hosts == (Host("box", 4, 0.15),) and {n.host for n in c.nodes} == {"box"}
    again = hexplan.cluster.cluster_from_dict(cluster_to_dict(c), hexplan.yamlio.Locator(None, {}))
    assert again.hosts == c.hosts and [n.host for n in again.nodes] == ["box", "box"]
    assert "hosts" not in cluster_to_dict(cluster(None))
    with pytest.raises(SpecError, match=r"nodes\[0\]\.host.*unknown host 'nope'"):
        loads_cluster("name: x\nnodes:\n  - {name: a, gpu: A100-80G, count: 1, host: nope}\n")
    with pytest.raises(SpecError, match=r"hosts\.box\.cores"):
        loads_cluster("name: x\nhosts:\n  box: {cores: 0}\nnodes:\n  - {name: a, gpu: A100-80G, count: 1, host: box}\n")
    with pytest.raises(SpecError, match=r"hosts\.box\.contention"):
        loads_cluster("name: x\nhosts:\n  box: {cores: 2, contention: -1}\nnodes:\n  - {name: a, gpu: A100-80G, count: 1}\n")


def test_slowdown():
    h = Host("box", 2, 0.2)
    one = (1, 1, 1.0)                                     # a 1-thread worker, computing all through
    assert h.slowdown(one) == 1.0
    assert h.slowdown(one, (one,)) == pytest.approx(1.2)             # both cores busy: bandwidth only
    assert h.slowdown(one, (one, one)) == pytest.approx(1.5 * 1.4)   # 3 workers on 2 cores, and bandwidth
    assert h.slowdown((1, 2, 1.0)) == 1.0
    # A TP-2 stage whose ranks compute 60% of its step and wait on all-reduces for the rest.
    tp2 = (2, 1, 0.6)
    assert h.slowdown(tp2) == pytest.approx(1.2)                     # alone: its ranks have the cores
    # Beside a 1-worker stage its ranks share the cores with it, in lockstep: 3 threads on 2.
    assert h.slowdown(tp2, (one,)) == pytest.approx(1.5 * 1.4)
    # The 1-worker stage beside it keeps its core: the ranks take turns on the other (they count
    # one worker's thread), so only bandwidth slows it.
    assert h.slowdown(one, (tp2,)) == pytest.approx(1.4)
    assert h.slowdown(one, ((2, 1, 1.0),)) == pytest.approx(1.4)     # ranks computing all through too
    assert h.slowdown(one, ((2, 1, 0.0),)) == pytest.approx(1.4)     # ranks that only wait: bandwidth only
    # On one core it shares that core with the ranks' turns while they compute (60% of the time).
    single = Host("box", 1, 0.0)
    assert single.slowdown(one, (tp2,)) == pytest.approx(0.6 * 2.0 + 0.4 * 1.0)
    # Two TP-2 stages computing half the time beside a 1-worker stage, no contention: each
    # counts one thread to it, so 1, 2 or 3 threads on 2 cores with probability 1/4, 1/2, 1/4.
    bare = Host("box", 2, 0.0)
    assert bare.slowdown(one, ((2, 1, 0.5), (2, 1, 0.5))) == pytest.approx(0.25 * 1 + 0.5 * 1 + 0.25 * 1.5)
    # A TP-2 stage beside them counts every rank, its own and the others': 2 + 2 + 1 threads.
    assert bare.slowdown((2, 1, 1.0), ((2, 1, 1.0), one)) == pytest.approx(2.5)


def test_slowdown_averages_the_others_phases():
    # Against a brute force over which of the other stages compute at a moment (each for its
    # share of the time, independently): max(1, threads / cores), weighted, x contention; to a
    # 1-worker stage, each other stage counts one worker's threads.
    import itertools
    import random
    rng = random.Random(7)
    for _ in range(200):
        h = Host("box", rng.choice([1, 2, 4, 8]), rng.choice([0.0, 0.05, 0.3]))
        stage = (rng.randint(1, 4), rng.randint(1, 2), rng.random())
        others = tuple((rng.randint(1, 4), rng.randint(1, 3), rng.choice([0.0, 1.0, rng.random()]))
                       for _ in range(rng.randint(0, 4)))
        want = 0.0
        for on in itertools.product((False, True), repeat=len(others)):
            p, threads = 1.0, stage[0] * stage[1]
            for (w, t, share), o in zip(others, on):
                p *= share if o else 1.0 - share
                threads += (t if stage[0] == 1 else w * t) if o else 0
            want += p * max(1.0, threads / h.cores)
        want *= 1.0 + h.contention * (stage[0] + sum(o[0] for o in others) - 1)
        assert h.slowdown(stage, others) == pytest.approx(want, rel=1e-12), (h, stage, others)


def test_stages_that_never_overlap_are_not_slowed():
    plan = two_stages()
    free, shared = alone(plan, cluster(None)), alone(plan, cluster("box"))
    assert shared.requests_completed == free.requests_completed == 10
    assert shared.ttft_s.p50 == pytest.approx(free.ttft_s.p50, rel=1e-9)
    assert shared.tpot_s.p50 == pytest.approx(free.tpot_s.p50, rel=1e-9)


@pytest.mark.parametrize("cores, contention, want", [(2, 0.2, 1.2), (1, 0.0, 2.0), (2, 0.0, 1.0)])
def test_saturated_stages_share_the_host(cores, contention, want):
    # Two balanced stages, two loops: at saturation each stage is busy nearly all the time, so
    # both run at once nearly all the time and the pipeline's rate drops by the pair's slowdown.
    plan = two_stages()
    free = saturated(plan, cluster(None))
    shared = saturated(plan, cluster("box", cores, contention))
    ratio = free.throughput_tokens_per_s / shared.throughput_tokens_per_s
    assert ratio == pytest.approx(want, rel=0.06), (free.throughput_tokens_per_s, shared.throughput_tokens_per_s)


def test_the_cost_model_rates_a_shared_host_with_every_stage_computing():
    from hexplan.evaluate import CostCache, evaluate_plan_pipelines, host_slowdowns, pipeline_overheads
    # A TP-2 stage then a TP-1 stage on 2 cores, contention 0.2: 3 workers of 1 thread. Alone,
    # the TP-2 stage's ranks contend (1.2) and fill the cores; with both computing it gets 1.5
    # (3 threads on 2 cores) x 1.4 (two workers beyond the first), the TP-1 stage 1.0 x 1.4.
    shared, own = cluster("box", 2, 0.2), cluster(None)
    assert host_slowdowns(own, ["a", "b"], [2, 1]) is None
    alone_f, busy = host_slowdowns(shared, ["a", "b"], [2, 1])
    assert alone_f == pytest.approx([1.2, 1.0]) and busy == pytest.approx([2.1, 1.4])
    # another pipeline's stage on the host counts too: beside a second TP-1 worker the threads
    # are max(1, 2 // 4) = 1 each, and it adds a worker
    _, busy4 = host_slowdowns(shared, ["a", "b"], [2, 1], beside=[("b", 1)])
    assert busy4 == pytest.approx([2.0 * 1.6, 1.5 * 1.6])
    plan = two_stages(tp0=2)
    cache = CostCache(plan.model, W)
    (m,), (m0,) = evaluate_plan_pipelines(shared, cache, plan.pipelines), evaluate_plan_pipelines(own, cache, plan.pipelines)
    # capacity at the slowdown with both computing
    assert m.stage_capacity == pytest.approx([c / f for c, f in zip(m0.stage_capacity, busy)])
    assert m.throughput < m0.throughput
    # TPOT and TTFT, a request alone: the TP-2 stage's layers at 1.2, the rest as without the host
    sc = pipeline_overheads(own, cache, ["a", "b"], [2, 1]).costs
    assert m.tpot_s == pytest.approx(m0.tpot_s + 20 * sc[0].decode_layer_s * 0.2)
    assert m.ttft_s == pytest.approx(m0.ttft_s + 20 * sc[0].prefill_layer_s * 0.2)


@pytest.mark.parametrize("cores, contention, want", [(2, 0.2, 1.2), (1, 0.0, 2.0), (2, 0.0, 1.0)])
def test_the_cost_model_and_the_simulator_agree_on_a_saturated_shared_host(cores, contention, want):
    # the same plans and ``want`` as test_saturated_stages_share_the_host, where the simulator's
    # saturated throughput drops by that ratio: here the cost model's capacity must too
    from hexplan.evaluate import CostCache, evaluate_plan_pipelines
    plan = two_stages()
    cache = CostCache(plan.model, W)
    (free,), (shared,) = (evaluate_plan_pipelines(c, cache, plan.pipelines)
                          for c in (cluster(None), cluster("box", cores, contention)))
    assert free.throughput / shared.throughput == pytest.approx(want, rel=0.01)


def test_a_tp_stage_alone_shares_the_host_between_its_ranks():
    # A TP-2 stage then a TP-1 stage on a 2-core host: 3 workers, 1 thread each. Alone, the TP-2
    # stage's two ranks contend (1 + c); the TP-1 stage runs at its profile.
    plan = two_stages(tp0=2)
    free, shared = alone(plan, cluster(None)), alone(plan, cluster("box", 2, 0.2))
    assert free.requests_completed == shared.requests_completed == 10
    assert shared.tpot_s.p50 > free.tpot_s.p50 * 1.02
    assert shared.tpot_s.p50 < free.tpot_s.p50 * 1.2


def test_a_step_with_a_prompt_chunk_costs_at_least_the_pass_the_executor_makes():
    # A chunk is charged its share of its prompt's prefill (chunking spreads a prompt's cost: the
    # planner's accounting) less the step's fixed cost, which the step pays once, but a step is
    # never cheaper than the executor's one pass over all its T tokens: a prompt forward of T,
    # less the attention across them that its chunks do not have, plus each chunk's own (within
    # itself, and to the positions before it) and each decode's. On a CPU a small forward is
    # mostly fixed cost, so that pass is the larger for few decodes. The profile:
    # bench/fidelity_bench.py's model on the 2-core development host, 1 thread.
    from hexplan.costmodel import CostParams, _quadratic, _quadratic_fit, decode_attention_time, step_fixed_time
    from hexplan.simulator.engine import Engine, EngineStats

    c = loads_cluster("name: cpu\ngpu_types:\n  A100-80G:\n    profiles:\n      llama-2-13b:\n"
                      "        decode_ms: {1: 2.52, 2: 2.58, 4: 4.27, 8: 5.95, 16: 7.52}\n"
                      "        prefill_ms: {16: 5.5, 32: 6.47, 64: 8.48, 128: 13.74, 256: 28.8}\n"
                      "nodes:\n  - {name: a, gpu: A100-80G, count: 2}\n  - {name: b, gpu: A100-80G, count: 1}\n")
    eng = Engine(two_stages(), c, W, CostParams())
    eng.stats = EngineStats(window=(0.0, 1.0))
    eng.prompt = [136, 16, 256, 16]
    pipe = eng.pipes[0]
    kind = pipe.kinds[0]
    gpu = c.node("a").gpu
    table = gpu.profile_for("llama-2-13b").prefill_ms
    q = _quadratic(table) / 1e3
    assert q > 0 and kind.pair == pytest.approx(q)
    # the fixed cost: the intercept of the same quadratic fit, 4.74 of a 16-token prompt's 5.5 ms
    fixed = _quadratic_fit(table)[0] / 1e3
    assert 4.5e-3 < fixed < 5e-3 and kind.fixed == pytest.approx(fixed)
    assert step_fixed_time(two_stages().model, gpu, 2) == pytest.approx(fixed / 2)

    def per_layer(n_dec, chunks):
        return eng._layer_times(pipe, n_dec, n_dec * 150, chunks, 1, n_dec + sum(ch[2] for ch in chunks))[0]

    # a decoding sequence beside a chunk: the decode table's growth per sequence between its
    # two largest batches (8 and 16) less the prefill table's per token (from 16 to 32: it has
    # no points below 16)
    attn = decode_attention_time(two_stages().model, gpu, 1, 150)
    assert attn == pytest.approx(((7.52 - 5.95) / 8 - (6.47 - 5.5) / 16) / 1e3)
    # 1 decode and a 32-token chunk of a 136-token prompt at position 32: a forward of 33
    # tokens, its attention across 33 x 33 pairs replaced by the chunk's 32 x 32 and 2 x 32 x 32
    # to the 32 before it, and the decode's; above the share rule
    share = kind.decode(1, 150) + (kind.prefill(136) - fixed) * 32 / 136
    one = kind.prefill(33) - q * (33 * 33 - 32 * 32 - 2 * 32 * 32) + attn
    assert one > share and per_layer(1, [(0, 32, 32, False)]) == pytest.approx(one)
    # a chunk alone pays the fixed cost and its share (at least a prompt forward of its tokens);
    # a whole prompt alone keeps its prefill
    alone = fixed + (kind.prefill(136) - fixed) * 32 / 136
    assert alone > kind.prefill(32) and per_layer(0, [(0, 0, 32, False)]) == pytest.approx(alone)
    assert per_layer(0, [(1, 0, 16, True)]) == pytest.approx(kind.prefill(16))
    # two whole 16-token prompts pay the fixed cost once: the two prefills less one fixed cost,
    # here below the pass (a forward of 32 tokens without the attention between the prompts)
    two = 2 * kind.prefill(16) - fixed
    pass32 = kind.prefill(32) - q * (32 * 32 - 2 * 256)
    assert two < pass32 < 2 * kind.prefill(16)
    assert per_layer(0, [(1, 0, 16, True), (3, 0, 16, True)]) == pytest.approx(pass32)
    # decode-heavy: 16 decodes and an 8-token chunk keep the sum of a decode step and the
    # chunk's share less the fixed cost, above the pass
    many = kind.decode(16, 16 * 150) + (kind.prefill(256) - fixed) * 8 / 256
    assert kind.prefill(24) - q * (24 * 24 - 64) + 16 * attn < many
    assert per_layer(16, [(2, 0, 8, False)]) == pytest.approx(many)
    # without a measured prefill table there is no fixed cost: a roofline's prompt is its FLOPs
    bare = loads_cluster("name: g\nnodes:\n  - {name: a, gpu: A100-80G, count: 1}\n").node("a").gpu
    assert step_fixed_time(two_stages().model, bare, 1) == 0.0


def test_an_attention_pair_is_the_prefill_tables_quadratic_term():
    from hexplan.costmodel import DEFAULT_PARAMS, _quadratic, attention_pair_time
    from hexplan.gpus import ProfileTable

    # a table that is exactly a + b P + q P^2: the fit gives q back, the time of a (query, key)
    # pair in the unit a prompt's P^2 counts them (a chunk of c tokens at s has c^2 + 2 s c)
    a, b, q = 3.0, 0.05, 1e-4
    table = ProfileTable(tuple((x, a + b * x + q * x * x) for x in (16, 32, 64, 128, 256, 512)))
    assert _quadratic(table) == pytest.approx(q, rel=1e-6)
    assert _quadratic(ProfileTable(((16, 1.0), (32, 2.0)))) == 0.0          # too few points to tell
    c = loads_cluster("name: cpu\ngpu_types:\n  A100-80G:\n    profiles:\n      llama-2-13b:\n"
                      "        decode_ms: {1: 2.5}\n"
                      "        prefill_ms: {" + ", ".join(f"{x}: {y!r}" for x, y in table.points) + "}\n"
                      "nodes:\n  - {name: a, gpu: A100-80G, count: 2}\n")
    model, gpu = hexplan.load_model("llama-2-13b"), c.node("a").gpu
    assert attention_pair_time(model, gpu, 1) == pytest.approx(q / 1e3, rel=1e-6)
    assert attention_pair_time(model, gpu, 2) == pytest.approx(q / 2e3, rel=1e-6)     # TP 2: half the heads each
    # without a profile: a pair's attention FLOPs at the roofline's rate, as the prefill
    # roofline's 2 P^2 d_h heads counts them
    bare = loads_cluster("name: g\nnodes:\n  - {name: a, gpu: A100-80G, count: 1}\n").node("a").gpu
    flops = 2 * model.dim_head * model.num_heads
    assert attention_pair_time(model, bare, 1) == pytest.approx(flops / (bare.flops * DEFAULT_PARAMS.flops_efficiency))


def test_three_stages_that_together_exceed_the_cores_share_them():
    # Three one-stage pipelines of one 1-thread worker each on a 2-core host, no contention: no
    # two of them exceed the cores, all three do (3 threads on 2 cores: 1.5x while all run).
    # Saturated, all three run nearly all the time: together they serve 2/3 of the rate they
    # would on separate machines. (The pairwise rule before gave them the whole rate.)
    def c(host):
        on = ", host: box" if host else ""
        return loads_cluster(("hosts:\n  box: {cores: 2, contention: 0.0}\n" if host else "") + "name: three\nnodes:\n"
                             f"  - {{name: a, gpu: A100-80G, count: 2{on}}}\n  - {{name: b, gpu: A100-80G, count: 1{on}}}\n"
                             "network:\n  default: {bandwidth: 100Gbps, latency: 0.01ms}\n")
    m = hexplan.load_model("llama-2-13b")
    one = Workload(512, 128, 16, 16)
    pipes = tuple(Pipeline((Stage(n, (g,), 1, (0, 40), "A100-80G"),), 1 / 3) for n, g in (("a", 0), ("a", 1), ("b", 0)))
    plan = Plan(m, pipes, assumptions={"workload": one.to_dict()})
    trace = (TraceRequest(0.0, 512, 128),) * 3000
    spec = WorkloadSpec(arrival="trace", trace=trace, duration=120.0)
    free, shared = simulate(plan, c(False), spec), simulate(plan, c(True), spec)
    assert shared.requests_unfinished > 0
    assert free.throughput_tokens_per_s / shared.throughput_tokens_per_s == pytest.approx(1.5, rel=0.05)
    # two of them alone on the host: no slowdown (2 threads, 2 cores)
    two = Plan(m, pipes[:2], assumptions={"workload": one.to_dict()})
    r2f, r2s = simulate(two, c(False), spec), simulate(two, c(True), spec)
    assert r2f.throughput_tokens_per_s == pytest.approx(r2s.throughput_tokens_per_s, rel=1e-9)


def test_solve_notes_a_host_with_more_workers_than_cores(tmp_path):
    # cluster_specs/local-cpu.yaml with its two nodes on one 2-core machine: the planner puts a
    # replica on each of the three CPU "GPUs" (three workers, 1 thread each, 2 cores) and says on
    # stderr that it placed them as if alone; without `hosts:` it says nothing. Its prediction
    # takes the host: 3 threads on 2 cores, 1.5x slower than the same plan apart.
    import json
    import subprocess
    import sys
    from pathlib import Path

    from hexplan.validate import shared_host_notes

    root = Path(__file__).resolve().parent.parent
    spec = (root / "cluster_specs" / "local-cpu.yaml").read_text()
    shared = spec.replace("address: 127.0.0.1:50061}", "address: 127.0.0.1:50061, host: box}") \
                 .replace("address: 127.0.0.1:50062}", "address: 127.0.0.1:50062, host: box}") \
        + "hosts:\n  box: {cores: 2}\n"
    assert shared.count("host: box") == 2
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
           "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "vocab_size": 1000, "max_position_embeddings": 512, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = {}
    for name, text in (("shared", shared), ("apart", spec)):
        (tmp_path / f"{name}.yaml").write_text(text)
        r = subprocess.run([sys.executable, "-m", "hexplan.cli", "solve", str(tmp_path / f"{name}.yaml"), "-m",
                            str(tmp_path / "config.json"), "--time-limit", "10", "-q", "-o", str(tmp_path / f"{name}.plan.yaml")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[name] = r
    plan = hexplan.load_plan(tmp_path / "shared.plan.yaml")
    assert plan.num_gpus == 3
    note = "hexplan: note: host 'box' runs 3 workers on 2 cores (1 thread each)"
    assert note in out["shared"].stderr and note not in out["shared"].stdout
    assert "hexplan: note" not in out["apart"].stderr
    assert shared_host_notes(plan, loads_cluster(spec)) == []
    apart = hexplan.load_plan(tmp_path / "apart.plan.yaml")
    assert [[(s.node, s.gpus, s.layers) for s in p.stages] for p in apart.pipelines] == \
        [[(s.node, s.gpus, s.layers) for s in p.stages] for p in plan.pipelines]
    assert plan.throughput == pytest.approx(apart.throughput / 1.5, rel=0.01)
