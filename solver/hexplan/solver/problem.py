"""The solver's view of one planning problem: candidate TP groups, their costs, options.

A *slot* is ``(node name, tp degree)``: one TP group of ``tp`` GPUs inside that node. A
pipeline under construction is a list of slots; which physical GPU indices a slot gets is
decided only when the plan is written (solver/hexplan/solver/optimizer.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hexplan.cluster import Cluster
from hexplan.costmodel import DEFAULT_PARAMS, CostParams, StageCost, Workload
from hexplan.errors import SpecError
from hexplan.evaluate import CostCache
from hexplan.models import ModelSpec

TP_DEGREES = (1, 2, 4, 8)
OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class SolveOptions:
    objective: str = "throughput"        # throughput | latency
    slo_tpot_ms: float | None = None     # time per output token, per pipeline, no queueing
    slo_ttft_ms: float | None = None     # time to first token, per pipeline, no queueing
    time_limit: float = 60.0             # seconds for the whole solve
    seed: int = 0
    backend: str = "highs"               # highs | cbc | ortools | none (heuristic only): the MILPs
    lp_backend: str | None = None        # column generation's master LP: highs | glop | pdlp
                                         # (None: glop with backend ortools, else highs)
    int_backend: str | None = None       # integer choice of patterns: cpsat | highs (None: cpsat
                                         # when OR-Tools loads, else highs)
    workload: Workload = field(default_factory=Workload)
    params: CostParams = DEFAULT_PARAMS
    max_pipelines: int | None = None
    shift: bool = False                  # let TP >= 2 stages run shifted (Shift Parallelism post-pass, shift.py)
    tp_degrees: tuple[int, ...] = TP_DEGREES   # TP degrees a stage may use (Helix-style: (1,))
    nodes: tuple[str, ...] | None = None      # use only these nodes' GPUs (None: every node); the
                                              # coordinator and the network stay the cluster's
    start: tuple[tuple[tuple[str, int], ...], ...] | None = None
                                         # warm start: pipelines as ((node, tp), ...) per stage in
                                         # order (a running plan's, hexplan.executor.replan); the
                                         # ones that still fit seed the search, which never returns less


class Problem:
    def __init__(self, cluster: Cluster, model: ModelSpec, options: SolveOptions):
        self.cluster, self.model, self.options = cluster, model, options
        self.workload = options.workload
        self.costs = CostCache(model, options.workload, options.params)
        self.L = model.num_layers
        self.slo_tpot = options.slo_tpot_ms / 1e3 if options.slo_tpot_ms else None
        self.slo_ttft = options.slo_ttft_ms / 1e3 if options.slo_ttft_ms else None
        self.node_by_name = {n.name: n for n in cluster.nodes}
        if options.nodes is not None:
            unknown = sorted(set(options.nodes) - set(self.node_by_name))
            if unknown:
                raise SpecError(f"unknown node(s) {', '.join(unknown)} in cluster {cluster.name!r}", field="nodes")
        # The nodes whose GPUs may be placed (the others can still be the coordinator).
        self.nodes = [n for n in cluster.nodes if options.nodes is None or n.name in options.nodes]
        # TP degrees each node can host: allowed by the options, divides the model, fits in the
        # node, holds >= 1 layer.
        self.allowed_tp: dict[str, list[int]] = {}
        for n in self.nodes:
            ok = []
            for d in sorted(set(options.tp_degrees)):
                if d <= n.count and model.tp_degree_ok(d) is None and self.cost(n.name, d).max_layers() >= 1:
                    ok.append(d)
            self.allowed_tp[n.name] = ok

    def cost(self, node: str, tp: int, split: bool = True) -> StageCost:
        """``split`` False: without interleaving (a pipeline of one TP-1 stage is not cut)."""
        n = self.node_by_name[node]
        return self.costs.get(n.gpu, tp, n.interconnect, split)

    def max_layers(self, slot) -> int:
        return self.cost(*slot).max_layers()

    def rate(self, slot) -> float:
        sc = self.cost(*slot)
        if slot[1] == 1 and sc.parts > 1:
            # Interleaving: a TP-1 group that can hold the whole model may be a pipeline of its
            # own, which is not cut into parts; the higher rate keeps the bounds valid.
            whole = self.cost(*slot, split=False)
            if whole.max_layers(first=True, last=True) >= self.L:
                return max(sc.layer_rate, whole.layer_rate)
        return sc.layer_rate

    def all_slots(self) -> list[tuple[str, int]]:
        """Every candidate group: node n offers count // d groups of each allowed degree d."""
        out = []
        for n in self.nodes:
            for d in self.allowed_tp[n.name]:
                out += [(n.name, d)] * (n.count // d)
        return out

    def best_partition_rate(self, node: str) -> tuple[float, float]:
        """(max total layer rate, max total layers) over the ways to split one node into groups
        (each maximised separately: an unbounded knapsack over the allowed degrees)."""
        n = self.node_by_name[node]
        degs = self.allowed_tp[node]
        rate = [0.0] * (n.count + 1)
        mem = [0.0] * (n.count + 1)
        for c in range(1, n.count + 1):
            rate[c], mem[c] = rate[c - 1], mem[c - 1]
            for d in degs:
                if d <= c:
                    rate[c] = max(rate[c], rate[c - d] + self.rate((node, d)))
                    mem[c] = max(mem[c], mem[c - d] + self.max_layers((node, d)))
        return rate[n.count], mem[n.count]
