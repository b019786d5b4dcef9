"""Interleaved steps: a step split into parts at the first stage, each sent on while the next is
computed, and on TP stages parts whose all-reduces run under each other's compute. The split
itself, the injected link delays, and token identity end to end."""
from __future__ import annotations

from concurrent import futures

import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc")

from hexplan.executor.distributed import Pending, SlowLink  # noqa: E402
from hexplan.executor.worker import parse_link_delay, split_parts  # noqa: E402


@pytest.mark.parametrize("lengths, n, want", [
    ([1] * 8, 2, [(0, 4), (4, 8)]),
    ([1] * 7, 3, [(0, 3), (3, 5), (5, 7)]),
    ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),            # a long prompt chunk is a part of its own
    ([1, 1, 1, 100], 2, [(0, 3), (3, 4)]),
    ([5, 5], 4, [(0, 1), (1, 2)]),                     # never more parts than chunks
    ([3], 2, [(0, 1)]),
    ([1, 2, 3], 1, [(0, 3)]),
    ([1, 2, 3], 0, [(0, 3)]),
])
def test_split_parts(lengths, n, want):
    got = split_parts(lengths, n)
    assert got == want
    assert got[0][0] == 0 and got[-1][1] == len(lengths)
    assert all(a < b for a, b in got) and all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))


def test_parse_link_delay():
    assert parse_link_delay("") is None
    assert parse_link_delay("2,1000") == (0.002, 125e6)
    for bad in ("2", "x,1", "-1,10", "1,0"):
        with pytest.raises(ValueError, match="HEXPLAN_LINK_DELAY"):
            parse_link_delay(bad)


def test_slow_tp_link_times_ring_bytes_one_transfer_at_a_time(monkeypatch):
    import time
    link = SlowLink(0.010, 1e6)                  # 10 ms, 1 MB/s
    t0 = time.perf_counter()
    a = link.done_at(1000, 2)                    # a 2-rank ring sends 2 (p-1)/p = 1x the bytes: 1 ms
    b = link.done_at(1000, 4)                    # 4 ranks: 1.5x, queued behind the first: 1 + 1.5 ms
    assert a - t0 == pytest.approx(0.011, abs=2e-3)
    assert b - t0 == pytest.approx(0.0125, abs=2e-3)
    # a handle waits until its done-at time, even when the (here absent) collective is done
    torch = pytest.importorskip("torch")
    t = torch.ones(3)
    t0 = time.perf_counter()
    assert Pending(t, None, t0 + 0.02).wait() is t
    assert time.perf_counter() - t0 >= 0.02
    monkeypatch.setenv("HEXPLAN_TP_LINK_DELAY", "0.5,80")
    link = SlowLink.from_env()
    assert (link.latency, link.bandwidth) == (0.0005, 1e7)
    monkeypatch.setenv("HEXPLAN_TP_LINK_DELAY", "fast")
    with pytest.raises(ValueError, match="HEXPLAN_TP_LINK_DELAY"):
        SlowLink.from_env()
    monkeypatch.delenv("HEXPLAN_TP_LINK_DELAY")
    assert SlowLink.from_env() is None


def serve_and_check(ckpt, stages, prompts, news, **launch):
    """Serve ``prompts`` concurrently through a plan of ``stages`` launched with ``launch``
    options; every result must be transformers' greedy tokens and the first stage must have
    split at least one step."""
    from executor_util import hf_greedy, plan

    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    with Launch(plan(ckpt, stages), ckpt, **launch) as L:
        with futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=180)
                    for p, n in zip(prompts, news)]
            results = [j.result() for j in jobs]
        gw = L.gateway
        first = gw.stub(gw.pipelines[0].stages[0]).Stats(pb.StatsRequest(), timeout=10)
        assert first.interleaved_steps > 0, "no step was split"
    for p, n, r in zip(prompts, news, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"


# A TP-2 stage with a next stage (parts sent on as they finish) and a lone TP-2 stage (parts
# only overlap all-reduces), each on a slowed TP link, with the row-parallel products in slices.
@pytest.mark.parametrize("stages", [[("a", 2, 0, 4), ("b", 1, 4, 6)], [("a", 2, 0, 6)]],
                         ids=["tp2-then-tp1", "tp2-alone"])
def test_interleaved_tp_stage_is_token_identical(tmp_path, monkeypatch, stages):
    pytest.importorskip("transformers")
    from executor_util import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m", layers=6, kv_heads=2)
    # 8 requests: the plan's 4 micro-batch loops get two each, so there is a step to split
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100], [42] * 20,
               [7, 8, 9, 10], [250, 3, 77, 91, 12, 6], [9] * 5, [31, 41, 59, 26]]
    news = [10, 4, 12, 6, 8, 5, 9, 7]
    monkeypatch.setenv("HEXPLAN_TP_LINK_DELAY", "0.2,1000")
    serve_and_check(ckpt, stages, prompts, news, interleave=2, matmul_pieces=2, threads=1)


def test_interleaved_pipeline_is_token_identical(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from executor_util import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m", layers=6)
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100], [42] * 20,
               [7, 8, 9, 10], [250, 3, 77, 91, 12, 6]]
    news = [12, 5, 20, 8, 16, 3]
    # A slow link (1 ms, 200 Mbps, injected in the workers' sending thread) between the stages.
    monkeypatch.setenv("HEXPLAN_LINK_DELAY", "1,200")
    serve_and_check(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4), ("c", 1, 4, 6)], prompts, news, interleave=2)


def test_tp_parts_overlap_each_others_all_reduces(tmp_path):
    """The order a TP stage issues work in, recorded with a stand-in group of 2 in one process
    (its sums are wrong, the order is what counts): with two parts, part 1 starts its all-reduce
    before part 0's is waited for, at every layer; with one part, each all-reduce is waited for
    before the next starts; with 3 product slices, 3 all-reduces start before the first wait."""
    pytest.importorskip("transformers")
    import dataclasses

    import torch
    from executor_util import make_checkpoint

    from hexplan.executor.distributed import TPContext
    from hexplan.executor.model import SeqChunk, ShardSpec, StageModel

    events = []

    class Recorded:
        def __init__(self, t, tag):
            self.t, self.tag = t, tag

        def wait(self):
            events.append(("wait", self.tag))
            return self.t

    @dataclasses.dataclass(frozen=True)
    class FakeGroup(TPContext):
        def all_reduce_async(self, t):
            events.append(("start", t.shape[0]))
            return Recorded(t, t.shape[0])

        def all_gather_last_dim(self, t):
            return torch.cat([t, t], dim=-1)

    ckpt = make_checkpoint(tmp_path / "m", layers=3, kv_heads=2)
    model = StageModel.load(ckpt, ShardSpec(0, 3, True, True), FakeGroup(0, 2))
    # two sequences of different lengths, so each part's all-reduces are told apart by rows
    chunks, ids = [SeqChunk("a", 0, 3), SeqChunk("b", 0, 5)], torch.arange(8)

    def order(parts, pieces=1):
        events.clear()
        model.forward_parts(chunks, ids, parts, pieces)
        for c in chunks:
            model.release(c.request_id)
        return list(events)

    interleaved = order([(0, 1), (1, 2)])
    assert len(interleaved) == 2 * 2 * 3 * 2          # start + wait, 2 per layer, 3 layers, 2 parts
    for i, ev in enumerate(interleaved):
        if ev == ("wait", 3):                          # part 0 waits only after part 1 has started
            assert ("start", 5) in interleaved[:i][-2:], interleaved
    assert interleaved[:3] == [("start", 3), ("start", 5), ("wait", 3)]
    whole = order(None)
    assert whole == [("start", 8), ("wait", 8)] * 6   # one part: nothing in flight while computing
    sliced = order(None, pieces=3)
    assert sliced[:4] == [("start", 8)] * 3 + [("wait", 8)]
