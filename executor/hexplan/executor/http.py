"""The gateway's OpenAI-compatible HTTP front (``hexplan serve --http HOST:PORT``).

FastAPI on uvicorn, what vLLM and ``transformers serve`` use, in a thread of the gateway's
process, over the same ``Gateway`` object the gRPC servicer uses: requests are validated with
the servicer's checks (``servicer.check_prompt`` / ``check_sampling``, the fields renamed to
this API's), submitted, and their events (tokens, done, error) turned into OpenAI's JSON or
server-sent events. Endpoints, in vLLM's / OpenAI's shapes:

* ``GET /v1/models`` (and ``/v1/models/{id}``): the one served model (``--served-model-name``).
* ``POST /v1/completions``: ``prompt`` (text, token ids, or a list of one of either),
  ``max_tokens`` (default 16), ``temperature``, ``top_p``, ``top_k`` and ``stop_token_ids``
  (vLLM's extras), ``seed``, ``stop``, ``stream`` + ``stream_options.include_usage``, ``n``,
  ``echo``, ``ignore_eos`` and ``return_token_ids`` (vLLM's); ``usage``.
* ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template
  (``apply_chat_template(..., add_generation_prompt=True)``), or ``--chat-template FILE``.
* ``GET /health`` (200 only while a pipeline is live and the gateway is not draining) and
  ``GET /metrics`` (``gw.metrics.render()`` when the gateway has metrics; else 404).

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field
(named in ``param`` and at the start of the message; FastAPI's 422 becomes 400), 404 for an
unknown model or path, 413 for a body past the gRPC message limit, 429 when more than
``max_queue`` requests would wait for a slot, 503 while draining or with no live pipeline, 500
for an internal error. A stream that fails after its first byte ends with an error event and
``data: [DONE]``.

Text. Each choice's generated ids are decoded whole at every token and only the new suffix is
sent, never while the text ends in U+FFFD (a character whose bytes are not all generated yet),
and with stop strings, never the last ``len(longest stop) - 1`` characters before the request
ends (they may begin a stop string). A stop string ends the choice: its text is cut before the
stop string and its request cancelled (its KV freed on every stage). The streamed pieces
therefore add up to the non-streamed text.

A client that goes away cancels its requests (``Gateway.cancel``): a stream notices at once
(the response watches the connection), a non-streamed request within ``DISCONNECT_POLL_S``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import grpc
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .gateway import Gateway, Request
from .limits import request_message_limit, total_concurrency, waiting_allowance
from .servicer import Invalid, check_prompt, check_sampling, log_refused

log = logging.getLogger("hexplan.http")

IDLE_S = 0.5                 # a waiting request's thread wakes up this often
DISCONNECT_POLL_S = 0.5      # a non-streamed request checks its client this often
SHUTDOWN_GRACE_S = 3.0       # uvicorn's wait for open responses when stopped, then they are cut
MAX_N = 16                   # choices per request
BODY_FACTOR = 2              # a body may be this many times the gRPC message limit (JSON is wordier)
DEFAULT_MAX_TOKENS = 16      # /v1/completions, as OpenAI's


# ---- errors -------------------------------------------------------------------------------

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


GRPC_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503}


def event_error(code: grpc.StatusCode, message: str, fields: dict) -> APIError:
    """An error event of the gateway as an HTTP error; a gRPC field named at the start of the
    message (``sampling.max_new_tokens: ...``) is renamed to this API's."""
    field, sep, rest = message.partition(": ")
    param = fields.get(field) if sep else None
    if param:
        message = f"{param}: {rest}"
    status = GRPC_STATUS.get(code, 500)
    return APIError(status, message, param, code="draining" if message.startswith("draining") else None)


# ---- request bodies ---------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")    # other fields are ignored, as vLLM does


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Common(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    min_tokens: int | None = None
    use_beam_search: bool | None = None
    ignore_eos: bool | None = False
    return_token_ids: bool | None = False
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True


# A field whose value is not its default asks for something hexplan does not do: 400 naming it.
UNSUPPORTED = (
    ("logprobs", lambda v: v is None or v is False, "log probabilities are not supported"),
    ("top_logprobs", lambda v: not v, "log probabilities are not supported"),
    ("presence_penalty", lambda v: not v, "penalties are not supported (only 0)"),
    ("frequency_penalty", lambda v: not v, "penalties are not supported (only 0)"),
    ("repetition_penalty", lambda v: v is None or v == 1, "penalties are not supported (only 1)"),
    ("logit_bias", lambda v: not v, "not supported"),
    ("min_tokens", lambda v: not v, "not supported"),
    ("use_beam_search", lambda v: not v, "beam search is not supported"),
    ("suffix", lambda v: not v, "not supported"),
    ("tools", lambda v: not v, "tool calls are not supported"),
    ("response_format", lambda v: not v or v.get("type") == "text", "only {\"type\": \"text\"} is supported"),
)

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-plain"}


def validation_param(loc) -> str | None:
    """A pydantic error location as a field path (``messages[0].content``): the body's name
    and the union members' tags (``list[int]``) left out."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and "[" not in p and p not in _TYPE_TAGS:
            out += ("." if out else "") + p
    return out or None


def validation_error(errors) -> APIError:
    errors = list(errors)
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    param = validation_param(e.get("loc", ()))
    msg = e.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{more}" if param else f"{msg}{more}", param)


# ---- one choice's text --------------------------------------------------------------------

class Choice:
    """One generation (one gateway request) of an HTTP request: its ids, the text sent so far,
    stop strings, how it ended."""

    def __init__(self, index: int, req: Request, tokenizer, stops: list[str]):
        self.index, self.req, self.tokenizer, self.stops = index, req, tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1   # characters that may begin a stop string
        self.ids: list[int] = []
        self.text = ""             # the text sent (or to be sent) so far
        self.finish: str | None = None
        self.pending: list[int] = []   # ids not yet reported with a chunk (return_token_ids)
        self.ended = False         # the gateway sent its last event (done or error)

    @property
    def done(self) -> bool:
        return self.finish is not None

    def _decode(self) -> str:
        if self.tokenizer is None or not self.ids:
            return ""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _stop_at(self, full: str) -> int:
        """Where the first stop string begins in ``full`` (after the text already sent), or -1."""
        start = max(0, len(self.text) - self.hold)
        found = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else -1

    def add(self, tokens: list[int]) -> str:
        """New tokens; returns the text to send now (possibly empty)."""
        self.ids += tokens
        self.pending += tokens
        if self.tokenizer is None:
            return ""
        full = self._decode()
        stopped = self._stopped(full)
        if stopped is not None:
            return stopped
        if full.endswith("\ufffd"):
            return ""                          # a character still being generated
        return self._take(full[:len(full) - self.hold] if self.stops else full)

    def _stopped(self, full: str) -> str | None:
        """When ``full`` holds a stop string: finish ("stop") and return the text up to it not yet
        sent; else None."""
        if self.stops:
            at = self._stop_at(full)
            if at >= 0:
                self.finish = "stop"
                return self._take(full[:max(at, len(self.text))])
        return None

    def end(self, reason: str) -> str:
        """The gateway's ``done``: the rest of the text."""
        self.ended = True
        full = self._decode()
        stopped = self._stopped(full)
        if stopped is not None:
            return stopped
        self.finish = reason
        return self._take(full)

    def _take(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            # a decoder that rewrote earlier text (it cannot with byte-level BPE); keep what was sent
            return ""
        delta, self.text = upto[len(self.text):], upto
        return delta

    def take_pending(self) -> list[int]:
        out, self.pending = self.pending, []
        return out


def _take_events(q: queue.Queue, timeout: float) -> list:
    """Block up to ``timeout`` for an event, then take every event already there."""
    try:
        out = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


class SSEResponse(StreamingResponse):
    """Server-sent events that watch the connection whatever the ASGI server's version: a
    client that goes away stops the stream at once, and ``on_close`` runs however it ends."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def watch():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()
                tg.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- the app ------------------------------------------------------------------------------

class Front:
    """The HTTP front's state and handlers over one gateway."""

    def __init__(self, gw: Gateway, served_model_name: str, chat_template: str | None = None,
                 max_queue: int | None = None):
        self.gw, self.model = gw, served_model_name
        self.chat_template = chat_template
        self.concurrency = total_concurrency(gw)
        self.max_queue = waiting_allowance(self.concurrency) if max_queue is None else int(max_queue)
        self.limiter = anyio.CapacityLimiter(self.concurrency + self.max_queue + 2 * MAX_N)
        self.body_limit = BODY_FACTOR * request_message_limit(gw.context_limit)
        self.created = int(time.time())
        gen = _generation_config(gw.checkpoint)
        self.defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k") if isinstance(gen.get(k), (int, float))
                         and not isinstance(gen.get(k), bool)}
        eos: set = set()
        for v in (gw.config.get("eos_token_id"), gen.get("eos_token_id"),
                  getattr(gw.tokenizer, "eos_token_id", None) if gw.tokenizer is not None else None):
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < gw.vocab:
                    eos.add(t)
        self.eos = sorted(eos)

    # -- admission --
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model}`).", "model",
                           code="model_not_found")

    def check_available(self, n: int) -> None:
        gw = self.gw
        if gw.draining:
            raise APIError(503, "draining: the gateway is shutting down and takes no new requests", code="draining")
        if not any(p.alive for p in gw.pipelines):
            raise APIError(503, "no pipeline is available: every pipeline is down", code="no_pipeline")
        waiting = gw.in_flight() + n - self.concurrency
        if waiting > self.max_queue:
            raise APIError(429, f"too many requests waiting: at most {self.max_queue} may wait for a slot past the "
                                f"plan's concurrency of {self.concurrency} (--max-queue); retry later",
                           code="queue_full")

    def health(self) -> tuple[bool, str]:
        gw = self.gw
        if gw.draining:
            return False, "draining"
        if not any(p.alive for p in gw.pipelines):
            return False, "no live pipeline"
        return True, "ok"

    # -- parsing --
    async def read(self, request: HTTPRequest, model: type[BaseModel]):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_limit:
            raise APIError(413, f"the request body ({int(length)} bytes) exceeds the limit of {self.body_limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_limit:
                raise APIError(413, f"the request body exceeds the limit of {self.body_limit} bytes")
            chunks.append(chunk)
        try:
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            errors = e.errors(include_url=False)
            if errors and errors[0].get("type") == "json_invalid":
                raise APIError(400, f"the body is not valid JSON: {errors[0].get('msg')}") from None
            raise validation_error(errors) from None

    def unsupported(self, body) -> None:
        for name, ok, why in UNSUPPORTED:
            if hasattr(body, name) and not ok(getattr(body, name)):
                raise bad(name, why)
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise bad("best_of", "not supported (only equal to n)")

    def sampling_fields(self, max_tokens_name: str, prompt_name: str) -> dict:
        return {"token_ids": prompt_name, "prompt": prompt_name, "sampling.max_new_tokens": max_tokens_name,
                "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
                "sampling.stop_token_ids": "stop_token_ids"}

    def prompt_ids(self, *, token_ids=None, text=None, prompt_name="prompt", special=True) -> list[int]:
        try:
            return check_prompt(self.gw, token_ids, text, add_special_tokens=special)
        except Invalid as e:
            raise bad(prompt_name, e.message) from None

    def stops(self, body) -> list[str]:
        stop = body.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and self.gw.tokenizer is None:
            raise bad("stop", "stop strings need a tokenizer and this checkpoint has none (use stop_token_ids)")
        if any(s == "" for s in stops):
            raise bad("stop", "a stop string must not be empty")
        return stops

    def submit(self, body, ids: list[int], max_tokens: int | None, max_tokens_name: str, prompt_name: str,
               label: str) -> list[Request]:
        """Check the sampling fields, then submit ``n`` requests (all or none)."""
        gw = self.gw
        n = 1 if body.n is None else body.n
        if not 1 <= n <= MAX_N:
            raise bad("n", f"must be between 1 and {MAX_N}, got {n}")
        room = min(gw.context_limit, gw.scheduler.kv_budget) - len(ids)
        if max_tokens is None:            # null or absent (chat): what the context and the KV budget leave
            if room <= 0:
                raise bad(prompt_name, f"the prompt ({len(ids)} tokens) leaves no room to generate (the model's "
                                       f"context is {gw.context_limit} tokens, a request's KV budget "
                                       f"{gw.scheduler.kv_budget})")
            max_tokens = room
        temperature = body.temperature if body.temperature is not None else float(self.defaults.get("temperature", 1.0))
        top_p = body.top_p if body.top_p is not None else float(self.defaults.get("top_p", 1.0))
        top_k = body.top_k if body.top_k is not None else int(self.defaults.get("top_k", 0))
        if top_k == -1:
            top_k = 0                      # vLLM's "no top-k"
        seed = body.seed
        if seed is not None and not -2 ** 63 <= seed < 2 ** 63:
            raise bad("seed", f"must fit in 64 bits (signed), got {seed}")
        stop_ids = list(body.stop_token_ids or [])
        fields = self.sampling_fields(max_tokens_name, prompt_name)
        try:
            check_sampling(gw, ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=seed, stop_token_ids=stop_ids)
        except Invalid as e:
            raise bad(fields.get(e.field, e.field), e.message) from None
        if not body.ignore_eos:
            stop_ids += [t for t in self.eos if t not in stop_ids]
        self.check_available(n)
        reqs: list[Request] = []
        try:
            for i in range(n):
                s = None if seed is None else (seed + i + 2 ** 63) % 2 ** 64 - 2 ** 63
                sampling = check_sampling(gw, ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                          top_k=top_k, seed=s, stop_token_ids=stop_ids)
                req = gw.submit(ids, sampling, label if n == 1 else f"{label}-{i}")
                reqs.append(req)
                if req.finished:               # refused at once: draining, KV budget, no pipeline
                    ev = req.events.get_nowait()
                    raise event_error(ev[1], ev[2], fields) if ev[0] == "error" else APIError(500, str(ev))
        except BaseException:
            for r in reqs:
                gw.cancel(r)
            raise
        return reqs

    # -- events --
    async def events(self, choices: list[Choice]):
        """(choice, event) pairs until every choice is done; (None, None) when nothing came for a while."""
        async def take(c):
            evs = await anyio.to_thread.run_sync(_take_events, c.req.events, IDLE_S, limiter=self.limiter,
                                                 abandon_on_cancel=True)
            if not evs and self.gw.stop_event.is_set():
                raise APIError(503, "the gateway stopped before the request ended")
            return evs
        if len(choices) == 1:
            c = choices[0]
            while not c.done:
                evs = await take(c)
                if not evs:
                    yield None, None
                for ev in evs:
                    if c.done:
                        break
                    yield c, ev
            return
        out: asyncio.Queue = asyncio.Queue()

        async def pump(c):
            try:
                while not c.done:
                    evs = await take(c)
                    out.put_nowait((c, evs))
                    if any(ev[0] in ("done", "error") for ev in evs):
                        return
            except APIError as e:
                out.put_nowait((c, e))
        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            while not all(c.done for c in choices):
                c, evs = await out.get()
                if isinstance(evs, APIError):
                    raise evs
                if not evs:
                    yield None, None
                for ev in evs:
                    if c.done:
                        break
                    yield c, ev
        finally:
            for t in tasks:
                t.cancel()

    def apply(self, c: Choice, ev, fields: dict) -> str:
        """One event of ``c``'s request; returns the text to send. An error event raises."""
        if ev[0] == "tokens":
            delta = c.add(list(ev[1]))
            if c.done:                         # a stop string: its request is no longer needed
                ended = getattr(self.gw, "request_ended", None)
                if ended is not None:          # recorded as a stop (metrics, access line), not a cancel
                    ended(c.req, None, "stop")
                self.gw.cancel(c.req)
            return delta
        if ev[0] == "done":
            return c.end(ev[1])
        if ev[0] == "error":
            c.ended = True
            raise event_error(ev[1], ev[2], fields)
        return ""

    def cancel_all(self, choices: list[Choice]) -> None:
        for c in choices:
            self.gw.cancel(c.req)

    async def collect(self, request: HTTPRequest, choices: list[Choice], fields: dict) -> None:
        """A non-streamed request: run every choice to its end; the client's going away cancels."""
        checked = time.monotonic()
        try:
            async with aclosing(self.events(choices)) as evs:
                async for c, ev in evs:
                    if c is not None:
                        self.apply(c, ev, fields)
                    if time.monotonic() - checked >= DISCONNECT_POLL_S:
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            raise APIError(499, "the client went away")
        finally:
            self.cancel_all(choices)      # no-op for requests that ended


def _generation_config(checkpoint: str) -> dict:
    try:
        data = json.loads((Path(checkpoint) / "generation_config.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _usage(prompt: int, choices: list[Choice]) -> dict:
    out = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _chat_text(messages: list[dict]) -> list[dict]:
    """The messages as the chat template takes them; text content parts joined."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"messages[{i}].role", "must be a non-empty string")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                             "are supported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string, a list of text parts, or null")
        out.append({**m, "content": content if content is not None else ""})
    return out


def make_app(gw: Gateway, served_model_name: str, chat_template: str | None = None,
             max_queue: int | None = None) -> FastAPI:
    front = Front(gw, served_model_name, chat_template, max_queue)
    app = FastAPI(title="hexplan", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    def refused(request, err: APIError):
        """The error's response; requests to the generation endpoints also get their access line
        (``log_refused``: the ones accepted get theirs when they end)."""
        if request.method == "POST" and request.url.path in GENERATION_PATHS:
            log_refused(gw, f"POST {request.url.path}", f"HTTP {err.status}", err.message)
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return refused(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return refused(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return refused(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):     # the server logs the traceback
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    def model_card() -> dict:
        return {"id": front.model, "object": "model", "created": front.created, "owned_by": "hexplan",
                "root": front.model, "parent": None, "max_model_len": gw.context_limit}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        front.check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        ok, why = front.health()
        if ok:
            return {"status": "ok"}
        return APIError(503, why, code="draining" if why == "draining" else "no_pipeline").response()

    @app.get("/metrics")
    async def metrics():
        m = getattr(gw, "metrics", None)
        if m is None:
            raise APIError(404, "metrics are not enabled on this gateway")
        body, content_type = m.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await front.read(request, CompletionRequest)
        front.check_model(body.model)
        front.unsupported(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad("prompt", f"one prompt per request, got {len(prompt)} (send them as separate requests)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = front.prompt_ids(text=prompt)
            prompt_text = prompt
        else:
            ids = front.prompt_ids(token_ids=prompt)
            prompt_text = (gw.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                           if gw.tokenizer is not None else "")
        stops = front.stops(body)
        fields = front.sampling_fields("max_tokens", "prompt")
        cid = f"cmpl-{request.headers.get('x-request-id') or uuid.uuid4().hex}"   # the header: the log's label
        reqs = front.submit(body, ids, body.max_tokens, "max_tokens", "prompt", cid)
        choices = [Choice(i, r, gw.tokenizer, stops) for i, r in enumerate(reqs)]
        created = int(time.time())
        echo = prompt_text if body.echo else ""
        tokens = bool(body.return_token_ids)

        def choice_obj(c: Choice, text: str, finish=None, final=False) -> dict:
            out = {"index": c.index, "text": text, "logprobs": None, "finish_reason": finish}
            if tokens:
                out["token_ids"] = c.ids if final else c.take_pending()
                if final:
                    out["prompt_token_ids"] = ids
            return out

        if not body.stream:
            await front.collect(request, choices, fields)
            return {"id": cid, "object": "text_completion", "created": created, "model": front.model,
                    "choices": [choice_obj(c, echo + c.text, c.finish, final=True) for c in choices],
                    "usage": _usage(len(ids), choices), "system_fingerprint": None}

        usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(cs: list[dict]) -> str:
            out = {"id": cid, "object": "text_completion", "created": created, "model": front.model, "choices": cs}
            if usage:
                out["usage"] = None
            return sse(out)

        first = [chunk([{"index": c.index, "text": echo, "logprobs": None, "finish_reason": None}])
                 for c in choices] if echo else []
        tail = {"id": cid, "object": "text_completion", "created": created, "model": front.model, "choices": []}
        return SSEResponse(_sse_stream(front, choices, fields, cid, tokens, first,
                                       lambda c, delta: chunk([choice_obj(c, delta, c.finish)]),
                                       tail if usage else None, len(ids)),
                           lambda: front.cancel_all(choices))

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await front.read(request, ChatCompletionRequest)
        front.check_model(body.model)
        front.unsupported(body)
        if gw.tokenizer is None:
            raise bad("messages", "this checkpoint has no tokenizer, so chat is not possible "
                                  "(send token ids to /v1/completions)")
        template = front.chat_template or getattr(gw.tokenizer, "chat_template", None)
        if not template:
            raise bad("messages", "this checkpoint's tokenizer has no chat template: start the server with "
                                  "--chat-template FILE (a Jinja template), or use /v1/completions")
        if not body.messages:
            raise bad("messages", "at least one message is needed")
        messages = _chat_text(body.messages)
        try:
            text = gw.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                    add_generation_prompt=bool(body.add_generation_prompt))
        except Exception as e:      # the template's own checks (roles, order) and Jinja errors
            raise bad("messages", f"the chat template failed: {type(e).__name__}: {e}") from None
        ids = front.prompt_ids(text=text, prompt_name="messages", special=False)
        stops = front.stops(body)
        mt_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        fields = front.sampling_fields(mt_name, "messages")
        cid = f"chatcmpl-{request.headers.get('x-request-id') or uuid.uuid4().hex}"   # the header: the log's label
        reqs = front.submit(body, ids, max_tokens, mt_name, "messages", cid)
        choices = [Choice(i, r, gw.tokenizer, stops) for i, r in enumerate(reqs)]
        created = int(time.time())
        tokens = bool(body.return_token_ids)

        if not body.stream:
            await front.collect(request, choices, fields)
            out_choices = []
            for c in choices:
                ch = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": None, "finish_reason": c.finish}
                if tokens:
                    ch["token_ids"] = c.ids
                out_choices.append(ch)
            out = {"id": cid, "object": "chat.completion", "created": created, "model": front.model,
                   "choices": out_choices, "usage": _usage(len(ids), choices), "system_fingerprint": None}
            if tokens:
                out["prompt_token_ids"] = ids
            return out

        usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(c: Choice, delta: dict, finish=None) -> str:
            ch = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if tokens:
                ch["token_ids"] = c.take_pending()
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": front.model,
                   "system_fingerprint": None, "choices": [ch]}
            if usage:
                out["usage"] = None
            return sse(out)

        first = [chunk(c, {"role": "assistant", "content": ""}) for c in choices]
        tail = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": front.model,
                "system_fingerprint": None, "choices": []}
        return SSEResponse(_sse_stream(front, choices, fields, cid, tokens, first,
                                       lambda c, delta: chunk(c, {"content": delta} if delta else {}, c.finish),
                                       tail if usage else None, len(ids)),
                           lambda: front.cancel_all(choices))

    return app


async def _sse_stream(front, choices, fields, cid: str, tokens: bool, first: list, delta_chunk, usage_tail,
                      prompt_tokens: int):
    """The server-sent events of a streamed completion or chat completion: ``first`` (echo,
    or the assistant role), a ``delta_chunk(choice, text)`` whenever a choice has new text, ends
    or (``tokens``) has new token ids, ``usage_tail`` with the usage when asked, then ``[DONE]``;
    an error after the first byte is an error event before ``[DONE]``."""
    try:
        for s in first:
            yield s
        async with aclosing(front.events(choices)) as evs:
            async for c, ev in evs:
                if c is None:
                    continue
                delta = front.apply(c, ev, fields)
                if delta or c.done or (tokens and c.pending):
                    yield delta_chunk(c, delta)
        if usage_tail is not None:
            yield sse(dict(usage_tail, usage=_usage(prompt_tokens, choices)))
    except APIError as e:
        yield sse(e.body())
    except Exception as e:
        log.exception("HTTP stream %s failed", cid)
        yield sse(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
    yield "data: [DONE]\n\n"


# ---- the server ---------------------------------------------------------------------------

class HttpServer:
    """uvicorn serving the app in a daemon thread; ``stop()`` ends it (open responses get
    ``SHUTDOWN_GRACE_S``, then are cut)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int):
        self.server, self.thread, self.host, self.port = server, thread, host, port

    @property
    def front(self) -> Front:
        return self.server.config.app.state.front

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = SHUTDOWN_GRACE_S + 5) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=2)


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_http(gw: Gateway, listen: str, served_model_name: str, chat_template: str | None = None,
               max_queue: int | None = None, start_timeout: float = 30.0) -> HttpServer:
    """Serve the OpenAI-compatible API of ``gw`` on ``listen`` (HOST:PORT; port 0: a free one,
    read back as ``.port``). ``chat_template``: the Jinja text (not a path) for checkpoints whose
    tokenizer has none; ``max_queue``: requests that may wait past the plan's concurrency
    (default: the gRPC server's allowance, limits.waiting_allowance). Raises OSError when it
    cannot listen there."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    sock = _bind(host, int(port))
    try:
        gw.served_model_name = served_model_name     # the model's name in metrics and access lines too
        app = make_app(gw, served_model_name, chat_template, max_queue)
        config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, ws="none")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="http-front")
        thread.start()
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise OSError(f"the HTTP server on {listen} did not start")
            time.sleep(0.01)
    except BaseException:
        sock.close()
        raise
    return HttpServer(server, thread, host, sock.getsockname()[1])


def default_model_name(checkpoint: str) -> str:
    """The name a checkpoint is served as without ``--served-model-name``: its folder's name."""
    return Path(checkpoint).resolve().name or str(checkpoint)
