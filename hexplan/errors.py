"""Typed errors with messages a user can act on.

Libraries raise these; only the CLI turns them into a one-line message and exit code 2.
"""
from __future__ import annotations


class HexplanError(Exception):
    """Base class of every error hexplan raises on purpose."""


class SpecError(HexplanError):
    """Bad input in a cluster, model, workload or plan description.

    ``str(err)`` is one line: ``file:line: field: message`` with the parts that are known.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"

    def located(self, file: str | None = None, line: int | None = None) -> "SpecError":
        """Return a copy that also names the file and line (keeps what is already known)."""
        return SpecError(self.message, file=self.file or file, line=self.line or line,
                         field=self.field)


class InfeasibleError(HexplanError):
    """No placement satisfies the constraints (memory, SLO). The message says what is missing."""
