"""Request routing by max-flow over the placed graph (networkx).

Graph: coordinator (source) -> first stage -> ... -> last stage -> coordinator (sink). Each
stage is split into an in- and an out-vertex joined by an edge of the stage's capacity
(layer_rate / layers); edges between stages carry the link capacity (in output tokens/s,
shared among the pipelines that use the same pair of nodes); source and sink edges carry the
coordinator links' capacity and the pipeline's concurrency limit (concurrency / round trip). The max
flow is the plan's throughput and each pipeline's share of it is its routing weight.
"""
from __future__ import annotations

import networkx as nx


def route(pipelines) -> tuple[float, list[float]]:
    """Return (max flow, flow per pipeline).

    ``pipelines[p]`` is ``(stage_caps, hop_caps, source_cap)``: the capacity of each stage, of
    each hop between consecutive stages, and of the coordinator's edge into the pipeline (its
    coordinator links and its concurrency limit), all in output tokens/s.
    """
    g = nx.DiGraph()
    for p, (stage_caps, hop_caps, source_cap) in enumerate(pipelines):
        if not stage_caps:
            continue
        g.add_edge("source", ("in", p, 0), capacity=source_cap)
        for s, cap in enumerate(stage_caps):
            g.add_edge(("in", p, s), ("out", p, s), capacity=cap)
            if s + 1 < len(stage_caps):
                g.add_edge(("out", p, s), ("in", p, s + 1), capacity=hop_caps[s])
        g.add_edge(("out", p, len(stage_caps) - 1), "sink")  # no capacity attribute = unbounded
    if "source" not in g:
        return 0.0, [0.0] * len(pipelines)
    value, flow = nx.maximum_flow(g, "source", "sink")
    per = [flow["source"].get(("in", p, 0), 0.0) for p in range(len(pipelines))]
    return value, per
