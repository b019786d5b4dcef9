"""Tensor-parallel context for one pipeline stage: its rank, size and process group.

A stage of a plan is a TP group of processes inside one node. Each process builds a
``TPContext`` once (``init_tp``) and hands it to the model; helpers never read ranks from
the environment. The context offers the two collectives the model needs (in-place sum,
gather along the last dim) and ``broadcast_message``, which the stage leader (rank 0) uses to
tell its followers what to run next.

``broadcast_message`` carries data that arrived from the network, so it moves only JSON and
raw tensor bytes, never pickles: a follower decodes a header it can validate (dtype names
from a fixed table, shapes that must add up to the bytes received).
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .wire import is_loopback

# dtype names that may travel in a message header (never eval'd or getattr'd from input)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}


class SlowLink:
    """A slower TP interconnect than the real one, for benchmarks (``HEXPLAN_TP_LINK_DELAY``).

    Each all-reduce holds this rank's link for the bytes a ring all-reduce sends,
    2 (p-1)/p * nbytes, at ``bandwidth`` (one transfer at a time, in issue order), then waits
    ``latency``; its handle's ``wait`` returns no earlier than that. The real collective runs
    too, so the result is exact; only the time is stretched. Work done between issuing an
    asynchronous all-reduce and waiting for it hides the delay, as it would hide a real link's.
    """

    def __init__(self, latency_s: float, bandwidth: float):
        self.latency, self.bandwidth = latency_s, bandwidth
        self._free_at = 0.0
        self._lock = threading.Lock()

    def done_at(self, nbytes: float, size: int) -> float:
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + 2 * (size - 1) / size * nbytes / self.bandwidth
            return self._free_at + self.latency

    @classmethod
    def from_env(cls, name: str = "HEXPLAN_TP_LINK_DELAY") -> "SlowLink | None":
        """The link ``LATENCY_MS,MBPS`` in the environment variable describes; None if unset."""
        link = parse_link_delay(os.environ.get(name, ""), name)
        return cls(*link) if link else None


def parse_link_delay(text: str, name: str = "HEXPLAN_LINK_DELAY"):
    """``"LATENCY_MS,MBPS"`` -> (seconds, bytes/s), or None for "" (no injected delay)."""
    if not text:
        return None
    try:
        lat, mbps = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{name}: expected LATENCY_MS,MBPS, got {text!r}") from None
    if lat < 0 or mbps <= 0:
        raise ValueError(f"{name}: latency must be >= 0 and bandwidth > 0, got {text!r}")
    return lat / 1e3, mbps * 1e6 / 8


class Pending:
    """An all-reduce in flight (``TPContext.all_reduce_async``); ``wait()`` returns its tensor."""

    def __init__(self, t: torch.Tensor, work=None, done_at: float = 0.0):
        self.tensor, self._work, self._done_at = t, work, done_at

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        delay = self._done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self.tensor


@dataclass(frozen=True)
class TPContext:
    """This process's place in its stage's TP group. ``group`` None means the default group;
    ``device`` is where collective staging tensors live (a CUDA device under NCCL); ``link``
    stretches all-reduces to a slower interconnect (benchmarks only, see ``SlowLink``)."""
    rank: int = 0
    size: int = 1
    group: Any = None
    device: str = "cpu"
    link: SlowLink | None = None

    def __post_init__(self):
        if not (self.size >= 1 and 0 <= self.rank < self.size):
            raise ValueError(f"TP rank {self.rank} is outside a group of size {self.size}")

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group, in place; returns ``t``."""
        return self.all_reduce_async(t).wait()

    def all_reduce_async(self, t: torch.Tensor) -> Pending:
        """Start summing ``t`` over the group, in place, and return at once; the returned
        handle's ``wait()`` gives ``t`` once the sum is done. Every rank must issue the same
        collectives in the same order (the interleaved schedule is deterministic). Gloo runs
        the collective on its own threads, NCCL on its own stream, so the caller can compute
        meanwhile."""
        if self.size == 1:
            return Pending(t)
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        done_at = self.link.done_at(t.numel() * t.element_size(), self.size) if self.link else 0.0
        return Pending(t, work, done_at)

    def all_gather_last_dim(self, t: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's ``t`` (same shape on all ranks) along the last dim, rank
        order, or with ``order`` the part of rank ``order[i]`` i-th (a shifted stage's vocab
        shards: ``shift.ShiftLayout.vocab_order``)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts if order is None else [parts[r] for r in order], dim=-1)

    def all_gather_first_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (same shape on all ranks) along the first dim, rank order."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """``t``: [size, ...]; row i goes to rank i. Returns [size, ...] whose row i came from
        rank i (torch.distributed's all_to_all_single: gloo on the CPU, NCCL on CUDA)."""
        if self.size == 1:
            return t
        if t.shape[0] != self.size:
            raise ValueError(f"all_to_all takes [{self.size}, ...], got {list(t.shape)}")
        t = t.contiguous()
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.group)
        return out


def init_tp(rank: int, size: int, master_addr: str, master_port: int,
            backend: str = "gloo", timeout_s: float = 60) -> TPContext:
    """Join (or, as rank 0, host) this stage's TP group over TCP; size 1 needs no group.

    One TP group per process: it becomes this process's default torch.distributed group.
    Under NCCL the caller picks the CUDA device (``torch.cuda.set_device``) first.

    Nothing listens on a wildcard address: rank 0 hosts the rendezvous store (a TCPStore) on a
    socket it binds to ``master_addr:master_port`` itself (a TCPStore left to itself listens on
    every interface), and gloo's connections bind ``master_addr`` too (a gloo device made for
    that host, not the one the machine's hostname resolves to). NCCL picks its bootstrap
    interface itself; on a loopback ``master_addr`` it is told ``lo`` (NCCL_SOCKET_IFNAME, unless
    already set).
    """
    if size == 1:
        return TPContext(rank, 1)
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; "
                           "run one TP rank per process")
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        fd = _listen_fd(master_addr, master_port)
        try:
            store = dist.TCPStore(master_addr, master_port, size, True, timeout=timeout, wait_for_workers=False,
                                  master_listen_fd=fd)
        except BaseException:
            os.close(fd)
            raise
    else:
        store = dist.TCPStore(master_addr, master_port, size, False, timeout=timeout)
    if backend == "gloo":
        backend = _gloo_bound_to(master_addr)
    elif backend == "nccl" and is_loopback(master_addr):
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    return TPContext(rank, size, dist.group.WORLD, device, SlowLink.from_env())


def _listen_fd(host: str, port: int) -> int:
    """A listening TCP socket on ``host:port`` (not every interface); its fd, owned by the caller."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(128)
    except BaseException:
        s.close()
        raise
    return s.detach()


_GLOO_HOST: list = []     # the host this process's gloo device binds (one TP group per process)


def _gloo_bound_to(host: str) -> str:
    """Register (once per process) a gloo backend whose device binds ``host``; its name."""
    name = "hexplan_gloo"
    if not _GLOO_HOST:
        def create(store, rank, size, timeout):
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_GLOO_HOST[0])]
            return dist.ProcessGroupGloo(store, rank, size, opts)
        dist.Backend.register_backend(name, create, devices=["cpu"])
        _GLOO_HOST.append(host)
    _GLOO_HOST[0] = host
    return name


def destroy_tp(ctx: TPContext) -> None:
    """Leave the group ``init_tp`` joined (no-op for size 1)."""
    if ctx.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_message(ctx: TPContext, obj: dict | None, tensors: list[torch.Tensor] | None
                      ) -> tuple[dict, list[torch.Tensor]]:
    """Rank 0 sends a JSON-serialisable dict and a list of tensors to the other ranks.

    Rank 0 passes them (and gets the same objects back); followers pass None and receive
    copies on ``ctx.device``. Two broadcasts: ``[header_len, body_len]`` (int64), then one
    uint8 buffer = JSON header ``{"obj": ..., "tensors": [{"dtype", "shape"}, ...]}`` followed
    by the tensors' raw bytes. If rank 0 cannot encode its message, the followers get a
    ValueError too instead of waiting for the timeout.
    """
    if ctx.rank == 0:
        tensors = list(tensors or [])
        if ctx.size == 1:
            return obj, tensors
        try:
            header, body = _encode(obj, tensors)
        except (TypeError, ValueError):
            dist.broadcast(torch.tensor([-1, 0], device=ctx.device), src=0, group=ctx.group)
            raise
        lengths = torch.tensor([header.numel(), body.numel()], dtype=torch.int64, device=ctx.device)
        dist.broadcast(lengths, src=0, group=ctx.group)
        dist.broadcast(torch.cat([header, body]).to(ctx.device), src=0, group=ctx.group)
        return obj, tensors

    if obj is not None or tensors is not None:
        raise ValueError("followers (rank > 0) call broadcast_message with obj=None, tensors=None")
    lengths = torch.empty(2, dtype=torch.int64, device=ctx.device)
    dist.broadcast(lengths, src=0, group=ctx.group)
    header_len, body_len = lengths.tolist()
    if header_len < 0:
        raise ValueError("TP rank 0 failed to encode its message")
    buf = torch.empty(header_len + body_len, dtype=torch.uint8, device=ctx.device)
    dist.broadcast(buf, src=0, group=ctx.group)
    return _decode(buf[:header_len], buf[header_len:])


def _encode(obj: dict | None, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, body) as uint8 CPU tensors."""
    if not isinstance(obj, dict):
        raise TypeError(f"broadcast_message sends a dict, got {type(obj).__name__}")
    metas, chunks = [], []
    for i, t in enumerate(tensors):
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"tensor {i}: dtype {name} cannot be broadcast; use one of {', '.join(_DTYPES)}")
        metas.append({"dtype": name, "shape": list(t.shape)})
        chunks.append(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
    text = json.dumps({"obj": obj, "tensors": metas}, allow_nan=False).encode("utf-8")
    header = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    body = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return header, body


def _decode(header: torch.Tensor, body: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    """Inverse of ``_encode``; checks the header against the bytes received."""
    try:
        msg = json.loads(bytes(header.cpu().tolist()).decode("utf-8"))
        obj, metas = msg["obj"], msg["tensors"]
        specs = [(_DTYPES[m["dtype"]], [int(n) for n in m["shape"]]) for m in metas]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed broadcast header: {e}") from None
    tensors, offset = [], 0
    for dtype, shape in specs:
        if any(n < 0 for n in shape):
            raise ValueError(f"malformed broadcast header: negative shape {shape}")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if offset + nbytes > body.numel():
            raise ValueError("malformed broadcast: tensors exceed the bytes received")
        # clone: a dtype view needs its own, aligned storage
        tensors.append(body[offset:offset + nbytes].clone().view(dtype).reshape(shape))
        offset += nbytes
    if offset != body.numel():
        raise ValueError("malformed broadcast: unused bytes after the tensors")
    return obj, tensors
