"""Upper bounds on throughput that do not depend on the search.

compute_bound: every node split into its best TP groups, every group busy all the time, layers
perfectly balanced: sum over nodes of max_partition sum(layer_rate) / L. It ignores memory,
links and concurrency, so it is loose but always valid (it is Helix's compute-only bound).

max_pipelines: no plan has more pipelines than floor(total layer capacity / L).
"""
from __future__ import annotations

from .problem import Problem


def compute_bound(problem: Problem) -> float:
    return sum(problem.best_partition_rate(n.name)[0] for n in problem.nodes) / problem.L


def layer_capacity(problem: Problem) -> float:
    return sum(problem.best_partition_rate(n.name)[1] for n in problem.nodes)


def max_pipelines(problem: Problem) -> int:
    return int(layer_capacity(problem) // problem.L)
