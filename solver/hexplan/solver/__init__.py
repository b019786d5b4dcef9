"""hexplan.solver: the placement optimizer (heuristic + MILP), max-flow routing and bounds."""
from .optimizer import solve
from .problem import SolveOptions

__all__ = ["solve", "SolveOptions"]
