"""A finished response means its KV cache is freed: the gateway ends a generative stream only
after every stage has released the request's cache (and still ends it when the release fails),
so a client that reads Stats the moment its stream ends finds nothing held, under fcfs and mlfq,
with preemption, offload and prefill-only requests chunked across steps."""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent import futures

import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import make_checkpoint, plan  # noqa: E402

from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor.gateway import Gateway, Pipeline  # noqa: E402
from hexplan.executor.sampling import Sampling  # noqa: E402
from hexplan.executor.wire import to_proto  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("release") / "m", layers=4, kv_heads=2)


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "stage went away"


class FakeStage:
    """Stage 0 of a one-stage pipeline: Forward returns logits whose argmax is token 7; Release
    records which requests' streams had already ended when it was called."""

    def __init__(self, vocab, fail_release=False):
        self.vocab, self.fail_release = vocab, fail_release
        self.ended_before_release: list = []
        self.requests: list = []

    def Forward(self, req, timeout=None):
        logits = torch.zeros(len(req.chunks), self.vocab)
        logits[:, 7] = 1.0
        return pb.ForwardResponse(logits=to_proto(logits))

    def Release(self, req, timeout=None):
        for r in self.requests:
            if r.id in req.request_ids:
                self.ended_before_release += [r.id for ev in list(r.events.queue) if ev[0] == "done"]
        if self.fail_release:
            raise Unavailable()
        return pb.ReleaseResponse(released=len(req.request_ids))


def _gateway_with_fake_stage(ckpt, stage):
    gw = Gateway(plan(ckpt, [("a", 1, 0, 4)]), ckpt, {})
    p = Pipeline(0, 1.0, ["stage0"], ["a"])
    gw.pipelines.append(p)
    gw._stubs["stage0"] = stage
    return gw, p


@pytest.mark.parametrize("fail_release", [False, True])
def test_stream_ends_only_after_release(ckpt, caplog, fail_release):
    stage = FakeStage(256, fail_release)
    gw, p = _gateway_with_fake_stage(ckpt, stage)
    stop = gw.submit([1, 2, 3], Sampling(stop_token_ids=(7,), max_new_tokens=5))
    length = gw.submit([4, 5], Sampling(max_new_tokens=1))
    going = gw.submit([6], Sampling(max_new_tokens=5))
    stage.requests = [stop, length, going]
    step = gw.runner.next_step(0, 0, wait=0)         # the three prompts, whole
    assert [(c[0], c[2], c[3]) for c in step.prefill] == [(stop.sid, 3, True), (length.sid, 2, True),
                                                           (going.sid, 1, True)]
    with caplog.at_level(logging.WARNING, logger="hexplan.gateway"):
        assert gw.runner.run(step)
    assert stage.ended_before_release == []          # no stream ended before its KV was released
    for r, reason in ((stop, "stop"), (length, "length")):
        assert list(r.events.queue) == [("tokens", [7]), ("done", reason)]
        assert r.finished and r.sid not in gw.requests
    assert list(going.events.queue) == [("tokens", [7])] and not going.finished
    assert gw.scheduler.loads() == [1]
    if fail_release:                                  # logged, and the streams still ended
        assert "release of 2 request(s) failed (UNAVAILABLE: stage went away)" in caplog.text
    else:
        assert caplog.text == ""


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_kv_is_freed_when_the_stream_ends(ckpt, policy):
    from hexplan.executor.client import generate, prefill
    from hexplan.executor.launch import Launch

    # Two KV slots, micro-batches of two, prompts chunked by 3 tokens and (mlfq) a 1 ms quantum:
    # requests are preempted and offloaded, prefill-only prompts span several steps (under mlfq
    # possibly in different loops). Every Release reaches the stages 0.5 s late: a stream that
    # ended before its release would leave KV for the Stats read below.
    pl = plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)])
    pl = dataclasses.replace(pl, assumptions={"workload": {"prompt_tokens": 8, "output_tokens": 8,
                                                           "batch_size": 2, "concurrency": 2}})
    gen = [([5, 17, 33], 6), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 4), ([200, 100], 8), ([42] * 20, 5)]
    score = [[250, 3, 77, 91, 12, 6] * 4, [9] * 5]
    with Launch(pl, ckpt, policy=policy, prefill_chunk=3, mlfq_quantum_s=0.001) as L:
        gw = L.gateway
        release = gw.release

        def late_release(p, reqs):
            if reqs:
                time.sleep(0.5)
            release(p, reqs)
        gw.release = late_release
        with futures.ThreadPoolExecutor(len(gen) + len(score)) as pool:
            g = [pool.submit(generate, L.address, token_ids=t, max_new_tokens=n, timeout=120) for t, n in gen]
            s = [pool.submit(prefill, L.address, token_ids=t, timeout=120) for t in score]
            gens = [j.result(timeout=150) for j in g]
            [j.result(timeout=150) for j in s]
        for addr in gw.pipelines[0].stages:
            st = gw.stub(addr).Stats(pb.StatsRequest(), timeout=10)
            assert (st.sequences, st.kv_bytes, st.offloaded_bytes) == (0, 0, 0), (addr, st)
    assert [len(r["token_ids"]) for r in gens] == [n for _, n in gen]
    assert all(r["finish_reason"] == "length" for r in gens)


class GreedyStage(FakeStage):
    """Answers a greedy step with tokens (the argmax of its logits), as a real last stage does;
    records each step's greedy flag."""

    def __init__(self, vocab, bad_row: int | None = None):
        super().__init__(vocab)
        self.flags: list = []
        self.bad_row = bad_row

    def Forward(self, req, timeout=None):
        self.flags.append(req.greedy)
        if not req.greedy:
            return super().Forward(req, timeout)
        tokens = [7] * len(req.chunks)
        if self.bad_row is not None:
            tokens[self.bad_row] = -1                 # a row whose logits were not finite
        return pb.ForwardResponse(tokens=tokens)


def test_greedy_steps_get_tokens_and_sampled_steps_logits(ckpt):
    stage = GreedyStage(256, bad_row=1)
    gw, p = _gateway_with_fake_stage(ckpt, stage)
    a = gw.submit([1, 2, 3], Sampling(max_new_tokens=2))
    b = gw.submit([4, 5], Sampling(max_new_tokens=2))
    assert gw.runner.run(gw.runner.next_step(0, 0, wait=0))
    assert stage.flags == [True]
    assert list(a.events.queue)[0] == ("tokens", [7])
    (ev,) = [e for e in b.events.queue if e[0] == "error"]      # its row was -1: it fails, a goes on
    assert b.failed and ev[1] == grpc.StatusCode.INTERNAL and "non-finite" in ev[2]
    # one sampled request in the step: the whole step asks for logits
    stage.bad_row = None
    c = gw.submit([6], Sampling(temperature=0.5, seed=1, max_new_tokens=1))
    assert gw.runner.run(gw.runner.next_step(0, 0, wait=0))
    assert stage.flags[-1] is False and c.generated and a.generated == [7, 7]
