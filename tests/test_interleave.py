"""Interleaved steps: a step split into parts at the first stage, each sent on while the next is
computed. The split itself, the injected link delay, and token identity end to end."""
from __future__ import annotations

from concurrent import futures

import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc")

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


def test_interleaved_pipeline_is_token_identical(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from executor_util import hf_greedy, make_checkpoint, plan

    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    ckpt = make_checkpoint(tmp_path / "m", layers=6)
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100], [42] * 20,
               [7, 8, 9, 10], [250, 3, 77, 91, 12, 6]]
    news = [12, 5, 20, 8, 16, 3]
    # A slow link (1 ms, 200 Mbps, injected in the workers' sending thread) between the stages.
    monkeypatch.setenv("HEXPLAN_LINK_DELAY", "1,200")
    with Launch(plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4), ("c", 1, 4, 6)]), ckpt, interleave=2) as L:
        with futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=180)
                    for p, n in zip(prompts, news)]
            results = [j.result() for j in jobs]
        gw = L.gateway
        first = gw.stub(gw.pipelines[0].stages[0]).Stats(pb.StatsRequest(), timeout=10)
        assert first.interleaved_steps > 0, "no step was split"
    for p, n, r in zip(prompts, news, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"
