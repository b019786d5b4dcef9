"""The pattern master LP on HiGHS (highspy) and GLOP (OR-Tools), and the integer choice of
patterns on CP-SAT and HiGHS, on the same columns.

    python bench/pattern_lp_bench.py [--only helix-42] [--time 20]

Per cluster: column generation (solver/hexplan/solver/patterns.py) runs once with each LP
backend (same time limit); the table gives the LP solves, their total seconds and the final LP
value and bound per backend; then the columns of the HiGHS run are re-solved as a master LP
with growing size (all columns, x1 to x4 copies with perturbed values) to time the LP alone,
and the integer choice over the same exact-valued columns is timed on CP-SAT and on HiGHS.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import highspy  # noqa: E402,F401  (first: OR-Tools bundles HiGHS)
import hexplan  # noqa: E402
from hexplan.solver import patterns  # noqa: E402
from hexplan.solver.problem import Problem, SolveOptions  # noqa: E402

CASES = {"helix-42": "helix-42.yaml", "synthetic-128": "synthetic-128.yaml", "gen-256": "gen:256:1"}


def load(spec):
    if spec.startswith("gen:"):
        from cluster_gen import generate
        _, g, s = spec.split(":")
        return hexplan.loads_cluster(generate(int(g), int(s)))
    return hexplan.load_cluster(ROOT / "cluster_specs" / spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append")
    ap.add_argument("--time", type=float, default=20.0)
    args = ap.parse_args()
    print(f"highspy {md.version('highspy')}, ortools {md.version('ortools')}")
    print("| cluster | LP backend | LP solves | LP seconds | ms / solve | LP value | bound |")
    print("|---|---|---|---|---|---|---|")
    extra = []
    for name, spec in CASES.items():
        if args.only and name not in args.only:
            continue
        cl = load(spec)
        res = {}
        for be in ("highs", "glop"):
            patterns.LP_STATS.clear()
            pb = Problem(cl, hexplan.load_model("llama-2-70b"), SolveOptions())
            r = patterns.pattern_bound(pb, args.time, lp_backend=be)
            n, secs = patterns.LP_STATS.get(be, [0, 0.0])
            res[be] = r
            print(f"| {name} | {be} | {n} | {secs:.3f} | {1e3 * secs / max(1, n):.2f} | {r.lp_value:.2f} | {r.bound:.2f} |",
                  flush=True)
        r = res["highs"]
        ctx = r.context
        cols = [ctx.gpus(p) for p in r.patterns]
        vals = [ctx.upper_value(p) for p in r.patterns]
        G = [k.gpus for k in ctx.kinds]
        for mult in (1, 4, 16):
            cc = cols * mult
            vv = [v * (1 - 1e-4 * (i // len(cols))) for i, v in enumerate(vals * mult)]
            row = [name, len(cc)]
            for be in ("highs", "glop"):
                t0 = time.perf_counter()
                for _ in range(5):
                    z, *_ = patterns._solve_lp(cc, vv, G, ctx.P_max, be)
                row += [(time.perf_counter() - t0) / 5 * 1e3, z]
            extra.append(row)
        ex = [ctx.exact_value(p) for p in r.patterns]
        keep = [i for i, v in enumerate(ex) if v > 0]
        ic = [cols[i] for i in keep]
        iv = [ex[i] for i in keep]
        for be in ("cpsat", "highs"):
            t0 = time.perf_counter()
            ys = patterns._solve_int(ic, iv, G, ctx.P_max, 10.0, be)
            extra.append([name, len(ic), be, (time.perf_counter() - t0) * 1e3, sum(y * v for y, v in zip(ys, iv))])
    print()
    print("| cluster | columns | HiGHS ms | HiGHS value | GLOP ms | GLOP value |")
    print("|---|---|---|---|---|---|")
    for r in extra:
        if len(r) == 6:
            print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} |")
    print()
    print("| cluster | columns | integer backend | ms | value |")
    print("|---|---|---|---|---|")
    for r in extra:
        if len(r) == 5:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
