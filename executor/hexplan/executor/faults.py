"""Faults: a pipeline whose step fails is probed stage by stage; nodes that do not answer are
marked down, every pipeline using them stops, and their requests move to a live pipeline,
where they are prefilled again from prompt + tokens already streamed: the client sees a delay,
never a lost or repeated token. With no pipeline left, requests fail UNAVAILABLE and the
gateway keeps running."""
from __future__ import annotations

import logging

import grpc

from ._proto import hexplan_v1_pb2 as pb

log = logging.getLogger("hexplan.gateway")

PROBE_TIMEOUT_S = 2.0


def dead_nodes(gw, p) -> list[str]:
    """Nodes of pipeline ``p`` whose stage does not answer a Stats call."""
    dead = []
    for node, addr in zip(p.nodes, p.stages):
        try:
            gw.stub(addr).Stats(pb.StatsRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError:
            dead.append(node)
    return dead


def pipeline_failed(gw, p, why: str) -> None:
    """A step of pipeline ``p`` failed: stop it and every pipeline on a dead node, move their requests."""
    dead = dead_nodes(gw, p)
    with gw.cv:
        if p.alive:
            log.warning("pipeline %d failed (%s); nodes down: %s", p.index, why, ", ".join(dead) or "none")
        gw.down_nodes.update(dead)
        for q in gw.pipelines:
            if q.alive and (q is p or any(n in gw.down_nodes for n in q.nodes)):
                q.alive = False
                gw.requeue_locked(gw.scheduler.fail(q.index))
        gw.cv.notify_all()
