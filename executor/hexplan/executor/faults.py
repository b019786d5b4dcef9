"""Faults and recovery.

A pipeline whose step fails with a transport error (a stage does not answer) or stalls (no
answer within the runner's step timeout) is probed stage by stage. It stops ("down", or
"suspect" when its stages still answer after a stall), and so does every pipeline on a node
whose executor does not answer. Their requests move to a live pipeline, where they are
prefilled again from prompt + tokens already streamed: the client sees a delay, never a lost
or repeated token. Their KV caches are released on the stages that still answer. With no
pipeline left, requests fail UNAVAILABLE, health says NOT_SERVING, and the gateway keeps
running.

The monitor (one thread) probes every live pipeline's stages every 2 s (their grpc health
service, which answers while a step runs), and every stopped pipeline's node executors with backoff (0.5 s,
doubling to 8 s). Requests moved while no pipeline is live wait (parked) up to the gateway's
``recovery_wait_s`` for one to come back, then fail UNAVAILABLE. When all of them answer (a restarted ``hexplan node`` at the same address,
a stage that answers again after a stall), it reloads the pipeline's stages (LoadShard, last
stage first, each told its downstream) and the pipeline takes requests again.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc

from grpc_health.v1 import health_pb2

from ._proto import hexplan_v1_pb2 as pb
from .limits import step_tokens
from .loading import GatewayError, load_pipeline

log = logging.getLogger("hexplan.gateway")

PROBE_TIMEOUT_S = 2.0
PROBE_EVERY_S = 2.0          # live pipelines' stages are probed this often (a node may die idle)
BACKOFF_S = (0.5, 8.0)       # first and longest wait between probes of a stopped pipeline


def _answers(gw, address: str) -> bool:
    """Whether the server at ``address`` answers its health service in time (a busy stage does:
    its server threads answer while a step runs; a stopped or dead one does not)."""
    if not address:
        return False
    try:
        gw.health_stub(address).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        return True
    except grpc.RpcError:
        return False


def pipeline_failed(gw, p, why: str, epoch: int | None = None, stalled: bool = False) -> None:
    """A step of pipeline ``p`` failed (or stalled): stop it and every pipeline on a node whose
    executor does not answer, move their requests, release their KV where stages answer."""
    silent = [(node, addr) for node, addr in zip(p.nodes, p.stages) if not _answers(gw, addr)]
    dead_nodes = [node for node, _ in silent if not _answers(gw, gw.node_addresses.get(node, ""))]
    moved = []
    with gw.cv:
        if (epoch is not None and p.epoch != epoch) or not p.alive:
            return                   # another loop of it got here first
        if silent:
            reason = f"{why}; not answering: " + ", ".join(f"{n} ({a})" for n, a in silent)
        else:
            reason = why
        log.warning("pipeline %d stopped (%s); nodes down: %s", p.index, reason, ", ".join(dead_nodes) or "none")
        gw.down_nodes.update(dead_nodes)
        for q in gw.pipelines:
            if q.alive and (q is p or any(n in dead_nodes for n in q.nodes)):
                q.alive = False
                q.state = "suspect" if (q is p and stalled and not silent) else "down"
                q.reason = reason if q is p else f"node(s) {', '.join(n for n in q.nodes if n in dead_nodes)} down"
                q.epoch += 1
                q.step_s = 0.0
                if gw.metrics is not None:
                    gw.metrics.on_pipeline_failed(q.index)
                sids = gw.scheduler.fail(q.index)
                moved.append((q, [gw.requests[s] for s in sids if s in gw.requests]))
                gw.requeue_locked(sids)
        gw.set_health()
        gw.cv.notify_all()
    dead_addrs = {a for _, a in silent}
    for q, reqs in moved:       # their KV on the stages that still answer
        ids = [r.id for r in reqs]
        if not ids:
            continue
        for addr in q.stages:
            if addr in dead_addrs:
                continue
            try:
                gw.stub(addr).Release(pb.ReleaseRequest(request_ids=ids), timeout=PROBE_TIMEOUT_S)
            except grpc.RpcError:
                pass                # it is down too: its cache went with it


def reload_pipeline(gw, p) -> list[str]:
    """Load pipeline ``p``'s stages again (loading.load_pipeline: last stage first, each told
    the stages after it); returns the new stage addresses. Raises GatewayError."""
    plan = p.plan if p.plan is not None else gw.plan
    index = p.plan_index if p.plan_index >= 0 else p.index
    return load_pipeline(plan, index, gw.checkpoint, gw.dtype, gw.node_addresses, gw.stub, step_tokens(gw),
                         generation=p.generation, shift_threshold=getattr(gw, "shift_threshold", None))


class Monitor:
    """Probes stopped pipelines with backoff and brings them back (reload_pipeline)."""

    def __init__(self, gw):
        self.gw = gw
        self.next_probe: dict = {}     # pipeline index -> (time, wait)
        self.last_live_probe = 0.0
        self.thread = threading.Thread(target=self.run, daemon=True, name="gateway-monitor")

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        gw = self.gw
        while not gw.stop_event.wait(0.25):
            if gw.parked:
                with gw.cv:
                    gw.expire_parked_locked()
            if time.monotonic() - self.last_live_probe >= PROBE_EVERY_S and not gw.stop_event.is_set():
                self.last_live_probe = time.monotonic()
                self.probe_live()
            for p in list(gw.pipelines):
                if p.alive or p.state == "retired":     # retired: a re-plan replaced it (replan.py)
                    self.next_probe.pop(p.index, None)
                    continue
                now = time.monotonic()
                at, wait = self.next_probe.setdefault(p.index, (now + BACKOFF_S[0], BACKOFF_S[0]))
                if now < at or gw.draining:
                    continue
                if self.try_revive(p):
                    self.next_probe.pop(p.index, None)
                else:
                    wait = min(wait * 2, BACKOFF_S[1])
                    self.next_probe[p.index] = (time.monotonic() + wait, wait)

    def probe_live(self) -> None:
        """A live pipeline with a stage that does not answer stops now, not at its next step
        (so health and Status tell the truth with no traffic)."""
        gw = self.gw
        for p in list(gw.pipelines):
            if not p.alive:
                continue
            epoch = p.epoch
            silent = [a for a in p.stages if not _answers(gw, a)]
            if silent and p.alive and p.epoch == epoch:
                pipeline_failed(gw, p, "a stage did not answer its health probe", epoch)

    def try_revive(self, p) -> bool:
        gw = self.gw
        nodes = sorted(set(p.nodes))
        if not all(_answers(gw, gw.node_addresses.get(n, "")) for n in nodes):
            return False
        epoch = p.epoch
        try:
            addresses = reload_pipeline(gw, p)
        except (GatewayError, KeyError) as e:
            log.warning("pipeline %d: reload failed (%s); will try again", p.index, e)
            return False
        with gw.cv:
            if p.epoch != epoch or p.alive or gw.stop_event.is_set() or p.state == "retired":
                return p.alive
            p.stages = addresses
            # a pipeline a re-plan is draining comes back draining (it takes no new requests)
            p.alive, p.state, p.reason = True, "draining" if p.retiring else "live", ""
            p.epoch += 1
            p.step_s = 0.0
            still_down = {n for q in gw.pipelines if not q.alive for n in q.nodes}
            gw.down_nodes.intersection_update(still_down)
            gw.scheduler.revive(p.index)
            gw.resume_parked_locked()
            gw.set_health()
            gw.cv.notify_all()
        log.warning("pipeline %d is back: stages reloaded at %s", p.index, ", ".join(addresses))
        gw.start_loops(p.index)
        return True
