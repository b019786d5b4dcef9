"""A small solver-neutral MILP container and its backends: HiGHS (highspy), CBC (PuLP) and
SCIP through OR-Tools (``ortools``, the optional extra).

OR-Tools' wheel bundles its own HiGHS: loading it next to highspy 1.15.x in one process fails
with undefined symbols (ortools 9.15; highspy 1.11 and 1.16 load beside it), so highspy is
always imported first (``patterns.ortools_available``) and the ``ortools`` backend is only used
when asked for.

The formulation (solver/hexplan/solver/formulation.py) writes rows into ``LinearModel``; a backend solves it
and returns a ``MilpResult``. Every variable carries a readable name (``x[n0/tp4#0,p1]``) so a
model dump (``LinearModel.to_lp()``) can be read by a person.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

INF = math.inf


@dataclass
class LinearModel:
    names: list = field(default_factory=list)
    lb: list = field(default_factory=list)
    ub: list = field(default_factory=list)
    integer: list = field(default_factory=list)
    rows: list = field(default_factory=list)       # (dict index -> coef, lo, hi, name)
    objective: dict = field(default_factory=dict)  # maximised

    def var(self, name: str, lb: float = 0.0, ub: float = INF, integer: bool = False) -> int:
        self.names.append(name)
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(integer)
        return len(self.names) - 1

    def binary(self, name: str) -> int:
        return self.var(name, 0.0, 1.0, True)

    def add(self, coeffs: dict, lo: float = -INF, hi: float = INF, name: str = "") -> None:
        coeffs = {i: c for i, c in coeffs.items() if c != 0}
        if coeffs:
            self.rows.append((coeffs, lo, hi, name or f"r{len(self.rows)}"))

    @property
    def num_vars(self) -> int:
        return len(self.names)

    def violations(self, values, tol: float = 1e-6) -> list[str]:
        """Names of rows and bounds that ``values`` violates (to check warm starts)."""
        out = []
        for i, v in enumerate(values):
            if v < self.lb[i] - tol or v > self.ub[i] + tol:
                out.append(f"bound {self.names[i]}={v}")
        for coeffs, lo, hi, name in self.rows:
            a = sum(c * values[i] for i, c in coeffs.items())
            scale = tol * max(1.0, abs(lo) if lo > -INF else 0, abs(hi) if hi < INF else 0)
            if a < lo - scale or a > hi + scale:
                out.append(f"{name}: {a} not in [{lo}, {hi}]")
        return out

    def to_lp(self) -> str:
        """A readable dump (CPLEX-LP-like) for debugging."""
        def expr(c):
            return " ".join(f"{'+' if v >= 0 else '-'} {abs(v):g} {self.names[i]}" for i, v in c.items())
        out = ["Maximize", " obj: " + expr(self.objective), "Subject To"]
        for c, lo, hi, name in self.rows:
            if lo == hi:
                out.append(f" {name}: {expr(c)} = {lo:g}")
            else:
                if lo > -INF:
                    out.append(f" {name}_lo: {expr(c)} >= {lo:g}")
                if hi < INF:
                    out.append(f" {name}_hi: {expr(c)} <= {hi:g}")
        out.append("End")
        return "\n".join(out)


@dataclass
class MilpResult:
    status: str                 # optimal | feasible | time_limit | infeasible | error
    values: list | None
    objective: float | None
    bound: float | None         # best proven upper bound on the (maximised) objective
    seconds: float
    backend: str


def solve(model: LinearModel, backend: str = "highs", time_limit: float = 60.0, seed: int = 0,
          warm_start: list | None = None, on_incumbent=None, on_bound=None) -> MilpResult:
    """``on_incumbent(obj, bound, seconds)`` at each improving solution; ``on_bound(bound,
    incumbent)`` at most once a second while branch-and-bound runs (HiGHS only)."""
    if backend == "highs":
        return _solve_highs(model, time_limit, seed, warm_start, on_incumbent, on_bound)
    if backend == "cbc":
        return _solve_cbc(model, time_limit, seed, warm_start)
    if backend == "ortools":
        with native_stdout_silenced():
            return _solve_ortools(model, time_limit, seed, warm_start)
    raise ValueError(f"unknown MILP backend {backend!r}; use highs, cbc or ortools")


@contextlib.contextmanager
def native_stdout_silenced():
    """Send whatever native code writes to file descriptor 1 to /dev/null while the block runs.

    highspy 1.16 prints a banner on stdout when ``Highs()`` is created, before ``output_flag``
    can be switched off; stdout is for results (``-o -``, ``--json``), so every solver call runs
    inside this. C stdio buffers are flushed before fd 1 is given back, so nothing written inside
    leaks out later. Python's ``sys.stdout`` is flushed first; anything written to fd 1 inside
    the block is dropped, so callers print nothing there (progress goes to stderr, untouched).
    """
    fd = 1                           # where native code writes, whatever sys.stdout is now
    sys.stdout.flush()
    try:
        saved = os.dup(fd)
    except OSError:                  # no fd 1 to guard (closed stdout)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to reach (not seen on Linux or macOS)
        pass


# ---- HiGHS ----------------------------------------------------------------------------

def _solve_highs(model, time_limit, seed, warm, on_incumbent, on_bound=None) -> MilpResult:
    with native_stdout_silenced():
        return _solve_highs_inner(model, time_limit, seed, warm, on_incumbent, on_bound)


def relaxed(model: LinearModel) -> LinearModel:
    """The LP relaxation: the same rows, every variable continuous."""
    return LinearModel(model.names, model.lb, model.ub, [False] * model.num_vars, model.rows, model.objective)


def _solve_highs_inner(model, time_limit, seed, warm, on_incumbent, on_bound=None) -> MilpResult:
    import highspy
    import numpy as np

    t0 = time.perf_counter()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(max(0.1, time_limit)))
    h.setOptionValue("random_seed", int(seed) % (2 ** 31))
    h.setOptionValue("mip_rel_gap", 1e-4)
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    n = model.num_vars
    lp.num_col_ = n
    lp.num_row_ = len(model.rows)
    cost = np.zeros(n)
    for i, c in model.objective.items():
        cost[i] = -c  # HiGHS minimises
    lp.col_cost_ = cost
    lp.col_lower_ = np.array(model.lb, dtype=float)
    lp.col_upper_ = np.array([u if u < INF else highspy.kHighsInf for u in model.ub], dtype=float)
    lp.row_lower_ = np.array([lo if lo > -INF else -highspy.kHighsInf for _, lo, _, _ in model.rows], dtype=float)
    lp.row_upper_ = np.array([hi if hi < INF else highspy.kHighsInf for _, _, hi, _ in model.rows], dtype=float)
    cols: list[list] = [[] for _ in range(n)]
    for r, (coeffs, _, _, _) in enumerate(model.rows):
        for i, c in coeffs.items():
            cols[i].append((r, c))
    start, index, value = [0], [], []
    for col in cols:
        for r, c in col:
            index.append(r)
            value.append(c)
        start.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(start, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=float)
    lp.integrality_ = [highspy.HighsVarType.kInteger if z else highspy.HighsVarType.kContinuous
                       for z in model.integer]
    h.passModel(lp)
    if warm is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(map(float, warm))
        sol.value_valid = True
        h.setSolution(sol)
    if on_incumbent is not None:
        def _cb(e):
            d = e.data_out
            on_incumbent(-d.objective_function_value, -d.mip_dual_bound, d.running_time)
        h.cbMipImprovingSolution.subscribe(_cb)
    if on_bound is not None:
        last = [time.perf_counter()]

        def _cb_bound(e):
            now = time.perf_counter()
            if now - last[0] >= 1.0:
                last[0] = now
                d = e.data_out
                if math.isfinite(d.mip_dual_bound):
                    on_bound(-d.mip_dual_bound, -d.mip_primal_bound if math.isfinite(d.mip_primal_bound) else None)
        h.cbMipInterrupt.subscribe(_cb_bound)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    S = highspy.HighsModelStatus
    has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
    if status == S.kOptimal:
        st = "optimal"
    elif status in (S.kTimeLimit, S.kIterationLimit, S.kInterrupt, S.kSolutionLimit):
        st = "time_limit"
    elif status == S.kInfeasible:
        st = "infeasible"
    else:
        st = "feasible" if has_sol else "error"
    values = list(h.getSolution().col_value) if has_sol else None
    obj = -info.objective_function_value if has_sol else None
    bound = -info.mip_dual_bound if math.isfinite(info.mip_dual_bound) else None
    if st == "optimal" and obj is not None:
        bound = obj if bound is None else max(bound, obj)
    return MilpResult(st, values, obj, bound, time.perf_counter() - t0, "highs")


# ---- CBC (PuLP) -------------------------------------------------------------------------

def _solve_cbc(model, time_limit, seed, warm) -> MilpResult:
    with warnings.catch_warnings(), native_stdout_silenced():  # PuLP 3.x announces its 4.0 API
        warnings.simplefilter("ignore", DeprecationWarning)
        return _solve_cbc_inner(model, time_limit, seed, warm)


def _solve_cbc_inner(model, time_limit, seed, warm) -> MilpResult:
    import pulp

    t0 = time.perf_counter()
    prob = pulp.LpProblem("hexplan", pulp.LpMaximize)
    vs = []
    for i, name in enumerate(model.names):
        safe = f"v{i}"
        vs.append(pulp.LpVariable(safe, lowBound=model.lb[i], upBound=None if model.ub[i] == INF else model.ub[i],
                                  cat=pulp.LpInteger if model.integer[i] else pulp.LpContinuous))
    prob += pulp.lpSum(c * vs[i] for i, c in model.objective.items())
    for coeffs, lo, hi, name in model.rows:
        e = pulp.lpSum(c * vs[i] for i, c in coeffs.items())
        if lo == hi:
            prob += e == lo
        else:
            if lo > -INF:
                prob += e >= lo
            if hi < INF:
                prob += e <= hi
    if warm is not None:
        for i, (v, x) in enumerate(zip(vs, warm)):
            x = min(max(x, model.lb[i]), model.ub[i])  # PuLP rejects values a rounding step outside
            v.setInitialValue(round(x) if v.cat == pulp.LpInteger else x)
    # CBC counts only its own search: building the model here, writing it out and reading the
    # solution back (about twice the build time) come out of the limit.
    built = time.perf_counter() - t0
    limit = max(0.5, round(time_limit - 2.5 * built, 1))
    kw = dict(msg=False, timeLimit=limit, timeMode="elapsed", warmStart=warm is not None,
              options=[f"randomSeed {int(seed) % 2**31 or 1}", "randomCbcSeed 1"], threads=1)
    solver = pulp.COIN_CMD(**kw)
    if not solver.available():  # no `cbc` on PATH (pulp[cbc] installs one): PuLP's bundled binary
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(**kw)
    prob.solve(solver)
    st = pulp.LpStatus[prob.status]
    values = [v.value() if v.value() is not None else 0.0 for v in vs]
    has = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    obj = pulp.value(prob.objective) if has else None
    status = {"Optimal": "optimal"}.get(st, "infeasible" if st == "Infeasible" else "time_limit")
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "time_limit"
    return MilpResult(status, values if has else None, obj, obj if status == "optimal" else None,
                      time.perf_counter() - t0, "cbc")


# ---- OR-Tools (SCIP through pywraplp) -------------------------------------------------

def _solve_ortools(model, time_limit, seed, warm) -> MilpResult:
    """The model with SCIP, as OR-Tools' wheel bundles it (one thread, the seed, the warm start
    as a hint). SCIP's dual bound is reported at the time limit as HiGHS's is."""
    from .patterns import ortools_available
    if not ortools_available():
        raise RuntimeError("the ortools backend needs OR-Tools (pip install 'hexplan[ortools]')")
    from ortools.linear_solver import pywraplp

    t0 = time.perf_counter()
    s = pywraplp.Solver.CreateSolver("SCIP")
    if s is None:
        raise RuntimeError("this OR-Tools build has no SCIP")
    inf = s.infinity()
    vs = []
    for i, name in enumerate(model.names):
        lo = model.lb[i] if model.lb[i] > -INF else -inf
        hi = model.ub[i] if model.ub[i] < INF else inf
        vs.append(s.IntVar(lo, hi, f"v{i}") if model.integer[i] else s.NumVar(lo, hi, f"v{i}"))
    for coeffs, lo, hi, name in model.rows:
        c = s.Constraint(lo if lo > -INF else -inf, hi if hi < INF else inf)
        for i, a in coeffs.items():
            c.SetCoefficient(vs[i], a)
    obj = s.Objective()
    for i, a in model.objective.items():
        obj.SetCoefficient(vs[i], a)
    obj.SetMaximization()
    if warm is not None:
        s.SetHint(vs, [min(max(x, model.lb[i]), model.ub[i]) for i, x in enumerate(warm)])
    s.SetNumThreads(1)
    s.SetSolverSpecificParametersAsString(f"randomization/randomseedshift = {int(seed) % 2**31}\n")
    s.SetTimeLimit(int(max(0.1, time_limit - (time.perf_counter() - t0)) * 1000))
    st = s.Solve()
    has = st in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)
    status = {pywraplp.Solver.OPTIMAL: "optimal", pywraplp.Solver.FEASIBLE: "time_limit",
              pywraplp.Solver.INFEASIBLE: "infeasible"}.get(st, "time_limit" if st == pywraplp.Solver.NOT_SOLVED
                                                             else "error")
    values = [v.solution_value() for v in vs] if has else None
    objective = obj.Value() if has else None
    bound = None
    if status in ("optimal", "time_limit"):
        try:
            b = obj.BestBound()
            bound = b if math.isfinite(b) and abs(b) < 1e29 else None
        except Exception:     # some builds have no dual bound at all
            bound = None
        if bound is None and status == "optimal" and objective is not None:
            bound = objective * (1 + 1e-4) + 1e-9     # pywraplp's default relative gap
    return MilpResult(status, values, objective, bound, time.perf_counter() - t0, "ortools")
