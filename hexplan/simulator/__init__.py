"""Discrete-event simulation of a plan under traffic (docs/simulator.md).

    from hexplan.simulator import WorkloadSpec, simulate
    res = simulate(plan, cluster, WorkloadSpec(rate=2.0, duration=600), seed=0)
    print(res.throughput_tokens_per_s, res.ttft_s.p90)

workload.py makes the traffic, engine.py replays it through the plan's pipelines with the
cost model's step times, metrics.py measures the run, run.py ties them together (and sweeps
the request rate), plot.py draws the results (needs matplotlib, the ``[plot]`` extra), and
report.py and command.py render and run ``hexplan simulate`` for the CLI.
"""
from __future__ import annotations

from .engine import EngineOptions
from .metrics import LatencyStats, SimResult, Slo
from .run import Probe, Sweep, meets, simulate, sweep_rate
from .workload import LengthDist, TraceRequest, WorkloadSpec, load_trace, parse_trace

__all__ = ["EngineOptions", "LatencyStats", "LengthDist", "Probe", "SimResult", "Slo", "Sweep", "TraceRequest",
           "WorkloadSpec", "load_trace", "meets", "parse_trace", "simulate", "sweep_rate"]
