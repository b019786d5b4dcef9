"""The gateway's mlfq policy: KV offload in a stage model, and the policy end to end (preemption
and offload still give transformers' greedy tokens). The queue bookkeeping alone, shared with
the simulator: tests/test_scheduler.py."""
from __future__ import annotations

import dataclasses
import time
from concurrent import futures

import pytest


def test_offload_and_restore_in_a_stage_model(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from executor_util import make_checkpoint

    from hexplan.executor.distributed import TPContext
    from hexplan.executor.model import SeqChunk, ShardSpec, StageModel

    ckpt = make_checkpoint(tmp_path / "m", layers=2)
    m = StageModel.load(ckpt, ShardSpec(0, 2, True, True), TPContext())
    ref = StageModel.load(ckpt, ShardSpec(0, 2, True, True), TPContext())
    prompt = torch.tensor([5, 6, 7, 8, 9])
    for model in (m, ref):
        model.forward_batch([SeqChunk("r", 0, 5)], prompt)
    assert m.offload("r") and not m.offload("r")
    assert m.kv_bytes() == 0 and m.offloaded_bytes() > 0 and m.num_sequences() == 1
    with pytest.raises(ValueError, match="holds 5 positions"):
        m.forward_batch([SeqChunk("r", 0, 1)], torch.tensor([3]))
    got = m.forward_batch([SeqChunk("r", 5, 1)], torch.tensor([3]))   # restored for this step
    want = ref.forward_batch([SeqChunk("r", 5, 1)], torch.tensor([3]))
    assert torch.equal(got, want)
    assert m.offloaded_bytes() == 0 and m.kv_bytes() > 0
    assert m.offload("r") and m.release("r") and m.num_sequences() == 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("grpc")
    pytest.importorskip("transformers")
    from executor_util import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("mlfq"), layers=4)


def test_mlfq_with_offload_gives_the_reference_tokens(ckpt):
    from executor_util import hf_greedy, plan

    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch

    # Two KV caches per pipeline and micro-batches of two: eight requests, so most of them wait,
    # are preempted, and have their KV offloaded while others run. A 1 ms quantum demotes a
    # request after its first steps, so newcomers (top queue) overtake it.
    pl = plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)])
    pl = dataclasses.replace(pl, assumptions={"workload": {"prompt_tokens": 8, "output_tokens": 8,
                                                           "batch_size": 2, "concurrency": 2}})
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100], [42] * 20,
               [7, 8, 9, 10], [250, 3, 77, 91, 12, 6], [19], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
    news = [12, 5, 20, 8, 16, 3, 10, 14]
    with Launch(pl, ckpt, policy="mlfq", mlfq_quantum_s=0.001) as L:
        with futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=180)
                    for p, n in zip(prompts, news)]
            results = [j.result() for j in jobs]
        gw = L.gateway
        assert gw.offloads > 0, "no KV cache was offloaded"
        assert gw.scheduler.demotions > 0
        deadline = time.monotonic() + 10           # the loop drops a finished request after its step
        while gw.scheduler.loads()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.scheduler.loads() == [0] and not gw.requests
    for p, n, r in zip(prompts, news, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"
        assert r["finish_reason"] == "length"


def test_unknown_policy_is_an_error(ckpt):
    from executor_util import plan

    from hexplan.executor.gateway import Gateway, GatewayError
    with pytest.raises(GatewayError, match="policy must be 'fcfs' or 'mlfq'"):
        Gateway(plan(ckpt, [("a", 1, 0, 4)]), ckpt, {}, policy="lifo")


@pytest.mark.parametrize("flags, field", [(["--policy", "lifo"], "--policy"),
                                          (["--policy", "mlfq", "--mlfq-quantum-ms", "0"], "--mlfq-quantum-ms")])
def test_cli_policy_errors(ckpt, tmp_path, flags, field):
    import subprocess
    import sys
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n"
                         "      - {node: a, gpus: [0], tp: 1, layers: [0, 4]}\n")
    for cmd in (["serve", "--plan", str(plan_file)], ["launch", str(plan_file)]):
        out = subprocess.run([sys.executable, "-m", "hexplan.cli", *cmd, "--checkpoint", str(ckpt), *flags],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert field in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
