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
from .wire import Tls, add_health_and_reflection, bind, make_server, split_host_port
from .worker import worker_main

LOAD_TIMEOUT_S = 600


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeServicer(pbg.StageServicer):
    def __init__(self, name: str, host: str, tls: Tls | None, threads: int | None = None):
        self.name, self.host, self.tls, self.threads = name, host, tls, threads
        self.stages: dict = {}   # stage_id -> (processes, address)
        self.lock = threading.Lock()
        self.mp = mp.get_context("spawn")

    def LoadShard(self, request, context):
        spec = {"stage_id": request.stage_id, "checkpoint": request.checkpoint,
                "layer_start": request.layer_start, "layer_end": request.layer_end,
                "is_first": request.is_first, "is_last": request.is_last, "tp": max(1, request.tp),
                "gpus": list(request.gpus), "dtype": request.dtype or "float32", "host": self.host,
                "threads": self.threads}
        if not os.path.isdir(request.checkpoint):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: checkpoint {request.checkpoint!r} is not a directory here")
        if not 0 <= request.layer_start < request.layer_end:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: bad layer range [{request.layer_start}, {request.layer_end})")
        self._unload(request.stage_id)
        ready = self.mp.Queue()
        port = free_port()
        tls = {"cert": self.tls.cert, "key": self.tls.key, "ca": self.tls.ca} if self.tls and self.tls.enabled else None
        procs = []
        for rank in range(spec["tp"]):
            p = self.mp.Process(target=worker_main, args=(spec, rank, port, ready, tls, os.getpid()),
                                name=f"hexplan-{request.stage_id}-r{rank}", daemon=True)
            p.start()
            procs.append(p)
        address, errors = None, []
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
        if errors or address is None:
            for p in procs:
                p.kill()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name}: stage {request.stage_id} failed to load: {'; '.join(errors) or 'no address'}")
        with self.lock:
            self.stages[request.stage_id] = (procs, address)
        return pb.LoadShardResponse(address=address)

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


def serve_node(listen: str, name: str, tls: Tls | None = None, threads: int | None = None, on_ready=None) -> None:
    """Run a node executor until SIGINT/SIGTERM. ``on_ready(port)`` is called once it listens."""
    host, _ = split_host_port(listen)
    servicer = NodeServicer(name, host, tls, threads)
    server = make_server()
    pbg.add_StageServicer_to_server(servicer, server)
    add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Stage"].full_name])
    port = bind(server, listen, tls)
    server.start()
    stop = threading.Event()

    def handle(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    if on_ready:
        on_ready(port)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        servicer.shutdown()
        server.stop(grace=1).wait()
