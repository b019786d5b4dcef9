"""``hexplan launch``: every node executor of a plan plus the gateway, on this host.

For laptops, CI and tests. Each node executor is a separate process (``hexplan node``) on a
free loopback port; the gateway runs in this process. One line is printed when everything is
ready; SIGINT or SIGTERM stops the gateway and every process started here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from hexplan.plan import Plan

from .gateway import Gateway
from .servicer import serve_gateway
from .wire import Tls

READY_TIMEOUT_S = 120


def start_node(name: str, host: str, threads: int | None, tls: Tls | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hexplan.cli", "node", "--listen", f"{host}:0", "--name", name]
    if threads:
        cmd += ["--threads", str(threads)]
    if tls and tls.enabled:
        cmd += ["--tls-cert", tls.cert, "--tls-key", tls.key] + (["--tls-ca", tls.ca] if tls.ca else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("hexplan node"):
            address = line.strip().rsplit(" ", 1)[-1]
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, address
    proc.kill()
    raise RuntimeError(f"node {name} did not start (exit code {proc.poll()})")


def _drain(stream) -> None:
    for _ in stream:
        pass


class Launch:
    """Processes and the gateway started for one plan; ``close()`` stops all of them."""

    def __init__(self, plan: Plan, checkpoint: str, listen: str = "127.0.0.1:0", tls: Tls | None = None,
                 dtype: str = "float32", threads: int | None = None, max_batch: int | None = None,
                 prefill_chunk: int | None = None, policy: str = "fcfs", mlfq_quantum_s: float | None = None,
                 interleave: int | None = None, matmul_pieces: int = 1):
        self.nodes: dict = {}
        self.server = None
        self.gateway = None
        names = []
        for p in plan.pipelines:
            for s in p.stages:
                if s.node not in names:
                    names.append(s.node)
        if threads is None:
            workers = sum(s.tp for p in plan.pipelines for s in p.stages)
            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        host = listen.rpartition(":")[0] or "127.0.0.1"
        try:
            for n in names:
                self.nodes[n] = start_node(n, host, threads, tls)
            self.gateway = Gateway(plan, checkpoint, {n: a for n, (_, a) in self.nodes.items()}, tls, dtype,
                                   max_batch=max_batch, prefill_chunk=prefill_chunk, policy=policy,
                                   mlfq_quantum_s=mlfq_quantum_s, interleave=interleave,
                                   matmul_pieces=matmul_pieces)
            self.gateway.start()
            self.server, self.port = serve_gateway(self.gateway, listen, tls)
            self.address = f"{host}:{self.port}"
        except BaseException:
            self.close()
            raise

    def node_process(self, name: str) -> subprocess.Popen:
        return self.nodes[name][0]

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(grace=1).wait()
        if self.gateway is not None:
            self.gateway.stop()
        for proc, _ in self.nodes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.nodes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_launch(plan: Plan, checkpoint: str, listen: str, tls: Tls | None, dtype: str, threads: int | None,
               out=sys.stdout, policy: str = "fcfs", mlfq_quantum_s: float | None = None, interleave: int | None = None,
               matmul_pieces: int = 1) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    launch = Launch(plan, checkpoint, listen, tls, dtype, threads, policy=policy, mlfq_quantum_s=mlfq_quantum_s,
                    interleave=interleave, matmul_pieces=matmul_pieces)
    try:
        print(f"hexplan: ready: serving {plan.model.name} on {launch.address} "
              f"({len(plan.pipelines)} pipeline(s), {len(launch.nodes)} node executor(s))", file=out, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        launch.close()
    print("hexplan: stopped", file=out, flush=True)
    return 0
