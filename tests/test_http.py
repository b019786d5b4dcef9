"""The OpenAI-compatible HTTP front (executor/hexplan/executor/http.py), driven by the `openai`
package and by plain HTTP, on a two-stage plan over a tiny checkpoint with a real (tiny BPE)
tokenizer: greedy tokens equal transformers' and the gRPC path's, streamed text equals the
non-streamed text, chat, stop strings, errors in OpenAI's shape, usage, a client that goes away
mid-stream (its KV freed on every stage), draining, and `hexplan launch --http` end to end.
Everything listens on 127.0.0.1, on free ports."""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from executor_util import hf_greedy, make_checkpoint, make_tokenizer, plan  # noqa: E402

from hexplan.executor.client import generate  # noqa: E402
from hexplan.executor.launch import Launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-chat"          # the checkpoint folder's name: the served model's default name
PROMPT = "A naïve café in Zürich serves 😀 and 日本語"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("http") / MODEL, layers=2, vocab=256)
    tok = make_tokenizer(ckpt, 256)
    with Launch(plan(ckpt, [("a", 1, 0, 1), ("b", 1, 1, 2)]), ckpt, threads=1, http="127.0.0.1:0") as L:
        yield L, ckpt, tok


def client(L, retries=0):
    return openai.OpenAI(base_url=f"{L.http.url}/v1", api_key="x", max_retries=retries, timeout=120)


def call(L, method, path, body=None, raw=None):
    """(status, parsed JSON or text) over plain HTTP."""
    conn = http.client.HTTPConnection("127.0.0.1", L.http.port, timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        text = r.read().decode()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text
    finally:
        conn.close()


def kv_free(L, within=10.0) -> dict:
    """Poll the stages until none holds KV (bounded); returns the last stats."""
    deadline = time.monotonic() + within
    while True:
        stats = L.gateway.kv_stats()
        if all(v is not None and v[0] == 0 and v[1] == 0 for v in stats.values()) and L.gateway.in_flight() == 0:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- models, health, metrics ----------------------------------------------------------

def test_models_health_and_unknown_paths(served):
    L, ckpt, _ = served
    status, body = call(L, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL] and body["data"][0]["max_model_len"] == 256
    assert [m.id for m in client(L).models.list()] == [MODEL]
    assert call(L, "GET", "/health") == (200, {"status": "ok"})
    status, body = call(L, "GET", "/v1/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = call(L, "GET", "/metrics")
    if getattr(L.gateway, "metrics", None) is None:
        assert status == 404
    else:
        assert status == 200 and "vllm:" in body


# ---- completions ------------------------------------------------------------------------

def test_greedy_completion_equals_transformers_and_grpc(served):
    L, ckpt, tok = served
    ids = tok(PROMPT)["input_ids"]
    want = hf_greedy(ckpt, ids, 10)
    c = client(L)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                             extra_body={"return_token_ids": True})
    (ch,) = r.choices
    assert ch.model_extra["token_ids"] == want and ch.model_extra["prompt_token_ids"] == ids
    assert ch.text == tok.decode(want) and ch.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert generate(L.address, token_ids=ids, max_new_tokens=10, timeout=120)["token_ids"] == want
    # the prompt as token ids (and as a list of one prompt), echo
    r2 = c.completions.create(model=MODEL, prompt=[ids], max_tokens=10, temperature=0, echo=True)
    assert r2.choices[0].text == tok.decode(ids) + ch.text
    # two choices: two requests; greedy, so the same text; usage counts both
    r3 = c.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, n=2)
    assert [x.index for x in r3.choices] == [0, 1]
    assert r3.choices[0].text == r3.choices[1].text == tok.decode(want[:4])
    assert r3.usage.completion_tokens == 8 and r3.usage.prompt_tokens == len(ids)


def test_streamed_text_equals_the_text_and_never_splits_a_character(served):
    L, ckpt, tok = served
    c = client(L)
    full = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert all(x.object == "text_completion" for x in chunks)
    texts = [x.choices[0].text for x in chunks if x.choices]
    assert "".join(texts) == full
    # a U+FFFD the model's bytes make stays; none comes from a character cut between chunks
    assert sum(t.count("\ufffd") for t in texts) == full.count("\ufffd")
    finals = [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_choice_detokenizer_on_multibyte_text(served):
    """Token by token through the streaming decoder: 2-, 3- and 4-byte characters split across
    tokens come out whole, never as U+FFFD, and the pieces add up to the text."""
    from hexplan.executor.http import Choice

    _, _, tok = served
    text = "naïve café 😀 🚀 日本語 русский"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))   # characters really are split
    for stops in ([], ["日本"]):
        c = Choice(0, None, tok, stops)
        pieces = [c.add([t]) for t in ids if not c.done]
        pieces.append(c.end("length") if not c.done else "")
        assert not any("\ufffd" in p for p in pieces)
        want = text if not stops else text[:text.index("日本")]
        assert "".join(pieces) == want == c.text
        assert c.finish == ("stop" if stops else "length")


def test_stop_strings_cut_the_text_and_free_the_request(served):
    L, ckpt, tok = served
    c = client(L)
    full = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    k = len(full) // 2
    stop = full[k:k + 2]
    want = full[:full.find(stop)]
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "never-seen"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 24
    streamed = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                         stream=True))
    assert "".join(x.choices[0].text for x in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert all(v == (0, 0) for v in kv_free(L).values())


# ---- chat ---------------------------------------------------------------------------------

def test_chat_completions_sync_and_streamed(served):
    L, ckpt, tok = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café? 😀"}]
    ids = chat_ids(tok, messages)
    want = hf_greedy(ckpt, ids, 8)
    c = client(L)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(want) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(x.object == "chat.completion.chunk" for x in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == r.choices[0].message.content
    assert [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # content as text parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "café? 😀"}]}]
    r2 = c.chat.completions.create(model=MODEL, messages=parts, max_tokens=3, temperature=0)
    assert r2.choices[0].message.content == tok.decode(hf_greedy(ckpt, chat_ids(tok, [parts[0] | {"content": "café? 😀"}]), 3))


def test_sse_wire_format(served):
    """The bytes on the wire: `data: {json}` events, a blank line after each, `data: [DONE]` last."""
    L, _, _ = served
    status, text = call(L, "POST", "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                         "temperature": 0, "stream": True})
    assert status == 200
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {")
        json.loads(e[len("data: "):])


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),             # past the model's context of 256
    ({"n": 0}, "n"),
    ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"prompt": [5, 999]}, "prompt"),                   # outside the vocabulary
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),                 # one prompt per request
    ({"prompt": {"not": "a prompt"}}, "prompt"),        # a pydantic error: 400 too, not 422
    ({"max_tokens": "many"}, "max_tokens"),
])
def test_bad_fields_are_400_naming_the_field(served, kwargs, param, caplog):
    L, _, _ = served
    caplog.set_level(logging.INFO, logger="hexplan.access")
    args = {"model": MODEL, "prompt": "café", "max_tokens": 4} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client(L).completions.create(**args)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert err["message"].startswith(param), err
    # a refused request has its access line too, with the answer and the error
    access = [r for r in caplog.records if r.name == "hexplan.access"]
    assert len(access) == 1, [r.getMessage() for r in access]
    a = access[0]
    assert (a.api, a.status, a.finish_reason, a.error) == ("POST /v1/completions", "HTTP 400", "refused", err["message"])


def test_other_errors_in_openai_shape(served):
    L, _, _ = served
    c = client(L)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="not-this-one", prompt="café", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-2)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"
    status, body = call(L, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = call(L, "POST", "/v1/chat/completions", {"model": MODEL})       # messages missing
    assert status == 400 and body["error"]["param"] == "messages"
    # the gateway's own refusals (the KV budget: an error event) name this API's field
    from hexplan.executor.http import event_error

    e = event_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens: prompt (3 tokens) + ... exceeds",
                    L.http.front.sampling_fields("max_completion_tokens", "messages"))
    assert (e.status, e.param, e.message) == (400, "max_completion_tokens", "max_completion_tokens: prompt (3 tokens) + ... exceeds")
    assert event_error(grpc.StatusCode.UNAVAILABLE, "draining: no", {}).status == 503
    assert event_error(grpc.StatusCode.INTERNAL, "boom", {}).status == 500


def test_chat_without_a_template_is_400_unless_one_is_given(served):
    from hexplan.executor.http import serve_http

    L, ckpt, tok = served
    saved = tok.chat_template
    gw_tok = L.gateway.tokenizer
    gw_tok.chat_template = None
    fronts = []
    try:
        fronts.append(serve_http(L.gateway, "127.0.0.1:0", MODEL))
        bare = openai.OpenAI(base_url=f"{fronts[0].url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            bare.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert "--chat-template" in e.value.body["message"] and e.value.body["param"] == "messages"
        fronts.append(serve_http(L.gateway, "127.0.0.1:0", MODEL, chat_template=saved))
        given = openai.OpenAI(base_url=f"{fronts[1].url}/v1", api_key="x", max_retries=0)
        r = given.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0)
        assert r.choices[0].message.content == tok.decode(hf_greedy(ckpt, chat_ids(tok, [{"role": "user",
                                                                                            "content": "hi"}]), 2))
    finally:
        gw_tok.chat_template = saved
        for f in fronts:
            f.stop()


def test_queue_full_is_429(served):
    from hexplan.executor.http import serve_http

    L, _, _ = served
    front = serve_http(L.gateway, "127.0.0.1:0", MODEL, max_queue=0)
    try:
        front.front.concurrency = 0           # as if every slot were taken: any request would wait
        c = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="café", max_tokens=2)
        assert "--max-queue" in e.value.body["message"]
    finally:
        front.stop()


def test_draining_is_503_and_health_follows(served):
    L, _, _ = served
    gw = L.gateway
    gw.begin_drain()
    try:
        status, body = call(L, "POST", "/v1/completions", {"model": MODEL, "prompt": "café", "max_tokens": 2})
        assert status == 503 and body["error"]["message"].startswith("draining")
        status, _ = call(L, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 503
        assert call(L, "GET", "/health")[0] == 503
    finally:
        with gw.cv:
            gw.draining = False
            gw.set_health()
    assert call(L, "GET", "/health")[0] == 200


# ---- a client that goes away ------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_frees_its_kv(served):
    L, _, _ = served
    body = json.dumps({"model": MODEL, "prompt": "café", "max_tokens": 200, "temperature": 0, "stream": True,
                       "stop_token_ids": []}).encode()
    with socket.create_connection(("127.0.0.1", L.http.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: {" not in got:                 # the headers and the first chunk
            data = s.recv(4096)
            assert data, got
            got += data
        assert got.startswith(b"HTTP/1.1 200")
        busy = L.gateway.kv_stats()
        assert any(v[1] > 0 for v in busy.values()), busy    # it holds KV while it streams
    stats = kv_free(L)
    assert all(v == (0, 0) for v in stats.values()), stats
    assert L.gateway.in_flight() == 0


# ---- `hexplan launch --http`, end to end --------------------------------------------------

def test_cli_launch_http_drains_then_stops(tmp_path):
    ckpt = make_checkpoint(tmp_path / MODEL, layers=2, vocab=256)
    make_tokenizer(ckpt, 256)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n      - {{node: a, gpus: [0], tp: 1, layers: [0, 1]}}\n"
                         "      - {node: b, gpus: [0], tp: 1, layers: [1, 2]}\n")
    err = tmp_path / "launch.err"
    # a slow link between the stages (20 ms a step): the stream is still running when the drain starts
    env = os.environ | {"HEXPLAN_LINK_DELAY": "20,10000"}
    proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "launch", str(plan_file), "--checkpoint", ckpt,
                             "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--served-model-name", "tiny",
                             "--threads", "1", "--drain-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=err.open("w"), text=True, cwd=ROOT, env=env)
    try:
        line = proc.stdout.readline()
        m = re.match(r"hexplan: ready: serving \S+ on 127\.0\.0\.1:\d+ .*; HTTP on http://127\.0\.0\.1:(\d+)$",
                     line.strip())
        assert m, line + err.read_text()
        port = int(m.group(1))
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        assert [x.id for x in c.models.list()] == ["tiny"]
        stream = c.completions.create(model="tiny", prompt="café", max_tokens=120, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)               # drain: the stream goes on, new requests get 503
        deadline = time.monotonic() + 30
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            status = conn.getresponse().status
            conn.close()
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503
        with pytest.raises(openai.InternalServerError) as e:     # openai's class for 503
            c.completions.create(model="tiny", prompt="café", max_tokens=2)
        assert e.value.status_code == 503
        rest = list(stream)                            # the stream in flight ran to its end
        assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 120
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read().strip().endswith("hexplan: stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("args, flag", [
    (["--http", "127.0.0.1:0", "--max-queue", "-1"], "--max-queue"),
    (["--http", "nowhere"], "--http"),
    (["--http", "127.0.0.1:0", "--chat-template", "/no/such/template.jinja"], "--chat-template"),
    (["--served-model-name", "x"], "--served-model-name"),       # only with --http
])
def test_cli_http_flags_are_checked(tmp_path, args, flag):
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", "launch", str(tmp_path / "plan.yaml"), "--checkpoint",
                          str(tmp_path)] + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and flag in out.stderr, out.stderr
