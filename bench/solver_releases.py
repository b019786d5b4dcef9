"""The planner on several HiGHS releases: does a new highspy change what hexplan plans?

    python bench/solver_releases.py [--versions 1.11.0,1.15.1,1.16.0] [--only helix-24-3regions]
    python bench/solver_releases.py --python /work/venv/bin/python --python /tmp/h4venv/bin/python \
                                    --time-limit 20 --only helix-24 --only gen-64

With ``--python`` (repeatable) each interpreter (a virtualenv with hexplan installed, each with
its own highspy) runs the benchmark as it is, instead of pip-installed releases; the release
is read from the benchmark's own row.

Each release is installed once into bench/.highspy/<version> (pip --target, no other package
changes) and bench/solver_bench.py runs against it in a subprocess, so the numbers come from the
same cases and time limits as the solver benchmark. Releases are run in turn, case by case, so a
busy machine slows them alike. Prints one table: release, cluster, solve seconds, plan and bound
(tokens/s), plan / bound, and the solver's status. Use it before widening highspy's range in
pyproject.toml; docs/dependencies.md has the last results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".highspy"


def install(version: str) -> Path:
    target = CACHE / version
    if not (target / "highspy").is_dir():
        print(f"# installing highspy {version} into {target}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"highspy=={version}"], check=True)
    return target


def run(version: str, case: str, time_scale: float, python: str | None = None,
        time_limit: float | None = None, method: str = "solve") -> dict:
    env = dict(os.environ)
    if python is None:
        env["PYTHONPATH"] = str(install(version))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [python or sys.executable, str(ROOT / "bench" / "solver_bench.py"), "--only", case,
               "--time-scale", str(time_scale), "--json", str(out), "--method", method]
        if time_limit:
            cmd += ["--time-limit", str(time_limit)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise SystemExit(f"highspy {version}, {case}: solver_bench failed:\n{proc.stderr}")
        (row,) = json.loads(out.read_text())
    if python is None:
        row["highspy"] = version
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default="1.11.0,1.13.1,1.15.1,1.16.0", help="comma-separated highspy releases")
    ap.add_argument("--only", action="append", help="solver_bench cases (default: helix-24, helix-24-3regions)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--time-limit", type=float, help="this limit (s) for every case (solver_bench --time-limit)")
    ap.add_argument("--python", action="append",
                    help="run solver_bench with this interpreter (a venv with its own highspy); repeatable")
    ap.add_argument("--method", choices=("solve", "patterns"), default="solve")
    args = ap.parse_args()
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    runs = [(None, p) for p in args.python] if args.python else [(v, None) for v in versions]
    cases = args.only or ["helix-24", "helix-24-3regions"]
    rows = []
    for case in cases:
        for v, py in runs:
            row = run(v, case, args.time_scale, py, args.time_limit, args.method)
            v = row["highspy"]
            print(f"# highspy {v}, {case}: {row['solve_s']:.1f} s, {row['throughput']:.1f} / "
                  f"{row['upper_bound']:.1f} tokens/s ({row['status']})", file=sys.stderr, flush=True)
            rows.append(row)
    print("| highspy | ortools | cluster | limit s | solve s | tokens/s | upper bound | plan / bound | bound from | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['highspy']} | {r.get('ortools', '-')} | {r['cluster']} | {r['time_limit']:g} | {r['solve_s']:.1f} | "
              f"{r['throughput']:.1f} | {r['upper_bound']:.1f} | {r['ratio']:.1%} | {r.get('bound_source') or '-'} | "
              f"{r['status']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
