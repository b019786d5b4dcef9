"""Process lifetime: no orphans, and a graceful drain on SIGTERM/SIGINT.

No orphans. ``hexplan launch`` starts its node executors in sessions of their own (so a
terminal's Ctrl-C reaches only the launcher, which drains first), and passes them
``--parent-pid``: a node watches that pid (``watch_parent``: its parent changed, so the launcher
is gone, SIGKILL included) and, where the launcher's creating thread lives as long as the
process, also asks the kernel for SIGTERM when its parent dies (``set_parent_death_signal``,
Linux prctl PR_SET_PDEATHSIG). A node that stops, by signal or because its parent went, stops
its stage workers; workers watch their node the same way (worker.py ``_watch_parent``), so a
SIGKILLed node takes its workers with it too.

Drain. ``drain_and_stop``: health NOT_SERVING, new requests UNAVAILABLE ("draining"; 503 on
the HTTP front), the requests in flight finish up to a timeout, then the servers and the
gateway stop.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1     # <linux/prctl.h>
EXIT_BACKSTOP_S = 5.0    # a node whose parent is gone exits by then even if its shutdown hangs

log = logging.getLogger("hexplan.lifecycle")


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    The kernel tracks the parent *thread*: the signal fires when the thread that started this
    process exits, even if the rest of its process lives on. Only use it for children started
    from a thread that lives as long as its process (the launcher's main thread). Call it first
    thing in the child, then check the parent is still there (``watch_parent`` does): a parent
    that died before the call sends nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, on_gone, poll_s: float = 0.25) -> threading.Thread:
    """Call ``on_gone()`` once, from a daemon thread, when this process's parent is no longer
    ``parent_pid`` (it died and this process was reparented; pid reuse cannot fool it). Called
    at once when it is already gone."""
    def run():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        on_gone()
    t = threading.Thread(target=run, daemon=True, name="parent-watch")
    t.start()
    return t


def exit_later(seconds: float = EXIT_BACKSTOP_S, code: int = 3) -> None:
    """A backstop: leave the process after ``seconds`` whatever the main thread is doing."""
    t = threading.Timer(seconds, lambda: os._exit(code))
    t.daemon = True
    t.start()


def child_parent_args() -> list[str]:
    """The hidden ``hexplan node`` options that tie a child to this process: its pid, and the
    parent-death signal when started from the main thread (which lives as long as the process)."""
    args = ["--parent-pid", str(os.getpid())]
    if threading.current_thread() is threading.main_thread():
        args.append("--parent-death-signal")
    return args


class StopSignals:
    """SIGINT/SIGTERM handlers: ``stop`` is set by the first signal, ``hurry`` by a second one
    (cut the drain short).

    The handler only counts: it takes no lock. A Python signal handler runs in the main thread
    between two bytecodes, possibly while that thread holds a lock of its own (inside
    ``Event.wait``); ``Event.set`` there deadlocks (it did: a node stuck for good after a
    parent-death SIGTERM). The main thread polls with ``time.sleep`` instead."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.count = 0
        self.stop = _AtLeast(self, 1)
        self.hurry = _AtLeast(self, 2)
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.count += 1

    def wait(self, poll_s: float = 0.2) -> None:
        while not self.count:
            time.sleep(poll_s)


class _AtLeast:
    """``is_set()`` once ``owner.count`` reaches ``n``: a flag a signal handler can raise without a lock."""

    def __init__(self, owner, n: int):
        self.owner, self.n = owner, n

    def is_set(self) -> bool:
        return self.owner.count >= self.n


def drain_and_stop(gw, server, timeout: float, err=None, hurry=None,
                   report_s: float = 1.0, http=None) -> int:
    """Stop admitting and let the requests in flight end, up to ``timeout`` seconds, then stop
    ``server`` (a short grace for the last messages), the HTTP front ``http`` (http.py; it
    answers 503 "draining" meanwhile) and ``gw``. Health turns NOT_SERVING at
    once (``gw.health``, set by serve_gateway); new requests get UNAVAILABLE ("draining").
    Progress goes to ``err`` when given, else to the log (logger ``hexplan.lifecycle``: stderr,
    in the process's log format). ``hurry.is_set()`` (a second signal): stop waiting. Returns
    how many requests were still in flight, cut by the stop."""
    def say(msg: str, level: int = logging.INFO) -> None:
        if err is not None:
            print(f"hexplan: {msg}", file=err, flush=True)
        else:
            log.log(level, msg)
    health = getattr(gw, "health", None)
    if health is not None:
        health.enter_graceful_shutdown()
    gw.begin_drain()
    deadline = time.monotonic() + max(0.0, timeout)
    n = gw.in_flight()
    said = None
    while n and not (hurry is not None and hurry.is_set()):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if said is None or time.monotonic() - said >= report_s:
            say(f"draining: {n} request(s) in flight ({left:.0f} s left of --drain-timeout)")
            said = time.monotonic()
        n = gw.drain(min(left, 0.25))
    if n:
        say(f"drain: cutting {n} request(s) still in flight", logging.WARNING)
    else:
        say("drained: no request in flight")
    # No request left: the grace only lets the streams send their last message. Cutting: short.
    server.stop(grace=2.0 if not n else 0.5).wait()
    if http is not None:
        http.stop()
    gw.stop()
    return n


def stop_serving(http, server, gateway) -> None:
    """Stop what serves clients, each that was started: the HTTP front, the gRPC server (a
    second's grace), then the gateway's loops (``Launch.close`` and ``RayLaunch.close``)."""
    if http is not None:
        http.stop()
    if server is not None:
        server.stop(grace=1).wait()
    if gateway is not None:
        gateway.stop()
