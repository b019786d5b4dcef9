"""``hexplan serve``: the gateway. Clients call ``Inference``; the gateway does the rest.

The gateway is four pieces, each in its own file:

* loading.py: start: check the checkpoint against the plan's model, ask every node executor to
  load its stages (``LoadShard``), load the tokenizer if the checkpoint has one.
* hexplan/serving (torch-free, shared with the simulator): the scheduler. Routing (shortest
  expected delay, hexplan.dispatch), admission (KV budget, concurrency, prefill-only requests
  past a full pipeline), chunked prefill, and the policy: fcfs, or FastServe's skip-join MLFQ
  with preemption and KV offload. Each pipeline's micro-batch loops and their size come from
  the plan (hexplan.serving.setup: its workload section, else one loop per stage).
* runner.py: the step runner: one thread per micro-batch loop sends each Step down its
  pipeline, samples and streams tokens, frees finished requests' KV before their streams end.
* faults.py: a failed step marks dead nodes down; requests move to a live pipeline and are
  prefilled again there (the client sees a delay, never a lost or repeated token).
* servicer.py: the thin gRPC servicer (validate, submit, stream).

This class ties them together and owns the shared state (under ``cv``): the scheduler, the
live requests by scheduler id, the pipelines' stage addresses.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import grpc

from hexplan.costmodel import Workload
from hexplan.dispatch import Dispatcher
from hexplan.errors import SpecError
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.plan import Plan, plan_cluster
from hexplan.serving import NoPipeline, Scheduler, pipeline_configs
from hexplan.serving.scheduler import DONE, NEW
from hexplan.serving.setup import (CALIBRATION_BATCHES, choose_batch, estimated_batches, has_workload,
                                   pipeline_step_ms)
from hexplan.validate import plan_assumptions

from ._proto import hexplan_v1_pb2 as pb
from ._proto import hexplan_v1_pb2_grpc as pbg
from .loading import GatewayError, check_checkpoint, load_shards, load_tokenizer
from .faults import Monitor
from .limits import step_tokens
from .runner import StepRunner
from .sampling import Sampling
from .wire import Tls, channel

log = logging.getLogger("hexplan.gateway")
access_log = logging.getLogger("hexplan.access")   # one line per request when it ends (request_ended)

STALL_TIMEOUT_S = 10.0     # the least time a step may take before its pipeline is suspect
STALL_FACTOR = 10.0        # ... or this many times its expected time, when that is longer
RECOVERY_WAIT_S = 30.0     # accepted requests wait this long for a pipeline to come back

__all__ = ["Gateway", "GatewayError", "Pipeline", "Request", "build_scheduler", "check_checkpoint"]


@dataclass(eq=False)
class Request:
    id: str                     # the gateway's own: keys the KV caches and every internal call
    prompt: list[int]
    sampling: Sampling
    generated: list[int] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    sid: int = -1               # the scheduler's id
    prefill_only: bool = False  # Prefill: no generation; the result is the last token's outputs
    want_hidden: bool = False   # Prefill: also return the last token's hidden state
    label: str = ""             # the client's request_id (or this id): echoed back, logged
    failed: bool = False        # ended with an error event (no "done")
    # time.monotonic() when it was accepted, first ran in a step, got its first and latest
    # token, ended (request_ended; 0: not yet): metrics and the access line
    t_submit: float = 0.0
    t_sched: float = 0.0
    t_first_token: float = 0.0
    t_last_token: float = 0.0
    t_end: float = 0.0

    def context(self) -> list[int]:
        return self.prompt + self.generated


@dataclass(eq=False)
class Pipeline:
    index: int
    weight: float
    stages: list[str]          # worker addresses, first to last
    nodes: list[str]
    alive: bool = True
    served: int = 0            # requests ever routed here
    # "live" | "down" (a stage or node does not answer) | "suspect" (a step stalled) | after a
    # re-plan (replan.py): "draining" (takes no new requests, finishes its own) | "retired" (unloaded)
    state: str = "live"
    reason: str = ""           # why it is not live
    epoch: int = 0             # bumped when it fails or comes back: a step of an older epoch is ignored
    step_s: float = 0.0        # running mean of its steps' wall time (stall detection)
    # the plan it was loaded from (None: the gateway's first), its index there and the plan's
    # generation (0 first, then one per re-plan that loaded shards: replan.py; stage ids, reloads)
    plan: Plan | None = None
    plan_index: int = -1       # -1: ``index``
    generation: int = 0
    retiring: bool = False     # a re-plan replaced it: no new requests; retired once empty


def build_scheduler(plan: Plan, policy: str = "fcfs", *, max_batch: int | None = None,
                    prefill_tokens: int | None = None, prefill_chunk: int | None = None,
                    mlfq_quantum_s: float | None = None, interleave: int | None = None,
                    batches: list | None = None) -> Scheduler:
    """The gateway's scheduler for ``plan``: hexplan.serving's, configured from the plan as the
    simulator configures it (the plan's workload, its cluster section for the cost model's
    estimates and routing predictions when it has one). ``batches``: a bare plan's batch size
    per pipeline, chosen from its measured decode steps (``Gateway.start``)."""
    asm = plan_assumptions(plan)
    workload: Workload = asm.workload
    if interleave is not None and interleave != workload.interleave:
        workload = replace(workload, interleave=interleave)
    try:
        cluster = plan_cluster(plan)
    except SpecError:
        cluster = None         # a hand-written plan: the plan's own predictions, if any
    if cluster is not None:
        try:
            metrics = evaluate_plan_pipelines(cluster, CostCache(plan.model, workload, asm.params), plan.pipelines)
        except (SpecError, KeyError, ValueError):
            cluster, metrics = None, None
    else:
        metrics = None
    dispatcher = Dispatcher.for_plan(plan, workload.output_tokens, metrics)
    if batches is None and max_batch is None:    # nothing measured yet: the cost model's, as the simulator's
        batches = estimated_batches(plan, workload, asm.params, cluster)
    configs = pipeline_configs(plan, workload, asm.params, cluster, batch=max_batch, prefill_chunk=prefill_chunk,
                               prefill_budget=prefill_tokens, batches=batches)
    sched = Scheduler(configs, policy, dispatcher, mlfq_quantum_s=mlfq_quantum_s)
    # each pipeline's predicted output tokens/s (the cost model's on the plan's cluster, else the
    # plan's own figure, else None): the metrics' hexplan_pipeline_predicted_tokens_per_second
    sched.predicted_tokens_per_s = ([m.throughput for m in metrics] if metrics is not None
                                    else [p.throughput_tokens_per_s for p in plan.pipelines])
    return sched


def _quoted(text: str) -> str:
    """A client's label as one token of a text log line: as is when plain, else JSON-quoted
    (no spaces, quotes or control characters can forge a field or a line)."""
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


def _metrics(gw):
    """The gateway's Metrics, or None when prometheus_client is not installed (it is optional)."""
    try:
        from .metrics import Metrics
    except ImportError as e:
        if not (e.name or "").startswith("prometheus_client"):
            raise
        return None
    return Metrics(gw, getattr(gw.scheduler, "predicted_tokens_per_s", None))


class Gateway:
    def __init__(self, plan: Plan, checkpoint: str, node_addresses: dict, tls: Tls | None = None,
                 dtype: str = "float32", max_batch: int | None = None, prefill_tokens: int | None = None,
                 prefill_chunk: int | None = None, policy: str = "fcfs", mlfq_quantum_s: float | None = None,
                 interleave: int | None = None, matmul_pieces: int = 1, auth_token: str | None = None,
                 calibrate: bool = True, shift_threshold: int | None = None):
        self.plan, self.checkpoint, self.tls, self.dtype = plan, str(checkpoint), tls, dtype
        self.auth_token = auth_token or None   # sent on every call to node executors and stages
        self.node_addresses = dict(node_addresses)
        if policy not in ("fcfs", "mlfq"):
            raise GatewayError(f"policy must be 'fcfs' or 'mlfq', got {policy!r}")
        self.policy = policy
        self.workload = plan_assumptions(plan).workload
        if interleave is None:         # the plan's (hexplan solve --interleave), else 1
            interleave = self.workload.interleave
        for name, v in (("interleave", interleave), ("matmul_pieces", matmul_pieces)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GatewayError(f"{name} must be an integer >= 1, got {v!r}")
        self.interleave = interleave         # parts a step is cut into (1: off)
        if shift_threshold is not None and (isinstance(shift_threshold, bool) or not isinstance(shift_threshold, int)
                                            or shift_threshold < 0):
            raise GatewayError(f"shift_threshold must be an integer >= 0 tokens, got {shift_threshold!r}")
        # shifted stages run steps of more tokens in SP mode (None: each stage's default,
        # loading.stage_shift_threshold)
        self.shift_threshold = shift_threshold
        self.matmul_pieces = matmul_pieces   # slices of each TP row-parallel product (1: off)
        self._schedule_args = dict(max_batch=max_batch, prefill_tokens=prefill_tokens, prefill_chunk=prefill_chunk,
                                   mlfq_quantum_s=mlfq_quantum_s, interleave=interleave)
        self.scheduler = build_scheduler(plan, policy, **self._schedule_args)
        # A bare plan's batch size comes from its stages' decode steps, timed at load (start);
        # a plan's workload section or --max-batch fixes it.
        self.calibrate = calibrate and max_batch is None and not has_workload(plan)
        self.decode_ms: dict = {}     # pipeline -> {batch: ms of its slowest stage's decode step}
        self.config, ckpt_model = check_checkpoint(self.checkpoint, plan.model)
        self.vocab = ckpt_model.vocab_size
        # the checkpoint's context, or the plan's when its config.json does not say
        self.context_limit = (ckpt_model.max_position_embeddings if self.config.get("max_position_embeddings")
                              else plan.model.max_position_embeddings)
        self.tokenizer = load_tokenizer(self.checkpoint)
        self.cv = threading.Condition()
        self.stop_event = threading.Event()
        self.clock = time.monotonic
        self.pipelines: list[Pipeline] = []
        self.requests: dict[int, Request] = {}   # by scheduler id, until ended (and their KV released)
        self.down_nodes: set = set()
        self.draining = False      # set by begin_drain: no new requests, in-flight ones finish
        self.health = None         # the client server's grpc health servicer (serve_gateway sets it)
        # stall detection: a step slower than stall_factor x its expected time (at least
        # stall_timeout_s) makes its pipeline suspect (runner.StepRunner.step_timeout)
        self.stall_timeout_s = STALL_TIMEOUT_S
        self.stall_factor = STALL_FACTOR
        # requests whose pipeline failed while none was live wait this long for one to come back
        self.recovery_wait_s = RECOVERY_WAIT_S
        self.parked: list = []     # [(Request, deadline)]
        self.runner = StepRunner(self)
        self.monitor = Monitor(self)
        # the model's name in metrics (model_name) and access lines
        self.served_model_name = plan.model.name
        self.metrics = _metrics(self)   # Prometheus metrics (metrics.py); None without prometheus_client
        self._stubs: dict = {}
        self._threads: list = []

    # ---- start / stop -------------------------------------------------------------------
    def stub(self, address: str) -> pbg.StageStub:
        s = self._stubs.get(address)
        if s is None:
            s = self._stubs[address] = pbg.StageStub(channel(address, self.tls, self.auth_token))
        return s

    def health_stub(self, address: str):
        """The grpc health service of a node executor or stage worker: answered by its server
        threads even while a long step holds the stage (liveness probes, faults.py)."""
        key = ("health", address)
        s = self._stubs.get(key)
        if s is None:
            from grpc_health.v1 import health_pb2_grpc
            s = self._stubs[key] = health_pb2_grpc.HealthStub(channel(address, self.tls, self.auth_token))
        return s

    def start(self) -> None:
        calibrate, timings, max_tokens = None, {}, step_tokens(self)
        if self.calibrate:
            # the stages time decode steps at the workload's mean context (the checkpoint's limit
            # permitting); the message limits allow the largest batch that may be chosen
            context = max(1, min(int(self.workload.mean_decode_context), self.context_limit - 1))
            calibrate = (CALIBRATION_BATCHES, context)
            largest = build_scheduler(self.plan, self.policy, **dict(
                self._schedule_args, batches=[max(CALIBRATION_BATCHES)] * len(self.plan.pipelines)))
            max_tokens = max(max_tokens, step_tokens(self, largest.configs))
        self.load_step_tokens = max_tokens
        addresses = load_shards(self.plan, self.checkpoint, self.dtype, self.node_addresses, self.stub,
                                max_tokens, calibrate, timings, shift_threshold=self.shift_threshold)
        if calibrate:
            self._choose_batches(timings)
        total_w = sum(p.weight for p in self.plan.pipelines) or 1.0
        for pi, p in enumerate(self.plan.pipelines):
            self.pipelines.append(Pipeline(pi, (p.weight or 0.0) / total_w,
                                           [addresses[pi, si] for si in range(len(p.stages))],
                                           [s.node for s in p.stages]))
        self.start_loops()
        self.monitor.start()
        log.info("gateway: %d pipeline(s) loaded; micro-batch loops %s", len(self.pipelines),
                 ", ".join(f"{c.loops} x {c.batch}" for c in self.scheduler.configs))

    def _choose_batches(self, timings: dict) -> None:
        """Rebuild the (still empty) scheduler with each pipeline's batch size chosen from its
        stages' measured decode steps (hexplan.serving.setup.choose_batch)."""
        batches = []
        for pi, p in enumerate(self.plan.pipelines):
            ms = pipeline_step_ms([timings.get((pi, si), {}) for si in range(len(p.stages))])
            self.decode_ms[pi] = ms
            b = choose_batch(ms)
            batches.append(b if b is not None else self.scheduler.configs[pi].batch)   # else the estimate
            if b is not None:
                log.info("pipeline %d: batch %d from its decode steps (batch: ms %s)", pi, b,
                         ", ".join(f"{k}: {v:.1f}" for k, v in ms.items()))
        predicted = getattr(self.scheduler, "predicted_tokens_per_s", None)
        self.scheduler = build_scheduler(self.plan, self.policy, **dict(self._schedule_args, batches=batches))
        self.scheduler.predicted_tokens_per_s = predicted

    def start_loops(self, pipeline: int | None = None) -> None:
        """One thread per micro-batch loop of each pipeline, or of ``pipeline`` (StepRunner.loop)."""
        for pi, cfg in enumerate(self.scheduler.configs):
            if pipeline is not None and pi != pipeline:
                continue
            for g in range(cfg.loops):
                t = threading.Thread(target=self.runner.loop, args=(pi, g), daemon=True, name=f"pipeline{pi}-mb{g}")
                t.start()
                self._threads.append(t)

    def set_health(self) -> None:
        """Health SERVING while a pipeline is live and the gateway is not draining."""
        if self.health is None:
            return
        from grpc_health.v1 import health_pb2
        ok = not self.draining and any(p.alive for p in self.pipelines)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "hexplan.v1.Inference"):
            self.health.set(name, status)

    def begin_drain(self) -> None:
        """Stop admitting: new requests get UNAVAILABLE ("draining"); those in flight go on."""
        with self.cv:
            self.draining = True
            self.set_health()
            self.cv.notify_all()

    def in_flight(self) -> int:
        """Requests accepted and not yet ended."""
        with self.cv:
            return len(self.requests)

    def drain(self, timeout: float) -> int:
        """begin_drain, then wait up to ``timeout`` s for the requests in flight to end; returns
        how many are still in flight (cut by the stop that follows)."""
        self.begin_drain()
        deadline = time.monotonic() + max(0.0, timeout)
        with self.cv:
            while self.requests and not self.stop_event.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(min(left, 0.2))
            return len(self.requests)

    def stop(self) -> None:
        self.stop_event.set()
        with self.cv:
            self.cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    # ---- requests -----------------------------------------------------------------------
    def submit(self, token_ids: list[int], sampling: Sampling, request_id: str = "", prefill_only: bool = False,
               hidden: bool = False) -> Request:
        """Queue a request. ``prefill_only``: run the prompt and deliver ("result", logits,
        hidden or None) instead of tokens (``sampling`` is ignored)."""
        rid = uuid.uuid4().hex   # never the client's: two requests with one label stay apart
        req = Request(rid, list(token_ids), sampling, prefill_only=prefill_only, want_hidden=hidden,
                      label=request_id or rid, t_submit=time.monotonic())
        with self.cv:
            if self.draining:
                req.finished = True
                self.request_ended(req, grpc.StatusCode.UNAVAILABLE)
                req.events.put(("error", grpc.StatusCode.UNAVAILABLE, "draining: the gateway is shutting down and "
                                "takes no new requests"))
                return req
            if not prefill_only and not self.scheduler.fits(len(req.prompt), sampling.max_new_tokens):
                req.finished = True
                self.request_ended(req, grpc.StatusCode.INVALID_ARGUMENT)
                req.events.put(("error", grpc.StatusCode.INVALID_ARGUMENT,
                                f"sampling.max_new_tokens: prompt ({len(req.prompt)} tokens) + max_new_tokens "
                                f"({sampling.max_new_tokens}) exceeds the pipelines' KV budget of {self.scheduler.kv_budget} "
                                "tokens (the plan's workload: concurrency x (prompt + output tokens))"))
                return req
            try:
                req.sid = self.scheduler.add(len(req.prompt), sampling.max_new_tokens, self.clock(), prefill_only)
            except NoPipeline:
                self._unavailable(req)
                return req
            self.requests[req.sid] = req
            if self.pipelines:
                self.pipelines[self.scheduler.pipe_of[req.sid]].served += 1
            self.cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: stop generating for it, free what it holds."""
        req.cancelled.set()
        with self.cv:
            if not req.finished and req.sid >= 0 and req.sid in self.requests:
                self.request_ended(req, grpc.StatusCode.CANCELLED)
                sched = self.scheduler
                sched.cancel(req.sid)
                if sched.state[req.sid] == DONE and not any(req.sid in p.release for p in sched.pipes):
                    self.retire_locked(req.sid)      # it held no KV
            self.cv.notify_all()

    def fail_locked(self, sid: int, code: grpc.StatusCode, message: str) -> None:
        """End one request with an error (its stream gets ``code``); the scheduler lets it go at
        its next chance (at once when waiting; with its step's update when in a step), and its
        KV is released like a cancelled request's."""
        req = self.requests.get(sid)
        if req is None or req.failed:
            return
        log.warning("request %s failed: %s: %s", req.label, code.name, message)
        req.failed = True
        self.request_ended(req, code)       # recorded before its client can see the end
        req.events.put(("error", code, message))
        req.cancelled.set()
        self.scheduler.cancel(sid)
        if self.scheduler.state[sid] == DONE and not any(sid in p.release for p in self.scheduler.pipes):
            self.retire_locked(sid)

    def retire_locked(self, sid: int) -> Request:
        """The request has ended and the scheduler holds nothing of it: its id is given back."""
        req = self.requests.pop(sid)
        req.finished = True
        self.scheduler.forget(sid)
        return req

    def take_released(self, sids) -> list[Request]:
        """The requests a Step says to free (cancelled ones), retired."""
        with self.cv:
            return [self.retire_locked(s) for s in sids if s in self.requests]

    def requeue_locked(self, sids: list[int]) -> None:
        """Move the requests of a failed pipeline to a live one (prefilled again there)."""
        now = self.clock()
        for s in sids:
            req = self.requests.get(s)
            if req is None:
                continue
            if req.cancelled.is_set():
                self.retire_locked(s)
                continue
            try:
                self.scheduler.requeue(s, len(req.prompt) + len(req.generated),
                                       req.sampling.max_new_tokens - len(req.generated), now)
            except NoPipeline:
                if self.recovery_wait_s > 0 and not self.stop_event.is_set():
                    # accepted work is not dropped: it waits for a pipeline to come back
                    self.parked.append((req, time.monotonic() + self.recovery_wait_s))
                else:
                    self.retire_locked(s)
                    self._unavailable(req)
                continue
            self.pipelines[self.scheduler.pipe_of[s]].served += 1

    def resume_parked_locked(self) -> None:
        """A pipeline is back: the requests parked while none was live go to it."""
        parked, self.parked = self.parked, []
        current = [(r, t) for r, t in parked if self.requests.get(r.sid) is r and not r.finished]
        self.requeue_locked([r.sid for r, _ in current])
        still = {id(r) for r, _ in self.parked}
        self.parked = [(r, t) for r, t in current if id(r) in still]

    def expire_parked_locked(self) -> None:
        """Requests parked longer than ``recovery_wait_s`` fail UNAVAILABLE; cancelled ones go."""
        now = time.monotonic()
        keep = []
        for r, t in self.parked:
            if self.requests.get(r.sid) is not r or r.finished:
                continue
            if r.cancelled.is_set() or now >= t:
                self.retire_locked(r.sid)
                if not r.cancelled.is_set():
                    self._unavailable(r)
                continue
            keep.append((r, t))
        self.parked = keep

    def _unavailable(self, req: Request) -> None:
        req.finished = True
        self.request_ended(req, grpc.StatusCode.UNAVAILABLE)
        req.events.put(("error", grpc.StatusCode.UNAVAILABLE,
                        "no pipeline is available: every pipeline has a node that is down "
                        f"({', '.join(sorted(self.down_nodes)) or 'none loaded'})"))

    def request_ended(self, req: Request, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        """The one place a request's end is recorded, once, whichever path ends it: its metrics
        (an accepted request's: ``sid >= 0``) and its access line (logger ``hexplan.access``,
        INFO). ``code``: None for a normal end (``reason`` stop or length), else the status its
        client gets (CANCELLED: the client went away)."""
        with self.cv:               # reentrant: callers may hold it
            if req.t_end:
                return
            req.t_end = time.monotonic()
        if code is None:
            status, reason = "OK", reason or "stop"
        else:
            status, reason = code.name, "abort" if code == grpc.StatusCode.CANCELLED else "error"
        if self.metrics is not None and req.sid >= 0:
            self.metrics.on_request_end(req, reason)
        if access_log.isEnabledFor(logging.INFO):
            ttft = req.t_first_token - req.t_submit if req.t_first_token else None
            waited = req.t_sched - req.t_submit if req.t_sched else None
            total = req.t_end - req.t_submit
            fields = {"request_id": req.id, "label": req.label, "model": self.served_model_name,
                      "prompt_tokens": len(req.prompt), "output_tokens": len(req.generated),
                      "ttft_s": None if ttft is None else round(ttft, 6),
                      "queue_s": None if waited is None else round(waited, 6),
                      "total_s": round(total, 6), "finish_reason": reason, "status": status}
            access_log.info("request %s label=%s model=%s prompt_tokens=%d output_tokens=%d ttft=%s total=%.3fs "
                            "finish_reason=%s status=%s", req.id, _quoted(req.label), self.served_model_name, len(req.prompt),
                            len(req.generated), "-" if ttft is None else f"{ttft:.3f}s", total, reason, status,
                            extra=fields)

    # ---- KV on the stages -------------------------------------------------------------------
    def release(self, p: Pipeline, reqs: list[Request]) -> None:
        """Free these requests' KV caches on every stage of ``p``."""
        if not reqs or not p.alive:
            return
        try:
            self.stub(p.stages[0]).Release(pb.ReleaseRequest(request_ids=[r.id for r in reqs]),
                                           timeout=30)
        except grpc.RpcError as e:
            log.warning("pipeline %d: release of %d request(s) failed (%s: %s); their KV may still be held",
                        p.index, len(reqs), e.code().name, e.details())

    def offload(self, p: Pipeline, reqs: list[Request]) -> None:
        """mlfq: move these requests' KV caches to host memory on every stage of ``p``."""
        try:
            self.stub(p.stages[0]).Release(pb.ReleaseRequest(request_ids=[r.id for r in reqs], offload=True), timeout=30)
        except grpc.RpcError as e:
            log.warning("pipeline %d: offload failed: %s", p.index, e.details())

    # ---- counters ---------------------------------------------------------------------------
    @property
    def offloads(self) -> int:
        return self.scheduler.offloads

    @property
    def partial_chunks(self) -> int:
        """Prompt chunks sent that were not their prompt's last."""
        return self.scheduler.partial_chunks

    def queued_locked(self) -> int:
        """Requests accepted and not yet given a place to run (Status.queued,
        vllm:num_requests_waiting): waiting for admission, or parked waiting for a pipeline."""
        sched = self.scheduler
        return len(self.parked) + sum(1 for s in self.requests
                                      if sched.state[s] == NEW and not sched.busy[s]
                                      and (sched.mlfq or sched.loop_of[s] < 0))

    def status(self) -> pb.StatusResponse:
        """The Status RPC: per pipeline its state, requests in flight and each stage's KV."""
        with self.cv:
            sched = self.scheduler
            loads = sched.loads()
            pipes = [(p.index, p.state, p.reason, loads[p.index],
                      list(zip(p.nodes, p.stages)), p.alive) for p in self.pipelines]
            in_flight = len(self.requests)
            queued = self.queued_locked()
            down = sorted(self.down_nodes)
            draining = self.draining
        out = pb.StatusResponse(model=self.plan.model.name, draining=draining, in_flight=in_flight,
                                queued=queued, down_nodes=down)
        kv = self.kv_stats(timeout=2.0, live_only=True)   # a stopped pipeline's stages: the monitor probes them
        for index, state, reason, n, stages, alive in pipes:
            ps = out.pipelines.add(index=index, state=state, in_flight=n, reason=reason)
            for node, addr in stages:
                st = ps.stages.add(node=node, address=addr)
                got = kv.get(addr) if alive else None
                if got is not None:
                    st.answering, (st.kv_bytes, st.sequences) = True, got
        out.serving = not draining and any(alive for *_, alive in pipes)
        return out

    def kv_stats(self, timeout: float = 5.0, live_only: bool = False) -> dict:
        """{stage address: (kv_bytes, sequences), or None when it does not answer}, every stage
        asked at once."""
        calls = {addr: self.stub(addr).Stats.future(pb.StatsRequest(), timeout=timeout)
                 for p in self.pipelines if p.alive or not live_only for addr in p.stages}
        out = {}
        for addr, f in calls.items():
            try:
                r = f.result()
                out[addr] = (r.kv_bytes, r.sequences)
            except grpc.RpcError:
                out[addr] = None
        return out


def __getattr__(name):
    # the servicer lives in servicer.py; old imports from here keep working
    if name in ("InferenceServicer", "serve_gateway"):
        from . import servicer
        return getattr(servicer, name)
    raise AttributeError(name)
