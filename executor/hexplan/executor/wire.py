"""What crosses the wire: tensors as raw bytes, gRPC servers and channels (TLS optional).

Tensors travel as ``Tensor{dtype, shape, data}`` with little-endian C-order bytes; decoding
checks that the byte count matches the shape. No pickle anywhere.

Internal calls (the ``Stage`` service of node executors and stage workers) are authenticated
by a shared token (``authorization: Bearer <token>`` metadata, checked by ``TokenAuth``) and/or
mutual TLS (``bind(..., require_client_auth=True)`` with a CA); health and reflection stay open.
"""
from __future__ import annotations

import hmac
import ipaddress
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import hexplan_v1_pb2 as pb

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_MESSAGE = 512 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


def to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    name = _NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    return pb.Tensor(dtype=name, shape=list(t.shape), data=raw.numpy().tobytes())


def from_proto(msg: pb.Tensor) -> torch.Tensor:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {msg.dtype!r}")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative tensor dimension in {shape}")
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    count = int(np.prod(shape)) if shape else 1
    if len(msg.data) != count * np.dtype(np_dtype).itemsize:
        raise ValueError(f"tensor of shape {shape} and dtype {msg.dtype} needs {count * np.dtype(np_dtype).itemsize} "
                         f"bytes, got {len(msg.data)}")
    arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape).copy()
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@dataclass(frozen=True)
class Tls:
    """Certificate files: ``cert``/``key`` for servers, ``ca`` to verify peers."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    @property
    def verifies_clients(self) -> bool:
        """A server of ours with these files requires client certificates signed by ``ca``
        (mutual TLS; node executors and stage workers, never the client-facing gateway)."""
        return bool(self.cert and self.key and self.ca)

    def server_credentials(self, require_client_auth: bool = False):
        pair = [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())]
        if require_client_auth:
            if not self.ca:
                raise ValueError("mutual TLS needs a CA (--tls-ca) to verify client certificates")
            return grpc.ssl_server_credentials(pair, root_certificates=Path(self.ca).read_bytes(),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    def channel_credentials(self):
        """Verify the server with ``ca`` (else ``cert``); present ``cert``/``key`` as the client
        certificate when both are given (the gateway and stage workers calling stages)."""
        if self.cert and self.key:
            return grpc.ssl_channel_credentials(root_certificates=Path(self.ca or self.cert).read_bytes(),
                                                private_key=Path(self.key).read_bytes(),
                                                certificate_chain=Path(self.cert).read_bytes())
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca or self.cert).read_bytes())


def make_server(workers: int = 16, interceptors=(), *, max_receive: int | None = None,
                max_concurrent_rpcs: int | None = None) -> grpc.Server:
    """A sync gRPC server on a pool of ``workers`` threads. ``max_receive``: the largest request
    in bytes (default MAX_MESSAGE); gRPC refuses a bigger one with RESOURCE_EXHAUSTED before it
    is parsed. ``max_concurrent_rpcs``: RPCs past it are refused the same way (None: no cap)."""
    options = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", int(max_receive or MAX_MESSAGE)))
    return grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=list(interceptors) or None,
                       options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)


def bind(server: grpc.Server, address: str, tls: Tls | None, require_client_auth: bool = False) -> int:
    """Bind ``host:port`` (port 0 picks a free one); returns the port. ``require_client_auth``:
    mutual TLS (clients must present a certificate signed by ``tls.ca``)."""
    if tls and tls.enabled:
        port = server.add_secure_port(address, tls.server_credentials(require_client_auth))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def add_health_and_reflection(server: grpc.Server, service_names) -> health.HealthServicer:
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    for name in list(service_names) + [""]:
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(list(service_names) + [reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return hs


def channel(address: str, tls: Tls | None, token: str | None = None) -> grpc.Channel:
    """A channel to ``address``; with ``token`` every call carries ``authorization: Bearer
    <token>`` (internal calls to node executors and stage workers)."""
    if tls and tls.enabled:
        ch = grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    else:
        ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(ch, BearerToken(token)) if token else ch


# ---- authentication of internal calls ----------------------------------------------------------

AUTH_METADATA = "authorization"
TOKEN_ENV = "HEXPLAN_AUTH_TOKEN"          # how `hexplan launch` hands its token to its node executors
STAGE_SERVICE = "/" + pb.DESCRIPTOR.services_by_name["Stage"].full_name + "/"


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Client side: add ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str):
        self._pair = (AUTH_METADATA, f"Bearer {token}")

    def _details(self, d):
        md = [m for m in (d.metadata or ()) if m[0] != AUTH_METADATA] + [self._pair]
        return _CallDetails(d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: object
    wait_for_ready: bool | None
    compression: object


class TokenAuth(grpc.ServerInterceptor):
    """Server side: every call of the ``Stage`` service must carry ``authorization: Bearer
    <token>`` (compared in constant time); anything else is UNAUTHENTICATED before the servicer
    runs. Health checks and reflection stay open (load balancers, grpcurl)."""

    def __init__(self, token: str, protected: str = STAGE_SERVICE):
        if not token:
            raise ValueError("empty auth token")
        self._want = f"Bearer {token}".encode()
        self._protected = protected

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._protected):
            return handler
        got = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == AUTH_METADATA]
        if len(got) == 1 and isinstance(got[0], str) and hmac.compare_digest(got[0].encode(), self._want):
            return handler
        return _deny(handler, "missing or wrong auth token (authorization: Bearer <token>)" if got
                     else "missing auth token (authorization: Bearer <token> metadata)")


def _deny(handler, message: str):
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def abort_stream(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


def server_interceptors(token: str | None) -> list:
    """The interceptors of an internal server (node executor, stage worker)."""
    return [TokenAuth(token)] if token else []


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
