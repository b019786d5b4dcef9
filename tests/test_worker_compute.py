"""A stage worker runs all of its torch work on one thread (worker.ComputeThread)."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("grpc")

from hexplan.executor.worker import ComputeThread  # noqa: E402


def serving(compute: ComputeThread):
    """Serve ``compute``'s calls on this thread (its owner) until the returned stop is called."""
    done = threading.Event()
    return done, (lambda: compute.serve(done.is_set, poll_s=0.05))


def test_calls_from_other_threads_run_on_the_owner_in_order():
    compute = ComputeThread()
    owner = threading.get_ident()
    seen, results, errors = [], {}, []

    def caller(i):
        try:
            results[i] = compute.call(lambda: (seen.append(i), threading.get_ident())[1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    done, serve = serving(compute)
    threads = []
    for i in range(8):                       # one after the other: the queue keeps their order
        t = threading.Thread(target=caller, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.01)
    stopper = threading.Thread(target=lambda: ([t.join(10) for t in threads], done.set()))
    stopper.start()
    serve()                                  # returns once every caller has its answer
    stopper.join(10)
    assert not errors
    assert set(results.values()) == {owner}  # every call ran on the compute thread
    assert seen == list(range(8))


def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    compute = ComputeThread()
    done, serve = serving(compute)
    out = {}

    def caller():
        try:
            compute.call(lambda: int("x"))
        except ValueError as e:
            out["error"] = str(e)
        out["after"] = compute.call(lambda: 41 + 1)
        done.set()

    t = threading.Thread(target=caller)
    t.start()
    serve()
    t.join(10)
    assert "invalid literal" in out["error"]
    assert out["after"] == 42


def test_a_call_on_the_owner_runs_inline_and_serve_stops():
    compute = ComputeThread()
    assert compute.call(lambda a, b=0: a + b, 2, b=3) == 5   # no server needed on its own thread
    t0 = time.monotonic()
    compute.serve(lambda: time.monotonic() - t0 > 0.1, poll_s=0.02)
    assert time.monotonic() - t0 < 2
    err: list = []                                           # serve() belongs to the owner
    th = threading.Thread(target=lambda: _catch(err, lambda: compute.serve(lambda: True)))
    th.start()
    th.join(10)
    assert len(err) == 1 and isinstance(err[0], RuntimeError)


def _catch(sink, fn):
    try:
        fn()
    except BaseException as e:
        sink.append(e)


class _Cache:
    """A stage model's cache bookkeeping, enough for Release and Stats: which requests it holds,
    and in what order the compute thread released them."""

    def __init__(self, held):
        self.held = set(held)
        self.order: list = []

    def release(self, rid):
        self.order.append(rid)
        if rid in self.held:
            self.held.remove(rid)
            return True
        return False

    def num_sequences(self):
        return len(self.held)

    def kv_bytes(self):
        return 0

    def offloaded_bytes(self):
        return 0


def test_release_is_queued_not_waited_for(monkeypatch):
    """Release answers while the compute thread is still in another step, and the caches go
    before any later call runs on the stage (Stats sees them gone)."""
    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor.distributed import TPContext
    from hexplan.executor.worker import StageWorker

    monkeypatch.delenv("HEXPLAN_STEP_LOG", raising=False)
    cache = _Cache({"a", "b"})
    worker = StageWorker(cache, TPContext(), {"stage_id": "s0"}, None)   # this thread computes
    done = threading.Event()
    in_step, step_may_end = threading.Event(), threading.Event()
    out: dict = {}

    def step():                               # another loop's step, holding the compute thread
        in_step.set()
        step_may_end.wait(10)
        cache.order.append("step")

    busy = threading.Thread(target=worker.compute.call, args=(step,))

    def caller():
        try:
            busy.start()
            in_step.wait(10)
            t0 = time.monotonic()
            reply = worker.Release(pb.ReleaseRequest(request_ids=["a", "x"]), None)
            out["release_s"] = time.monotonic() - t0
            out["released"] = reply.released
            out["step_running"] = "step" not in cache.order
            step_may_end.set()
            stats = worker.Stats(pb.StatsRequest(), None)       # queued after the release
            out["sequences"] = stats.sequences
        finally:
            step_may_end.set()
            done.set()

    t = threading.Thread(target=caller)
    t.start()
    deadline = time.monotonic() + 30
    worker.compute.serve(lambda: done.is_set() or time.monotonic() > deadline, poll_s=0.05)
    t.join(10)
    busy.join(10)
    assert out["step_running"], "Release waited for the step on the compute thread"
    assert out["release_s"] < 5
    assert out["released"] == 2                       # the ids it took
    assert cache.order == ["step", "a", "x"]          # in the order the calls came
    assert out["sequences"] == 1                      # "b" alone is held


def test_a_release_that_fails_on_the_stage_is_logged(monkeypatch, caplog):
    """No caller waits for a queued release, so its failure is logged on the stage."""
    import logging

    from hexplan.executor._proto import hexplan_v1_pb2 as pb
    from hexplan.executor.distributed import TPContext
    from hexplan.executor.worker import StageWorker

    class Broken(_Cache):
        def release(self, rid):
            raise RuntimeError(f"cannot free {rid}")

    monkeypatch.delenv("HEXPLAN_STEP_LOG", raising=False)
    worker = StageWorker(Broken({"a"}), TPContext(), {"stage_id": "s0"}, None)
    with caplog.at_level(logging.ERROR, logger="hexplan.worker"):
        reply = worker.Release(pb.ReleaseRequest(request_ids=["a"]), None)   # on the compute thread: runs now
    assert reply.released == 1
    assert "stage s0: release of 1 cache(s) failed: RuntimeError: cannot free a" in caplog.text
