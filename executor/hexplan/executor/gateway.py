"""``hexplan serve``: the gateway. Clients call ``Inference``; the gateway does the rest.

* Start: check the checkpoint against the plan's model, ask every node executor to load its
  stages (``LoadShard``), load the tokenizer if the checkpoint has one.
* Routing: a new request goes to the live pipeline with the shortest expected delay
  (hexplan.dispatch: the plan's predicted latency while a pipeline is lightly loaded, its
  share of the plan's throughput by the max-flow weights once it is not; a plan without
  predictions: least load per unit of weight). The simulator routes the same way.
* Continuous batching, on the schedule the plan was made for (its workload): each pipeline runs
  one loop per micro-batch (ceil(concurrency / batch_size), so while one micro-batch is on one
  stage others compute on the next), each of up to batch_size sequences, at most `concurrency`
  in flight per pipeline. Every iteration a loop admits waiting requests and sends one ragged batch down the
  pipeline: a token for each decoding sequence plus prompt chunks (chunked prefill: at most
  B P / O prompt tokens per step, the workload's share, while the loop has sequences decoding,
  so steps cost about the same and no stage waits on a long one; a whole prompt when nothing
  is decoding; `_schedule_locked`). It then samples one token for each sequence whose context
  is now all cached (a prompt's last chunk, or a decode step), streams it, and retires finished
  requests: their KV caches are released on every stage before their streams end, so a
  finished response means its KV is freed.
* Task-aware batching: prefill-only requests (``Prefill``: scoring, classification, embeddings)
  share the steps' prompt budget with generative prompts, in arrival order, but hold no KV
  slot: they are admitted even when the pipeline already holds ``concurrency`` generative
  sequences (they never decode, so they do not stretch anyone's steps past their prompt), their
  last chunk tells every stage to drop their KV cache in the same step (no Release round trip),
  and the last stage returns their last-token hidden state beside the logits. Nothing is sampled.
* Faults: when a pipeline's step fails, its stages are probed, nodes that do not answer are
  marked down, every pipeline using them stops, and their requests move to a live pipeline,
  where they are prefilled again from prompt + tokens already streamed: the client sees a
  delay, never a lost or repeated token. With no pipeline left, requests fail UNAVAILABLE and
  the gateway keeps running.

The scheduler never touches tensors beyond sampling; workers make no policy decisions.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from hexplan.dispatch import Dispatcher
from hexplan.errors import SpecError
from hexplan.models import ModelSpec, model_from_hf_config, read_hf_config
from hexplan.plan import Plan
from hexplan.validate import plan_assumptions

from ._proto import hexplan_v1_pb2 as pb
from ._proto import hexplan_v1_pb2_grpc as pbg
from .mlfq import MLFQ
from .sampling import Sampling, sample
from .wire import Tls, add_health_and_reflection, bind, channel, from_proto, make_server, to_proto

log = logging.getLogger("hexplan.gateway")

STEP_TIMEOUT_S = 300.0


class GatewayError(Exception):
    """A problem at start (bad checkpoint, unreachable node): the message says which."""


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    sampling: Sampling
    generated: list[int] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    cached: int = 0            # context tokens held in the KV cache of its current pipeline
    running: bool = False      # mlfq: in a step now
    offloaded: bool = False    # mlfq: its KV cache is in host memory on every stage
    pipeline: "Pipeline | None" = None
    prefill_only: bool = False  # Prefill: no generation; the result is the last token's outputs
    want_hidden: bool = False   # Prefill: also return the last token's hidden state

    def context(self) -> list[int]:
        return self.prompt + self.generated

    def uncached(self) -> int:
        """Context tokens not yet in the KV cache: 1 while decoding, more while prefilling."""
        return len(self.prompt) + len(self.generated) - self.cached


@dataclass(eq=False)
class Pipeline:
    index: int
    weight: float
    stages: list[str]          # worker addresses, first to last
    nodes: list[str]
    alive: bool = True
    pending: deque = field(default_factory=deque)
    groups: list = field(default_factory=list)   # one list of running requests per micro-batch loop
    load: int = 0              # requests routed here and not finished
    mlfq: object = None        # policy mlfq: the pipeline's MLFQ of routed requests
    quantum_s: float = 0.05    # policy mlfq: top queue's quantum (the plan's time per output token)
    ttft_s: float | None = None  # the plan's predicted TTFT (prefill estimate for skip-join)
    served: int = 0            # requests ever routed here


def check_checkpoint(checkpoint: str, model: ModelSpec) -> tuple[dict, ModelSpec]:
    """Read the checkpoint's config.json (hexplan.models, the one reader) and compare its shape
    with the plan's model; returns the config and the checkpoint's model."""
    path = Path(checkpoint) / "config.json"
    try:
        cfg = read_hf_config(path)
        have = model_from_hf_config(cfg, name=Path(checkpoint).name or str(checkpoint), file=str(path))
    except SpecError as e:
        raise GatewayError(f"checkpoint {e}") from None
    pairs = [("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"),
             ("intermediate_size", "intermediate_size"), ("num_attention_heads", "num_heads"),
             ("num_key_value_heads", "num_kv_heads"), ("vocab_size", "vocab_size")]
    diffs = [f"{ck} {getattr(have, mk)} vs {getattr(model, mk)}" for ck, mk in pairs
             if getattr(have, mk) != getattr(model, mk)]
    if diffs:
        raise GatewayError(f"checkpoint {checkpoint} does not match the plan's model {model.name}: "
                           + ", ".join(diffs) + " (checkpoint vs plan)")
    return cfg, have


def _load_tokenizer(checkpoint: str):
    files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((Path(checkpoint) / f).exists() for f in files):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except Exception as e:  # a broken tokenizer must not stop token-id serving
        log.warning("checkpoint %s: tokenizer not loaded (%s); token ids only", checkpoint, e)
        return None


class Gateway:
    def __init__(self, plan: Plan, checkpoint: str, node_addresses: dict, tls: Tls | None = None,
                 dtype: str = "float32", max_batch: int | None = None, prefill_tokens: int | None = None,
                 prefill_chunk: int | None = None, policy: str = "fcfs", mlfq_quantum_s: float | None = None,
                 interleave: int | None = None, matmul_pieces: int = 1):
        self.plan, self.checkpoint, self.tls, self.dtype = plan, str(checkpoint), tls, dtype
        self.node_addresses = dict(node_addresses)
        # The plan's workload sets the schedule the planner assumed: micro-batches of batch_size
        # sequences, at most `concurrency` in flight per pipeline, prompts prefilled in chunks
        # of B P / O tokens per step (a whole prompt when nothing else is decoding).
        self.workload = plan_assumptions(plan).workload
        self.max_batch = max_batch or self.workload.batch_size
        self.concurrency = max(self.workload.concurrency, self.max_batch)
        self.prefill_tokens = prefill_tokens or self.workload.prompt_tokens
        self.prefill_chunk = prefill_chunk     # None: Workload.prefill_chunk(stages), per pipeline
        self.partial_chunks = 0        # prompt chunks sent that were not their prompt's last
        if policy not in ("fcfs", "mlfq"):
            raise GatewayError(f"policy must be 'fcfs' or 'mlfq', got {policy!r}")
        self.policy, self.mlfq_quantum_s = policy, mlfq_quantum_s
        if interleave is None:         # the plan's (hexplan solve --interleave), else 1
            interleave = self.workload.interleave
        for name, v in (("interleave", interleave), ("matmul_pieces", matmul_pieces)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GatewayError(f"{name} must be an integer >= 1, got {v!r}")
        self.interleave = interleave         # parts a step is cut into (1: off)
        self.matmul_pieces = matmul_pieces   # slices of each TP row-parallel product (1: off)
        self.offloads = 0              # mlfq: KV caches moved to host memory
        self.dispatcher = Dispatcher.for_plan(plan, self.workload.output_tokens)
        self.config, ckpt_model = check_checkpoint(self.checkpoint, plan.model)
        self.vocab = ckpt_model.vocab_size
        # the checkpoint's context, or the plan's when its config.json does not say
        self.context_limit = (ckpt_model.max_position_embeddings if self.config.get("max_position_embeddings")
                              else plan.model.max_position_embeddings)
        self.tokenizer = _load_tokenizer(self.checkpoint)
        self.cv = threading.Condition()
        self.stop_event = threading.Event()
        self.pipelines: list[Pipeline] = []
        self.down_nodes: set = set()
        self._stubs: dict = {}
        self._threads: list = []

    # ---- start / stop -------------------------------------------------------------------
    def stub(self, address: str) -> pbg.StageStub:
        s = self._stubs.get(address)
        if s is None:
            s = self._stubs[address] = pbg.StageStub(channel(address, self.tls))
        return s

    def start(self) -> None:
        missing = sorted({s.node for p in self.plan.pipelines for s in p.stages} - set(self.node_addresses))
        if missing:
            raise GatewayError(f"no address for node(s) {', '.join(missing)}: give them in the plan's cluster "
                               "section or with --nodes NAME=HOST:PORT")
        model_json = json.dumps(self.plan.model.to_dict())
        jobs = []
        with futures.ThreadPoolExecutor(max_workers=8) as pool:
            for pi, p in enumerate(self.plan.pipelines):
                for si, s in enumerate(p.stages):
                    req = pb.LoadShardRequest(stage_id=f"p{pi}s{si}", checkpoint=str(Path(self.checkpoint).resolve()),
                                              layer_start=s.layers[0], layer_end=s.layers[1], is_first=si == 0,
                                              is_last=si == len(p.stages) - 1, tp=s.tp, gpus=list(s.gpus),
                                              dtype=self.dtype, model_json=model_json)
                    jobs.append((pi, si, s.node, pool.submit(self.stub(self.node_addresses[s.node]).LoadShard, req,
                                                             timeout=900)))
            addresses: dict = {}
            for pi, si, node, fut in jobs:
                try:
                    addresses[pi, si] = fut.result().address
                except grpc.RpcError as e:
                    raise GatewayError(f"node {node} ({self.node_addresses[node]}): {e.details() or e.code().name}") from None
        total_w = sum(p.weight for p in self.plan.pipelines) or 1.0
        for pi, p in enumerate(self.plan.pipelines):
            pl = Pipeline(pi, (p.weight or 0.0) / total_w, [addresses[pi, si] for si in range(len(p.stages))],
                          [s.node for s in p.stages])
            pl.groups = [[] for _ in range(self.workload.micro_batches)]
            if self.policy == "mlfq":
                tpot = (p.decode_ms_per_token or 0) / 1e3
                pl.quantum_s = self.mlfq_quantum_s or tpot or 0.05
                pl.ttft_s = (p.ttft_ms / 1e3) if p.ttft_ms else None
                pl.mlfq = MLFQ(quantum_s=pl.quantum_s)
            self.pipelines.append(pl)
            for gi in range(len(pl.groups)):
                t = threading.Thread(target=self._loop, args=(pl, gi), daemon=True, name=f"pipeline{pi}-mb{gi}")
                t.start()
                self._threads.append(t)
        log.info("gateway: %d pipeline(s) loaded", len(self.pipelines))

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
        req = Request(request_id or uuid.uuid4().hex, list(token_ids), sampling, prefill_only=prefill_only,
                      want_hidden=hidden)
        with self.cv:
            self._route_locked(req)
            self.cv.notify_all()
        return req

    def _route_locked(self, req: Request) -> None:
        live = [p for p in self.pipelines if p.alive]
        if not live:
            req.finished = True
            req.events.put(("error", grpc.StatusCode.UNAVAILABLE,
                            "no pipeline is available: every pipeline has a node that is down "
                            f"({', '.join(sorted(self.down_nodes)) or 'none loaded'})"))
            return
        i = self.dispatcher.choose([q.load for q in self.pipelines], [q.alive for q in self.pipelines])
        p = self.pipelines[i] if i >= 0 else min(live, key=lambda q: (q.load, q.index))   # live, weight 0
        req.pipeline, req.cached, req.offloaded = p, 0, False
        p.load += 1
        p.served += 1
        p.pending.append(req)

    def _retire_locked(self, req: Request) -> None:
        if req.pipeline is not None:
            req.pipeline.load -= 1
            req.pipeline = None

    # ---- the per-micro-batch loop ----------------------------------------------------------
    def _loop(self, p: Pipeline, gi: int) -> None:
        if p.mlfq is not None:
            return self._loop_mlfq(p, gi)
        group = p.groups[gi]
        while not self.stop_event.is_set():
            to_release: list[Request] = []
            with self.cv:
                if not p.alive:
                    self._reroute_locked(group)
                    group.clear()
                    return
                keep = []
                for r in group:
                    if r.finished:
                        continue
                    (to_release if r.cancelled.is_set() else keep).append(r)
                for r in to_release:
                    r.finished = True
                    self._retire_locked(r)
                running = self._schedule_locked(p, group, keep)
                group[:] = keep
                if not keep and not to_release:
                    self.cv.wait(0.05)
            if to_release:
                self._release(p, [r for r in to_release if r.cached > 0])
            if not running:
                continue
            if not self._step(p, running):
                with self.cv:
                    group.clear()
                return

    # ---- policy mlfq: skip-join multi-level feedback queue (hexplan/executor/mlfq.py) -------
    def _loop_mlfq(self, p: Pipeline, gi: int) -> None:
        """One micro-batch loop under mlfq: every step re-forms its batch from the pipeline's
        highest-priority waiting requests (not in another loop's step). A request not picked is
        preempted and keeps its KV cache; when a request needs KV room and the pipeline already
        holds ``concurrency`` caches, the lowest-priority preempted one is offloaded to host
        memory on every stage (Release with offload), and brought back by the stages when it
        next runs."""
        group = p.groups[gi]
        while not self.stop_event.is_set():
            to_release: list[Request] = []
            to_offload: list[Request] = []
            with self.cv:
                if not p.alive:
                    self._reroute_locked([e.req for e in list(p.mlfq.entries.values()) if not e.req.running])
                    for e in list(p.mlfq.entries.values()):
                        if not e.req.running:
                            p.mlfq.remove(e.req)
                    group.clear()
                    return
                now = time.monotonic()
                while p.pending:
                    r = p.pending.popleft()
                    if r.cancelled.is_set():
                        r.finished = True
                        self._retire_locked(r)
                        continue
                    p.mlfq.add(r, self._prefill_estimate(p, len(r.context())), now)
                for e in list(p.mlfq.entries.values()):
                    r = e.req
                    if not r.running and (r.finished or r.cancelled.is_set()):
                        p.mlfq.remove(r)
                        if not r.finished:
                            r.finished = True
                            self._retire_locked(r)
                        if r.cached > 0:
                            to_release.append(r)
                step, to_offload = self._pick_mlfq_locked(p)
                group[:] = [r for r, _ in step]
                if not step and not to_release:
                    self.cv.wait(0.05)
            if to_release:
                self._release(p, to_release)
            if to_offload:
                self._offload(p, to_offload)
            if not step:
                continue
            t0 = time.monotonic()
            ok = self._step(p, step)
            dt = time.monotonic() - t0
            with self.cv:
                for r, _ in step:
                    r.running = False
                    if r.finished or not ok:           # done, or moved to another pipeline
                        p.mlfq.remove(r)
                    else:
                        p.mlfq.charge(r, dt, time.monotonic())
                group.clear()
                self.cv.notify_all()
            # A failed step marked the pipeline down: the next iteration moves the requests still
            # queued here to live pipelines, then ends this loop.

    def _prefill_estimate(self, p: Pipeline, tokens: int) -> float:
        """Seconds to prefill ``tokens`` on pipeline p: the plan's TTFT scaled by prompt length,
        else a step's worth (the quantum) per prefill chunk."""
        if p.ttft_s:
            return p.ttft_s * tokens / self.workload.prompt_tokens
        return p.quantum_s * tokens / self._chunk(p)

    def _chunk(self, p: Pipeline) -> int:
        return self.prefill_chunk or self.workload.prefill_chunk(len(p.stages))

    def _prefill_budget(self, p: Pipeline, decoding: bool, first: Request | None) -> int:
        """Prompt tokens a step may carry: the chunk while its micro-batch has sequences
        decoding; otherwise the plan's prompt length, and at least all of the first prompt."""
        if decoding:
            return self._chunk(p)
        return max(self.prefill_tokens, first.uncached() if first is not None else 0)

    def _pick_mlfq_locked(self, p: Pipeline):
        """(request, tokens) for the next step and the requests to offload first."""
        order = p.mlfq.pick(time.monotonic(), eligible=lambda r: not r.running)
        resident = sum(1 for e in p.mlfq.entries.values()
                       if e.req.cached > 0 and not e.req.offloaded and not e.req.prefill_only)
        picked, step, offload = set(), [], []
        if not order:
            return step, offload
        budget = self._prefill_budget(p, any(r.uncached() == 1 for r in order[:self.max_batch]), order[0])
        for r in order:
            if len(step) >= self.max_batch:
                break
            n = r.uncached()
            take = 1 if n <= 1 else min(n, budget)
            if take <= 0:
                continue
            needs_room = (r.cached == 0 or r.offloaded) and not r.prefill_only
            if needs_room and resident >= self.concurrency:
                victim = next((v for v in reversed(order) if v is not r and id(v) not in picked
                               and v.cached > 0 and not v.offloaded and not v.prefill_only
                               and p.mlfq.rank(v) > p.mlfq.rank(r)), None)
                if victim is None:
                    continue
                victim.offloaded = True
                offload.append(victim)
                resident -= 1
            if n > 1:
                budget -= take
            if needs_room:
                resident += 1
            r.offloaded = False
            r.running = True
            picked.add(id(r))
            step.append((r, take))
        return step, offload

    def _offload(self, p: Pipeline, reqs: list[Request]) -> None:
        try:
            self.stub(p.stages[0]).Release(pb.ReleaseRequest(request_ids=[r.id for r in reqs], downstream=p.stages[1:],
                                                             offload=True), timeout=30)
            self.offloads += len(reqs)
        except grpc.RpcError as e:
            log.warning("pipeline %d: offload failed: %s", p.index, e.details())

    def _schedule_locked(self, p: Pipeline, group: list, keep: list[Request]) -> list[tuple[Request, int]]:
        """One step of a loop: (request, tokens) for each sequence it carries. Decoding
        sequences bring their one new token; prompts (and contexts being prefilled again after
        a failover) are prefilled in chunks of at most ``prefill_chunk`` tokens per step while
        the loop has sequences decoding, so every step costs about the same and no stage waits
        on a long one; with nothing decoding the first prompt goes whole (no one to stall).
        Admits waiting requests (appended to ``keep``) while the step has batch room, the
        pipeline is under its concurrency (prefill-only requests do not count: they hold no KV
        slot past their prompt) and prompt budget is left."""
        first = next((r for r in keep if r.uncached() > 1), p.pending[0] if p.pending else None)
        budget = self._prefill_budget(p, any(r.uncached() == 1 for r in keep), first)
        step = []
        for r in keep:
            n = r.uncached()
            take = n if n <= 1 else min(n, budget)
            if n > 1:
                budget -= take
            if take > 0:
                step.append((r, take))
        in_flight = sum(1 for g in p.groups if g is not group for r in g if not r.prefill_only) \
            + sum(1 for r in keep if not r.prefill_only)
        while p.pending and budget > 0 and len(keep) < self.max_batch:
            r = p.pending[0]
            if r.cancelled.is_set():
                p.pending.popleft()
                r.finished = True
                self._retire_locked(r)
                continue
            if not r.prefill_only and in_flight >= self.concurrency:
                # a full pipeline still takes the prefill-only requests queued behind this one
                r = next((q for q in p.pending if q.prefill_only and not q.cancelled.is_set()), None)
                if r is None:
                    break
            p.pending.remove(r)
            take = min(r.uncached(), budget)
            budget -= take
            in_flight += 0 if r.prefill_only else 1
            keep.append(r)
            step.append((r, take))
        return step

    def _step(self, p: Pipeline, running: list[tuple[Request, int]]) -> bool:
        chunks, tokens = [], []
        for r, n in running:
            ctx = r.context()
            last = r.prefill_only and r.cached + n == len(ctx)    # done after this step: no KV to keep
            chunks.append(pb.SeqChunk(request_id=r.id, start=r.cached, length=n, hidden=last and r.want_hidden,
                                      drop=last))
            tokens += ctx[r.cached:r.cached + n]
        req = pb.ForwardRequest(chunks=chunks, inputs=to_proto(torch.tensor(tokens, dtype=torch.int64)),
                                downstream=p.stages[1:], micro_batches=self.interleave,
                                matmul_pieces=self.matmul_pieces)
        try:
            resp = self.stub(p.stages[0]).Forward(req, timeout=STEP_TIMEOUT_S)
            logits = from_proto(resp.logits)
            hidden = iter(from_proto(resp.hidden)) if resp.HasField("hidden") else iter(())
        except grpc.RpcError as e:
            self._pipeline_failed(p, [r for r, _ in running], f"{e.code().name}: {e.details()}")
            return False
        done, dropped = [], []
        for (r, n), row, c in zip(running, logits, chunks):
            r.cached += n
            if c.drop:                     # a prefill-only request's last chunk: its result
                r.cached = 0               # the stages kept no KV cache
                h = next(hidden) if c.hidden else None
                if not r.cancelled.is_set():
                    r.events.put(("result", row, h))
                dropped.append(r)
                continue
            if r.cached < len(r.context()):
                self.partial_chunks += 1   # a prompt chunk that is not its last: no token yet
                continue
            if r.cancelled.is_set():
                continue
            tok = sample(row, r.sampling)
            r.generated.append(tok)
            r.events.put(("tokens", [tok]))
            reason = None
            if tok in r.sampling.stop_token_ids:
                reason = "stop"
            elif len(r.generated) >= r.sampling.max_new_tokens or len(r.context()) >= self.context_limit:
                reason = "length"
            if reason:
                done.append((r, reason))
        if done or dropped:
            with self.cv:
                for r in [r for r, _ in done] + dropped:
                    r.finished = True
                    self._retire_locked(r)
            # A finished response means its KV cache is freed: the last token is already
            # streamed, but the stream ends only once every stage has released the cache (a
            # client that reads Stats when its stream ends sees it gone), and ends even if the
            # release fails. Prefill-only results need no wait: their last chunk dropped the KV.
            try:
                self._release(p, [r for r, _ in done])
            finally:
                for r, reason in done:
                    r.events.put(("done", reason))
        return True

    def _release(self, p: Pipeline, reqs: list[Request]) -> None:
        if not reqs or not p.alive:
            return
        try:
            self.stub(p.stages[0]).Release(pb.ReleaseRequest(request_ids=[r.id for r in reqs], downstream=p.stages[1:]),
                                           timeout=30)
        except grpc.RpcError as e:
            log.warning("pipeline %d: release of %d request(s) failed (%s: %s); their KV may still be held",
                        p.index, len(reqs), e.code().name, e.details())

    # ---- faults -------------------------------------------------------------------------
    def _pipeline_failed(self, p: Pipeline, running: list[Request], why: str) -> None:
        dead = []
        for node, addr in zip(p.nodes, p.stages):
            try:
                self.stub(addr).Stats(pb.StatsRequest(), timeout=2)
            except grpc.RpcError:
                dead.append(node)
        with self.cv:
            if p.alive:
                log.warning("pipeline %d failed (%s); nodes down: %s", p.index, why, ", ".join(dead) or "none")
            self.down_nodes.update(dead)
            for q in self.pipelines:
                if q is p or any(n in self.down_nodes for n in q.nodes):
                    q.alive = False
            self._reroute_locked(running)
            for q in self.pipelines:
                if not q.alive:
                    self._reroute_locked(list(q.pending))
                    q.pending.clear()
            self.cv.notify_all()

    def _reroute_locked(self, reqs) -> None:
        for r in reqs:
            if r.finished:
                continue
            self._retire_locked(r)
            if r.cancelled.is_set():
                r.finished = True
                continue
            self._route_locked(r)

    # ---- stats ----------------------------------------------------------------------------
    def kv_stats(self) -> dict:
        out = {}
        for p in self.pipelines:
            for addr in p.stages:
                try:
                    s = self.stub(addr).Stats(pb.StatsRequest(), timeout=5)
                    out[addr] = (s.kv_bytes, s.sequences)
                except grpc.RpcError:
                    out[addr] = None
        return out


class InferenceServicer(pbg.InferenceServicer):
    """Thin adapter: validate, convert, submit, stream."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def _prompt(self, request, context) -> list[int]:
        """The request's prompt as token ids, checked (GenerateRequest and PrefillRequest)."""
        gw = self.gw
        bad = lambda field, msg: context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {msg}")
        if request.token_ids:
            ids = list(request.token_ids)
        elif request.prompt:
            if gw.tokenizer is None:
                bad("prompt", "this checkpoint has no tokenizer; send token_ids")
            ids = list(gw.tokenizer(request.prompt)["input_ids"])
        else:
            bad("prompt", "empty prompt: give prompt or token_ids")
        if not ids:
            bad("prompt", "the prompt has no tokens")
        for t in ids:
            if not 0 <= t < gw.vocab:
                bad("token_ids", f"token id {t} is outside the vocabulary [0, {gw.vocab})")
        return ids

    def _watch(self, req: Request, context) -> Request:
        def on_done():
            req.cancelled.set()
            with self.gw.cv:
                self.gw.cv.notify_all()
        context.add_callback(on_done)
        return req

    def _request(self, request, context) -> Request:
        gw = self.gw
        bad = lambda field, msg: context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {msg}")
        ids = self._prompt(request, context)
        s = request.sampling
        if s.max_new_tokens <= 0:
            bad("sampling.max_new_tokens", f"must be positive, got {s.max_new_tokens}")
        if len(ids) + s.max_new_tokens > gw.context_limit:
            bad("sampling.max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) "
                                           f"exceeds the model's context of {gw.context_limit} tokens")
        if not math.isfinite(s.temperature) or s.temperature < 0:
            bad("sampling.temperature", f"must be >= 0, got {s.temperature}")
        top_p = s.top_p if s.HasField("top_p") else 1.0
        if not (0 < top_p <= 1):
            bad("sampling.top_p", f"must be in (0, 1], got {top_p}")
        if s.top_k < 0:
            bad("sampling.top_k", f"must be >= 0, got {s.top_k}")
        for t in s.stop_token_ids:
            if not 0 <= t < gw.vocab:
                bad("sampling.stop_token_ids", f"token id {t} is outside the vocabulary [0, {gw.vocab})")
        sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=top_p,
                            seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
                            max_new_tokens=s.max_new_tokens)
        return self._watch(gw.submit(ids, sampling, request.request_id), context)

    def _events(self, req: Request, context):
        while True:
            try:
                ev = req.events.get(timeout=0.1)
            except queue.Empty:
                if not context.is_active():
                    req.cancelled.set()
                    return
                continue
            if ev[0] == "error":
                context.abort(ev[1], ev[2])
            yield ev
            if ev[0] in ("done", "result"):
                return

    def _text(self, ids) -> str:
        tok = self.gw.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None and ids else ""

    def Generate(self, request, context):
        req = self._request(request, context)
        shown = ""
        for ev in self._events(req, context):
            if ev[0] == "tokens":
                text = ""
                if self.gw.tokenizer is not None:
                    full = self._text(req.generated)
                    text, shown = full[len(shown):], full
                yield pb.GenerateResponse(token_ids=ev[1], text=text)
            else:
                yield pb.GenerateResponse(finish_reason=ev[1])

    def GenerateUnary(self, request, context):
        req = self._request(request, context)
        reason, ids = "", []
        for ev in self._events(req, context):
            if ev[0] == "tokens":
                ids += ev[1]
            else:
                reason = ev[1]
        return pb.GenerateResult(token_ids=ids, text=self._text(ids), finish_reason=reason)

    def Prefill(self, request, context):
        ids = self._prompt(request, context)
        if len(ids) > self.gw.context_limit:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt: {len(ids)} tokens exceed the model's context "
                                                            f"of {self.gw.context_limit} tokens")
        req = self._watch(self.gw.submit(ids, Sampling(), request.request_id, prefill_only=True,
                                         hidden=request.hidden), context)
        for ev in self._events(req, context):
            if ev[0] == "result":
                out = pb.PrefillResult(logits=to_proto(ev[1]), prompt_tokens=len(ids))
                if ev[2] is not None:
                    out.hidden.CopyFrom(to_proto(ev[2]))
                return out
        context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")


def serve_gateway(gw: Gateway, listen: str, tls: Tls | None = None) -> tuple[grpc.Server, int]:
    """Start the client-facing server; returns (server, port)."""
    server = make_server(workers=64)
    pbg.add_InferenceServicer_to_server(InferenceServicer(gw), server)
    add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Inference"].full_name])
    port = bind(server, listen, tls)
    server.start()
    return server, port
