"""Serving that no client can break (issue 11): request identity, failures that stay with their
request, KV released on the surviving stages of a failed pipeline, pipelines that come back,
stall detection, truthful health and the Status RPC. Real processes on loopback; greedy tokens
are checked against transformers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent import futures

import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import children, hf_greedy, make_checkpoint, plan, wait_for  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from hexplan.executor import runner as runner_mod  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor.client import generate, status  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402
from hexplan.executor.wire import channel  # noqa: E402

PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7], [200, 100], [42] * 9, [7, 8, 9, 10], [250, 3, 77, 91]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gqa4"), layers=4, heads=4, kv_heads=2, seed=3)


def two_pipelines(ckpt):
    """Pipeline 0: nodes a then b; pipeline 1: node c (one stage)."""
    return plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 4)], [("c", 1, 0, 4)], weights=[0.5, 0.5])


def health(address) -> int:
    with channel(address, None) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="hexplan.v1.Inference"),
                                                    timeout=5).status




def run_all(address, jobs):
    """jobs: [(prompt, max_new_tokens, kwargs)] at once; returns results or exceptions."""
    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        fs = [pool.submit(generate, address, token_ids=p, max_new_tokens=n, timeout=120, **kw) for p, n, kw in jobs]
        out = []
        for f in fs:
            try:
                out.append(f.result(timeout=180))
            except grpc.RpcError as e:
                out.append(e)
        return out


def stage_kv(L):
    """{stage address: sequences held} for every live stage."""
    return {a: n for a, v in L.gateway.kv_stats().items() if v is not None for n in [v[1]]}


def metric(gw, name, **labels):
    """One sample of the gateway's Prometheus metrics (metrics.py; model_name is implied for
    vllm:* names)."""
    from prometheus_client.parser import text_string_to_metric_families
    if name.startswith("vllm:"):
        labels.setdefault("model_name", gw.served_model_name)
    for fam in text_string_to_metric_families(gw.metrics.render()[0].decode()):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


# ---- request identity and isolation ---------------------------------------------------------

def test_same_label_concurrent_requests_complete_apart_and_bad_requests_stay_alone(ckpt, monkeypatch):
    with Launch(plan(ckpt, [("a", 1, 0, 4)], [("c", 1, 0, 4)], weights=[0.5, 0.5]), ckpt) as L:
        # 1. Four requests with one client id: each its own tokens, the label echoed.
        res = run_all(L.address, [(p, 8, {"request_id": "same-id"}) for p in PROMPTS[:4]])
        for p, r in zip(PROMPTS, res):
            assert not isinstance(r, Exception), r
            assert r["token_ids"] == hf_greedy(ckpt, p, 8) and r["request_id"] == "same-id"
        # 2. A temperature that overflows a naive softmax: greedy in effect, nothing breaks.
        res = run_all(L.address, [(PROMPTS[i % 6], 4, {"temperature": 1e-40, "seed": i}) for i in range(11)])
        for i, r in enumerate(res):
            assert not isinstance(r, Exception), r
            assert r["token_ids"] == hf_greedy(ckpt, PROMPTS[i % 6], 4)
        # 3. Sampling that raises for one request fails that request only (INTERNAL), and the
        #    loops go on: normal requests complete alongside and after.
        real = runner_mod.sample

        def flaky(row, s):
            if s.seed == 666:
                raise RuntimeError("boom")
            return real(row, s)
        monkeypatch.setattr(runner_mod, "sample", flaky)
        jobs = [([9, 9, 9], 6, {"temperature": 0.7, "seed": 666})] * 3 + [(p, 6, {}) for p in PROMPTS[:5]]
        res = run_all(L.address, jobs)
        for r in res[:3]:
            assert isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.INTERNAL and "boom" in r.details()
        for p, r in zip(PROMPTS, res[3:]):
            assert not isinstance(r, Exception), r
            assert r["token_ids"] == hf_greedy(ckpt, p, 6)
        monkeypatch.setattr(runner_mod, "sample", real)
        # 4. An exception while running a step fails that step's requests, not the pipeline.
        real_fr = runner_mod.StepRunner.forward_request
        hits = []

        def bad_step(self, step):
            req = self.gw.requests.get((list(step.decode) + [s for s, *_ in step.prefill])[0])
            if req is not None and req.prompt[:2] == [3, 1] and not hits:
                hits.append(1)
                raise ValueError("corrupt step")
            return real_fr(self, step)
        monkeypatch.setattr(runner_mod.StepRunner, "forward_request", bad_step)
        res = run_all(L.address, [([3, 1, 4, 1, 5], 5, {})])
        assert isinstance(res[0], grpc.RpcError) and res[0].code() == grpc.StatusCode.INTERNAL
        assert "corrupt step" in res[0].details()
        monkeypatch.setattr(runner_mod.StepRunner, "forward_request", real_fr)
        res = run_all(L.address, [(p, 5, {}) for p in PROMPTS[:6]])
        for p, r in zip(PROMPTS, res):
            assert not isinstance(r, Exception), r
            assert r["token_ids"] == hf_greedy(ckpt, p, 5)
        assert all(p.alive for p in L.gateway.pipelines)
        wait_for(lambda: all(n == 0 for n in stage_kv(L).values()), 10, "KV back to 0")
        assert health(L.address) == health_pb2.HealthCheckResponse.SERVING
        assert L.gateway.in_flight() == 0


# ---- a failed pipeline: KV released, requests moved, the pipeline back --------------------

def test_killed_node_releases_kv_then_pipeline_comes_back(ckpt):
    n_new = 60
    with Launch(two_pipelines(ckpt), ckpt) as L:
        gw = L.gateway
        first_stage = gw.pipelines[0].stages[0]
        with futures.ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n_new, timeout=180) for p in PROMPTS]
            wait_for(lambda: gw.scheduler.loads()[0] >= 2 and stage_kv(L).get(first_stage, 0) >= 2, 60,
                     "requests decoding on pipeline 0")
            L.node_process("b").send_signal(signal.SIGKILL)
            results = [j.result(timeout=180) for j in jobs]
        for p, r in zip(PROMPTS, results):
            assert r["token_ids"] == hf_greedy(ckpt, p, n_new)
        # The surviving first stage of the failed pipeline holds nothing.
        stage = gw.stub(first_stage)
        wait_for(lambda: stage.Stats(pb.StatsRequest(), timeout=5).sequences == 0, 10,
                 "KV released on the surviving stage")
        st = status(L.address)
        assert st["serving"] and st["pipelines"][0]["state"] == "down" and st["pipelines"][1]["state"] == "live"
        assert "b" in st["down_nodes"]
        if gw.metrics is not None:     # the metrics say so too; moved requests' tokens count once
            assert metric(gw, "hexplan_pipeline_state", pipeline="0", state="down") == 1
            assert metric(gw, "hexplan_pipeline_failures_total", pipeline="0") == 1
            assert metric(gw, "vllm:generation_tokens_total") == n_new * len(PROMPTS)
            assert metric(gw, "vllm:request_success_total", finished_reason="length") == len(PROMPTS)
        # A node executor back at the same address: the pipeline is reloaded and serves again.
        L.restart_node("b")
        wait_for(lambda: status(L.address)["pipelines"][0]["state"] == "live", 90, "pipeline 0 back")
        before = gw.pipelines[0].served
        res = run_all(L.address, [(p, 4, {}) for p in PROMPTS])
        for p, r in zip(PROMPTS, res):
            assert not isinstance(r, Exception), r
            assert r["token_ids"] == hf_greedy(ckpt, p, 4)
        assert gw.pipelines[0].served > before, "no request went to the pipeline that came back"
        assert not gw.down_nodes


def test_no_live_pipeline_is_not_serving(ckpt):
    with Launch(plan(ckpt, [("a", 1, 0, 4)]), ckpt) as L:
        L.gateway.recovery_wait_s = 1.0    # an accepted request waits this long for a pipeline to come back
        assert health(L.address) == health_pb2.HealthCheckResponse.SERVING
        L.node_process("a").send_signal(signal.SIGKILL)
        L.node_process("a").wait(timeout=30)
        time.sleep(1.0)  # its worker notices its node is gone within 0.2 s and exits
        with pytest.raises(grpc.RpcError) as err:      # the step fails; no pipeline is left
            generate(L.address, token_ids=[1, 2, 3], max_new_tokens=3, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health(L.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        if L.gateway.metrics is not None:
            assert metric(L.gateway, "hexplan_pipeline_state", pipeline="0", state="down") == 1
        out = subprocess.run([sys.executable, "-m", "hexplan.cli", "status", "--target", L.address],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        assert "NOT serving" in out.stdout and "down" in out.stdout


# ---- a stalled stage -------------------------------------------------------------------------

def test_stalled_stage_moves_its_requests_and_rejoins(ckpt):
    n_new = 40
    with Launch(two_pipelines(ckpt), ckpt) as L:
        gw = L.gateway
        gw.stall_timeout_s, gw.stall_factor = 2.0, 5.0
        worker = [c for c in children(L.node_process("b").pid)]
        assert worker, "node b has no worker process"
        stopped = False
        try:
            with futures.ThreadPoolExecutor(6) as pool:
                jobs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n_new, timeout=180)
                        for p in PROMPTS]
                wait_for(lambda: gw.scheduler.loads()[0] >= 2 and gw.pipelines[0].served >= 2, 60,
                         "requests on pipeline 0")
                for w in worker:
                    os.kill(w, signal.SIGSTOP)
                stopped = True
                t0 = time.monotonic()
                results = [j.result(timeout=180) for j in jobs]
                took = time.monotonic() - t0
        finally:
            if stopped:
                for w in worker:
                    try:
                        os.kill(w, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
        for p, r in zip(PROMPTS, results):
            assert r["token_ids"] == hf_greedy(ckpt, p, n_new)
        assert took < 60, f"the stall was noticed late: {took:.1f} s"
        # node b's executor still answers: the monitor reloads the pipeline and it rejoins
        wait_for(lambda: status(L.address)["pipelines"][0]["state"] == "live", 90, "pipeline 0 back")
        res = run_all(L.address, [(p, 3, {}) for p in PROMPTS])
        assert all(not isinstance(r, Exception) for r in res), res


@pytest.mark.parametrize("argv, message", [
    (["launch", "plan.yaml", "--checkpoint", ".", "--stall-timeout", "0"], "--stall-timeout: must be a number of seconds > 0"),
    (["serve", "--plan", "p.yaml", "--checkpoint", ".", "--recovery-wait", "-1"], "--recovery-wait: must be a number"),
])
def test_fault_flags_are_checked(argv, message):
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_internal_servers_refuse_messages_past_the_plans_step(ckpt):
    """A stage worker's message limit comes from the plan's largest step (LoadShard's
    max_step_tokens) and the model's hidden size; a node executor's is 4 MiB."""
    from hexplan.executor.limits import NODE_MESSAGE_LIMIT, step_tokens, worker_message_limit
    from hexplan.executor.wire import to_proto
    with Launch(plan(ckpt, [("a", 1, 0, 4)]), ckpt) as L:
        gw = L.gateway
        limit = worker_message_limit(step_tokens(gw), 64)
        assert limit < 64 * 1024 * 1024
        stage = gw.stub(gw.pipelines[0].stages[0])
        n = limit // 8 + 1000                        # int64 token ids: just past the limit
        big = pb.ForwardRequest(chunks=[pb.SeqChunk(request_id="x", start=0, length=n)],
                                inputs=to_proto(torch.zeros(n, dtype=torch.int64)))
        with pytest.raises(grpc.RpcError) as err:
            stage.Forward(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        node = gw.stub(L.nodes["a"][1])
        with pytest.raises(grpc.RpcError) as err:
            node.LoadShard(pb.LoadShardRequest(stage_id="x", model_json="x" * NODE_MESSAGE_LIMIT), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        r = generate(L.address, token_ids=[1, 2, 3], max_new_tokens=4, timeout=60)
        assert r["token_ids"] == hf_greedy(ckpt, [1, 2, 3], 4)
