"""Use hexplan as a library (as in a notebook): load a cluster, plan a model, inspect the plan.

    python examples/plan_in_notebook.py
"""
from pathlib import Path

import hexplan

HERE = Path(__file__).resolve().parent
cluster = hexplan.load_cluster(HERE.parent / "cluster_specs" / "hexgen-case.yaml")

# Maximum throughput for the default workload (512-token prompts, 128-token outputs).
plan = hexplan.solve(cluster, model="llama-2-70b", time_limit=10)
print(plan)            # the table `hexplan show` prints; in Jupyter, `plan` alone shows it
print(repr(plan))      # one line: model, pipelines, GPUs, predicted throughput
print(plan.to_yaml())  # the plan file

# The plan records its nodes and their network: it simulates without the cluster (None).
from hexplan.simulator import WorkloadSpec  # noqa: E402

print(hexplan.simulate(plan, None, WorkloadSpec(rate=1.5, duration=300)))   # the `hexplan simulate` report

# The same cluster, optimised for an interactive workload: short prompts, a TPOT SLO.
interactive = hexplan.Workload(prompt_tokens=128, output_tokens=256, batch_size=8, concurrency=32)
fast = hexplan.solve(cluster, model="llama-2-70b", workload=interactive, slo_tpot_ms=150, time_limit=10)
for i, p in enumerate(fast.pipelines):
    stages = ", ".join(f"{s.node} TP{s.tp} layers {s.layers[0]}-{s.layers[1]}" for s in p.stages)
    print(f"pipeline {i}: weight {p.weight:.2f}, {p.throughput_tokens_per_s:.0f} tokens/s, "
          f"{p.decode_ms_per_token:.0f} ms/token: {stages}")

# Every plan passes the independent validator.
assert hexplan.validate_plan(plan, cluster) == []
assert hexplan.validate_plan(fast, cluster) == []
