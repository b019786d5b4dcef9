"""hexplan: place and serve LLMs on heterogeneous GPU clusters.

    import hexplan
    cluster = hexplan.load_cluster("cluster_specs/hexgen-case.yaml")
    plan = hexplan.solve(cluster, model="llama-2-70b")
    print(plan.to_yaml())

The planner never imports torch or grpc; the executor lives in ``hexplan.executor``.
"""
from __future__ import annotations

from .cluster import Cluster, Link, Node, load_cluster, loads_cluster
from .costmodel import CostParams, Workload
from .errors import HexplanError, InfeasibleError, SpecError
from .gpus import CATALOG as GPU_CATALOG, GpuType
from .models import BUILTIN_MODELS, ModelSpec, load_model
from .plan import Pipeline, Plan, Stage, load_plan, loads_plan
from .simulator import SimResult, WorkloadSpec, simulate
from .validate import PlanInvalid, check_plan, validate_plan

__version__ = "0.1.0"


def solve(cluster, model="llama-2-70b", *, objective: str = "throughput", slo_tpot_ms: float | None = None,
          slo_ttft_ms: float | None = None, time_limit: float = 60.0, seed: int = 0, backend: str = "highs",
          workload: Workload | None = None, max_pipelines: int | None = None, progress=None) -> Plan:
    """Plan ``model`` on ``cluster`` (a Cluster or a path to a cluster YAML file).

    ``progress(event, **info)`` is called as the search goes (heuristic, milp, done).
    Raises SpecError for bad input and InfeasibleError when nothing fits or no SLO can be met.
    """
    from hexplan.solver import SolveOptions, solve as _solve

    if not isinstance(cluster, Cluster):
        cluster = load_cluster(cluster)
    spec = load_model(model)
    opts = SolveOptions(objective=objective, slo_tpot_ms=slo_tpot_ms, slo_ttft_ms=slo_ttft_ms,
                        time_limit=time_limit, seed=seed, backend=backend,
                        workload=workload or Workload(), max_pipelines=max_pipelines)
    return _solve(cluster, spec, opts, progress)


__all__ = [
    "BUILTIN_MODELS", "Cluster", "CostParams", "GPU_CATALOG", "GpuType", "HexplanError", "InfeasibleError",
    "Link", "ModelSpec", "Node", "Pipeline", "Plan", "PlanInvalid", "SpecError", "Stage", "Workload",
    "check_plan", "load_cluster", "load_model", "load_plan", "loads_cluster", "loads_plan", "solve",
    "validate_plan",
    "SimResult", "WorkloadSpec", "simulate",
]
