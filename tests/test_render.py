"""What plans and simulation results look like: `hexplan show`, the solver's report line, and
Plan / SimResult in a notebook (str: the CLI's table, repr: one line, HTML: the table in <pre>)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import hexplan
from hexplan.cli import format_plan as cli_format_plan
from hexplan.plan import Pipeline, Plan, Stage, loads_plan
from hexplan.render import format_plan, format_solver
from hexplan.simulator import WorkloadSpec, simulate
from hexplan.simulator.report import format_result

ROOT = Path(__file__).resolve().parent.parent
HEXGEN = ROOT / "cluster_specs" / "hexgen-case.yaml"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "hexgen.plan.yaml"
    r = cli("solve", HEXGEN, "-m", "llama-2-70b", "--time-limit", "5", "-o", out)
    assert r.returncode == 0, r.stderr
    return out, r


def test_plan_str_is_the_show_table(solved):
    path, _ = solved
    plan = hexplan.load_plan(path)
    shown = cli("show", path)
    assert shown.returncode == 0, shown.stderr
    assert str(plan) + "\n" == shown.stdout == format_plan(plan) + "\n"
    assert cli_format_plan is format_plan   # the CLI prints the same function's text
    assert str(plan).startswith("plan for llama-2-70b (80 layers), 1 pipeline(s), 8 GPUs\n")


def test_plan_repr_is_one_line_and_html_is_the_table(solved):
    plan = hexplan.load_plan(solved[0])
    r = repr(plan)
    assert "\n" not in r and len(r) < 100
    assert r == f"<Plan llama-2-70b: 1 pipeline, 8 GPUs, {plan.throughput:,.1f} tokens/s predicted>"
    html = plan._repr_html_()
    assert html.startswith("<pre>plan for llama-2-70b") and html.endswith("</pre>")
    assert "coordinator(n0) -&gt; n2[0-1]" in html and "->" not in html
    # A hand-written plan without predictions: no throughput in the repr, a table all the same.
    bare = Plan(hexplan.load_model("llama-2-7b"), (Pipeline((Stage("n0", (0, 1), 2, (0, 32)),), 1.0),
                                                    Pipeline((Stage("n1", (0,), 1, (0, 32)),), 0.0)))
    assert repr(bare) == "<Plan llama-2-7b: 2 pipelines, 3 GPUs>"
    assert "n1[0] TP1 L0-31" in str(bare) and "solver:" not in str(bare)


def test_plan_equality_still_compares_fields(solved):
    plan = hexplan.load_plan(solved[0])
    assert loads_plan(plan.to_yaml()) == plan and loads_plan(plan.to_json()) == plan
    assert replace(plan, solver={}) != plan
    assert replace(plan, pipelines=plan.pipelines[:0] + (replace(plan.pipelines[0], weight=0.5),)) != plan


def test_sim_result_str_repr_html(solved):
    plan = hexplan.load_plan(solved[0])
    spec = WorkloadSpec(rate=1.0, duration=120)
    res = simulate(plan, None, spec, seed=2)
    assert str(res) == format_result(res)
    assert "TTFT (s)" in str(res) and "stage utilisation" in str(res)
    r = repr(res)
    assert "\n" not in r and len(r) < 160 and r.startswith(f"<SimResult {res.throughput_tokens_per_s:,.1f} tokens/s")
    assert f"{res.requests_completed} requests completed" in r
    assert res._repr_html_().startswith("<pre>poisson arrivals at 1 requests/s")
    assert simulate(plan, None, spec, seed=2) == res and simulate(plan, None, spec, seed=3) != res


# ---- the solver's report line ----------------------------------------------------------------------

HEXPLAN = {"name": "hexplan", "backend": "highs", "status": "feasible", "seconds": 0.114, "time_limit": 5.0,
           "heuristic_tokens_per_s": 277.191, "milp_seconds": 0.0319, "milp_status": "optimal"}


@pytest.mark.parametrize("solver, gap, line", [
    # The MILP solved its relaxed model; the plan is 0.13% below the bound: both said, apart.
    (HEXPLAN, 0.0012554, "solver: highs, heuristic 277.2 tokens/s then MILP optimal in 0.0319 s; "
                         "plan within 0.13% of its upper bound; 0.114 s in all"),
    ({**HEXPLAN, "status": "optimal"}, 0.0, "solver: highs, heuristic 277.2 tokens/s then MILP optimal in 0.0319 s; "
                                            "plan optimal: it reaches its upper bound; 0.114 s in all"),
    ({**HEXPLAN, "status": "time_limit", "milp_status": "time_limit", "milp_seconds": 55.2}, 0.031,
     "solver: highs, heuristic 277.2 tokens/s then MILP stopped at the time limit after 55.2 s; "
     "plan within 3.10% of its upper bound; 0.114 s in all"),
    ({**HEXPLAN, "backend": "none", "milp_status": "skipped"}, 0.02,
     "solver: none, heuristic 277.2 tokens/s then no MILP (--solver none); plan within 2.00% of its upper bound; "
     "0.114 s in all"),
    ({**HEXPLAN, "milp_status": "skipped"}, 0.004,
     "solver: highs, heuristic 277.2 tokens/s then MILP skipped; plan within 0.40% of its upper bound; 0.114 s in all"),
    ({"name": "petals", "backend": "none", "status": "feasible", "seconds": 0.5}, 0.2,
     "solver: petals baseline, plan within 20.00% of its upper bound; 0.5 s in all"),
    ({"status": "feasible"}, None, "solver: unknown, plan feasible"),
])
def test_solver_line(solver, gap, line):
    assert format_solver(solver, {} if gap is None else {"gap": gap}) == line


def test_solve_prints_the_solver_line_and_where_the_plan_went(solved):
    path, r = solved
    line = next(x for x in r.stdout.splitlines() if x.startswith("solver: "))
    assert line.startswith("solver: highs, heuristic ") and "; plan " in line and " s in all" in line
    assert "feasible" not in line   # the old line read "highs feasible ... (MILP optimal)"
    assert r.stderr.splitlines()[-1] == f"hexplan: plan written to {path}" and "written" not in r.stdout
