"""`hexplan node` + `hexplan serve` as separate processes, prompts through a tokenizer, the
checked-in generated gRPC code, and `hexplan generate --wait` for a gateway still starting."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import free_port, hf_greedy, make_checkpoint, plan  # noqa: E402

from hexplan.executor.client import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _word_tokenizer(path, vocab):
    """A word-level tokenizer: "w17" is token 17; saved next to the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(str(path))


def _start(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line


def test_node_and_serve_processes_with_a_tokenizer(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=4, vocab=256)
    _word_tokenizer(tmp_path / "ckpt", 256)
    token = tmp_path / "token"                      # the nodes require it; the gateway sends it
    token.write_text("a-shared-secret\n")
    procs = []
    try:
        nodes = {}
        for name in ("left", "right"):
            proc, line = _start([sys.executable, "-m", "hexplan.cli", "node", "--listen", "127.0.0.1:0", "--name", name,
                                 "--auth-token-file", str(token), "--checkpoint-root", str(tmp_path)])
            procs.append(proc)
            assert line.startswith(f"hexplan node {name} listening on 127.0.0.1:"), line
            nodes[name] = line.split()[-1]
        plan_file = tmp_path / "plan.yaml"
        plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n"
                             "      - {node: left, gpus: [0], tp: 1, layers: [0, 1]}\n"
                             "      - {node: right, gpus: [0, 1], tp: 2, layers: [1, 4]}\n")
        port = free_port()
        proc, line = _start([sys.executable, "-m", "hexplan.cli", "serve", "--plan", str(plan_file), "--checkpoint", ckpt,
                             "--listen", f"127.0.0.1:{port}", "--nodes", ",".join(f"{k}={v}" for k, v in nodes.items()),
                             "--auth-token-file", str(token)])
        procs.append(proc)
        assert line.startswith("hexplan: ready: serving"), line
        got = generate(f"127.0.0.1:{port}", prompt="w5 w17 w33", max_new_tokens=8, timeout=120)
        want = hf_greedy(ckpt, [5, 17, 33], 8)
        assert got["token_ids"] == want
        assert got["text"].split() == [f"w{t}" for t in want]
        # --json through the CLI client
        out = subprocess.run([sys.executable, "-m", "hexplan.cli", "generate", "--target", f"127.0.0.1:{port}",
                              "--prompt", "w5 w17 w33", "--max-new-tokens", "4", "--json"],
                             capture_output=True, text=True, timeout=120)
        data = json.loads(out.stdout)
        assert data["token_ids"] == want[:4] and data["text"].split() == [f"w{t}" for t in want[:4]]
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(timeout=30) == 0
            finally:
                if p.poll() is None:
                    p.kill()


def test_serve_reports_a_node_it_cannot_reach(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=2)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n"
                         "      - {node: gone, gpus: [0], tp: 1, layers: [0, 2]}\n")
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", "serve", "--plan", str(plan_file), "--checkpoint", ckpt,
                          "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no address for node(s) gone" in out.stderr and "Traceback" not in out.stderr


def test_generated_grpc_code_is_up_to_date():
    pytest.importorskip("grpc_tools")
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ---- generate --wait: right after `hexplan launch ... &` ------------------------------------

def test_generate_waits_for_a_gateway_that_is_still_starting(tmp_path):
    from hexplan.executor.launch import Launch

    ckpt = make_checkpoint(tmp_path / "ckpt", layers=2)
    port = free_port()
    gen = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "generate", "--target", f"127.0.0.1:{port}",
                            "--token-ids", "5,17,33", "--max-new-tokens", "4", "--json", "--wait", "90",
                            "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Start the gateway only once the client has found nothing there and says it waits.
        first = []
        reader = threading.Thread(target=lambda: first.append(gen.stderr.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert first and first[0].startswith(f"hexplan: waiting up to 90 s for the gateway at 127.0.0.1:{port}"), first
        t0 = time.monotonic()
        with Launch(plan(ckpt, [("a", 1, 0, 2)]), ckpt, listen=f"127.0.0.1:{port}"):
            out, err = gen.communicate(timeout=120)
        assert time.monotonic() - t0 < 100
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait(timeout=10)
    assert gen.returncode == 0, err
    assert json.loads(out)["token_ids"] == hf_greedy(ckpt, [5, 17, 33], 4)
    assert "Traceback" not in err and "hexplan: error" not in err


def test_generate_wait_gives_up_after_its_time(capsys):
    from hexplan.cli import main

    port = free_port()                         # nothing listens there
    t0 = time.monotonic()
    assert main(["generate", "--target", f"127.0.0.1:{port}", "--token-ids", "1,2", "--wait", "1"]) == 2
    assert 0.9 < time.monotonic() - t0 < 15
    captured = capsys.readouterr()
    assert captured.out == ""
    progress, error = captured.err.splitlines()
    assert progress.startswith(f"hexplan: waiting up to 1 s for the gateway at 127.0.0.1:{port}")
    assert error.startswith(f"hexplan: error: --wait 1: no gateway serving at 127.0.0.1:{port} after 1 s (last: UNAVAILABLE")


def test_generate_wait_fails_at_once_on_a_server_that_is_not_a_gateway(capsys):
    from hexplan.cli import main
    from hexplan.executor.wire import add_health_and_reflection, make_server

    server = make_server(workers=2)
    add_health_and_reflection(server, ["hexplan.v1.Stage"])    # what a node executor serves
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        t0 = time.monotonic()
        assert main(["generate", "--target", f"127.0.0.1:{port}", "--token-ids", "1,2", "--wait", "30"]) == 2
        assert time.monotonic() - t0 < 10
    finally:
        server.stop(grace=None).wait(timeout=10)
    err = capsys.readouterr().err
    assert err.startswith(f"hexplan: error: --wait 30: 127.0.0.1:{port} answers but does not serve hexplan.v1.Inference")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_generate_wait_must_be_a_number_of_seconds(capsys, value):
    from hexplan.cli import main
    assert main(["generate", "--target", "127.0.0.1:1", "--token-ids", "1,2", "--wait", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hexplan: error: --wait: must be a number of seconds >= 0") and len(err.splitlines()) == 1
