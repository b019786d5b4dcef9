"""``hexplan launch``: every node executor of a plan plus the gateway, on this host.

For laptops, CI and tests. Each node executor is a separate process (``hexplan node``) on a
free loopback port; the gateway runs in this process. One line is printed when everything is
ready. SIGINT or SIGTERM drains (no new requests; those in flight finish, up to
``--drain-timeout``), then stops the gateway and every process started here. The node
executors, and their stage workers, also die when this process dies, SIGKILL included
(lifecycle.py).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

from hexplan import logconfig
from hexplan.plan import Plan

from .gateway import Gateway
from .lifecycle import StopSignals, child_parent_args, drain_and_stop, stop_serving
from .servicer import serve_gateway
from .wire import TOKEN_ENV, Tls, is_loopback

READY_TIMEOUT_S = 120


def start_serving(gw: Gateway, checkpoint: str, listen: str, tls: Tls | None, http: str | None = None,
                  served_model_name: str | None = None, chat_template: str | None = None,
                  max_queue: int | None = None):
    """Load the gateway's shards (``gw.start``), serve its gRPC API on ``listen`` and, with
    ``http`` (HOST:PORT), the OpenAI-compatible one: (gRPC server, its port, HTTP front or None).
    A port the HTTP front cannot take stops the gRPC server and raises RuntimeError naming --http."""
    gw.start()
    server, port = serve_gateway(gw, listen, tls)
    front = None
    if http is not None:
        from .http import default_model_name, serve_http
        try:
            front = serve_http(gw, http, served_model_name or default_model_name(checkpoint),
                               chat_template=chat_template, max_queue=max_queue)
        except OSError as e:
            server.stop(0)
            raise RuntimeError(f"--http: cannot listen on {http}: {e.strerror or e}") from None
    return server, port, front


def start_node(name: str, host: str, threads: int | None, tls: Tls | None, auth_token: str | None = None,
               checkpoint_root: str | None = None, port: int = 0) -> tuple[subprocess.Popen, str]:
    """Start ``hexplan node`` on ``host:port`` (0: a free port); ``auth_token`` goes in its
    environment (HEXPLAN_AUTH_TOKEN), never on its command line (which every local user can
    read); ``checkpoint_root``: what LoadShard may read there."""
    cmd = [sys.executable, "-m", "hexplan.cli", "node", "--listen", f"{host}:{port}", "--name", name]
    if threads:
        cmd += ["--threads", str(threads)]
    if tls and tls.enabled:
        cmd += ["--tls-cert", tls.cert, "--tls-key", tls.key] + (["--tls-ca", tls.ca] if tls.ca else [])
    if checkpoint_root:
        cmd += ["--checkpoint-root", checkpoint_root]
    cmd += logconfig.child_args()   # this process's --log-level and --log-format, if configured
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if auth_token:
        env[TOKEN_ENV] = auth_token
    cmd += child_parent_args()   # the node dies with this process (lifecycle.py), SIGKILL included
    # its own session: a terminal's Ctrl-C reaches only the launcher, which drains first
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, start_new_session=True, env=env)
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
                 interleave: int | None = None, matmul_pieces: int = 1, auth_token: str | None = None,
                 http: str | None = None, served_model_name: str | None = None, chat_template: str | None = None,
                 max_queue: int | None = None, shift_threshold: int | None = None):
        """``http``: also serve the OpenAI-compatible HTTP API on this HOST:PORT (http.py; port 0:
        a free one, in ``self.http.port``), as ``served_model_name`` (default: the checkpoint
        folder's name), with ``chat_template`` (Jinja text) and ``max_queue``."""
        self.nodes: dict = {}
        self.server = None
        self.gateway = None
        self.http = None
        # The node executors and their workers take calls carrying this token only: a fresh
        # random one unless given (tests and benchmarks calling stages directly read it here).
        self.auth_token = auth_token or secrets.token_urlsafe(32)
        names = []
        for p in plan.pipelines:
            for s in p.stages:
                if s.node not in names:
                    names.append(s.node)
        if threads is None:
            workers = sum(s.tp for p in plan.pipelines for s in p.stages)
            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        host = listen.rpartition(":")[0] or "127.0.0.1"
        # The node executors serve only this process: loopback, whatever the gateway listens on.
        node_host = host if is_loopback(host) else "127.0.0.1"
        self._node_args = (node_host, threads, tls, self.auth_token, checkpoint)
        try:
            for n in names:
                self.nodes[n] = start_node(n, node_host, threads, tls, self.auth_token, checkpoint_root=checkpoint)
            self.gateway = Gateway(plan, checkpoint, {n: a for n, (_, a) in self.nodes.items()}, tls, dtype,
                                   max_batch=max_batch, prefill_chunk=prefill_chunk, policy=policy,
                                   mlfq_quantum_s=mlfq_quantum_s, interleave=interleave,
                                   matmul_pieces=matmul_pieces, auth_token=self.auth_token,
                                   shift_threshold=shift_threshold)
            self.server, self.port, self.http = start_serving(self.gateway, checkpoint, listen, tls, http,
                                                              served_model_name, chat_template, max_queue)
            self.address = f"{host}:{self.port}"
        except BaseException:
            self.close()
            raise

    def node_process(self, name: str) -> subprocess.Popen:
        return self.nodes[name][0]

    def restart_node(self, name: str) -> None:
        """Start node ``name`` again at its address (after it died or was killed); the gateway's
        monitor then reloads the pipelines that use it (faults.py). For tests and benchmarks."""
        old, address = self.nodes[name]
        if old.poll() is None:
            old.kill()
        old.wait(timeout=10)
        host, threads, tls, token, checkpoint = self._node_args
        self.nodes[name] = start_node(name, host, threads, tls, token, checkpoint_root=checkpoint,
                                      port=int(address.rpartition(":")[2]))

    def drain(self, timeout: float, err=None, hurry=None) -> int:
        """Stop admitting, let the requests in flight end (up to ``timeout`` s), stop the server
        and the gateway (lifecycle.drain_and_stop); ``close()`` then stops the processes.
        Returns how many requests were cut."""
        if self.server is None or self.gateway is None:
            return 0
        return drain_and_stop(self.gateway, self.server, timeout, err, hurry, http=self.http)

    def close(self) -> None:
        stop_serving(self.http, self.server, self.gateway)
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
               matmul_pieces: int = 1, drain_timeout: float = 30.0, auth_token: str | None = None,
               stall_timeout_s: float | None = None, recovery_wait_s: float | None = None,
               http: str | None = None, served_model_name: str | None = None, chat_template: str | None = None,
               max_queue: int | None = None, shift_threshold: int | None = None) -> int:
    signals = StopSignals()
    launch = Launch(plan, checkpoint, listen, tls, dtype, threads, policy=policy, mlfq_quantum_s=mlfq_quantum_s,
                    interleave=interleave, matmul_pieces=matmul_pieces, auth_token=auth_token, http=http,
                    served_model_name=served_model_name, chat_template=chat_template, max_queue=max_queue,
                    shift_threshold=shift_threshold)
    return serve_until_stopped(launch, signals, f"{len(launch.nodes)} node executor(s)", out, drain_timeout,
                               stall_timeout_s, recovery_wait_s)


def serve_until_stopped(launch, signals: StopSignals, executors: str, out, drain_timeout: float,
                        stall_timeout_s: float | None = None, recovery_wait_s: float | None = None) -> int:
    """The launch commands' life after start (``Launch`` or ``RayLaunch``): set the fault
    timeouts given, print the ready line (``executors`` says where the nodes run), wait for
    SIGTERM/SIGINT, drain, close everything, print the stopped line."""
    gw = launch.gateway
    if stall_timeout_s is not None:
        gw.stall_timeout_s = stall_timeout_s
    if recovery_wait_s is not None:
        gw.recovery_wait_s = recovery_wait_s
    try:
        print(f"hexplan: ready: serving {gw.plan.model.name} on {launch.address} "
              f"({len(gw.plan.pipelines)} pipeline(s), {executors})"
              + (f"; HTTP on {launch.http.url}" if launch.http is not None else ""), file=out, flush=True)
        signals.wait()
        launch.drain(drain_timeout, hurry=signals.hurry)
    finally:
        launch.close()
    print("hexplan: stopped", file=out, flush=True)
    return 0
