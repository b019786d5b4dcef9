"""A stage worker: one process per GPU (or CPU worker) of a stage.

Rank 0 serves the internal ``Stage`` service (Forward, Release, Stats) on its own port; the
other ranks follow it: rank 0 broadcasts each step (a JSON header and tensors, never pickle)
and every rank runs the same forward, so the TP all-reduces line up. After its forward, rank 0
sends the activations straight to the next stage's worker and returns what comes back; the last
stage returns the logits.

A stage's downstream (the later stages' rank-0 addresses) is fixed when it is loaded
(``LoadShardRequest.downstream``, in the spec): Forward and Release go only there. The
``downstream`` field of ForwardRequest/ReleaseRequest is ignored, so no caller can make a
worker connect elsewhere. Rank 0's server checks the node's auth token and, with a CA, client
certificates (mutual TLS) like the node's own server; calls to the next stage carry the token
and present this node's certificate.

A shifted stage (``shift_sp`` > 1 in the spec, shift.py) makes SP mode's sub-groups at load;
each rank then picks every step's mode from the step itself, so the broadcast is unchanged.

The worker exits when its node executor (its parent process) goes away.
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from concurrent import futures

import grpc
import torch

from ._proto import hexplan_v1_pb2 as pb
from ._proto import hexplan_v1_pb2_grpc as pbg
from .distributed import TPContext, broadcast_message, init_tp, parse_link_delay
from .model import SeqChunk, ShardSpec, StageModel
from .shift import init_shift
from .limits import worker_message_limit
from .wire import (Tls, add_health_and_reflection, bind, channel, from_proto, make_server, server_interceptors,
                   to_proto)

log = logging.getLogger("hexplan.worker")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def split_parts(lengths: list[int], n: int) -> list[tuple[int, int]]:
    """Cut a step's chunks (their token counts, in order) into at most ``n`` contiguous,
    non-empty parts of about equal tokens: [(first, end), ...]. ``n`` <= 1: one part."""
    n = max(1, min(n, len(lengths)))
    if n == 1:
        return [(0, len(lengths))]
    total = sum(lengths)
    parts, start, acc = [], 0, 0
    for i, x in enumerate(lengths):
        acc += x
        left = len(lengths) - i - 1                     # chunks after this one
        need = n - len(parts) - 1                       # parts still to open after this one
        if need > 0 and left >= need and (acc >= total * (len(parts) + 1) / n or left == need):
            parts.append((start, i + 1))
            start = i + 1
    parts.append((start, len(lengths)))
    return parts


def _watch_parent(parent: int) -> None:
    def run():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.2)
    threading.Thread(target=run, daemon=True, name="parent-watch").start()


def open_step_log(stage_id: str):
    """``HEXPLAN_STEP_LOG=PREFIX`` (off by default): the stage worker appends a line per forward
    to ``PREFIX.<stage id>.<pid>``: when its compute started and ended (seconds of
    CLOCK_MONOTONIC, the clock of ``time.monotonic`` and, on Linux, ``time.perf_counter``), its
    tokens, its chunks, and when its Forward call arrived (before the request was decoded and
    queued for the compute thread). Beside the gateway's own step times it shows where a served step's
    time goes: each stage's compute, the queue in front of it, the hops
    (bench/fidelity_bench.py's ``step_breakdown``). A file the operator names, not a caller:
    nothing from the network reaches it."""
    prefix = os.environ.get("HEXPLAN_STEP_LOG")
    if not prefix:
        return None
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stage_id)
    return open(f"{prefix}.{safe}.{os.getpid()}", "a", buffering=1, encoding="utf-8")


class ComputeThread:
    """Runs a worker's torch work on one thread: the one that made it (the process's main
    thread, which loaded the model and timed its decode steps).

    gRPC runs each call on a thread of its pool. Were the forwards run there, every pool thread
    that ran one would get a team of OpenMP threads of its own, and once a process has more
    OpenMP threads than CPUs, libgomp's idle threads stop spinning (GOMP_SPINCOUNT drops to
    100), so every parallel region of a step waits for its threads to wake from the kernel.
    Measured on the 2-core development machine, a 64-sequence decode step of the 134M model
    took 217 ms on the thread that made the first team and 359 ms, on that thread as well as on
    any other, once a second thread had run one forward (bench/thread_team_bench.py,
    docs/executor-benchmark.md). One thread also runs the calls in the order they came, as the
    lock it replaces did not."""

    def __init__(self):
        self._owner = threading.get_ident()
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the compute thread; its result, or its exception raised
        here. Called on the compute thread itself, it just runs it."""
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn, *args, **kwargs) -> futures.Future:
        """Queue ``fn(*args, **kwargs)`` for the compute thread and return at once: a future of
        its result. It runs after every call queued before it and before every call queued
        after it. Called on the compute thread itself, it runs it now."""
        fut: futures.Future = futures.Future()
        if threading.get_ident() == self._owner:
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:
                fut.set_exception(e)
            return fut
        self._q.put((fut, fn, args, kwargs))
        return fut

    def serve(self, stopped, poll_s: float = 0.5) -> None:
        """Run the calls handed over, in order, until ``stopped()`` (checked at least every
        ``poll_s``). On the thread that made this object only."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("ComputeThread.serve() runs on the thread that made it")
        while not stopped():
            try:
                fut, fn, args, kwargs = self._q.get(timeout=poll_s)
            except queue.Empty:
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # the caller's to handle, on its own thread
                fut.set_exception(e)


class StageWorker(pbg.StageServicer):
    """Rank 0's Stage servicer over a loaded StageModel. Every call that touches the model
    runs on the compute thread (``ComputeThread``), one at a time."""

    def __init__(self, model: StageModel, ctx: TPContext, spec: dict, tls: Tls | None):
        self.model, self.ctx, self.spec, self.tls = model, ctx, spec, tls
        self.token = spec.get("auth_token") or None
        self.downstream = [str(a) for a in spec.get("downstream") or []]   # fixed at load
        self.compute = ComputeThread()    # made on the thread that loaded the model (worker_main)
        self._stubs: dict = {}
        self._stubs_lock = threading.Lock()
        self.link = parse_link_delay(os.environ.get("HEXPLAN_LINK_DELAY", ""))
        self._link_lock = threading.Lock()
        self.interleaved_steps = 0
        self._sender = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="send")
        self.step_log = open_step_log(str(spec["stage_id"]))

    def _stub(self, address: str) -> pbg.StageStub:
        with self._stubs_lock:
            stub = self._stubs.get(address)
            if stub is None:
                stub = self._stubs[address] = pbg.StageStub(channel(address, self.tls, self.token))
            return stub

    def _run(self, header: dict, tensors: list, on_part=None, hidden_out=None):
        t0 = time.monotonic()
        if self.ctx.size > 1:
            broadcast_message(self.ctx, header, tensors)
        out = _apply(self.model, header, tensors, on_part, hidden_out)
        if self.step_log is not None and header["op"] == "forward":
            self.step_log.write(f"{t0:.6f} {time.monotonic():.6f} {tensors[0].shape[0]} {len(header['chunks'])} "
                                f"{header.get('arrived', t0):.6f}\n")
        return out

    def Forward(self, request, context):
        arrived = time.monotonic()
        stage = f"stage {self.spec['stage_id']}"
        try:
            chunks = [{"request_id": c.request_id, "start": int(c.start), "length": int(c.length),
                       "hidden": c.hidden, "drop": c.drop} for c in request.chunks]
            inputs = from_proto(request.inputs)
            total = sum(c["length"] for c in chunks)
            if not chunks or any(c["length"] <= 0 or c["start"] < 0 for c in chunks):
                raise ValueError("every chunk needs start >= 0 and length > 0")
            if inputs.shape[0] != total:
                raise ValueError(f"inputs have {inputs.shape[0]} tokens, chunks say {total}")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{stage}: {e}")
        # Interleaving (micro_batches > 1): the step is cut into parts when there is something to
        # overlap: a next stage (part i goes on the wire while part i + 1 computes) or a TP group
        # (part i's all-reduces are in flight while part i + 1 computes). The parts sent on are
        # not cut again; matmul_pieces travels down the pipeline.
        n = request.micro_batches if (self.downstream or self.ctx.size > 1) else 1
        parts = split_parts([c["length"] for c in chunks], n)
        header = {"op": "forward", "chunks": chunks, "parts": parts, "pieces": max(1, request.matmul_pieces)}
        if self.step_log is not None:
            header["arrived"] = arrived
        if len(parts) > 1:
            self.interleaved_steps += 1
        if not self.downstream:      # request.downstream is ignored: the stage's is fixed at load
            def last_stage():
                hidden: dict = {}
                logits = torch.cat(self._run(header, [inputs], hidden_out=hidden)).float()
                if request.greedy:    # the gateway samples every row greedily: send it the tokens alone
                    resp = pb.ForwardResponse(tokens=greedy_tokens(logits))
                else:
                    resp = pb.ForwardResponse(logits=to_proto(logits))
                if hidden:
                    resp.hidden.CopyFrom(to_proto(torch.stack([hidden[c["request_id"]] for c in chunks
                                                               if c["hidden"]])))
                return resp
            try:
                return self.compute.call(last_stage)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{stage}: {e}")
        # A pipeline stage hands each part to the sending thread as soon as it is computed; the
        # logits come back in order.
        nxt = self.downstream[0]
        remaining = context.time_remaining()
        timeout = remaining if remaining and remaining < 1e6 else None
        sends = []

        def send(i, out):
            a, b = parts[i]
            req = pb.ForwardRequest(chunks=request.chunks[a:b], inputs=to_proto(out), matmul_pieces=request.matmul_pieces,
                                    greedy=request.greedy)
            sends.append(self._send(nxt, req, timeout))
        try:
            self.compute.call(self._run, header, [inputs], on_part=send)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{stage}: {e}")
        try:
            replies = [f.result() for f in sends]
        except grpc.RpcError as e:
            code = e.code() if e.code() != grpc.StatusCode.UNKNOWN else grpc.StatusCode.UNAVAILABLE
            context.abort(code, f"stage {nxt}: {e.details()}")
        if len(replies) == 1:
            return replies[0]
        if request.greedy:
            return self._joined(replies, True)
        return self.compute.call(self._joined, replies, False)   # torch.cat: on the compute thread

    @staticmethod
    def _joined(replies: list, greedy: bool):
        """One response from the next stage's replies to the parts of a step, in order."""
        if greedy:
            resp = pb.ForwardResponse(tokens=[t for r in replies for t in r.tokens])
        else:
            resp = pb.ForwardResponse(logits=to_proto(torch.cat([from_proto(r.logits) for r in replies])))
        hidden = [from_proto(r.hidden) for r in replies if r.HasField("hidden")]
        if hidden:
            resp.hidden.CopyFrom(to_proto(torch.cat(hidden)))
        return resp

    def _send(self, address: str, req, timeout):
        """Send activations to the next stage from the sending thread; a future of its reply.
        With HEXPLAN_LINK_DELAY (benchmarks: a slow link on loopback) each message first holds
        the link for bytes / bandwidth (one message at a time) and then waits the latency."""
        stub = self._stub(address)
        if self.link is None:
            return stub.Forward.future(req, timeout=timeout)

        def call():
            latency, bandwidth = self.link
            with self._link_lock:
                time.sleep(req.ByteSize() / bandwidth)
            time.sleep(latency)
            return stub.Forward(req, timeout=timeout)
        return self._sender.submit(call)

    def Release(self, request, context):
        """Queue the release (or offload) of these requests' caches on the compute thread, pass
        the call down the pipeline, and answer once every stage after this one has queued it,
        without waiting for the compute thread. Every later call to a stage (Forward, Stats,
        Release) runs after it there, in the order the calls came, so a caller that goes on
        once Release returns never sees the caches held. Waiting would hold the caller for the
        rest of whatever step the compute thread is in: with two micro-batch loops, the other
        loop's step on every stage, 24-70 ms for each step in which a request ended on the
        2-core machine (docs/executor.md, "Release")."""
        ids = list(request.request_ids)
        op = "offload" if request.offload else "release"
        self.compute.submit(self._run, {"op": op, "ids": ids}, []).add_done_callback(
            functools.partial(_log_failure, f"stage {self.spec['stage_id']}: {op} of {len(ids)} cache(s)"))
        if self.downstream:
            try:
                self._stub(self.downstream[0]).Release(
                    pb.ReleaseRequest(request_ids=ids, offload=request.offload), timeout=10)
            except grpc.RpcError:
                pass  # a dead stage holds no cache worth freeing
        return pb.ReleaseResponse(released=len(ids))

    def Stats(self, request, context):
        return self.compute.call(lambda: pb.StatsResponse(
            name=self.spec["stage_id"], kv_bytes=self.model.kv_bytes(), sequences=self.model.num_sequences(),
            stages=[self.spec["stage_id"]], offloaded_bytes=self.model.offloaded_bytes(),
            interleaved_steps=self.interleaved_steps))

    def stop_followers(self):
        if self.ctx.size > 1:
            self.compute.call(broadcast_message, self.ctx, {"op": "stop"}, [])


def _log_failure(what: str, fut: futures.Future) -> None:
    """A queued call's failure, which no caller waits for: logged on the stage."""
    e = fut.exception()
    if e is not None:
        log.error("%s failed: %s: %s", what, type(e).__name__, e)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first of equal maxima, as sampling.sample's greedy choice), or -1
    for a row with a non-finite value (the gateway fails that request, as sample would)."""
    tokens = torch.argmax(logits, dim=-1)
    tokens[~torch.isfinite(logits).all(dim=-1)] = -1
    return tokens.tolist()


def _apply(model: StageModel, header: dict, tensors: list, on_part=None, hidden_out=None):
    op = header["op"]
    if op == "forward":
        chunks = [SeqChunk(c["request_id"], c["start"], c["length"], bool(c["hidden"]), bool(c["drop"]))
                  for c in header["chunks"]]
        parts = [(int(a), int(b)) for a, b in header["parts"]]
        return model.forward_parts(chunks, tensors[0], parts, int(header["pieces"]), on_part, hidden_out)
    if op == "release":
        return sum(1 for r in header["ids"] if model.release(r))
    if op == "offload":
        return sum(1 for r in header["ids"] if model.offload(r))
    raise ValueError(f"unknown op {op!r}")


def worker_main(spec: dict, rank: int, master_port: int, ready, tls: dict | None, parent: int) -> None:
    """Process entry point (multiprocessing spawn). Reports {"rank", "ok", "port"|"error"} on ``ready``."""
    _watch_parent(parent)
    try:
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        tp = int(spec["tp"])
        device = "cpu"
        gpus = spec.get("gpus") or []
        if torch.cuda.is_available() and spec.get("device", "auto") != "cpu" and gpus:
            device = f"cuda:{gpus[rank]}"       # the node checked the indices (node.check_devices)
            torch.cuda.set_device(device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # the rendezvous store and gloo bind the node's own host, never every interface
        ctx = init_tp(rank, tp, spec["host"], master_port, backend=backend) if tp > 1 else TPContext(0, 1, None)
        shift_sp = int(spec.get("shift_sp") or 1)
        # a shifted stage (shift.py): SP mode's sub-groups, made by every rank in the same order
        shift = init_shift(ctx, shift_sp, int(spec["shift_threshold"])) if shift_sp > 1 else None
        shard = ShardSpec(spec["layer_start"], spec["layer_end"], spec["is_first"], spec["is_last"])
        model = StageModel.load(spec["checkpoint"], shard, ctx, DTYPES[spec.get("dtype") or "float32"], device,
                                shift=shift)
        decode_ms = {}
        cal = spec.get("calibrate")
        if cal and cal.get("batches"):    # every rank: the steps' collectives pair up
            from .profile import calibrate_decode
            decode_ms = calibrate_decode(model, ctx, cal["batches"], int(cal["context"]))
    except Exception as e:  # report any load failure to the node, which reports it to the gateway
        ready.put({"rank": rank, "ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    tls_obj = Tls(**tls) if tls else None
    if rank == 0:
        worker = StageWorker(model, ctx, spec, tls_obj)
        server = make_server(interceptors=server_interceptors(worker.token),
                             max_receive=worker_message_limit(int(spec.get("max_step_tokens") or 0),
                                                              model.args.hidden_size))
        pbg.add_StageServicer_to_server(worker, server)
        add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Stage"].full_name])
        try:
            port = bind(server, f"{spec['host']}:0", tls_obj,
                        require_client_auth=bool(tls_obj and tls_obj.verifies_clients))
        except Exception as e:
            ready.put({"rank": rank, "ok": False, "error": str(e)})
            return
        server.start()
        ready.put({"rank": rank, "ok": True, "port": port, "decode_ms": decode_ms})
        # this thread loaded the model and timed it: it runs every forward too (ComputeThread)
        worker.compute.serve(lambda: not server.wait_for_termination(timeout=0))
    else:
        ready.put({"rank": rank, "ok": True})
        while True:
            try:
                header, tensors = broadcast_message(ctx, None, None)
            except Exception:  # rank 0 went away: nothing left to follow
                return
            if header["op"] == "stop":
                return
            try:
                _apply(model, header, tensors)
            except ValueError:
                pass  # rank 0 raised the same error and reported it to the caller
