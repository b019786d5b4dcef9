"""Process lifetime and server limits of `hexplan launch` (issue 11, items 4, 6, 7 and 11):
graceful drain on SIGTERM, no orphans after SIGKILL, health and new requests answered with the
plan's whole concurrency open, and requests past the model's size refused before they are read.

Loopback only, free ports (``--listen 127.0.0.1:0``), every wait bounded, every process tree
killed in ``finally``."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("transformers")

from executor_util import alive, descendants, hf_greedy, make_checkpoint, proc_stat  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from hexplan.executor._proto import hexplan_v1_pb2 as pb  # noqa: E402
from hexplan.executor._proto import hexplan_v1_pb2_grpc as pbg  # noqa: E402
from hexplan.executor.limits import request_cap, request_message_limit  # noqa: E402
from hexplan.executor.wire import channel  # noqa: E402

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
CONTEXT = 512                   # the checkpoint's max_position_embeddings
READY_S = 180
# A slow link between the two stages (20 ms a step): streams of a few hundred tokens last seconds.
SLOW = {"HEXPLAN_LINK_DELAY": "20,1000"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lifecycle"), layers=4, max_pos=CONTEXT)


def two_stage_plan(tmp_path, ckpt, workload: str = "") -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(f"model: {ckpt}\npipelines:\n  - stages:\n"
                    "      - {node: a, gpus: [0], tp: 1, layers: [0, 2]}\n"
                    "      - {node: b, gpus: [0], tp: 1, layers: [2, 4]}\n"
                    + (f"assumptions:\n  workload: {workload}\n" if workload else ""))
    return str(path)


# ---- processes ------------------------------------------------------------------------------

def start_time(pid: int):
    """The process's start time (clock ticks since boot), or None when it is gone: with the pid,
    it names one process, so a pid reused by someone else's process is never signalled."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])


def kill_tree(pids: dict) -> None:
    """SIGKILL each of ``{pid: start_time}`` that is still that same process."""
    for p, started in pids.items():
        if started is not None and start_time(p) == started:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def wait_gone(pids, timeout: float) -> set[int]:
    """Poll until none of ``pids`` lives; returns those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p for p in left if alive(p)}
    return left


class Launched:
    """`hexplan launch` as a subprocess: its ready address, and its stdout/stderr lines as they come."""

    def __init__(self, plan_file: str, ckpt: str, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "hexplan.cli", "launch", plan_file, "--checkpoint", ckpt,
                                      "--listen", "127.0.0.1:0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.out: queue.Queue = queue.Queue()
        self.err_lines: list[str] = []
        self.known: dict[int, int] = {}          # pid -> start time, of every process below the launch
        threading.Thread(target=self._read, args=(self.proc.stdout, self.out.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err_lines.append), daemon=True).start()
        line, deadline = "", time.monotonic() + READY_S
        while not line and time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    time.sleep(0.2)     # let the readers take the last lines
                    break
        if not line.startswith("hexplan: ready: serving"):
            self.close()
            raise AssertionError(f"launch did not get ready: {line!r}; stderr: {''.join(self.err_lines)[-3000:]}")
        self.address = line.split(" on ")[1].split()[0]
        self.known = {p: start_time(p) for p in descendants(self.proc.pid)}

    @staticmethod
    def _read(stream, put):
        for line in stream:
            put(line)

    def stdout_rest(self, timeout: float = 5) -> str:
        lines, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                lines.append(self.out.get(timeout=0.1))
            except queue.Empty:
                if self.proc.poll() is not None and self.out.empty():
                    break
        return "".join(lines)

    def stderr(self) -> str:
        return "".join(self.err_lines)

    def wait_stderr(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        pids = {**self.known, **{p: start_time(p) for p in descendants(self.proc.pid)}}
        if self.proc.poll() is None:
            self.proc.kill()
        kill_tree(pids)
        self.proc.wait(timeout=30)
        wait_gone([p for p, t in pids.items() if t is not None and start_time(p) == t], 10)


def request(ids, n) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(max_new_tokens=n))


class Stream:
    """One Generate call read on its own thread: tokens, finish reason or error."""

    def __init__(self, stub, ids, n, timeout=180):
        self.ids, self.n = ids, n
        self.tokens: list[int] = []
        self.reason = ""
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()
        self.call = stub.Generate(request(ids, n), timeout=timeout)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for msg in self.call:
                self.tokens += msg.token_ids
                self.first.set()
                self.reason = msg.finish_reason or self.reason
        except grpc.RpcError as e:
            self.error = e
        self.first.set()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def health(address: str, timeout: float = 2.0) -> int:
    with channel(address, None) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=INFERENCE),
                                                    timeout=timeout).status


def wait_all(events, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)


# ---- item 6: graceful drain ---------------------------------------------------------------------

def test_sigterm_drains_every_stream_then_exits(ckpt, tmp_path):
    """SIGTERM mid-load: health turns NOT_SERVING, a new request gets UNAVAILABLE "draining",
    and every stream in flight still gets all its tokens (the right ones); then exit 0."""
    L = Launched(two_stage_plan(tmp_path, ckpt), ckpt, "--drain-timeout", "60", env=SLOW)
    try:
        with channel(L.address, None) as ch:
            stub = pbg.InferenceStub(ch)
            streams = [Stream(stub, [3 + i, 40 + 7 * i, 200 - i], 80 + 4 * i) for i in range(12)]
            assert wait_all([s.first for s in streams], 120), "the streams did not start"
            L.proc.send_signal(signal.SIGTERM)
            assert L.wait_stderr("draining:", 30), L.stderr()
            running = sum(not s.done for s in streams)
            assert running >= 6, f"only {running} streams were still in flight at SIGTERM"
            assert health(L.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request([1, 2, 3], 2), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
            for s in streams:
                s.thread.join(timeout=120)
            for s in streams:
                assert s.error is None, f"stream {s.ids} cut: {s.error.code().name}: {s.error.details()}"
                assert len(s.tokens) == s.n and s.reason == "length", (s.ids, len(s.tokens), s.reason)
            for s in streams[:2]:
                assert s.tokens == hf_greedy(ckpt, s.ids, s.n)
        assert L.proc.wait(timeout=60) == 0, L.stderr()
        assert "hexplan: stopped" in L.stdout_rest()
        assert "drained: no request in flight" in L.stderr()
    finally:
        L.close()


def test_drain_timeout_flag_is_checked(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", "launch", str(tmp_path / "none.yaml"), "--checkpoint",
                          str(tmp_path), "--drain-timeout", "-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--drain-timeout" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---- item 7: no orphans -------------------------------------------------------------------------

def stacks(L: Launched, pids) -> str:
    """For a failure message: the processes left, and their Python stacks (SIGABRT makes
    faulthandler, on in these processes, print them on the stderr they share with the launch)."""
    info = []
    for p in sorted(pids):
        try:
            with open(f"/proc/{p}/cmdline") as f:
                info.append(f"{p} {proc_stat(p)}: {f.read().replace(chr(0), ' ')[:160]}")
            os.kill(p, signal.SIGABRT)
        except OSError:
            pass
    time.sleep(2)
    return "\n" + "\n".join(info) + "\nstderr:\n" + L.stderr()[-12000:]


def test_sigkill_leaves_no_orphans(ckpt, tmp_path):
    """SIGKILL of a node ends its stage workers; SIGKILL of `hexplan launch` ends every node and
    worker it started."""
    L = Launched(two_stage_plan(tmp_path, ckpt), ckpt, env={"PYTHONFAULTHANDLER": "1"})
    try:
        nodes = [p for p in L.known if proc_stat(p) and proc_stat(p)[1] == L.proc.pid]
        assert len(nodes) == 2, f"launch's children: {nodes}"
        below = {n: descendants(n) for n in nodes}
        assert all(below.values()), f"a node has no worker: {below}"
        # a node killed outright: its workers follow it
        os.kill(nodes[0], signal.SIGKILL)
        left = wait_gone(below[nodes[0]], 10)
        assert not left, f"workers of the killed node still alive: {left}" + stacks(L, left)
        # the launcher killed outright: everything else follows it
        rest = descendants(L.proc.pid)
        assert nodes[1] in rest and below[nodes[1]] <= rest
        L.proc.kill()
        L.proc.wait(timeout=10)
        left = wait_gone(rest, 10)
        assert not left, f"still alive 10 s after SIGKILL of launch: {left}" + stacks(L, left)
    finally:
        L.close()


# ---- items 4 and 11: concurrency and size limits ------------------------------------------------

@pytest.fixture(scope="module")
def small(ckpt, tmp_path_factory):
    """A launch whose plan holds 4 sequences at once (its workload: 2 loops of 2), on a slow link."""
    workload = "{prompt_tokens: 64, output_tokens: 448, batch_size: 2, concurrency: 4}"
    L = Launched(two_stage_plan(tmp_path_factory.mktemp("small"), ckpt, workload), ckpt, "--drain-timeout", "0",
                 env=SLOW)
    try:
        yield L
    finally:
        L.close()


def test_full_concurrency_leaves_health_and_new_requests_answered(small, ckpt):
    concurrency = 4
    opened: list[Stream] = []
    with channel(small.address, None) as ch:
        stub = pbg.InferenceStub(ch)
        try:
            held = [Stream(stub, [9, 8, 7 + i], 150) for i in range(concurrency)]
            opened += held
            assert wait_all([s.first for s in held], 120)
            assert not any(s.done for s in held)
            t = time.monotonic()
            assert health(small.address, timeout=2) == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t < 2
            # queued behind the full plan, then served
            one = stub.GenerateUnary(request([11, 12], 1), timeout=120)
            assert list(one.token_ids) == hf_greedy(ckpt, [11, 12], 1) and one.finish_reason == "length"
            # up to the cap (the plan's concurrency + those allowed to wait) requests are taken; one
            # more is refused at once, and health is still answered
            for s in held:
                s.call.cancel()
            time.sleep(1.5)
            opened += [Stream(stub, [20 + i], 400) for i in range(request_cap(concurrency))]
            time.sleep(1.5)
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as full:
                list(stub.Generate(request([1], 1), timeout=30))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full.value.details()
            assert "too many requests open" in full.value.details()
            assert time.monotonic() - t < 5
            assert not any(s.error for s in opened[concurrency:]), [s.error for s in opened if s.error]
            assert health(small.address, timeout=2) == health_pb2.HealthCheckResponse.SERVING
        finally:
            for s in opened:
                s.call.cancel()
    # the cancelled streams give their slots back
    deadline = time.monotonic() + 30
    with channel(small.address, None) as ch:
        while True:
            try:
                got = pbg.InferenceStub(ch).GenerateUnary(request([1, 2], 1), timeout=60)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, e.details()
                time.sleep(0.5)
    assert len(got.token_ids) == 1


def test_oversized_prompts_refused_before_they_are_read(small):
    with channel(small.address, None) as ch:
        stub = pbg.InferenceStub(ch)
        # past the message limit: gRPC refuses it unread
        big = request([7] * (request_message_limit(CONTEXT) + 1), 1)
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(big, timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert time.monotonic() - t < 5
        # within the message limit, past the context: counted before it is copied
        for ids in ([7] * (CONTEXT + 1), [7] * (8 * CONTEXT)):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(request(ids, 1), timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("token_ids:"), \
                e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.Prefill(pb.PrefillRequest(token_ids=ids), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("token_ids:")
        # and the gateway goes on serving
        got = stub.GenerateUnary(request([3, 4, 5], 2), timeout=120)
        assert len(got.token_ids) == 2


def test_drain_timeout_zero_cuts_at_once(small):
    """Last: it stops the module's launch (``--drain-timeout 0``) with streams in flight."""
    L = small
    with channel(L.address, None) as ch:
        stub = pbg.InferenceStub(ch)
        streams = [Stream(stub, [5, 6, 7 + i], 400) for i in range(3)]
        assert wait_all([s.first for s in streams], 120)
        t = time.monotonic()
        L.proc.send_signal(signal.SIGTERM)
        assert L.proc.wait(timeout=30) == 0, L.stderr()
        took = time.monotonic() - t
        for s in streams:
            s.thread.join(timeout=30)
        assert all(s.error is not None or len(s.tokens) < s.n for s in streams)
    assert took < 15, f"exit took {took:.1f} s"
    assert "cutting 3 request(s)" in L.stderr()
    assert "hexplan: stopped" in L.stdout_rest()
