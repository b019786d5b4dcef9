"""The gateway's Prometheus metrics (prometheus_client, optional: without it ``Gateway.metrics``
is None and nothing is counted).

vLLM's names, meanings and buckets where vLLM has the metric (vllm/v1/metrics/loggers.py), with
its ``model_name`` label, so dashboards made for vLLM work:

* gauges ``vllm:num_requests_running`` (accepted, given a place to run, not ended),
  ``vllm:num_requests_waiting`` (accepted, not yet given a place to run: ``Status.queued``),
  ``vllm:kv_cache_usage_perc`` (0-1: KV tokens reserved by admitted requests over the live
  pipelines' KV budget);
* counters ``vllm:prompt_tokens_total`` (a request's prompt, counted once, at its first token
  or a prefill-only request's result), ``vllm:generation_tokens_total`` (tokens streamed),
  ``vllm:request_success_total{finished_reason}`` (every accepted request that ended: stop,
  length, abort (the client went away) or error);
* histograms ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds`` (each
  gap between two tokens of a request), ``vllm:e2e_request_latency_seconds`` (accepted to ended),
  ``vllm:request_queue_time_seconds`` (accepted to its first step).

hexplan's own, per pipeline and stage: ``hexplan_pipeline_state{pipeline,state}``,
``hexplan_pipeline_in_flight``, ``hexplan_pipeline_step_seconds`` (wall time of each Forward),
``hexplan_pipeline_failures_total``, ``hexplan_pipeline_predicted_tokens_per_second`` (the
plan's) and ``hexplan_pipeline_measured_tokens_per_second`` (tokens streamed over the last
60 s), ``hexplan_stage_kv_bytes`` and ``hexplan_stage_sequences`` (each stage's Stats, at most
every 5 s, asked when scraped).

Every metric lives in this object's own ``CollectorRegistry``, never the process-wide default,
so several gateways in one process do not clash. The hooks the runner and the gateway call are
small; gauges are computed when scraped (``render``), under the gateway's lock.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily


# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FINISH_REASONS = ("stop", "length", "abort", "error")     # vLLM's, less repetition
STATES = ("live", "suspect", "down", "draining", "retired")   # the last two: re-plans (replan.py)
WINDOW_S = 60.0            # measured tokens/s: over this many seconds
STATS_EVERY_S = 5.0        # stage Stats are asked at most this often (when scraped)
STATS_TIMEOUT_S = 1.0


class Metrics:
    """One gateway's metrics. ``render()`` -> (bytes, content type) for ``GET /metrics``."""

    def __init__(self, gw, predicted_tokens_per_s=None):
        self.gw = gw
        self.registry = r = CollectorRegistry(auto_describe=False)
        m = ["model_name"]
        self._prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r)
        self._generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m, registry=r)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                m + ["finished_reason"], registry=r)
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               m, buckets=TTFT_BUCKETS, registry=r)
        self._itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              m, buckets=ITL_BUCKETS, registry=r)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              m, buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self._queue = Histogram("vllm:request_queue_time_seconds",
                                "Histogram of time spent in WAITING phase for request.", m,
                                buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self._step = Histogram("hexplan_pipeline_step_seconds",
                               "Wall time of each step (one Forward down the pipeline), per pipeline.",
                               ["pipeline"], buckets=STEP_BUCKETS, registry=r)
        self._failures = Counter("hexplan_pipeline_failures",
                                 "Times the pipeline stopped (a stage did not answer, or a step stalled).",
                                 ["pipeline"], registry=r)
        r.register(_Scraped(self))
        self.predicted = list(predicted_tokens_per_s or [])   # per pipeline; None: the plan has none
        self.window_s = WINDOW_S
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._recent: dict = {}         # pipeline -> deque of [second, tokens]
        self._steps: dict = {}          # pipeline -> its step histogram's child
        self._stats: dict = {}          # (pipeline, stage) -> (node, kv_bytes, sequences)
        self._stats_at = 0.0
        self._stats_lock = threading.Lock()
        self._name = None
        self._bind()

    # ---- the model_name label ---------------------------------------------------------------
    def _bind(self) -> None:
        """Children of the model_name label: the gateway's served_model_name (re-bound if it
        changes before traffic, e.g. by --served-model-name)."""
        old, name = self._name, self.gw.served_model_name
        for metric in (self._prompt, self._generation, self._ttft, self._itl, self._e2e, self._queue):
            if old is not None:
                metric.remove(old)
        if old is not None:
            for reason in FINISH_REASONS:
                self._success.remove(old, reason)
        self._name = name
        self.prompt = self._prompt.labels(name)
        self.generation = self._generation.labels(name)
        self.ttft = self._ttft.labels(name)
        self.itl = self._itl.labels(name)
        self.e2e = self._e2e.labels(name)
        self.queue = self._queue.labels(name)
        self.success = {reason: self._success.labels(name, reason) for reason in FINISH_REASONS}

    def _check_name(self) -> None:
        if self.gw.served_model_name != self._name:
            self._bind()

    # ---- hooks (small: the step loop calls them) -----------------------------------------------
    def on_step(self, pipeline: int, seconds: float) -> None:
        h = self._steps.get(pipeline)
        if h is None:
            h = self._steps[pipeline] = self._step.labels(str(pipeline))
        h.observe(seconds)

    def on_tokens(self, pipeline: int, n: int, firsts, gaps, now: float) -> None:
        """A step streamed ``n`` tokens on ``pipeline``: ``firsts`` the requests whose first token
        it was, ``gaps`` the other tokens' times since their request's previous token."""
        self._check_name()
        self.generation.inc(n)
        for r in firsts:
            self.ttft.observe(now - r.t_submit)
            self.prompt.inc(len(r.prompt))
        for g in gaps:
            self.itl.observe(g)
        sec = int(now)
        with self._lock:
            q = self._recent.get(pipeline)
            if q is None:
                q = self._recent[pipeline] = deque()
            if q and q[-1][0] == sec:
                q[-1][1] += n
            else:
                q.append([sec, n])
                while q[0][0] < sec - self.window_s:
                    q.popleft()

    def on_request_end(self, req, reason: str) -> None:
        """An accepted request ended (Gateway.request_ended): ``reason`` stop, length, abort or error."""
        self._check_name()
        if req.prefill_only and reason == "stop":
            self.prompt.inc(len(req.prompt))
        self.success.get(reason, self.success["error"]).inc()
        self.e2e.observe(req.t_end - req.t_submit)
        if req.t_sched:
            self.queue.observe(req.t_sched - req.t_submit)

    def on_pipeline_failed(self, pipeline: int) -> None:
        self._failures.labels(str(pipeline)).inc()

    # ---- scrape -------------------------------------------------------------------------------
    def measured_tokens_per_s(self, pipeline: int, now: float | None = None) -> float:
        """Tokens streamed by ``pipeline`` over the last ``window_s`` seconds (or since start)."""
        now = time.monotonic() if now is None else now
        span = min(self.window_s, max(now - self.started, 1e-9))
        with self._lock:
            q = self._recent.get(pipeline) or ()
            n = sum(c for s, c in q if s >= now - self.window_s)
        return n / span

    def refresh_stage_stats(self, force: bool = False) -> None:
        """Ask every live pipeline's stages for Stats (all at once, STATS_TIMEOUT_S each), at
        most every STATS_EVERY_S seconds; a stage that does not answer has no series."""
        if not force and time.monotonic() - self._stats_at < STATS_EVERY_S:
            return
        if not self._stats_lock.acquire(blocking=False):
            return                      # another scrape is asking: use what it finds
        try:
            gw = self.gw
            with gw.cv:
                stages = [(p.index, si, node, addr) for p in gw.pipelines if p.alive
                          for si, (node, addr) in enumerate(zip(p.nodes, p.stages))]
            kv = gw.kv_stats(timeout=STATS_TIMEOUT_S, live_only=True)
            stats = {(pi, si): (node, *kv[addr]) for pi, si, node, addr in stages if kv.get(addr) is not None}
            self._stats = stats
            self._stats_at = time.monotonic()
        finally:
            self._stats_lock.release()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (``GET /metrics``)."""
        self._check_name()
        for p in list(self.gw.pipelines):     # a series per pipeline from the start, 0 until it fails
            self._failures.labels(str(p.index))
        self.refresh_stage_stats()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Scraped:
    """The gauges, computed at each scrape from the gateway's state (under its lock)."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.m
        gw = m.gw
        name = m._name
        now = time.monotonic()
        with gw.cv:
            sched = gw.scheduler
            queued = gw.queued_locked()
            running = len(gw.requests) - queued
            live = [pp for pp in sched.pipes if pp.alive]
            budget = sum(pp.cfg.kv_tokens for pp in live)
            used = sum(pp.kv_used for pp in live)
            loads = sched.loads()
            pipes = [(p.index, p.state) for p in gw.pipelines]
        g = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                              labels=["model_name"])
        g.add_metric([name], running)
        yield g
        g = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                              labels=["model_name"])
        g.add_metric([name], queued)
        yield g
        g = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              labels=["model_name"])
        g.add_metric([name], used / budget if budget else 0.0)
        yield g
        g = GaugeMetricFamily("hexplan_pipeline_state",
                              "1 for the pipeline's current state: live, suspect (a step stalled), down, "
                              "or after a re-plan draining or retired.",
                              labels=["pipeline", "state"])
        for pi, state in pipes:
            for s in STATES:
                g.add_metric([str(pi), s], 1.0 if s == state else 0.0)
        yield g
        g = GaugeMetricFamily("hexplan_pipeline_in_flight", "Requests routed to the pipeline and not ended.",
                              labels=["pipeline"])
        for pi, _ in pipes:
            g.add_metric([str(pi)], loads[pi] if pi < len(loads) else 0)
        yield g
        g = GaugeMetricFamily("hexplan_pipeline_predicted_tokens_per_second",
                              "The plan's predicted output tokens/s of the pipeline at its workload.",
                              labels=["pipeline"])
        for pi, _ in pipes:
            if pi < len(m.predicted) and m.predicted[pi]:
                g.add_metric([str(pi)], m.predicted[pi])
        yield g
        g = GaugeMetricFamily("hexplan_pipeline_measured_tokens_per_second",
                              f"Output tokens/s the pipeline streamed over the last {m.window_s:g} s.",
                              labels=["pipeline"])
        for pi, _ in pipes:
            g.add_metric([str(pi)], m.measured_tokens_per_s(pi, now))
        yield g
        kv = GaugeMetricFamily("hexplan_stage_kv_bytes", "KV cache bytes the stage holds (its last Stats).",
                               labels=["pipeline", "stage", "node"])
        seqs = GaugeMetricFamily("hexplan_stage_sequences", "Sequences whose KV cache the stage holds (its last Stats).",
                                 labels=["pipeline", "stage", "node"])
        for (pi, si), (node, kv_bytes, n) in sorted(m._stats.items()):
            kv.add_metric([str(pi), str(si), node], kv_bytes)
            seqs.add_metric([str(pi), str(si), node], n)
        yield kv
        yield seqs
