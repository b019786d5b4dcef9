"""Text renderings of clusters and plans: what `hexplan show` and `hexplan solve` print, and what
a Plan shows in a notebook (``str(plan)``). Strings only, no IO; the CLI does the printing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for annotations only: hexplan.plan imports this module lazily
    from .cluster import Cluster
    from .plan import Plan


def gpu_summary(cluster: "Cluster") -> str:
    counts: dict = {}
    for n in cluster.nodes:
        counts[n.gpu.name] = counts.get(n.gpu.name, 0) + n.count
    return f"{cluster.total_gpus} GPUs: " + ", ".join(f"{c}x {g}" for g, c in counts.items())


def table(header, rows) -> str:
    cols = list(zip(*([header] + [tuple(str(x) for x in r) for r in rows])))
    widths = [max(len(x) for x in c) for c in cols]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_plan(plan: "Plan", cluster: "Cluster | None" = None) -> str:
    """A readable summary: one diagram line per pipeline, a stage table and the predictions."""
    out = []
    m = plan.model
    out.append(f"plan for {m.name} ({m.num_layers} layers), {len(plan.pipelines)} pipeline(s), {plan.num_gpus} GPUs")
    coord = (plan.cluster or {}).get("coordinator")
    coord = f"coordinator({coord})" if coord else "coordinator"
    for i, p in enumerate(plan.pipelines):
        hops = " -> ".join(f"{s.node}[{_gpus(s.gpus)}] TP{s.tp}{f' shift SP{s.shift_sp}' if s.shifted else ''} "
                           f"L{s.layers[0]}-{s.layers[1] - 1}" for s in p.stages)
        out.append(f"  pipeline {i} ({p.weight:.0%} of requests): {coord} -> {hops} -> {coord}")
    rows = []
    for i, p in enumerate(plan.pipelines):
        for j, s in enumerate(p.stages):
            rows.append((i if j == 0 else "", f"{p.weight:.3f}" if j == 0 else "",
                         _fmt(p.throughput_tokens_per_s) if j == 0 else "", j, s.node, s.gpu or "", _gpus(s.gpus),
                         f"{s.tp} (shift sp {s.shift_sp})" if s.shifted else s.tp,
                         f"[{s.layers[0]}, {s.layers[1]})", s.num_layers))
    out.append("")
    out.append(table(("pipeline", "weight", "tokens/s", "stage", "node", "gpu", "gpus", "tp", "layers", "#layers"), rows))
    pr = plan.predicted or {}
    if pr:
        out.append("")
        tp, ub = pr.get("throughput_tokens_per_s"), pr.get("upper_bound_tokens_per_s")
        line = f"predicted throughput {_fmt(tp)} tokens/s"
        if ub and tp is not None:
            line += f" (upper bound {_fmt(ub)}, {tp / ub:.1%} of it)"
        out.append(line)
        out.append(f"time per output token {_fmt(pr.get('decode_ms_per_token'))} ms, time to first token "
                   f"{_fmt(pr.get('ttft_ms'))} ms (routing-weighted, no queueing)")
    if plan.solver:
        out.append(format_solver(plan.solver, pr))
    wl = (plan.assumptions or {}).get("workload")
    if wl:
        out.append("workload: " + ", ".join(f"{k} {v}" for k, v in wl.items()))
    return "\n".join(out)


_MILP = {"optimal": "MILP optimal in {t} s", "time_limit": "MILP stopped at the time limit after {t} s",
         "feasible": "MILP stopped with a feasible point after {t} s", "infeasible": "MILP infeasible after {t} s",
         "error": "MILP failed after {t} s"}


def format_solver(so: dict, predicted: dict) -> str:
    """The solver's report, keeping apart what the MILP reached and how good the plan is.

    The MILP (solver/hexplan/solver/formulation.py) is a relaxation of the exact cost model: "MILP optimal"
    means its relaxed problem was solved, its optimum being an upper bound on throughput, not
    that the plan is optimal. The plan is judged by its gap to the upper bound (``predicted.gap``;
    the bound is the MILP's, or the compute-only bound of solver/hexplan/solver/bounds.py when tighter), which
    holds whatever the MILP's status.
    """
    name, backend = so.get("name"), so.get("backend")
    who = f"{name} baseline" if name and name != "hexplan" else str(backend or name or "unknown")
    parts = []
    if "milp_status" in so:
        status = so["milp_status"]
        steps = [f"heuristic {_fmt(so['heuristic_tokens_per_s'])} tokens/s"] if "heuristic_tokens_per_s" in so else []
        if backend == "none":
            steps.append("no MILP (--solver none)")
        elif status == "skipped":
            steps.append("MILP skipped")
        else:
            steps.append(_MILP.get(status, f"MILP {status} after {{t}} s").format(t=_fmt(so.get("milp_seconds"))))
        parts.append(" then ".join(steps))
    gap = predicted.get("gap")
    if isinstance(gap, (int, float)) and not isinstance(gap, bool):
        parts.append("plan optimal: it reaches its upper bound" if gap <= 1e-4 else
                     f"plan within {gap:.2%} of its upper bound")
    elif so.get("status"):
        parts.append(f"plan {so['status']}")
    if so.get("seconds") is not None:
        parts.append(f"{_fmt(so['seconds'])} s in all")
    return f"solver: {who}" + (", " + "; ".join(parts) if parts else "")


def _gpus(g) -> str:
    g = list(g)
    if len(g) > 1 and g == list(range(g[0], g[0] + len(g))):
        return f"{g[0]}-{g[-1]}"
    return ",".join(map(str, g))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)
