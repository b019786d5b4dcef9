"""hexplan: place and serve LLMs on heterogeneous GPU clusters.

    import hexplan
    cluster = hexplan.load_cluster("cluster_specs/hexgen-case.yaml")
    plan = hexplan.solve(cluster, model="llama-2-70b")
    print(plan.to_yaml())

The planner never imports torch or grpc; the executor lives in ``hexplan.executor``.

One package, three source folders: ``hexplan/`` (specs, cost model, plans, simulator, CLI),
``solver/hexplan/solver/`` and ``executor/hexplan/executor/``. A module's file is always
``<folder>/hexplan/<dotted path>.py``. An installed wheel merges them into one ``hexplan/``;
in a source checkout (editable install, or run from the source root) the two sibling folders
are added to this package's ``__path__`` below, so ``hexplan.solver`` resolves to the checkout's
``solver/hexplan/solver`` and never to a mix of checkout and install.
"""
from __future__ import annotations

import os as _os


def _span_source_folders() -> None:
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for folder in ("solver", "executor"):
        portion = _os.path.join(root, folder, "hexplan")
        if _os.path.isfile(_os.path.join(portion, folder, "__init__.py")) and portion not in __path__:
            __path__.append(portion)


_span_source_folders()

from .cluster import Cluster, Link, Node, load_cluster, loads_cluster
from .costmodel import CostParams, Workload
from .errors import HexplanError, InfeasibleError, SpecError
from .gpus import CATALOG as GPU_CATALOG, GpuType
from .models import BUILTIN_MODELS, ModelSpec, load_model
from .plan import Pipeline, Plan, Stage, load_plan, loads_plan, plan_cluster
from .validate import PlanInvalid, check_plan, validate_plan

__version__ = "0.1.0"

_LAZY = {"SimResult": "hexplan.simulator", "WorkloadSpec": "hexplan.simulator",
         "simulate": "hexplan.simulator"}


def __getattr__(name: str):
    """The simulator is imported on first use (``hexplan.simulate``), not with ``import hexplan``."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hexplan' has no attribute {name!r}")


def solve(cluster, model="llama-2-70b", *, objective: str = "throughput", slo_tpot_ms: float | None = None,
          slo_ttft_ms: float | None = None, time_limit: float = 60.0, seed: int = 0, backend: str = "highs",
          workload: Workload | None = None, max_pipelines: int | None = None, shift: bool = False,
          progress=None) -> Plan:
    """Plan ``model`` on ``cluster`` (a Cluster or a path to a cluster YAML file).

    ``progress(event, **info)`` is called as the search goes (heuristic, milp, done), and
    ``heartbeat`` (phase, incumbent, bound) every few seconds while it runs. ``shift``: let
    stages of TP >= 2 run shifted (Shift Parallelism) where that helps the objective and fits.
    The plan records the nodes it uses and their network (hexplan.cluster.cluster_to_dict), so it can
    be simulated without the cluster. Raises SpecError for bad input and InfeasibleError when
    nothing fits or no SLO can be met.
    """
    from hexplan.solver import SolveOptions, solve as _solve

    if not isinstance(cluster, Cluster):
        cluster = load_cluster(cluster)
    spec = load_model(model)
    opts = SolveOptions(objective=objective, slo_tpot_ms=slo_tpot_ms, slo_ttft_ms=slo_ttft_ms,
                        time_limit=time_limit, seed=seed, backend=backend,
                        workload=workload or Workload(), max_pipelines=max_pipelines, shift=shift)
    return _solve(cluster, spec, opts, progress)


__all__ = [
    "BUILTIN_MODELS", "Cluster", "CostParams", "GPU_CATALOG", "GpuType", "HexplanError", "InfeasibleError",
    "Link", "ModelSpec", "Node", "Pipeline", "Plan", "PlanInvalid", "SpecError", "Stage", "Workload",
    "check_plan", "load_cluster", "load_model", "load_plan", "loads_cluster", "loads_plan", "plan_cluster", "solve",
    "validate_plan",
    "SimResult", "WorkloadSpec", "simulate",
]
