"""bench/shared_host_bench.py's pure parts: the replicas plan it serves and the planner's figure
it prints beside the measurement (the run itself needs minutes of a quiet host: docs/fidelity.md)."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fidelity_bench as fb  # noqa: E402
import shared_host_bench as shb  # noqa: E402


def test_replicas_on_local_cpu_and_the_cost_model_with_and_without_the_host(tmp_path):
    ckpt = tmp_path / "llama-134m"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(fb.MODEL, model_type="llama", architectures=["LlamaForCausalLM"])))
    w = {"prompt_tokens": 136, "output_tokens": 69, "batch_size": 16, "concurrency": 16}
    plan = shb.replicas_plan(str(ckpt), 3, w)
    assert [(p.stages[0].node, p.stages[0].gpus, p.stages[0].layers) for p in plan.pipelines] == \
        [("cpu0", (0,), (0, 12)), ("cpu0", (1,), (0, 12)), ("cpu1", (0,), (0, 12))]
    tables = {"decode_ms": {1: 2.5, 16: 8.0}, "prefill_ms": {16: 5.0, 256: 30.0}}
    shared = fb.make_cluster(fb.base_cluster_dict(ckpt.name, tables, {"cores": 2, "contention": 0.0}))
    alone = fb.make_cluster(fb.base_cluster_dict(ckpt.name, tables))
    one = shb.predicted(shb.replicas_plan(str(ckpt), 1, w), alone)
    # without the host the cost model rates each stage on its own: three replicas, three times
    # one (cpu1's a little less: its tokens cross the link from the coordinator, cpu0)
    assert shb.predicted(plan, alone) == pytest.approx(3 * one, rel=0.002)
    # with it, each at its slowdown with all three computing: 3 threads on 2 cores, 1.5x (the
    # links' part of a round is not slowed)
    assert shb.predicted(plan, shared) == pytest.approx(shb.predicted(plan, alone) / 1.5, rel=1e-3)
    # one replica alone on the host is not slowed
    assert shb.predicted(shb.replicas_plan(str(ckpt), 1, w), shared) == pytest.approx(one, rel=1e-9)
    with pytest.raises(ValueError, match="--replicas must be 1-3"):
        shb.replicas_plan(str(ckpt), 4, w)
