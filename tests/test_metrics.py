"""Prometheus metrics and logs of the gateway (issue 12): vLLM's metric names and meanings, hexplan's
own per pipeline and stage, one access line per request, --log-level/--log-format. Real processes
on loopback, free ports; everything is stopped."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import make_checkpoint, plan, wait_for  # noqa: E402

from hexplan import logconfig  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg  # noqa: E402
from hexplan.executor.client import generate, prefill  # noqa: E402
from hexplan.executor.gateway import Gateway  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402
from hexplan.executor.wire import channel  # noqa: E402

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-metrics"), layers=2, heads=4, kv_heads=2, seed=7)




def scrape(gw) -> dict:
    """{(sample name, frozenset(labels)): value} of the gateway's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    body, ctype = gw.metrics.render()
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_metrics_follow_the_requests(ckpt, caplog):
    pytest.importorskip("prometheus_client")
    p = plan(ckpt, [("a", 1, 0, 1), ("a", 1, 1, 2)])      # one pipeline, two stages
    caplog.set_level(logging.INFO, logger="hexplan.access")
    with Launch(p, ckpt, threads=1) as L:
        gw = L.gateway
        model = gw.served_model_name
        assert model == gw.plan.model.name
        jobs = [([5, 17, 33], 6), ([1, 2, 3, 4, 5, 6, 7], 4), ([200, 100], 5)]
        with futures.ThreadPoolExecutor(len(jobs)) as pool:
            outs = list(pool.map(lambda j: generate(L.address, token_ids=j[0], max_new_tokens=j[1], timeout=120,
                                                    request_id=f"job{len(j[0])}"), jobs))
        assert [o["finish_reason"] for o in outs] == ["length"] * 3
        # a stop token: the same greedy prompt again, ending at its 3rd token
        first = outs[0]["token_ids"]
        stop_tok = first[2]
        stopped = generate(L.address, token_ids=[5, 17, 33], max_new_tokens=6, stop_token_ids=[stop_tok], timeout=120)
        assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == first[:first.index(stop_tok) + 1]
        scored = prefill(L.address, token_ids=[9, 8, 7, 6], timeout=120)
        assert scored["prompt_tokens"] == 4

        m = scrape(gw)
        lbl = {"model_name": model}
        gen_tokens = sum(len(o["token_ids"]) for o in outs) + len(stopped["token_ids"])
        assert value(m, "vllm:generation_tokens_total", **lbl) == gen_tokens
        assert value(m, "vllm:prompt_tokens_total", **lbl) == 3 + 7 + 2 + 3 + 4
        assert value(m, "vllm:request_success_total", finished_reason="length", **lbl) == 3
        assert value(m, "vllm:request_success_total", finished_reason="stop", **lbl) == 2    # the prefill too
        assert value(m, "vllm:request_success_total", finished_reason="abort", **lbl) == 0
        assert value(m, "vllm:time_to_first_token_seconds_count", **lbl) == 4
        assert value(m, "vllm:inter_token_latency_seconds_count", **lbl) == gen_tokens - 4
        assert value(m, "vllm:e2e_request_latency_seconds_count", **lbl) == 5
        assert value(m, "vllm:request_queue_time_seconds_count", **lbl) == 5
        assert value(m, "vllm:e2e_request_latency_seconds_sum", **lbl) >= value(
            m, "vllm:time_to_first_token_seconds_sum", **lbl) > 0
        assert value(m, "vllm:num_requests_running", **lbl) == 0
        assert value(m, "vllm:num_requests_waiting", **lbl) == 0
        assert value(m, "vllm:kv_cache_usage_perc", **lbl) == 0
        assert value(m, "hexplan_pipeline_state", pipeline="0", state="live") == 1
        assert value(m, "hexplan_pipeline_state", pipeline="0", state="down") == 0
        assert value(m, "hexplan_pipeline_in_flight", pipeline="0") == 0
        assert value(m, "hexplan_pipeline_step_seconds_count", pipeline="0") > 0
        assert value(m, "hexplan_pipeline_measured_tokens_per_second", pipeline="0") > 0
        assert value(m, "hexplan_pipeline_predicted_tokens_per_second", pipeline="0") is None   # hand-written plan
        for stage in ("0", "1"):     # every stage answered its Stats; all KV released
            assert value(m, "hexplan_stage_kv_bytes", pipeline="0", stage=stage, node="a") == 0
            assert value(m, "hexplan_stage_sequences", pipeline="0", stage=stage, node="a") == 0

        # while a request runs: running 1, KV reserved; cancelled: abort, running 0, KV 0
        with channel(L.address, None) as ch:
            stream = pbg.InferenceStub(ch).Generate(pb.GenerateRequest(
                token_ids=[3, 1, 4, 1, 5], sampling=pb.SamplingParams(max_new_tokens=200)), timeout=120)
            next(stream)
            busy = scrape(gw)
            stream.cancel()
        assert value(busy, "vllm:num_requests_running", **lbl) == 1
        assert 0 < value(busy, "vllm:kv_cache_usage_perc", **lbl) <= 1
        assert value(busy, "hexplan_pipeline_in_flight", pipeline="0") == 1
        wait_for(lambda: gw.in_flight() == 0, 60, "the cancelled request to end")

        def released():
            gw.metrics.refresh_stage_stats(force=True)
            return all(value(scrape(gw), "hexplan_stage_sequences", pipeline="0", stage=s, node="a") == 0
                       for s in ("0", "1"))
        wait_for(released, 30, "the cancelled request's KV to be released")
        m = scrape(gw)
        assert value(m, "vllm:request_success_total", finished_reason="abort", **lbl) == 1
        assert value(m, "vllm:num_requests_running", **lbl) == 0
        assert value(m, "vllm:kv_cache_usage_perc", **lbl) == 0
        assert value(m, "vllm:e2e_request_latency_seconds_count", **lbl) == 6

        # refused (a bad field): no metrics, one access line saying so
        with pytest.raises(grpc.RpcError) as e:
            generate(L.address, token_ids=[1, 2], max_new_tokens=0, timeout=60, request_id="bad-one")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert value(scrape(gw), "vllm:e2e_request_latency_seconds_count", **lbl) == 6

    access = [r for r in caplog.records if r.name == "hexplan.access"]
    refused = [r for r in access if r.finish_reason == "refused"]
    assert len(refused) == 1 and refused[0].status == "INVALID_ARGUMENT" and refused[0].api == "Generate"
    assert refused[0].request_id == "bad-one" and refused[0].error.startswith("sampling.max_new_tokens:"), refused
    access = [r for r in access if r.finish_reason != "refused"]
    assert len(access) == 6, [r.getMessage() for r in access]
    by_label = {r.label: r for r in access}
    r = by_label["job3"]
    assert (r.model, r.prompt_tokens, r.output_tokens, r.finish_reason, r.status) == (model, 3, 6, "length", "OK")
    assert 0 < r.ttft_s <= r.total_s and r.request_id != "job3" and len(r.request_id) == 32
    assert "label=job3" in r.getMessage() and "status=OK" in r.getMessage()
    cancelled = [r for r in access if r.status == "CANCELLED"]
    assert len(cancelled) == 1 and cancelled[0].finish_reason == "abort" and cancelled[0].output_tokens >= 1
    assert sum(r.finish_reason == "stop" for r in access) == 2


def test_registries_are_per_gateway_and_prometheus_is_optional(ckpt, monkeypatch):
    pytest.importorskip("prometheus_client")
    p = plan(ckpt, [("a", 1, 0, 2)])
    one, two = Gateway(p, ckpt, {}), Gateway(p, ckpt, {})     # not started: no processes
    assert one.metrics.registry is not two.metrics.registry
    one.served_model_name = "renamed"                         # e.g. --served-model-name, before traffic
    m = scrape(one)
    assert value(m, "vllm:num_requests_waiting", model_name="renamed") == 0
    assert value(m, "vllm:prompt_tokens_total", model_name="renamed") == 0
    assert value(m, "vllm:prompt_tokens_total", model_name=p.model.name) is None
    assert value(scrape(two), "vllm:prompt_tokens_total", model_name=p.model.name) == 0
    monkeypatch.setitem(sys.modules, "prometheus_client", None)     # not installed
    monkeypatch.delitem(sys.modules, "hexplan.executor.metrics", raising=False)
    assert Gateway(p, ckpt, {}).metrics is None


def test_log_formats():
    rec = logging.LogRecord("hexplan.access", logging.INFO, __file__, 1, "request %s status=%s", ("abc", "OK"), None)
    rec.prompt_tokens, rec.status = 3, "OK"
    text = logconfig.TextFormatter().format(rec)
    ts, level, name, msg = text.split(" ", 3)
    assert ISO_MS.match(ts) and (level, name, msg) == ("INFO", "hexplan.access:", "request abc status=OK")
    obj = json.loads(logconfig.JsonFormatter().format(rec))
    assert ISO_MS.match(obj.pop("ts"))
    assert obj == {"level": "INFO", "logger": "hexplan.access", "message": "request abc status=OK",
                   "prompt_tokens": 3, "status": "OK"}
    try:
        raise ValueError("boom")
    except ValueError:
        rec.exc_info = sys.exc_info()
    line = logconfig.JsonFormatter().format(rec)
    assert "\n" not in line and "boom" in json.loads(line)["exc"]


def test_cli_launch_json_logs(ckpt, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n      - {{node: a, gpus: [0], tp: 1, layers: [0, 2]}}\n")
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "launch", str(plan_file), "--checkpoint", ckpt,
                                 "--listen", "127.0.0.1:0", "--threads", "1", "--log-format", "json",
                                 "--log-level", "INFO"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("hexplan: ready: serving"), (ready, err_file.read_text()[-3000:])
        address = ready.split(" on ")[1].split()[0]
        out = subprocess.run([sys.executable, "-m", "hexplan.cli", "generate", "--target", address,
                              "--token-ids", "5,17,33", "--max-new-tokens", "4", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ready.startswith("hexplan: ready:") and rest == "hexplan: stopped\n"   # stdout: results only
    lines = [ln for ln in err_file.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]       # every JSON line parses
    assert records and all(ISO_MS.match(r["ts"]) and r["level"] and r["logger"] for r in records)
    access = [r for r in records if r["logger"] == "hexplan.access"]
    assert len(access) == 1, lines
    a = access[0]
    assert (a["prompt_tokens"], a["output_tokens"], a["finish_reason"], a["status"]) == (3, 4, "length", "OK")
    assert a["model"] == Path(ckpt).name                        # the checkpoint folder's name
    assert 0 < a["ttft_s"] <= a["total_s"] and a["label"] == a["request_id"]
    assert any(r["logger"] == "hexplan.lifecycle" and "drained" in r["message"] for r in records)


@pytest.mark.parametrize("command", ["serve", "launch", "node"])
def test_bad_log_flags_exit_2_in_one_line(command, tmp_path):
    args = {"serve": ["--plan", "p.yaml", "--checkpoint", "c"], "launch": ["p.yaml", "--checkpoint", "c"],
            "node": ["--name", "n"]}[command]
    for flag, bad in (("--log-level", "loud"), ("--log-format", "xml")):
        out = subprocess.run([sys.executable, "-m", "hexplan.cli", command, *args, flag, bad],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1 and flag in out.stderr, out.stderr
