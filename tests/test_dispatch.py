"""Shortest-expected-delay routing (hexplan.dispatch), alone and in the simulator."""
from __future__ import annotations

import pytest

import hexplan
from hexplan import loads_cluster
from hexplan.costmodel import Workload
from hexplan.dispatch import Dispatcher
from hexplan.evaluate import CostCache, evaluate_plan_pipelines
from hexplan.plan import Pipeline, Plan, Stage
from hexplan.simulator import WorkloadSpec, simulate


def fill(d: Dispatcher, n: int, loads=None) -> list[int]:
    """Route n requests that never finish; the loads afterwards."""
    loads = list(loads or [0] * len(d.rates))
    for _ in range(n):
        loads[d.choose(loads)] += 1
    return loads


def test_light_load_goes_to_the_fastest_pipeline():
    # Pipeline 1 is slower (60 s) but has most of the throughput; a lone request goes to 0.
    d = Dispatcher([0.25, 0.75], [10.0, 60.0], total_requests_per_s=4.0)   # rates 1 and 3 req/s
    assert d.choose([0, 0]) == 0
    assert d.expected_delay(0, 0) == 10.0 and d.expected_delay(1, 0) == 60.0
    # Pipeline 0 takes requests until (n + 1) / (1 req/s) passes the 60 s of pipeline 1
    # (a tie goes to the lower index).
    loads = fill(d, 60)
    assert loads == [60, 0]
    assert fill(d, 1, loads) == [60, 1]


def test_heavy_load_follows_the_weights():
    d = Dispatcher([0.2, 0.3, 0.5], [5.0, 1.0, 30.0], total_requests_per_s=10.0)
    loads = fill(d, 10_000)
    shares = [n / 10_000 for n in loads]
    assert shares == pytest.approx([0.2, 0.3, 0.5], abs=0.002)


def test_without_predictions_least_load_per_weight():
    d = Dispatcher([1.0, 3.0])
    assert fill(d, 4) == [1, 3]
    assert fill(d, 400) == [100, 300]


def test_skips_pipelines_not_allowed_and_weight_zero():
    d = Dispatcher([1.0, 0.0, 1.0])
    assert d.choose([5, 0, 9], [False, True, True]) == 2
    assert d.choose([0, 0, 0], [False, True, False]) == -1      # weight 0 never takes requests
    assert Dispatcher([0.0, 0.0]).choose([3, 1]) == 1           # no weights at all: equal shares


def two_speed_plan():
    """Llama-2-13B: one A100-80G (fast) and a 2-stage pipeline of two L4s (slow)."""
    cluster = loads_cluster("name: two\nnodes:\n  - {name: a, gpu: A100-80G, count: 1}\n"
                            "  - {name: b, gpu: L4, count: 1}\n  - {name: c, gpu: L4, count: 1}\n"
                            "network:\n  default: {bandwidth: 10Gbps, latency: 1ms}\n")
    w = Workload(concurrency=32)
    model = hexplan.load_model("llama-2-13b")
    pipes = (Pipeline((Stage("a", (0,), 1, (0, 40), "A100-80G"),), 0.0),
             Pipeline((Stage("b", (0,), 1, (0, 20), "L4"), Stage("c", (0,), 1, (20, 40), "L4")), 0.0))
    ms = evaluate_plan_pipelines(cluster, CostCache(model, w), pipes)
    total = sum(m.throughput for m in ms)
    pipes = tuple(Pipeline(p.stages, m.throughput / total) for p, m in zip(pipes, ms))
    return Plan(model, pipes, assumptions={"workload": w.to_dict()}), cluster, ms


def test_simulator_routes_light_load_to_the_fast_pipeline_and_keeps_the_throughput():
    plan, cluster, ms = two_speed_plan()
    assert ms[0].tpot_s < ms[1].tpot_s                        # the A100 is the fast one
    total = sum(m.throughput for m in ms)
    light = WorkloadSpec(rate=0.2 * total / 128, duration=1200.0)
    by_delay = simulate(plan, cluster, light, seed=3)
    by_weight = simulate(plan, cluster, light, seed=3, routing="weights")
    assert by_delay.pipelines[1]["requests_routed"] < 0.05 * by_delay.pipelines[0]["requests_routed"]
    assert by_delay.e2e_s.p90 < 0.8 * by_weight.e2e_s.p90
    heavy = WorkloadSpec(rate=2 * total / 128, duration=900.0)
    sat_delay = simulate(plan, cluster, heavy, seed=3).throughput_tokens_per_s
    sat_weight = simulate(plan, cluster, heavy, seed=3, routing="weights").throughput_tokens_per_s
    assert sat_delay >= 0.98 * sat_weight
    assert sat_delay == pytest.approx(total, rel=0.1)
