"""hexplan.serving's scheduler: its pieces alone, and the differential test: the gateway and the
simulator, fed the same arrivals and the same step durations, produce the same sequence of Steps
(fcfs and mlfq, prefill-only requests mixed in). The simulator's run is recorded (every add,
schedule and update, with its time); the gateway's own objects (Gateway.submit, its scheduler
as build_scheduler makes it, StepRunner.next_step and StepRunner.finish) then replay it, and
every Step and every set of ended sequences must be equal. A change to either side's
configuration (loops, batch, chunk, KV budget, estimates, routing) or to how either feeds the
scheduler fails it."""
from __future__ import annotations

import json
import math
import random

import pytest

from hexplan.cluster import loads_cluster
from hexplan.costmodel import CostParams, Workload
from hexplan.dispatch import skip_join_level
from hexplan.plan import plan_from_dict
from hexplan.serving import DONE_OK, NoPipeline, PipelineConfig, Scheduler, StepResult, pipeline_configs


def cfg(**kw) -> PipelineConfig:
    d = dict(stages=1, loops=1, batch=4, concurrency=4, kv_tokens=10_000, chunk=8, whole=8)
    d.update(kw)
    return PipelineConfig(**d)


# ---- fcfs -------------------------------------------------------------------------------------

def test_fcfs_chunks_prompts_while_decoding_and_ends_at_max_new_tokens():
    s = Scheduler([cfg(chunk=4, whole=6)])
    a = s.add(5, 2, 0.0)
    st = s.schedule(0.0, 0, 0)                       # nothing decoding: the first prompt goes whole
    assert st.prefill == ((a, 0, 5, True),) and st.decode == () and st.logits == 1
    assert s.update(st) == []
    b = s.add(10, 3, 0.0)
    st = s.schedule(0.0, 0, 0)                       # a decodes, so b's prompt comes in chunks of 4
    assert st.decode == (a,) and st.prefill == ((b, 0, 4, False),) and st.logits == 1
    assert st.decode_context == 6                    # its prompt and its first token
    assert s.update(st) == [a]                       # a's second token: max_new_tokens reached
    st = s.schedule(0.0, 0, 0)                       # nothing decoding: the rest of b whole
    assert st.prefill == ((b, 4, 6, True),) and s.partial_chunks == 1
    s.update(st)
    st = s.schedule(0.0, 0, 0)
    assert st.decode == (b,) and st.decode_context == 11
    assert s.update(st) == []
    st = s.schedule(0.0, 0, 0)
    assert s.update(st) == [b] and s.loads() == [0] and s.schedule(0.0, 0, 0) is None


def test_fcfs_admission_respects_batch_concurrency_and_kv():
    s = Scheduler([cfg(batch=3, concurrency=2, kv_tokens=100, chunk=100, whole=100)])
    ids = [s.add(10, 10, 0.0) for _ in range(4)]
    st = s.schedule(0.0, 0, 0)
    assert [c[0] for c in st.prefill] == ids[:2]     # concurrency 2
    s2 = Scheduler([cfg(batch=8, concurrency=8, kv_tokens=50, chunk=100, whole=100)])
    big = [s2.add(10, 10, 0.0) for _ in range(3)]
    st = s2.schedule(0.0, 0, 0)
    assert [c[0] for c in st.prefill] == big[:2]     # 20 KV tokens each, 50 in all
    assert not s2.fits(40, 11) and s2.fits(40, 10)


def test_prefill_only_passes_a_full_pipeline_and_drops_its_kv():
    s = Scheduler([cfg(batch=4, concurrency=1, chunk=100, whole=100)])
    g = s.add(3, 5, 0.0)
    s.update(s.schedule(0.0, 0, 0))
    waiting = s.add(2, 5, 0.0)
    p = s.add(4, 0, 0.0, prefill_only=True)
    st = s.schedule(0.0, 0, 0)
    assert st.decode == (g,) and st.prefill == ((p, 0, 4, True),) and st.dropped == (p,)
    assert st.logits == 2
    assert s.update(st) == [p]
    assert list(s.pipes[0].pending) == [waiting]


def test_stop_tokens_and_cancellation_end_sequences_and_free_their_slots():
    s = Scheduler([cfg(batch=4, concurrency=2, chunk=100, whole=100)])
    a, b = s.add(3, 9, 0.0), s.add(3, 9, 0.0)
    c = s.add(3, 9, 0.0)
    s.update(s.schedule(0.0, 0, 0))
    st = s.schedule(0.0, 0, 0)
    assert st.decode == (a, b)
    assert s.update(st, StepResult(finished=(a,))) == [a]     # a stop token
    s.cancel(b)                                               # between steps: freed by the next step
    st = s.schedule(0.0, 0, 0)
    assert st.released == (b,) and st.prefill == ((c, 0, 3, True),)
    s.update(st)
    st = s.schedule(0.0, 0, 0)
    assert st.decode == (c,)
    s.cancel(c)                                               # in a step: ends when it is done
    assert s.update(st) == [c] and s.loads() == [0]


def test_a_failed_pipeline_moves_its_sequences_with_their_context():
    s = Scheduler([cfg(weight=1.0), cfg(weight=1.0)])
    a = s.add(5, 10, 0.0, pipeline=0)
    s.update(s.schedule(0.0, 0, 0))
    s.update(s.schedule(0.0, 0, 0))                # two tokens generated
    moved = s.fail(0)
    assert moved == [a] and s.schedule(0.0, 0, 0) is None and not s.runnable(0)
    s.requeue(a, 7, 8, 1.0)
    assert s.pipe_of[a] == 1
    st = s.schedule(1.0, 1, 0)
    assert st.prefill == ((a, 0, 7, True),)          # prompt + the 2 tokens already streamed
    assert s.out[a] == 8
    s.update(st)                                     # a third token
    s.fail(1)
    with pytest.raises(NoPipeline):
        s.add(3, 3, 2.0)
    # moved again, after waiting for a pipeline (a first requeue that found none): the count
    # is the caller's, never taken off twice
    with pytest.raises(NoPipeline):
        s.requeue(a, 8, 7, 3.0)
    s.revive(0)
    s.requeue(a, 8, 7, 4.0)
    assert s.pipe_of[a] == 0 and s.out[a] == 7
    done, steps = [], 0
    while not done and steps < 20:
        done = s.update(s.schedule(5.0, 0, 0))
        steps += 1
    assert done == [a] and steps == 7                # exactly the 7 tokens it had left


# ---- mlfq -------------------------------------------------------------------------------------

def mlfq(q0=1.0, levels=3, promote=10.0, **kw):
    c = cfg(decode_s=1.0, prefill_s=lambda n: n / 10, estimated=True, **kw)
    return Scheduler([c], "mlfq", mlfq_levels=levels, mlfq_quantum_s=q0, mlfq_promote_s=promote)


def test_mlfq_skip_join_order_demotion_and_promotion():
    assert [skip_join_level(t, 1.0, 4) for t in (0.5, 1.0, 1.5, 3.0, 7.9, 100.0)] == [0, 0, 1, 2, 3, 3]
    s = mlfq(batch=1, chunk=100, whole=100)          # quanta 1, 2, 4 s; prefill n / 10 s
    a = s.add(5, 50, 0.0)                            # 0.5 s: queue 0
    b = s.add(15, 50, 0.0)                           # 1.5 s: skips queue 0
    c = s.add(5, 50, 0.0)
    assert [s.level[x] for x in (a, b, c)] == [0, 1, 0]
    st = s.schedule(0.0, 0, 0)
    assert st.prefill == ((a, 0, 5, True),)          # priority order, one sequence per step
    s.update(st, now=0.5)
    st = s.schedule(0.5, 0, 0)
    assert st.decode == (a,)                         # a still has quantum left (0.5 of 1 s)
    s.update(st, now=1.5)                            # charged one decode step (1 s): demoted
    assert s.level[a] == 1 and s.demotions == 1
    st = s.schedule(1.5, 0, 0)
    assert st.prefill == ((c, 0, 5, True),) and st.preempted == (a,)
    s.update(st, now=2.0)
    st = s.schedule(12.5, 0, 0)                      # b and a waited > 10 s: to the back of the top queue
    assert s.promotions == 2 and (s.level[a], s.level[b]) == (0, 0)
    assert st.decode == (c,)                         # c was there first
    s.update(st, now=13.0)
    assert s.schedule(13.0, 0, 0).prefill == ((b, 0, 15, True),)


def test_mlfq_offloads_lower_priority_kv_and_restores_it():
    s = mlfq(q0=0.5, levels=2, promote=1e9, batch=1, kv_tokens=20, chunk=100, whole=100)
    a = s.add(5, 10, 0.0)                            # 15 KV tokens
    s.update(s.schedule(0.0, 0, 0), now=1.0)         # prefilled, 0.5 s charged: demoted to queue 1
    b = s.add(5, 2, 1.0)                             # queue 0, needs 7: a's KV goes to host memory
    st = s.schedule(1.0, 0, 0)
    assert st.offloaded == (a,) and st.prefill == ((b, 0, 5, True),) and s.offloads == 1
    s.update(st, now=2.0)
    st = s.schedule(2.0, 0, 0)                       # a cannot come back while b holds 7 of 20 tokens
    assert st.decode == (b,) and st.restored == ()
    assert s.update(st, now=3.0) == [b]
    st = s.schedule(3.0, 0, 0)                       # now it can: its prompt and first token return
    assert st.decode == (a,) and st.restored == (a,) and st.restored_tokens == 6 and s.swap_ins == 1


# ---- the differential test: the gateway's scheduler and the simulator -------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("grpc")


def _model_config(spec) -> dict:
    return {"model_type": "llama", "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings}


CLUSTER = {"name": "diff", "nodes": [{"name": "a", "gpu": "A100-80G", "count": 1},
                                     {"name": "b", "gpu": "L4", "count": 1},
                                     {"name": "c", "gpu": "L4", "count": 1}],
           "network": {"default": {"bandwidth": "10Gbps", "latency": "1ms"}}}


def _plan(ckpt, workload: dict | None):
    d = {"model": str(ckpt), "cluster": CLUSTER,
         "pipelines": [{"weight": 0.6, "stages": [{"node": "a", "gpus": [0], "tp": 1, "layers": [0, 32]}]},
                       {"weight": 0.4, "stages": [{"node": "b", "gpus": [0], "tp": 1, "layers": [0, 16]},
                                                  {"node": "c", "gpus": [0], "tp": 1, "layers": [16, 32]}]}]}
    if workload:
        d["assumptions"] = {"workload": workload}
    return plan_from_dict(d)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hexplan.models import load_model
    d = tmp_path_factory.mktemp("diff") / "llama-7b-shape"      # config.json only: nothing is loaded
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_model_config(load_model("llama-2-7b"))))
    return d


class _Stream:
    """The simulator's request stream: (time, prompt, output); output 0 is prefill-only."""

    def __init__(self, reqs):
        self.reqs, self.i, self.horizon, self.truncated = reqs, 0, 0.0, 0

    def next(self):
        if self.i >= len(self.reqs):
            return None
        self.i += 1
        return self.reqs[self.i - 1]


def _requests(n=120, rate=25.0, seed=1):
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prefill_only = rng.random() < 0.2
        out.append((t, rng.randint(8, 400), 0 if prefill_only else rng.randint(1, 60)))
    return out


def _record_simulation(plan, policy, reqs):
    """Run the simulator (as hexplan.simulate sets it up) and record its scheduler's calls."""
    from hexplan.simulator.run import _Policy, _setup
    from hexplan.simulator.workload import WorkloadSpec

    s = _setup(plan, loads_cluster(json.dumps(CLUSTER)), WorkloadSpec(rate=1.0, duration=1.0), None, None, None,
               policy=_Policy(policy))
    engine = s.engine
    log = []

    class Recorder(Scheduler):
        def add(self, prompt, max_new_tokens, now, prefill_only=False, pipeline=None):
            sid = super().add(prompt, max_new_tokens, now, prefill_only, pipeline)
            log.append(("add", now, prompt, max_new_tokens, prefill_only, sid, self.pipe_of[sid]))
            return sid

        def schedule(self, now, pipeline, loop):
            step = super().schedule(now, pipeline, loop)
            log.append(("schedule", now, pipeline, loop, step))
            return step

        def update(self, step, result=DONE_OK, now=0.0):
            done = super().update(step, result, now)
            log.append(("update", now, step, tuple(done)))
            return done

    def recording():
        sched = engine.__class__.new_scheduler(engine)
        sched.__class__ = Recorder
        return sched
    engine.new_scheduler = recording
    stats = engine.run(_Stream(reqs), (0.0, math.inf))
    return log, stats


def _replay_on_gateway(gw, log):
    """Feed the recorded run to the gateway's own objects; returns the first difference or None."""
    from hexplan.executor.gateway import Pipeline
    from hexplan.executor.sampling import Sampling

    import dataclasses
    gw.pipelines = [Pipeline(i, p.weight, [f"p{i}s{j}" for j in range(len(p.stages))], [s.node for s in p.stages])
                    for i, p in enumerate(gw.plan.pipelines)]
    ids: dict = {}          # the simulator's sequence id -> the gateway's (which reuses ended ones)

    def mapped(step):
        if step is None:
            return None
        m = lambda xs: tuple(ids[x] for x in xs)  # noqa: E731
        return dataclasses.replace(step, decode=m(step.decode), preempted=m(step.preempted),
                                   offloaded=m(step.offloaded), restored=m(step.restored),
                                   released=m(step.released), dropped=m(step.dropped),
                                   prefill=tuple((ids[c[0]],) + c[1:] for c in step.prefill))
    gw.release = lambda p, reqs: None
    clock = [0.0]
    gw.clock = lambda: clock[0]
    for i, ev in enumerate(log):
        clock[0] = ev[1]
        if ev[0] == "add":
            _, _, prompt, max_new, prefill_only, sid, pipe = ev
            req = gw.submit([1] * prompt, Sampling(max_new_tokens=max(max_new, 1)), prefill_only=prefill_only)
            ids[sid] = req.sid
            if gw.scheduler.pipe_of[req.sid] != pipe:
                return i, ev, ("routed", gw.scheduler.pipe_of[req.sid])
        elif ev[0] == "schedule":
            step = gw.runner.next_step(ev[2], ev[3], wait=0)
            if step != mapped(ev[4]):
                return i, ev, step
        else:
            step = mapped(ev[2])
            done = gw.runner.finish(step, torch.zeros(step.size, gw.vocab), [])
            if tuple(done) != tuple(ids[x] for x in ev[3]):
                return i, ev, done
    return None


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
@pytest.mark.parametrize("workload", [None, {"prompt_tokens": 200, "output_tokens": 30, "batch_size": 4,
                                             "concurrency": 12}])
def test_gateway_and_simulator_make_the_same_steps(ckpt, policy, workload):
    from hexplan.executor.gateway import Gateway

    plan = _plan(ckpt, workload)
    log, stats = _record_simulation(plan, policy, _requests())
    steps = [e for e in log if e[0] == "schedule" and e[4] is not None]
    assert len(steps) > 200 and stats.unfinished == 0
    assert any(e[4].dropped for e in steps) and any(len(e[4].decode) > 1 for e in steps)
    assert any(c[3] is False for e in steps for c in e[4].prefill), "no prompt was chunked"
    if policy == "mlfq":
        assert any(e[4].preempted for e in steps)
    gw = Gateway(plan, str(ckpt), {}, policy=policy)
    assert _replay_on_gateway(gw, log) is None
    assert len(gw.scheduler.prompt) < 120 and not gw.requests     # ended ids were reused, none left


def test_the_differential_test_sees_a_difference(ckpt):
    from hexplan.executor.gateway import Gateway

    plan = _plan(ckpt, None)
    log, _ = _record_simulation(plan, "fcfs", _requests())
    assert _replay_on_gateway(Gateway(plan, str(ckpt), {}, prefill_chunk=64), log) is not None
    assert _replay_on_gateway(Gateway(plan, str(ckpt), {}, max_batch=8), log) is not None


def test_serving_defaults_follow_the_pipeline():
    # A plan without a workload section: one loop per stage; with one, ceil(C / B) loops.
    w = Workload()
    bare = plan_from_dict({"model": "llama-2-7b", "pipelines": [
        {"stages": [{"node": "a", "gpus": [0], "tp": 1, "layers": [0, 32]}]},
        {"stages": [{"node": "b", "gpus": [0], "tp": 1, "layers": [0, 16]},
                    {"node": "c", "gpus": [0], "tp": 1, "layers": [16, 32]}]}]})
    one, two = pipeline_configs(bare, w)
    assert (one.loops, one.batch, one.concurrency) == (1, 16, 16)
    assert (two.loops, two.batch, two.concurrency) == (2, 16, 32)
    solved = plan_from_dict({"model": "llama-2-7b", "assumptions": {"workload": {"batch_size": 8, "concurrency": 40}},
                             "pipelines": [{"stages": [{"node": "a", "gpus": [0], "tp": 1, "layers": [0, 32]}]}]})
    (c,) = pipeline_configs(solved, Workload(batch_size=8, concurrency=40))
    assert (c.loops, c.batch, c.concurrency, c.kv_tokens) == (5, 8, 40, 40 * 640)


def test_serving_defaults_fit_the_stages_memory():
    # llama-2-13b on an L4 (24 GB) holding 30 of its 40 layers: about 19 GB of weights leaves
    # room for a few sequences of 640 tokens, not 2 x 16, so the two loops share what fits.
    from hexplan.serving.setup import memory_concurrency
    cluster = loads_cluster(json.dumps({"name": "m", "nodes": [{"name": "a", "gpu": "L4", "count": 1},
                                                               {"name": "b", "gpu": "L4", "count": 1}]}))
    bare = plan_from_dict({"model": "llama-2-13b", "pipelines": [{"stages": [
        {"node": "a", "gpus": [0], "tp": 1, "layers": [0, 30]}, {"node": "b", "gpus": [0], "tp": 1, "layers": [30, 40]}]}]})
    w = Workload()
    room = memory_concurrency(bare, bare.pipelines[0], w, CostParams(), cluster)
    assert 2 <= room < 16
    (c,) = pipeline_configs(bare, w, None, cluster)
    assert c.concurrency == room and c.loops == 2 and c.batch == -(-room // 2)
    (unknown,) = pipeline_configs(bare, w)            # no cluster: depth only
    assert (unknown.loops, unknown.concurrency) == (2, 32)


def test_forgotten_ids_are_reused_and_early_ends_leave_no_trace():
    s = Scheduler([cfg(batch=4, concurrency=4, chunk=100, whole=100)])
    a, b = s.add(3, 5, 0.0), s.add(3, 5, 0.0)
    s.update(s.schedule(0.0, 0, 0))
    st = s.schedule(0.0, 0, 0)
    assert s.update(st, StepResult(finished=(a,))) == [a]     # a stops early: filed to end later
    with pytest.raises(ValueError):
        s.forget(b)                                           # b has not ended
    s.forget(a)
    c = s.add(3, 5, 0.0)
    assert c == a and s.prompt[c] == 3 and s.state[c] == 0 and len(s.prompt) == 2
    ends = []
    for _ in range(8):
        st = s.schedule(0.0, 0, 0)
        if st is None:
            break
        ends += s.update(st)
    assert ends == [b, c]                                     # c runs its own 5 tokens, not a's end
    s.forget(b)
    s.forget(c)
    assert s.loads() == [0] and sorted(s.free) == [0, 1]
