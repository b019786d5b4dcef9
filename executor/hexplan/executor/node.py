"""``hexplan node``: the executor of one machine.

It serves the ``Stage`` service's control calls: ``LoadShard`` starts the worker processes of
one stage (one per GPU of its TP group, or one per plan GPU on a machine without GPUs), waits
until they have loaded their shard and returns the address of the stage's rank-0 worker;
``UnloadShard`` stops them; ``Stats`` says which stages run here. Forward and Release go to
the workers directly.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import threading

import grpc

from ._proto import hexplan_v1_pb2 as pb
from ._proto import hexplan_v1_pb2_grpc as pbg
from .lifecycle import StopSignals, exit_later, set_parent_death_signal, watch_parent
from .limits import NODE_MESSAGE_LIMIT
from .wire import Tls, add_health_and_reflection, bind, is_loopback, make_server, server_interceptors, split_host_port
from .shift import DEFAULT_SHIFT_THRESHOLD
from .worker import DTYPES, worker_main

LOAD_TIMEOUT_S = 600
# LoadShardRequest.calibrate_*: timed decode steps at load (profile.calibrate_decode)
MAX_CALIBRATION_POINTS, MAX_CALIBRATION_BATCH, MAX_CALIBRATION_CONTEXT = 16, 4096, 1 << 17
MAX_CPU_TP = 64          # a node without GPUs runs at most max(8, cores) ranks per stage, never more than this


# ---- who may call a node, what LoadShard may do ---------------------------------------------
# With an auth token every Stage call must carry it (wire.TokenAuth); with --tls-ca (and a
# certificate of its own) callers must present a client certificate signed by that CA. LoadShard
# reads only checkpoints under the node's checkpoint roots (symlinks resolved) and refuses TP
# degrees, GPU indices and dtypes the node cannot hold.

def exposure_problem(host: str, auth_token: str | None, tls: Tls | None) -> str | None:
    """Why a node must not listen on ``host`` (None: it may). Without a token and without
    client certificates (mutual TLS) anyone who reaches the port can load checkpoints and run
    stages on this machine, so such a node listens on loopback only."""
    if auth_token or (tls and tls.verifies_clients) or is_loopback(host):
        return None
    return (f"refusing to listen on {host}: this node has neither an auth token (--auth-token-file) nor client "
            "certificate verification (--tls-cert/--tls-key with --tls-ca); listen on 127.0.0.1 or give one of them")


def unauthenticated_warning(name: str, auth_token: str | None, tls: Tls | None) -> str | None:
    """The one-line warning of a node that checks no caller (None when it checks them)."""
    if auth_token or (tls and tls.verifies_clients):
        return None
    return (f"hexplan: warning: node {name} authenticates no caller (no --auth-token-file, no --tls-ca): "
            "any local process can load checkpoints and run stages on it; listening on loopback only")


def cpu_tp_limit() -> int:
    return min(MAX_CPU_TP, max(8, os.cpu_count() or 1))


def check_devices(tp: int, gpus: list[int]) -> str | None:
    """Why this node cannot hold a stage of ``tp`` ranks on ``gpus`` (None: it can); the
    message starts with the field at fault."""
    import torch

    if tp < 1:
        return f"tp: must be at least 1, got {tp}"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if tp > count:
            return f"tp: {tp} ranks, but this node has {count} visible GPU(s)"
        if gpus:
            if len(gpus) < tp:
                return f"gpus: {len(gpus)} GPU index(es) {gpus} for tp {tp}"
            bad = [g for g in gpus if not 0 <= g < count]
            if bad:
                return f"gpus: no GPU {bad} on this node (it has {count}: 0..{count - 1})"
            if len(set(gpus[:tp])) < tp:
                return f"gpus: the {tp} ranks need distinct GPUs, got {gpus[:tp]}"
        return None
    limit = cpu_tp_limit()
    if tp > limit:
        return f"tp: {tp} ranks, but this node (no GPU) runs at most {limit} per stage"
    return None


def confine(checkpoint: str, roots: list[str]) -> str | None:
    """The checkpoint's real path (symlinks resolved) when it lies under one of ``roots``
    (real paths themselves), else None."""
    if not checkpoint or "\x00" in checkpoint:
        return None
    real = os.path.realpath(checkpoint)
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    return None


def free_port(host: str = "127.0.0.1") -> int:
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.bind(addr)
        return s.getsockname()[1]


class NodeServicer(pbg.StageServicer):
    def __init__(self, name: str, host: str, tls: Tls | None, threads: int | None = None,
                 auth_token: str | None = None, checkpoint_roots=()):
        self.name, self.host, self.tls, self.threads = name, host, tls, threads
        self.auth_token = auth_token or None                                  # handed to the workers
        self.checkpoint_roots = [os.path.realpath(r) for r in checkpoint_roots]
        self.stages: dict = {}   # stage_id -> (processes, address)
        self.lock = threading.Lock()
        self.mp = mp.get_context("spawn")

    def LoadShard(self, request, context):
        # Confinement first, before anything touches the path: a refused path tells nothing
        # about whether it exists.
        if not self.checkpoint_roots:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"node {self.name}: no --checkpoint-root given: this node loads no checkpoint")
        checkpoint = confine(request.checkpoint, self.checkpoint_roots)
        if checkpoint is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"node {self.name}: checkpoint {request.checkpoint!r} is not under a --checkpoint-root "
                          f"of this node ({', '.join(self.checkpoint_roots)})")
        tp = request.tp or 1
        problem = check_devices(tp, list(request.gpus))
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{problem} (node {self.name})")
        if request.dtype and request.dtype not in DTYPES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"dtype: must be one of {', '.join(sorted(DTYPES))}, got {request.dtype!r} (node {self.name})")
        shift_sp = request.shift_sp or 1
        threshold = request.shift_threshold if request.HasField("shift_threshold") else DEFAULT_SHIFT_THRESHOLD
        if shift_sp < 1 or tp % shift_sp:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"shift_sp: must be at least 1 and divide tp {tp}, got {request.shift_sp} (node {self.name})")
        if threshold < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"shift_threshold: must be >= 0 tokens, got {threshold} (node {self.name})")
        if (len(request.calibrate_batches) > MAX_CALIBRATION_POINTS
                or any(not 1 <= b <= MAX_CALIBRATION_BATCH for b in request.calibrate_batches)
                or not 0 <= request.calibrate_context <= MAX_CALIBRATION_CONTEXT):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"calibrate_batches, calibrate_context: at most {MAX_CALIBRATION_POINTS} batch sizes of 1 to "
                          f"{MAX_CALIBRATION_BATCH}, a context of 0 to {MAX_CALIBRATION_CONTEXT} tokens (node {self.name})")
        spec = {"stage_id": request.stage_id, "checkpoint": checkpoint,
                "layer_start": request.layer_start, "layer_end": request.layer_end,
                "is_first": request.is_first, "is_last": request.is_last, "tp": tp,
                "gpus": list(request.gpus), "dtype": request.dtype or "float32", "host": self.host,
                "threads": self.threads, "auth_token": self.auth_token,
                "downstream": list(request.downstream),   # fixed for the stage's life
                "max_step_tokens": int(request.max_step_tokens),
                "shift_sp": int(shift_sp), "shift_threshold": int(threshold),
                "calibrate": {"batches": [int(b) for b in request.calibrate_batches],
                              "context": max(1, int(request.calibrate_context))}}
        if not os.path.isdir(checkpoint):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: checkpoint {request.checkpoint!r} is not a directory here")
        if not 0 <= request.layer_start < request.layer_end:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: bad layer range [{request.layer_start}, {request.layer_end})")
        self._unload(request.stage_id)
        ready = self.mp.Queue()
        port = free_port(self.host)     # the TP rendezvous: rank 0 binds it on this node's host only
        tls = {"cert": self.tls.cert, "key": self.tls.key, "ca": self.tls.ca} if self.tls and self.tls.enabled else None
        procs = []
        for rank in range(spec["tp"]):
            p = self.mp.Process(target=worker_main, args=(spec, rank, port, ready, tls, os.getpid()),
                                name=f"hexplan-{request.stage_id}-r{rank}", daemon=True)
            p.start()
            procs.append(p)
        address, errors, decode_ms = None, [], {}
        for _ in range(spec["tp"]):
            try:
                msg = ready.get(timeout=LOAD_TIMEOUT_S)
            except queue.Empty:
                errors.append(f"timed out after {LOAD_TIMEOUT_S}s")
                break
            if not msg["ok"]:
                errors.append(f"rank {msg['rank']}: {msg['error']}")
                break
            if msg["rank"] == 0:
                address = f"{self.host}:{msg['port']}"
                decode_ms = msg.get("decode_ms") or {}
        if errors or address is None:
            for p in procs:
                p.kill()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name}: stage {request.stage_id} failed to load: {'; '.join(errors) or 'no address'}")
        with self.lock:
            self.stages[request.stage_id] = (procs, address)
        return pb.LoadShardResponse(address=address, decode=[pb.DecodeTiming(batch=b, ms=ms)
                                                             for b, ms in sorted(decode_ms.items())])

    def _unload(self, stage_id: str) -> None:
        with self.lock:
            entry = self.stages.pop(stage_id, None)
        if entry:
            for p in entry[0]:
                p.terminate()
            for p in entry[0]:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()

    def UnloadShard(self, request, context):
        self._unload(request.stage_id)
        return pb.UnloadShardResponse()

    def Stats(self, request, context):
        with self.lock:
            return pb.StatsResponse(name=self.name, stages=sorted(self.stages))

    def Forward(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "send Forward to the stage worker address LoadShard returned")

    def Release(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "send Release to the stage worker address LoadShard returned")

    def shutdown(self) -> None:
        for sid in list(self.stages):
            self._unload(sid)


def serve_node(listen: str, name: str, tls: Tls | None = None, threads: int | None = None, on_ready=None,
               parent_pid: int | None = None, parent_death_signal: bool = False,
               auth_token: str | None = None, checkpoint_roots=()) -> None:
    """Run a node executor until SIGINT/SIGTERM. ``on_ready(port)`` is called once it listens.
    ``parent_pid`` (``hexplan launch``): also stop when that process, our parent, is gone, and
    with ``parent_death_signal`` ask the kernel for SIGTERM when it dies (lifecycle.py). Every
    way out stops this node's stage workers (which also watch this process)."""
    host, _ = split_host_port(listen)
    problem = exposure_problem(host, auth_token, tls)   # auth_token: every Stage call must carry it
    if problem:
        raise ValueError(problem)
    servicer = NodeServicer(name, host, tls, threads, auth_token, checkpoint_roots)
    server = make_server(interceptors=server_interceptors(auth_token), max_receive=NODE_MESSAGE_LIMIT)
    pbg.add_StageServicer_to_server(servicer, server)
    add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Stage"].full_name])
    port = bind(server, listen, tls, require_client_auth=bool(tls and tls.verifies_clients))
    server.start()
    signals = StopSignals()     # SIGTERM/SIGINT; its handler takes no lock (lifecycle.StopSignals)
    if parent_pid:
        if parent_death_signal:
            set_parent_death_signal(signal.SIGTERM)

        def parent_gone():
            signals.count += 1
            exit_later()        # in case the shutdown below hangs
        watch_parent(parent_pid, parent_gone)
    if on_ready:
        on_ready(port)
    try:
        signals.wait()
    finally:
        servicer.shutdown()
        server.stop(grace=1).wait()
