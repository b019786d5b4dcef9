"""The gateway's client-facing gRPC service (``Inference``): validate, convert, submit, stream.

Thin: every field is checked here (INVALID_ARGUMENT naming it), then the request goes to
``Gateway.submit`` and its events (tokens, done, result, error) are streamed back. A client
that goes away cancels its request (``Gateway.cancel``). The checks (``check_prompt``,
``check_sampling``) are shared with the OpenAI-compatible HTTP front (http.py), which names
the fields its own way."""
from __future__ import annotations

import logging
import math
import queue

import grpc

from ._proto import hexplan_v1_pb2 as pb
from ._proto import hexplan_v1_pb2_grpc as pbg
from .gateway import Gateway, Request
from .limits import CHARS_PER_TOKEN, gateway_server_args, prompt_char_limit
from .sampling import Sampling
from .wire import Tls, add_health_and_reflection, bind, make_server, to_proto


class Invalid(ValueError):
    """A bad field of a request: ``field`` (the gRPC API's name for it) and what is wrong.
    The gRPC servicer answers INVALID_ARGUMENT "field: message"; the HTTP front (http.py)
    renames the field to its own API's and answers 400."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def check_prompt(gw: Gateway, token_ids=None, prompt: str | None = None, *, add_special_tokens: bool = True
                 ) -> list[int]:
    """The prompt as token ids, checked against the model (the context, the vocabulary; a text
    prompt's characters are counted before it is tokenized). Raises ``Invalid``."""
    context_limit = gw.context_limit
    if token_ids:
        if len(token_ids) > context_limit:      # counted before anything is copied
            raise Invalid("token_ids", f"{len(token_ids)} token ids exceed the model's context of {context_limit} tokens")
        ids = list(token_ids)
    elif prompt:
        if gw.tokenizer is None:
            raise Invalid("prompt", "this checkpoint has no tokenizer; send token_ids")
        chars = prompt_char_limit(context_limit)
        if len(prompt) > chars:                 # counted before it is tokenized
            raise Invalid("prompt", f"{len(prompt)} characters exceed the limit of {chars} ({CHARS_PER_TOKEN} "
                                    f"per token of the model's context of {context_limit} tokens)")
        ids = list(gw.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if len(ids) > context_limit:
            raise Invalid("prompt", f"{len(ids)} tokens exceed the model's context of {context_limit} tokens")
    else:
        raise Invalid("prompt", "empty prompt: give prompt or token_ids")
    if not ids:
        raise Invalid("prompt", "the prompt has no tokens")
    for t in ids:
        if not 0 <= t < gw.vocab:
            raise Invalid("token_ids", f"token id {t} is outside the vocabulary [0, {gw.vocab})")
    return ids


def check_sampling(gw: Gateway, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop_token_ids=()) -> Sampling:
    """The sampling parameters of a generation of ``ids``, checked (the context, the ranges,
    the vocabulary); raises ``Invalid`` naming the gRPC field (``sampling.*``). The KV budget is
    checked by ``Gateway.submit`` (an error event)."""
    if max_new_tokens <= 0:
        raise Invalid("sampling.max_new_tokens", f"must be positive, got {max_new_tokens}")
    if len(ids) + max_new_tokens > gw.context_limit:
        raise Invalid("sampling.max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                                                 f"exceeds the model's context of {gw.context_limit} tokens")
    if not math.isfinite(temperature) or temperature < 0:
        raise Invalid("sampling.temperature", f"must be >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise Invalid("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise Invalid("sampling.top_k", f"must be >= 0, got {top_k}")
    for t in stop_token_ids:
        if not 0 <= t < gw.vocab:
            raise Invalid("sampling.stop_token_ids", f"token id {t} is outside the vocabulary [0, {gw.vocab})")
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    stop_token_ids=tuple(stop_token_ids), max_new_tokens=max_new_tokens)


access_log = logging.getLogger("hexplan.access")


def log_refused(gw: Gateway, api: str, status: str, message: str, request_id: str = "") -> None:
    """The access line of a request refused before it was accepted (a bad field, a model it
    does not serve, a full queue): ``status`` is its answer (a gRPC code's name, or ``HTTP
    400``...), ``message`` the error the client got. Accepted requests get theirs from
    ``Gateway.request_ended``; every request gets exactly one."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    model = getattr(gw, "served_model_name", "") or ""
    fields = {"request_id": request_id or None, "api": api, "model": model, "finish_reason": "refused",
              "status": status, "error": message}
    access_log.info("request %s refused api=%s model=%s status=%s error=%s", request_id or "-", api, model,
                    status.replace(" ", "_"), message, extra=fields)


class InferenceServicer(pbg.InferenceServicer):
    """Thin adapter: validate, convert, submit, stream."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def _invalid(self, request, context, api: str, message: str):
        log_refused(self.gw, api, "INVALID_ARGUMENT", message, request.request_id)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def _prompt(self, request, context, api: str) -> list[int]:
        """The request's prompt as token ids, checked (GenerateRequest and PrefillRequest)."""
        try:
            return check_prompt(self.gw, request.token_ids, request.prompt)
        except Invalid as e:
            self._invalid(request, context, api, str(e))

    def _watch(self, req: Request, context) -> Request:
        context.add_callback(lambda: self.gw.cancel(req))
        return req

    def _request(self, request, context, api: str) -> Request:
        ids = self._prompt(request, context, api)
        s = request.sampling
        try:
            sampling = check_sampling(self.gw, ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                      top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k,
                                      seed=s.seed if s.HasField("seed") else None, stop_token_ids=s.stop_token_ids)
        except Invalid as e:
            self._invalid(request, context, api, str(e))
        return self._watch(self.gw.submit(ids, sampling, request.request_id), context)

    def _events(self, req: Request, context):
        while True:
            try:
                ev = req.events.get(timeout=0.1)
            except queue.Empty:
                if not context.is_active():
                    self.gw.cancel(req)
                    return
                continue
            if ev[0] == "error":
                context.abort(ev[1], ev[2])
            yield ev
            if ev[0] in ("done", "result"):
                return

    def _text(self, ids) -> str:
        tok = self.gw.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None and ids else ""

    def Generate(self, request, context):
        req = self._request(request, context, "Generate")
        shown = ""
        label = req.label
        for ev in self._events(req, context):
            if ev[0] == "tokens":
                text = ""
                if self.gw.tokenizer is not None:
                    full = self._text(req.generated)
                    text, shown = full[len(shown):], full
                yield pb.GenerateResponse(token_ids=ev[1], text=text, request_id=label)
            else:
                yield pb.GenerateResponse(finish_reason=ev[1], request_id=label)
            label = ""              # on the first message only

    def GenerateUnary(self, request, context):
        req = self._request(request, context, "GenerateUnary")
        reason, ids = "", []
        for ev in self._events(req, context):
            if ev[0] == "tokens":
                ids += ev[1]
            else:
                reason = ev[1]
        return pb.GenerateResult(token_ids=ids, text=self._text(ids), finish_reason=reason, request_id=req.label)

    def Prefill(self, request, context):
        ids = self._prompt(request, context, "Prefill")
        if len(ids) > self.gw.context_limit:
            self._invalid(request, context, "Prefill", f"prompt: {len(ids)} tokens exceed the model's context "
                                                       f"of {self.gw.context_limit} tokens")
        req = self._watch(self.gw.submit(ids, Sampling(), request.request_id, prefill_only=True,
                                         hidden=request.hidden), context)
        for ev in self._events(req, context):
            if ev[0] == "result":
                out = pb.PrefillResult(logits=to_proto(ev[1]), prompt_tokens=len(ids), request_id=req.label)
                if ev[2] is not None:
                    out.hidden.CopyFrom(to_proto(ev[2]))
                return out
        context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")

    def Status(self, request, context):
        return self.gw.status()


def serve_gateway(gw: Gateway, listen: str, tls: Tls | None = None) -> tuple[grpc.Server, int]:
    """Start the client-facing server; returns (server, port). Its limits come from the model and
    the plan (limits.py): requests up to the context's size; a thread pool for the plan's total
    concurrency plus requests waiting for a slot plus threads that only health, reflection and
    Status use. The health servicer is kept as ``gw.health`` (NOT_SERVING while draining)."""
    server = make_server(**gateway_server_args(gw))
    pbg.add_InferenceServicer_to_server(InferenceServicer(gw), server)
    gw.health = add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Inference"].full_name])
    port = bind(server, listen, tls)
    server.start()
    return server, port
