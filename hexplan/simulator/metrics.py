"""What a simulation measured: throughput, latency percentiles, SLO attainment, utilisation.

Everything is measured over the window [warm-up, end of traffic]: output tokens produced in
it, requests completed in it (their TTFT, TPOT and end-to-end latency), stage busy time inside
it, and the time-average number of requests in the system (queued or running) for Little's
law, L = lambda x W.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SpecError
from .engine import EngineStats


def percentile(sorted_values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    x = (n - 1) * q / 100.0
    i = int(x)
    if i >= n - 1:
        return float(sorted_values[-1])
    return sorted_values[i] + (sorted_values[i + 1] - sorted_values[i]) * (x - i)


@dataclass(frozen=True)
class LatencyStats:
    """Seconds. NaN when no request was measured."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @staticmethod
    def of(values) -> "LatencyStats":
        v = sorted(x for x in values if not math.isnan(x))
        if not v:
            return LatencyStats(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return LatencyStats(len(v), sum(v) / len(v), percentile(v, 50), percentile(v, 90), percentile(v, 99), v[-1])

    def pct(self, q: int) -> float:
        return {50: self.p50, 90: self.p90, 99: self.p99}[q]

    def to_dict(self) -> dict:
        return {k: _num(getattr(self, k)) for k in ("mean", "p50", "p90", "p99", "max")} | {"count": self.count}


@dataclass(frozen=True)
class Slo:
    """Latency objectives in seconds (None: not checked)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self):
        for f in ("ttft_s", "tpot_s", "e2e_s"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or not math.isfinite(v)):
                raise SpecError(f"must be a positive number, got {v!r}", field=f"slo_{f}")

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2e_s))

    def to_dict(self) -> dict:
        return {k: v for k, v in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2e_s", self.e2e_s))
                if v is not None}


@dataclass(frozen=True)
class SimResult:
    window_s: tuple[float, float]
    throughput_tokens_per_s: float      # output tokens produced in the window / its length
    requests_per_s: float               # requests completed in the window / its length
    requests_completed: int             # in the window
    requests_arrived: int               # all arrivals (whole run)
    requests_unfinished: int            # still queued or running when the traffic ended
    requests_rejected: int              # prompt + output larger than a pipeline's KV cache
    requests_truncated: int             # cut to the model's context
    ttft_s: LatencyStats
    tpot_s: LatencyStats                # per request: (e2e - ttft) / (output tokens - 1)
    e2e_s: LatencyStats
    slo: Slo
    slo_attainment: dict                # "ttft", "tpot", "e2e", "all": share of completed requests
    stage_utilisation: tuple[tuple[float, ...], ...]   # per pipeline, per stage: busy share of the window
    link_utilisation: dict              # "a->b" between nodes
    pipelines: tuple[dict, ...]         # per pipeline: weight, routed, completed, tokens/s
    mean_in_system: float               # time-average requests queued or running (Little's L)
    arrivals_in_window: int
    predicted_throughput_tokens_per_s: float
    steps: int
    workload: dict = field(default_factory=dict)
    seed: int = 0
    kv_offloads: int = 0                # mlfq: requests whose KV cache was offloaded to host memory (whole run)
    scheduler: dict = field(default_factory=dict)   # policy, and for mlfq its counts (whole run)
    # ttft/tpot/e2e lists (plots); "request": each ttft_s / e2e_s entry's request, its index among
    # the admitted requests in arrival order (a trace's own order), to pair them with a measured run
    samples: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def window_length_s(self) -> float:
        return self.window_s[1] - self.window_s[0]

    # ---- display: the report `hexplan simulate` prints, in a terminal or a notebook --------
    def __str__(self) -> str:
        from .report import format_result   # lazily: report.py imports this module

        return format_result(self)

    def __repr__(self) -> str:
        """One line; the dataclass repr runs to pages (``str()`` gives the report)."""
        return (f"<SimResult {self.throughput_tokens_per_s:,.1f} tokens/s (plan predicts "
                f"{self.predicted_throughput_tokens_per_s:,.1f}), {self.requests_completed} requests completed, "
                f"P90 TTFT {self.ttft_s.p90:.3g} s, P90 TPOT {self.tpot_s.p90 * 1e3:.3g} ms>")

    def _repr_html_(self) -> str:
        """Jupyter shows the report, in a fixed-width font so its columns line up."""
        import html

        return f"<pre>{html.escape(str(self))}</pre>"

    @property
    def arrival_rate(self) -> float:
        return self.arrivals_in_window / self.window_length_s if self.window_length_s > 0 else math.nan

    def to_dict(self) -> dict:
        return {
            "throughput_tokens_per_s": _num(self.throughput_tokens_per_s),
            "requests_per_s": _num(self.requests_per_s),
            "requests_completed": self.requests_completed,
            "requests_arrived": self.requests_arrived,
            "requests_unfinished": self.requests_unfinished,
            "requests_rejected": self.requests_rejected,
            "requests_truncated": self.requests_truncated,
            "ttft_s": self.ttft_s.to_dict(),
            "tpot_s": self.tpot_s.to_dict(),
            "e2e_s": self.e2e_s.to_dict(),
            "slo": self.slo.to_dict() or None,
            "slo_attainment": {k: _num(v) for k, v in self.slo_attainment.items()} or None,
            "stage_utilisation": [[_num(u) for u in p] for p in self.stage_utilisation],
            "link_utilisation": {k: _num(v) for k, v in self.link_utilisation.items()},
            "pipelines": [dict(p) for p in self.pipelines],
            "littles_law": {"mean_in_system": _num(self.mean_in_system),
                            "completion_rate_per_s": _num(self.requests_per_s),
                            "mean_e2e_s": _num(self.e2e_s.mean)},
            "window_s": [_num(self.window_s[0]), _num(self.window_s[1])],
            "predicted_throughput_tokens_per_s": _num(self.predicted_throughput_tokens_per_s),
            "steps": self.steps,
            "workload": self.workload,
            "seed": self.seed,
            "kv_offloads": self.kv_offloads,
            "scheduler": dict(self.scheduler),
        }


def _num(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return round(v, 6) if isinstance(v, float) else v


def attainment(st: EngineStats, slo: Slo) -> dict:
    """Share of the requests completed in the window that met each objective, and all of them."""
    n = len(st.e2e)
    if not slo or n == 0:
        return {}
    checks = []
    if slo.ttft_s is not None:
        checks.append(("ttft", [x <= slo.ttft_s for x in st.ttft]))
    if slo.tpot_s is not None:   # a one-token output has no TPOT: it meets any TPOT objective
        checks.append(("tpot", [math.isnan(x) or x <= slo.tpot_s for x in st.tpot]))
    if slo.e2e_s is not None:
        checks.append(("e2e", [x <= slo.e2e_s for x in st.e2e]))
    out = {name: sum(ok) / n for name, ok in checks}
    out["all"] = sum(all(c) for c in zip(*(ok for _, ok in checks))) / n
    return out


def summarise(st: EngineStats, *, slo: Slo, weights, predicted: float, workload: dict, seed: int,
              keep_samples: bool = True) -> SimResult:
    w0, w1 = st.window
    span = w1 - w0
    rate = (lambda x: x / span) if span > 0 else (lambda x: math.nan)
    util = tuple(tuple(rate(b) for b in busy) for busy in st.stage_busy)
    pipes = tuple({"weight": round(w, 6), "requests_routed": st.pipe_routed[i],
                   "requests_completed": st.pipe_completed[i],
                   "throughput_tokens_per_s": _num(rate(st.pipe_tokens[i])),
                   "stage_utilisation": [_num(u) for u in util[i]]}
                  for i, w in enumerate(weights))
    return SimResult(
        window_s=(w0, w1),
        throughput_tokens_per_s=rate(st.tokens_in_window),
        requests_per_s=rate(len(st.e2e)),
        requests_completed=len(st.e2e),
        requests_arrived=st.arrived,
        requests_unfinished=st.unfinished,
        requests_rejected=st.rejected,
        requests_truncated=st.truncated,
        ttft_s=LatencyStats.of(st.ttft),
        tpot_s=LatencyStats.of(st.tpot),
        e2e_s=LatencyStats.of(st.e2e),
        slo=slo,
        slo_attainment=attainment(st, slo),
        stage_utilisation=util,
        link_utilisation={k: rate(v) for k, v in sorted(st.link_busy.items())},
        pipelines=pipes,
        mean_in_system=rate(st.in_system_area),
        arrivals_in_window=st.arrived_in_window,
        predicted_throughput_tokens_per_s=predicted,
        steps=st.steps,
        workload=workload,
        seed=seed,
        kv_offloads=st.offloads,
        scheduler={"policy": st.policy} | ({"preemptions": st.preemptions, "demotions": st.demotions,
                                            "promotions": st.promotions, "kv_offloads": st.offloads,
                                            "kv_swap_ins": st.swap_ins} if st.policy == "mlfq" else {}),
        samples={"ttft_s": st.ttft, "tpot_s": [x for x in st.tpot if not math.isnan(x)], "e2e_s": st.e2e,
                 "request": st.request} if keep_samples else {},
    )
