"""One logging configuration for the long-running commands (``hexplan serve``, ``launch``, ``node``).

    from hexplan import logconfig
    logconfig.configure(level="info", fmt="json")

Every record goes to stderr (stdout carries results only: the "hexplan: ready ..." line), one
line each, with an ISO 8601 UTC timestamp in milliseconds, the level, the logger's name and the
message:

    text: 2025-06-01T12:00:00.123Z INFO hexplan.access: request 3f2a... status=OK ...
    json: {"ts": "2025-06-01T12:00:00.123Z", "level": "INFO", "logger": "hexplan.access",
           "message": "request 3f2a... status=OK ...", "request_id": "3f2a...", ...}

In json, the fields a call passes in ``extra`` are keys of the object too (the access line's
request_id, prompt_tokens, ...), and an exception's traceback is the ``exc`` key, so every line
is one JSON object. Noisy third-party loggers are held at WARNING (grpc, urllib3, httpx,
asyncio) and uvicorn's access log is off (hexplan writes its own access line per request,
logger ``hexplan.access``). Python warnings go through logging too.

Torch-free and grpc-free: the planner's CLI imports it.
"""
from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
QUIET = ("grpc", "urllib3", "httpx", "httpcore", "asyncio", "filelock", "uvicorn.error")
OFF = ("uvicorn.access",)

# the attributes every LogRecord has: anything else on a record came in ``extra``
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}

_current: tuple[str, str] | None = None


def timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds: 2025-06-01T12:00:00.123Z."""
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": timestamp(record.created), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_") and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler):
    """Ours (so configure() replaces only the handler it installed); writes to the current
    sys.stderr at each record, so a test's captured stderr sees it."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def check(level: str, fmt: str) -> None:
    """ValueError naming the bad one."""
    if level not in LEVELS:
        raise ValueError(f"--log-level: must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: must be one of {', '.join(FORMATS)}, got {fmt!r}")


def configure(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once for this process (calling it again replaces its own
    handler: no duplicate lines)."""
    global _current
    level, fmt = str(level).lower(), str(fmt).lower()
    check(level, fmt)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    handler = _Handler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in OFF:
        lg = logging.getLogger(name)
        lg.setLevel(logging.CRITICAL + 1)
        lg.propagate = False
    logging.captureWarnings(True)
    _current = (level, fmt)


def current() -> tuple[str, str] | None:
    """(level, format) given to configure() in this process, or None."""
    return _current


def child_args() -> list[str]:
    """The flags that give a child ``hexplan`` process this process's configuration."""
    if _current is None:
        return []
    return ["--log-level", _current[0], "--log-format", _current[1]]
