"""Which pipeline a new request goes to (shortest expected delay), and which mlfq queue it
joins (skip-join): shared by the gateway and the simulator.

Routing: shortest expected delay. The gateway and the simulator
both route with this class, so what the simulator reports is what the gateway does.

Pipeline ``i`` serves ``r_i`` requests/s at most: its share of the plan's throughput by the
plan's routing weights (the max-flow shares), ``r_i = w_i / sum(w) * T / O``. Unloaded, a
request spends ``L_i = TTFT_i + (O - 1) * TPOT_i`` in it. With ``n_i`` requests already there a
new one expects to spend about

    D_i(n_i) = max(L_i, (n_i + 1) / r_i)

its own latency while the pipeline is lightly loaded, and the time to serve everyone ahead of
it and itself at the pipeline's rate once it is not (the two asymptotes of mean value analysis
for a closed queue). A request goes to the pipeline with the smallest ``D_i`` (ties: the lower
index). Light load thus goes to the fastest pipelines (lowest latency); under heavy load the
``(n_i + 1) / r_i`` terms dominate and requests are shared in proportion to ``r_i``, i.e. by the
plan's weights, which is what the planner's throughput assumes.

Without predictions (a hand-written plan with weights only) every ``L_i`` is 0 and ``r_i`` is
the weight: least load per unit of weight.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def skip_join_level(prefill_s: float, quantum_s: float, levels: int) -> int:
    """FastServe's skip-join (the mlfq policy of the gateway and the simulator): the
    highest-priority queue i whose quantum ``quantum_s * 2**i`` covers the request's estimated
    prefill time (the last queue when none does)."""
    for i in range(levels - 1):
        if quantum_s * 2 ** i >= prefill_s:
            return i
    return levels - 1


class Dispatcher:
    def __init__(self, weights: Sequence[float], latencies_s: Sequence[float] | None = None,
                 total_requests_per_s: float | None = None):
        w = [max(0.0, float(x)) for x in weights]
        total = sum(w)
        if total <= 0:                 # no weights at all: share equally
            w, total = [1.0] * len(w), float(len(w))
        scale = (total_requests_per_s / total) if total_requests_per_s and total_requests_per_s > 0 else 1.0
        self.rates = [x * scale for x in w]
        lat = list(latencies_s) if latencies_s is not None else [0.0] * len(w)
        if len(lat) != len(w):
            raise ValueError(f"{len(lat)} latencies for {len(w)} pipelines")
        self.latencies = [x if x is not None and math.isfinite(x) and x > 0 else 0.0 for x in lat]

    def expected_delay(self, i: int, n: int) -> float:
        """Seconds a new request expects to spend in pipeline ``i`` that holds ``n`` already."""
        r = self.rates[i]
        if r <= 0:
            return math.inf
        return max(self.latencies[i], (n + 1) / r)

    def choose(self, loads: Sequence[int], allowed: Sequence[bool] | None = None) -> int:
        """The pipeline for a new request, given the requests in each (routed, not finished);
        ``allowed[i]`` False skips pipeline ``i``. -1 when none can take it."""
        best, best_d = -1, math.inf
        for i, n in enumerate(loads):
            if allowed is not None and not allowed[i]:
                continue
            d = self.expected_delay(i, n)
            if d < best_d:
                best, best_d = i, d
        return best

    @classmethod
    def for_plan(cls, plan, output_tokens: int, metrics: Sequence | None = None) -> "Dispatcher":
        """From a plan's weights and its per-pipeline predictions (``metrics``: objects with
        ``throughput``, ``tpot_s``, ``ttft_s``, e.g. evaluate_plan_pipelines'; else the figures
        stored in the plan; a plan without them routes by least load per weight)."""
        weights = [p.weight for p in plan.pipelines]
        if metrics is not None:
            lat = [m.ttft_s + (output_tokens - 1) * m.tpot_s for m in metrics]
            total = sum(m.throughput for m in metrics)
        else:
            lat = []
            for p in plan.pipelines:
                if p.ttft_ms is None or p.decode_ms_per_token is None:
                    lat = None
                    break
                lat.append((p.ttft_ms + (output_tokens - 1) * p.decode_ms_per_token) / 1e3)
            total = plan.throughput
        return cls(weights, lat, total / output_tokens if total else None)
