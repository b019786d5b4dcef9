"""A bare plan's batch size, chosen from its stages' decode steps timed at load (issue 10):
hexplan.serving.setup.choose_batch, profile.calibrate_decode and Gateway.start."""
from __future__ import annotations

import pytest

from hexplan.costmodel import Workload
from hexplan.plan import plan_from_dict
from hexplan.serving.setup import BATCH_GAIN, choose_batch, pipeline_configs, pipeline_step_ms


def test_choose_batch_stops_where_doubling_gains_less_than_the_threshold():
    # tokens/s: 8 -> 80, 16 -> 133, 32 -> 200, 64 -> 256 (x1.28), 128 -> 269 (x1.05)
    ms = {8: 100.0, 16: 120.0, 32: 160.0, 64: 250.0, 128: 475.0}
    assert choose_batch(ms) == 64
    assert choose_batch(ms, gain=1.3) == 32
    assert choose_batch(ms, gain=1.0) == 128                  # every doubling helps: the largest
    assert choose_batch({8: 10.0, 16: 10.0, 32: 10.0}) == 32  # flat steps (a GPU): the largest
    assert choose_batch({8: 10.0, 16: 20.0}) == 8              # linear steps: nothing to gain
    assert choose_batch({}) is None and choose_batch({16: 0.0}) is None
    assert BATCH_GAIN > 1


def test_pipeline_step_time_is_the_slowest_stage_at_sizes_all_measured():
    assert pipeline_step_ms([{8: 5.0, 16: 9.0, 32: 15.0}, {8: 7.0, 16: 8.0}]) == {8: 7.0, 16: 9.0}
    assert pipeline_step_ms([]) == {}


def test_pipeline_configs_take_a_bare_plans_chosen_batches_and_ignore_them_with_a_workload():
    stages = [{"node": "a", "gpus": [0], "tp": 1, "layers": [0, 40]},
              {"node": "b", "gpus": [0], "tp": 1, "layers": [40, 80]}]
    d = {"model": "llama-2-70b", "pipelines": [{"stages": stages}, {"stages": stages[:1]}]}
    w = Workload()
    two, one = pipeline_configs(plan_from_dict(d), w, batches=[64, None])
    assert (two.loops, two.batch, two.concurrency) == (2, 64, 128)
    assert two.chunk == -(-64 * w.prompt_tokens // w.output_tokens)   # the chunk scales with the batch
    assert (one.loops, one.batch, one.concurrency) == (1, w.batch_size, w.batch_size)
    solved = plan_from_dict(dict(d, assumptions={"workload": {"batch_size": 8, "concurrency": 40}}))
    (c, _) = pipeline_configs(solved, Workload(batch_size=8, concurrency=40), batches=[64, 64])
    assert c.batch == 8                                      # the plan's workload is an explicit override
    (c, _) = pipeline_configs(plan_from_dict(d), w, batch=4, batches=[64, 64])
    assert c.batch == 4                                      # so is --max-batch


# ---- measured on a real stage ---------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import hf_greedy, make_checkpoint, plan  # noqa: E402

from hexplan.executor.client import generate  # noqa: E402
from hexplan.executor.distributed import TPContext  # noqa: E402
from hexplan.executor.gateway import Gateway  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402
from hexplan.executor.model import ShardSpec, StageModel  # noqa: E402
from hexplan.executor.profile import calibrate_decode  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("batch"), layers=4)


def test_calibrate_decode_times_ascending_sizes_stops_early_and_leaves_no_cache(ckpt):
    ctx = TPContext(0, 1, None)
    model = StageModel.load(ckpt, ShardSpec(0, 4, True, True), ctx, torch.float32, "cpu")
    ms = calibrate_decode(model, ctx, (4, 1, 2), context=9, gain=0.0)   # never stops on gain
    assert list(ms) == [1, 2, 4] and all(v > 0 for v in ms.values())
    assert model.caches == {}
    # a gain no doubling reaches: the second size is the last measured
    assert list(calibrate_decode(model, ctx, (1, 2, 4, 8), context=9, gain=1e9)) == [1, 2]
    # a step longer than max_step_s: the first is the last
    assert list(calibrate_decode(model, ctx, (1, 2, 4), context=9, max_step_s=0.0)) == [1]
    assert model.caches == {}
    # the stage serves as before: a prompt's logits equal a fresh stage's
    from hexplan.executor.model import SeqChunk
    fresh = StageModel.load(ckpt, ShardSpec(0, 4, True, True), ctx, torch.float32, "cpu")
    prompt = torch.tensor([5, 17, 33, 8])
    got = model.forward_batch([SeqChunk("r", 0, 4)], prompt)
    assert torch.equal(got, fresh.forward_batch([SeqChunk("r", 0, 4)], prompt))


def test_bare_plan_batch_comes_from_the_stages_measured_steps(ckpt):
    pl = plan(ckpt, [("a", 2, 0, 2), ("b", 1, 2, 4)])            # TP-2 stage then a plain one
    with Launch(pl, ckpt) as L:
        gw = L.gateway
        ms = gw.decode_ms[0]
        assert len(ms) >= 2 and list(ms) == sorted(ms)
        (cfg,) = gw.scheduler.configs
        assert cfg.batch == choose_batch(ms) and cfg.loops == 2 and cfg.concurrency == 2 * cfg.batch
        prompt = [5, 17, 33, 8]
        got = generate(L.address, token_ids=prompt, max_new_tokens=6, timeout=120)
        assert got["token_ids"] == hf_greedy(ckpt, prompt, 6)
    with Launch(pl, ckpt, max_batch=3) as L:                      # --max-batch: no calibration
        assert L.gateway.decode_ms == {} and L.gateway.scheduler.configs[0].batch == 3


def test_plan_with_a_workload_is_not_calibrated(ckpt):
    pl = plan(ckpt, [("a", 1, 0, 4)])
    d = pl.to_dict()
    d["assumptions"] = {"workload": {"batch_size": 5, "concurrency": 10}}
    gw = Gateway(plan_from_dict(d), ckpt, {"a": "127.0.0.1:1"})
    assert gw.calibrate is False and gw.scheduler.configs[0].batch == 5
    assert Gateway(pl, ckpt, {"a": "127.0.0.1:1"}).calibrate is True
    assert Gateway(pl, ckpt, {"a": "127.0.0.1:1"}, calibrate=False).calibrate is False


def test_greedy_tokens_are_samplings_greedy_choice_and_flag_non_finite_rows():
    from hexplan.executor.sampling import Sampling, sample
    from hexplan.executor.worker import greedy_tokens

    logits = torch.randn(5, 50)
    logits[1, 7] = logits[1, 9] = 100.0                 # a tie: the first, as argmax in sample
    logits[3, 2] = float("nan")
    logits[4, 0] = float("inf")
    got = greedy_tokens(logits)
    assert got[1] == 7 and got[3] == -1 and got[4] == -1
    for i in (0, 1, 2):
        assert got[i] == sample(logits[i], Sampling())
