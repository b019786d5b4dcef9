"""The executor end to end: node executors, stage workers and the gateway as real processes on
loopback, serving tiny random Llama checkpoints; greedy tokens must equal transformers'
LlamaForCausalLM.generate on the same checkpoint (float32, CPU)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import hf_greedy, make_checkpoint, plan  # noqa: E402

from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg  # noqa: E402
from hexplan.executor.client import generate  # noqa: E402
from hexplan.executor.gateway import Gateway, GatewayError  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402

PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100], [42] * 20,
           [7, 8, 9, 10], [250, 3, 77, 91, 12, 6], [19], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
NEW = [12, 5, 20, 8, 16, 3, 10, 14]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama6"), layers=6)


@pytest.fixture(scope="module")
def gqa_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gqa"), layers=4, heads=4, kv_heads=2, seed=1)


def check_greedy(address, checkpoint, prompts=PROMPTS[:3], news=NEW[:3]):
    for p, n in zip(prompts, news):
        got = generate(address, token_ids=p, max_new_tokens=n, timeout=120)
        assert got["token_ids"] == hf_greedy(checkpoint, p, n), f"prompt {p}"
        assert got["finish_reason"] == "length"


def concurrent(address, prompts, news, **kw):
    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        jobs = [pool.submit(generate, address, token_ids=p, max_new_tokens=n, timeout=180, **kw)
                for p, n in zip(prompts, news)]
        return [j.result() for j in jobs]


# ---- token identity ----------------------------------------------------------------------

def test_pipeline_parallel_three_stages(ckpt):
    with Launch(plan(ckpt, [("a", 1, 0, 2), ("b", 1, 2, 3), ("c", 1, 3, 6)]), ckpt) as L:
        check_greedy(L.address, ckpt)


def test_tensor_parallel_two(ckpt):
    with Launch(plan(ckpt, [("a", 2, 0, 6)]), ckpt) as L:
        check_greedy(L.address, ckpt)


def test_asymmetric_tp2_then_tp1_uneven_layers(ckpt):
    with Launch(plan(ckpt, [("a", 2, 0, 4), ("b", 1, 4, 6)]), ckpt) as L:
        check_greedy(L.address, ckpt)


def test_gqa_model(gqa_ckpt):
    with Launch(plan(gqa_ckpt, [("a", 2, 0, 1), ("b", 1, 1, 4)]), gqa_ckpt) as L:
        check_greedy(L.address, gqa_ckpt)


def test_step_log_records_every_stage_forward(ckpt, tmp_path, monkeypatch):
    # HEXPLAN_STEP_LOG: each stage worker writes a line per forward (start, end, tokens, chunks)
    monkeypatch.setenv("HEXPLAN_STEP_LOG", str(tmp_path / "s"))
    with Launch(plan(ckpt, [("a", 1, 0, 2), ("b", 2, 2, 6)]), ckpt) as L:
        got = generate(L.address, token_ids=PROMPTS[1], max_new_tokens=4, timeout=120)
    assert got["token_ids"] == hf_greedy(ckpt, PROMPTS[1], 4)
    files = {f.name.split(".")[1]: f for f in tmp_path.glob("s.*")}
    assert sorted(files) == ["p0s0", "p0s1"]     # rank 0 of each stage only
    rows = {k: [line.split() for line in f.read_text().splitlines()] for k, f in files.items()}
    for k, r in rows.items():          # the prompt's forward, then three decode steps
        assert [int(x[2]) for x in r] == [len(PROMPTS[1]), 1, 1, 1], (k, r)
        assert all(float(x[0]) <= float(x[1]) and x[3] == "1" for x in r), (k, r)
    # the same step reaches stage 1 after stage 0 has started it, and stage 1 computes it after
    # it arrived; stage 0 hands its last part to the sending thread inside its compute, so its
    # logged end can come after stage 1 has started (11.5 ms once with the suite in parallel)
    for a, b in zip(rows["p0s0"], rows["p0s1"]):
        assert float(a[0]) <= float(b[4]) <= float(b[0]) + 1e-3, (a, b)
    # and the next step starts on stage 0 only after stage 1 has finished this one (its tokens
    # are the next step's inputs)
    for b, a_next in zip(rows["p0s1"], rows["p0s0"][1:]):
        assert float(b[1]) <= float(a_next[0]) + 1e-3, (b, a_next)


def test_eight_concurrent_requests_one_pipeline(ckpt):
    with Launch(plan(ckpt, [("a", 1, 0, 3), ("b", 1, 3, 6)]), ckpt) as L:
        results = concurrent(L.address, PROMPTS, NEW)
    for p, n, r in zip(PROMPTS, NEW, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"


def test_eight_concurrent_requests_two_pipelines(ckpt):
    pl = plan(ckpt, [("a", 1, 0, 3), ("b", 1, 3, 6)], [("c", 2, 0, 6)], weights=[0.5, 0.5])
    with Launch(pl, ckpt) as L:
        results = concurrent(L.address, PROMPTS, NEW)
        served = [p.served for p in L.gateway.pipelines]
        assert len(served) == 2 and min(served) >= 2, f"requests per pipeline: {served}"
    for p, n, r in zip(PROMPTS, NEW, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"


def test_chunked_prefill_is_token_identical(ckpt):
    # A prefill chunk of 3 tokens: prompts of up to 20 tokens are prefilled over several steps
    # while other sequences decode, through a TP-2 stage and a TP-1 stage.
    with Launch(plan(ckpt, [("a", 2, 0, 2), ("b", 1, 2, 6)]), ckpt, prefill_chunk=3) as L:
        results = concurrent(L.address, PROMPTS, NEW)
        assert L.gateway.partial_chunks > 0, "no prompt was chunked"
    for p, n, r in zip(PROMPTS, NEW, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"


# ---- faults ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_killed_node_requests_finish_on_surviving_pipeline(ckpt, policy):
    pl = plan(ckpt, [("a", 1, 0, 3), ("b", 1, 3, 6)], [("c", 1, 0, 2), ("d", 1, 2, 6)], weights=[0.5, 0.5])
    n_new = 40
    prompts = PROMPTS[:6]
    with Launch(pl, ckpt, policy=policy) as L:
        streams: dict = {i: [] for i in range(len(prompts))}
        first_tokens = threading.Barrier(len(prompts) + 1, timeout=120)

        def run(i):
            seen = [False]

            def on_tokens(toks, _text):
                streams[i].extend(toks)
                if not seen[0]:
                    seen[0] = True
                    first_tokens.wait()
            return generate(L.address, token_ids=prompts[i], max_new_tokens=n_new, timeout=180, on_tokens=on_tokens)

        with futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(run, i) for i in range(len(prompts))]
            first_tokens.wait()            # every request is running and has streamed a token
            L.node_process("a").send_signal(signal.SIGKILL)
            results = [j.result(timeout=180) for j in jobs]
        for i, (p, r) in enumerate(zip(prompts, results)):
            want = hf_greedy(ckpt, p, n_new)
            assert r["token_ids"] == want, f"request {i}: lost, repeated or wrong tokens"
            assert streams[i] == want
            assert r["finish_reason"] == "length"
        assert "a" in L.gateway.down_nodes
        assert not L.gateway.pipelines[0].alive and L.gateway.pipelines[1].alive

        # No pipeline left: a clear UNAVAILABLE (once the accepted request has waited its
        # recovery_wait_s for a pipeline to come back), and the gateway keeps serving.
        L.gateway.recovery_wait_s = 1.0
        L.node_process("d").send_signal(signal.SIGKILL)
        L.node_process("d").wait(timeout=30)
        time.sleep(1.0)  # its workers notice the node is gone within 0.2 s and exit
        with pytest.raises(grpc.RpcError) as err:
            generate(L.address, token_ids=[1, 2, 3], max_new_tokens=4, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            generate(L.address, token_ids=[1, 2, 3], max_new_tokens=4, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no pipeline is available" in err.value.details()


# ---- bad input, cancellation, start-up checks ---------------------------------------------

@pytest.fixture(scope="module")
def small_launch(ckpt):
    with Launch(plan(ckpt, [("a", 1, 0, 3), ("b", 1, 3, 6)]), ckpt) as L:
        yield L


@pytest.mark.parametrize("kwargs, field", [
    (dict(token_ids=[]), "prompt"),
    (dict(token_ids=[1, 256]), "token_ids"),
    (dict(token_ids=[-1, 2]), "token_ids"),
    (dict(token_ids=[1, 2], max_new_tokens=0), "sampling.max_new_tokens"),
    (dict(token_ids=[1, 2], max_new_tokens=255), "sampling.max_new_tokens"),
    (dict(token_ids=[1, 2], temperature=-0.5), "sampling.temperature"),
    (dict(token_ids=[1, 2], temperature=1.0, top_p=0.0), "sampling.top_p"),
    (dict(token_ids=[1, 2], temperature=1.0, top_p=1.5), "sampling.top_p"),
    (dict(prompt="hello"), "prompt"),   # the checkpoint has no tokenizer
])
def test_invalid_arguments_name_the_field(small_launch, kwargs, field):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(grpc.RpcError) as err:
        generate(small_launch.address, timeout=30, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def _kv_is_zero(gw, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = gw.kv_stats()
        if all(s is not None and s == (0, 0) for s in stats.values()):
            return True
        time.sleep(0.1)
    return False


def test_cancel_and_deadline_free_kv_on_every_stage(small_launch):
    L = small_launch
    req = pb.GenerateRequest(token_ids=[1, 2, 3, 4], sampling=pb.SamplingParams(max_new_tokens=200))
    with grpc.insecure_channel(L.address) as ch:
        stub = pbg.InferenceStub(ch)
        call = stub.Generate(req, timeout=120)
        got = 0
        for msg in call:
            got += len(msg.token_ids)
            if got >= 3:
                break
        stats = L.gateway.kv_stats()
        assert any(s and s[0] > 0 for s in stats.values()), "the request should hold KV while it runs"
        call.cancel()
        assert _kv_is_zero(L.gateway), L.gateway.kv_stats()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stub.Generate(req, timeout=0.3):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _kv_is_zero(L.gateway), L.gateway.kv_stats()
    # Finished requests free their caches too.
    generate(L.address, token_ids=[9, 9, 9], max_new_tokens=3, timeout=60)
    assert _kv_is_zero(L.gateway)


def test_sampling_is_reproducible_with_a_seed(small_launch):
    kw = dict(token_ids=[3, 1, 4, 1, 5], max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95)
    a = generate(small_launch.address, seed=7, timeout=60, **kw)
    b = generate(small_launch.address, seed=7, timeout=60, **kw)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12


def test_stop_token_ends_generation(small_launch, ckpt):
    want = hf_greedy(ckpt, [5, 17, 33], 12)
    stop = want[4]
    got = generate(small_launch.address, token_ids=[5, 17, 33], max_new_tokens=12, stop_token_ids=[stop], timeout=60)
    assert got["token_ids"] == want[:want.index(stop) + 1]
    assert got["finish_reason"] == "stop"


def test_checkpoint_that_does_not_match_the_plan(ckpt):
    from hexplan.plan import plan_from_dict

    wrong = plan_from_dict({"model": "llama-2-7b", "pipelines": [{"stages": [
        {"node": "a", "gpus": [0], "tp": 1, "layers": [0, 32]}]}]})
    with pytest.raises(GatewayError) as err:
        Gateway(wrong, ckpt, {"a": "127.0.0.1:1"})
    msg = str(err.value)
    assert "llama-2-7b" in msg and ckpt in msg and "num_hidden_layers 6 vs 32" in msg


def test_checkpoint_without_a_usable_config_json(tmp_path):
    from hexplan.plan import plan_from_dict

    pl = plan_from_dict({"model": "llama-2-7b", "pipelines": [{"stages": [
        {"node": "a", "gpus": [0], "tp": 1, "layers": [0, 32]}]}]})
    with pytest.raises(GatewayError) as err:
        Gateway(pl, str(tmp_path), {"a": "127.0.0.1:1"})
    assert str(err.value) == f"checkpoint {tmp_path / 'config.json'}: file not found"
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 32,\n "oops"}')
    with pytest.raises(GatewayError) as err:
        Gateway(pl, str(tmp_path), {"a": "127.0.0.1:1"})
    assert str(err.value).startswith(f"checkpoint {tmp_path / 'config.json'}:2: not valid JSON")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 32, "hidden_size": 4096}))
    with pytest.raises(GatewayError) as err:
        Gateway(pl, str(tmp_path), {"a": "127.0.0.1:1"})
    assert str(err.value) == f"checkpoint {tmp_path / 'config.json'}: num_attention_heads: missing"


def test_health_and_reflection(small_launch):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(small_launch.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="hexplan.v1.Inference"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = [s.name for r in replies for s in r.list_services_response.service]
        assert "hexplan.v1.Inference" in names


# ---- TLS ----------------------------------------------------------------------------------

def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_everywhere(ckpt, tmp_path):
    pytest.importorskip("cryptography")
    from hexplan.executor.wire import Tls

    cert, key = _self_signed(tmp_path)
    tls = Tls(cert=cert, key=key, ca=cert)
    with Launch(plan(ckpt, [("a", 1, 0, 3), ("b", 1, 3, 6)]), ckpt, tls=tls) as L:
        got = generate(L.address, token_ids=[5, 17, 33], max_new_tokens=6, tls=Tls(ca=cert), timeout=60)
        assert got["token_ids"] == hf_greedy(ckpt, [5, 17, 33], 6)
        with grpc.insecure_channel(L.address) as ch:   # a plaintext client is refused
            with pytest.raises(grpc.RpcError):
                pbg.InferenceStub(ch).GenerateUnary(pb.GenerateRequest(
                    token_ids=[1], sampling=pb.SamplingParams(max_new_tokens=1)), timeout=5)


# ---- the command line -------------------------------------------------------------------

def test_cli_launch_generate_and_sigterm(ckpt, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n"
                         "      - {node: a, gpus: [0], tp: 1, layers: [0, 4]}\n"
                         "      - {node: b, gpus: [0], tp: 1, layers: [4, 6]}\n")
    proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "launch", str(plan_file), "--checkpoint", ckpt,
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("hexplan: ready: serving"), line
        address = line.split(" on ")[1].split()[0]
        out = subprocess.run([sys.executable, "-m", "hexplan.cli", "generate", "--target", address,
                              "--token-ids", "5,17,33", "--max-new-tokens", "7", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["token_ids"] == hf_greedy(ckpt, [5, 17, 33], 7)
        assert data["finish_reason"] == "length" and data["text"] == ""
        bad = subprocess.run([sys.executable, "-m", "hexplan.cli", "generate", "--target", address,
                              "--token-ids", "5,999", "--max-new-tokens", "3"], capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 2 and "INVALID_ARGUMENT: token_ids:" in bad.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launch_without_executor_extra_message():
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", "generate", "--target", "nohost",
                          "--token-ids", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--target: expected HOST:PORT" in out.stderr
