"""Saturated throughput in the simulator against the planner's prediction, chunked prefill or not.

    python bench/saturation_bench.py [--duration 600] [--helix-time-limit 60]

For each plan, four ways to saturate it (an offline batch at t = 0, Poisson arrivals at twice
the predicted rate; the plan's 512/128 lengths or outputs uniform in 64-192), under the
gateway's default schedule (chunked prefill: B P / O prompt tokens per step while a loop has
sequences decoding, on pipelines of more than one stage) and with whole prompts in one step (--prefill-chunk = P). Prints a
markdown table of simulated output tokens/s and the share of the prediction; the results are
recorded in docs/simulator.md ("Chunked prefill").
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hexplan  # noqa: E402
from hexplan import loads_cluster  # noqa: E402
from hexplan.costmodel import Workload  # noqa: E402
from hexplan.evaluate import CostCache, evaluate_plan_pipelines  # noqa: E402
from hexplan.plan import Pipeline, Plan, Stage  # noqa: E402
from hexplan.simulator import TraceRequest, WorkloadSpec, simulate  # noqa: E402
from hexplan.validate import plan_assumptions  # noqa: E402

DEFAULT = Workload()


def plans(helix_time_limit: float):
    one = loads_cluster("name: one\nnodes:\n  - {name: n0, gpu: A100-80G, count: 1}\n")
    yield ("1x A100-80G, llama-2-13b (1 stage)", one,
           Plan(hexplan.load_model("llama-2-13b"), (Pipeline((Stage("n0", (0,), 1, (0, 40), "A100-80G"),), 1.0),),
                assumptions={"workload": DEFAULT.to_dict()}))
    four = loads_cluster("name: four\nnodes:\n  - {name: n0, gpu: A100-80G, count: 4, interconnect: 300GB/s}\n")
    stages = tuple(Stage("n0", (i,), 1, (20 * i, 20 * i + 20), "A100-80G") for i in range(4))
    yield ("4x A100-80G, llama-2-70b (4 stages)", four,
           Plan(hexplan.load_model("llama-2-70b"), (Pipeline(stages, 1.0),), assumptions={"workload": DEFAULT.to_dict()}))
    hexgen = hexplan.load_cluster(ROOT / "cluster_specs" / "hexgen-case.yaml")
    yield "hexgen-case (4 stages)", hexgen, hexplan.solve(hexgen, "llama-2-70b", time_limit=5)
    helix = hexplan.load_cluster(ROOT / "cluster_specs" / "helix-24.yaml")
    plan = hexplan.solve(helix, "llama-2-70b", time_limit=helix_time_limit)
    stages = ", ".join(str(len(p.stages)) for p in plan.pipelines)
    yield f"helix-24 ({len(plan.pipelines)} pipelines: {stages} stages)", helix, plan


def predicted(plan, cluster) -> float:
    asm = plan_assumptions(plan)
    return sum(m.throughput for m in evaluate_plan_pipelines(cluster, CostCache(plan.model, asm.workload, asm.params),
                                                             plan.pipelines))


def workloads(pred: float, w: Workload, duration: float):
    """(name, WorkloadSpec): offline batches and Poisson at 2x the predicted request rate."""
    n = int(2 * pred * duration / w.output_tokens) + 64
    rng = random.Random(0)
    fixed = (TraceRequest(0.0, w.prompt_tokens, w.output_tokens),) * n
    varied = tuple(TraceRequest(0.0, w.prompt_tokens, rng.randint(64, 192)) for _ in range(n))
    rate = 2 * pred / w.output_tokens
    return [("offline, 512/128", WorkloadSpec(arrival="trace", trace=fixed, duration=duration)),
            ("Poisson 2x, 512/128", WorkloadSpec(rate=rate, duration=duration)),
            ("offline, output 64-192", WorkloadSpec(arrival="trace", trace=varied, duration=duration)),
            ("Poisson 2x, output 64-192", WorkloadSpec(rate=rate, duration=duration, output_len="64-192"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds per run (default 600)")
    ap.add_argument("--helix-time-limit", type=float, default=60.0, help="solver time limit for helix-24 (default 60)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    header = None
    for name, cluster, plan in plans(a.helix_time_limit):
        w = plan_assumptions(plan).workload
        pred = predicted(plan, cluster)
        cases = workloads(pred, w, a.duration)
        if header is None:
            cols = [c for c, _ in cases]
            print("| plan | schedule | predicted | " + " | ".join(cols) + " |")
            print("|---" * (3 + len(cols)) + "|")
            header = True
        for sched, kw in (("default", {}), ("whole prompts", {"prefill_chunk": w.prompt_tokens})):
            cells = []
            for _, spec in cases:
                res = simulate(plan, cluster, spec, **kw, keep_samples=False)
                tput = res.throughput_tokens_per_s
                cells.append(f"{tput:.1f} ({100 * tput / pred:.0f}%)")
            print(f"| {name} | {sched} | {pred:.1f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({a.duration:.0f} s per run, {time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
