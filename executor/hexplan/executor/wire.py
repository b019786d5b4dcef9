"""What crosses the wire: tensors as raw bytes, gRPC servers and channels (TLS optional).

Tensors travel as ``Tensor{dtype, shape, data}`` with little-endian C-order bytes; decoding
checks that the byte count matches the shape. No pickle anywhere.
"""
from __future__ import annotations

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

    def server_credentials(self):
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())])

    def channel_credentials(self):
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca or self.cert).read_bytes())


def make_server(workers: int = 16) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)


def bind(server: grpc.Server, address: str, tls: Tls | None) -> int:
    """Bind ``host:port`` (port 0 picks a free one); returns the port."""
    if tls and tls.enabled:
        port = server.add_secure_port(address, tls.server_credentials())
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


def channel(address: str, tls: Tls | None) -> grpc.Channel:
    if tls and tls.enabled:
        return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
