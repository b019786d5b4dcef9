"""`hexplan compare`: every planner, predicted and simulated, in one table or JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"planner", "predicted_throughput", "simulated_throughput", "p50_latency_s", "p90_latency_s", "solve_seconds"}


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hexplan.cli", "compare", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_compare_json_has_every_planner_and_hexplan_is_best():
    out = run(str(ROOT / "cluster_specs" / "hexgen-case.yaml"), "--model", "llama-2-70b", "--time-limit", "5", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    names = [r["planner"] for r in rows]
    assert names[0] == "hexplan"
    assert set(names) == {"hexplan", "homogeneous", "symmetric", "uniform", "petals", "swarm", "helix"}
    for r in rows:
        assert FIELDS <= set(r), r
        if r["predicted_throughput"] is None:
            assert r["simulated_throughput"] is None and r["reason"]
        else:
            assert r["simulated_throughput"] > 0 and r["p90_latency_s"] >= r["p50_latency_s"] > 0
    best = max(r["predicted_throughput"] or 0 for r in rows)
    assert rows[0]["predicted_throughput"] == best and rows[0]["ratio"] == 1.0


def test_compare_budget_mode_and_online_rate():
    out = run(str(ROOT / "cluster_specs" / "hexgen-case.yaml"), "--model", "llama-2-70b", "--time-limit", "3",
              "--planners", "hexplan,uniform", "--budget-per-hour", "4.7", "--rate", "0.5", "--duration", "120", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    budget = [r for r in rows if r["planner"].startswith("budget ")]
    assert budget and all(r["price_per_hour"] <= 4.7 + 1e-9 for r in budget)
    assert any(r["planner"] == "budget A6000x5" for r in budget)


def test_compare_bad_input():
    out = run(str(ROOT / "cluster_specs" / "hexgen-case.yaml"), "--model", "llama-2-70b", "--planners", "nope")
    assert out.returncode == 2 and "--planners: unknown planner 'nope'" in out.stderr
    out = run(str(ROOT / "cluster_specs" / "hexgen-case.yaml"), "--model", "llama-2-70b", "--rate", "-1")
    assert out.returncode == 2 and "--rate" in out.stderr and "Traceback" not in out.stderr
