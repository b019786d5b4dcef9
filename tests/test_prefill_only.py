"""Task-aware batching: prefill-only requests (scoring, classification, embeddings) against
transformers' own logits and hidden states, their KV dropped in the step that finishes them,
and their admission past a pipeline full of generative requests."""
from __future__ import annotations

import dataclasses
import json
from concurrent import futures

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import hf_greedy, make_checkpoint, plan  # noqa: E402

from hexplan.executor.model import SeqChunk, ShardSpec, StageModel  # noqa: E402
from hexplan.executor.distributed import TPContext  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prefill") / "m", layers=4, kv_heads=2)


def hf_last(ckpt, prompt):
    """transformers' logits and final hidden state (after the final norm) of the prompt's last token."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
        last_hidden = model.model(torch.tensor([prompt])).last_hidden_state
    return out.logits[0, -1], last_hidden[0, -1]


def test_stage_model_returns_hidden_and_drops_kv(ckpt):
    stages = [StageModel.load(ckpt, ShardSpec(0, 2, True, False), TPContext()),
              StageModel.load(ckpt, ShardSpec(2, 4, False, True), TPContext())]
    prompt = [5, 17, 33, 8, 99]
    chunks = [SeqChunk("keep", 0, 3), SeqChunk("score", 0, 5, hidden=True, drop=True)]
    x = torch.tensor([1, 2, 3] + prompt)
    hidden: dict = {}
    x = stages[0].forward_parts(chunks, x)
    logits = stages[1].forward_parts(chunks, torch.cat(x), hidden_out=hidden)
    ref_logits, ref_hidden = hf_last(ckpt, prompt)
    torch.testing.assert_close(torch.cat(logits)[1], ref_logits, atol=1e-4, rtol=0)
    assert set(hidden) == {"score"}
    torch.testing.assert_close(hidden["score"], ref_hidden, atol=1e-4, rtol=0)
    for s in stages:
        assert s.num_sequences() == 1 and "score" not in s.caches and "keep" in s.caches


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_prefill_and_generate_share_the_pipeline(ckpt, capsys, policy):
    from hexplan.cli import main
    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor.client import generate, prefill
    from hexplan.executor.launch import Launch

    gen = [([5, 17, 33], 8), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 5), ([200, 100], 10), ([42] * 20, 6)]
    score = [([7, 8, 9, 10], True), ([250, 3, 77, 91, 12, 6] * 4, False), ([9] * 5, True), ([31], True)]
    # two stages, steps cut in two (the hidden states of a step's parts come back in order)
    with Launch(plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)]), ckpt, interleave=2, policy=policy) as L:
        with futures.ThreadPoolExecutor(8) as pool:
            g = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=180) for p, n in gen]
            s = [pool.submit(prefill, L.address, token_ids=p, hidden=h, timeout=180) for p, h in score]
            gens, scores = [j.result() for j in g], [j.result() for j in s]
        gw = L.gateway
        for addr in gw.pipelines[0].stages:     # generations released, prefill-only KV dropped
            st = gw.stub(addr).Stats(pb.StatsRequest(), timeout=10)
            assert st.sequences == 0 and st.kv_bytes == 0, addr
        assert main(["generate", "--target", L.address, "--token-ids", "7,8,9,10", "--prefill-only",
                     "--hidden", "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
    for (p, n), r in zip(gen, gens):
        assert r["token_ids"] == hf_greedy(ckpt, p, n)
    for (p, h), r in zip(score, scores):
        ref_logits, ref_hidden = hf_last(ckpt, p)
        assert r["prompt_tokens"] == len(p)
        torch.testing.assert_close(r["logits"], ref_logits, atol=1e-4, rtol=0)
        if h:
            torch.testing.assert_close(r["hidden"], ref_hidden, atol=1e-4, rtol=0)
        else:
            assert r["hidden"] is None
    torch.testing.assert_close(torch.tensor(cli["logits"]), scores[0]["logits"], atol=1e-5, rtol=0)
    assert len(cli["hidden"]) == 64


def test_prefill_only_is_admitted_past_a_full_pipeline(ckpt):
    from hexplan.executor.gateway import Gateway
    from hexplan.executor.sampling import Sampling

    p = dataclasses.replace(plan(ckpt, [("a", 1, 0, 4)]), assumptions={"workload": {
        "prompt_tokens": 8, "output_tokens": 8, "batch_size": 4, "concurrency": 4}})
    gw = Gateway(p, ckpt, {})                       # KV for 4 x 16 tokens: two of these reserve 54
    decoding = [gw.submit([1, 2, 3], Sampling(max_new_tokens=24)) for _ in range(2)]
    first = gw.scheduler.schedule(0.0, 0, 0)
    gw.scheduler.update(first)                      # both prefilled: decoding now
    waiting = gw.submit([5, 6], Sampling(max_new_tokens=24))
    scoring = gw.submit([7, 8, 9], Sampling(), prefill_only=True)
    step = gw.scheduler.schedule(0.0, 0, 0)
    assert step.decode == (decoding[0].sid, decoding[1].sid)
    assert step.prefill == ((scoring.sid, 0, 3, True),) and step.dropped == (scoring.sid,)
    assert list(gw.scheduler.pipes[0].pending) == [waiting.sid]   # the generative one waits for KV room


def test_hidden_needs_prefill_only(capsys):
    from hexplan.cli import main
    assert main(["generate", "--target", "127.0.0.1:1", "--token-ids", "1,2", "--hidden"]) == 2
    err = capsys.readouterr().err
    assert "--hidden" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_gateway_interleaves_as_the_plan_was_solved(ckpt):
    # `hexplan solve --interleave N` records N in the plan's workload; serving follows it unless told
    from hexplan.executor.gateway import Gateway
    p = plan(ckpt, [("a", 1, 0, 4)])
    assert Gateway(p, ckpt, {}).interleave == 1
    p = dataclasses.replace(p, assumptions={"workload": {"interleave": 2}})
    assert Gateway(p, ckpt, {}).interleave == 2
    assert Gateway(p, ckpt, {}, interleave=1).interleave == 1


def test_a_request_larger_than_the_kv_budget_is_refused_naming_the_field(ckpt):
    import grpc

    from hexplan.executor.gateway import Gateway
    from hexplan.executor.sampling import Sampling

    p = dataclasses.replace(plan(ckpt, [("a", 1, 0, 4)]), assumptions={"workload": {
        "prompt_tokens": 8, "output_tokens": 8, "batch_size": 2, "concurrency": 2}})
    gw = Gateway(p, ckpt, {})                       # KV budget: 2 x 16 tokens
    assert gw.scheduler.kv_budget == 32
    req = gw.submit([1, 2, 3], Sampling(max_new_tokens=30))
    kind, code, msg = req.events.get_nowait()
    assert (kind, code) == ("error", grpc.StatusCode.INVALID_ARGUMENT) and req.finished
    assert msg.startswith("sampling.max_new_tokens:") and "KV budget of 32 tokens" in msg
    assert gw.scheduler.loads() == [0] and not gw.requests
