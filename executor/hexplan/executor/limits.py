"""The client-facing server's limits, sized from the model and the plan.

Message size. A request carries at most a prompt of the model's context: as token ids (int32
varints, 10 bytes each at worst) or as text (``CHARS_PER_TOKEN`` bytes a token of context), plus
sampling parameters and a margin. gRPC refuses a bigger message itself, with RESOURCE_EXHAUSTED,
before it is parsed into Python objects; the servicer then checks the count of ids and of
characters (INVALID_ARGUMENT) before it copies or tokenizes anything.

Concurrency. gRPC Python's sync server runs every RPC, health checks included, on one thread
pool, and a streaming RPC holds its thread until it ends. The pool is sized from the plan: its
total concurrency C (sequences holding KV, over all pipelines), plus requests waiting for a slot
(``waiting_allowance``: 4 C, at least 64, at most 1024), plus ``RESERVED_THREADS`` that requests
never take. ``RequestCap`` refuses a generation or prefill past C + waiting with
RESOURCE_EXHAUSTED (instead of letting it wait for a thread while health checks queue behind
it), so health, reflection and Status always find a free thread.
"""
from __future__ import annotations

import threading

import grpc

from ._proto import hexplan_v1_pb2 as pb

ID_BYTES = 10            # a varint int32 at worst (negative values take 10 bytes)
CHARS_PER_TOKEN = 32     # a text prompt's characters per token of context, at most
MESSAGE_MARGIN = 64 * 1024
QUEUE_FACTOR, QUEUE_MIN, QUEUE_MAX = 4, 64, 1024   # requests past the plan's concurrency that may wait
RESERVED_THREADS = 16    # threads requests never take: health checks, reflection, Status


def prompt_char_limit(context: int) -> int:
    """Characters a text prompt may have: CHARS_PER_TOKEN per token of the model's context."""
    return context * CHARS_PER_TOKEN


def request_message_limit(context: int) -> int:
    """Bytes a client's request may have: a context of token ids, plus a text prompt's
    allowance, plus a margin. (A text prompt of multi-byte characters may hit this limit,
    RESOURCE_EXHAUSTED, before the character check.)"""
    return context * ID_BYTES + prompt_char_limit(context) + MESSAGE_MARGIN


NODE_MESSAGE_LIMIT = 4 * 1024 * 1024     # a node executor's requests: LoadShard and friends, small


def step_tokens(gw, configs=None) -> int:
    """Tokens one Forward of the gateway may carry at most: a full batch of decode tokens plus
    the largest prompt budget of a step, or a whole prompt of the context, whichever is more
    (``configs``: the pipelines' schedule; default the gateway's, and at least what its stages
    were first loaded with, ``gw.load_step_tokens``, so a reloaded stage gets the same limit)."""
    if configs is not None:
        return max(c.batch + max(c.whole, c.chunk, gw.context_limit) for c in configs)
    return max(getattr(gw, "load_step_tokens", 0), step_tokens(gw, gw.scheduler.configs))


def worker_message_limit(max_step_tokens: int, hidden_size: int) -> int | None:
    """Bytes a stage worker's request may have: a step of activations (``max_step_tokens`` rows of
    ``hidden_size`` float32 values, or int64 token ids) with 25% and 1 MiB to spare. None when
    the step's size is unknown (the wire's default)."""
    if max_step_tokens <= 0:
        return None
    return int(max_step_tokens * max(hidden_size * 4, 8) * 1.25) + (1 << 20)


def total_concurrency(gw) -> int:
    """Generative sequences the plan holds at once, over all pipelines."""
    return sum(int(c.concurrency) for c in gw.scheduler.configs)


def waiting_allowance(concurrency: int) -> int:
    """Requests that may wait for a slot past the plan's concurrency (queued in the scheduler,
    each holding a server thread): 4 x concurrency, at least 64, at most 1024."""
    return min(QUEUE_MAX, max(QUEUE_MIN, QUEUE_FACTOR * concurrency))


def request_cap(concurrency: int) -> int:
    """Generate/GenerateUnary/Prefill calls open at once, at most."""
    return concurrency + waiting_allowance(concurrency)


def gateway_server_args(gw) -> dict:
    """``wire.make_server`` arguments for the gateway's client-facing server (module docstring)."""
    conc = total_concurrency(gw)
    cap = request_cap(conc)
    workers = cap + RESERVED_THREADS
    service = pb.DESCRIPTOR.services_by_name["Inference"].full_name
    capped = [f"/{service}/{m}" for m in ("Generate", "GenerateUnary", "Prefill")]
    reason = f" (the plan's concurrency {conc} + {cap - conc} waiting)"
    return {"workers": workers, "interceptors": [RequestCap(cap, capped, reason)],
            "max_receive": request_message_limit(gw.context_limit), "max_concurrent_rpcs": 2 * workers}


class RequestCap(grpc.ServerInterceptor):
    """At most ``limit`` requests of ``methods`` open at once; one more gets RESOURCE_EXHAUSTED.
    A slot is given back when its RPC ends (done, failed or cancelled)."""

    def __init__(self, limit: int, methods, reason: str = ""):
        self.limit, self.methods, self.reason = int(limit), frozenset(methods), reason
        self.active = 0
        self.lock = threading.Lock()

    def _enter(self, context) -> None:
        with self.lock:
            full = self.active >= self.limit
            if not full:
                self.active += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many requests open: {self.limit} at most{self.reason}; retry later")
        given_back = []

        def leave():
            with self.lock:
                if not given_back:
                    given_back.append(True)
                    self.active -= 1
        if not context.add_callback(leave):
            leave()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods:
            return handler

        def wrap(behavior):
            def call(request, context):
                self._enter(context)
                return behavior(request, context)
            return call
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        return handler
