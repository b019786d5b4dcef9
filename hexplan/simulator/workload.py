"""Traffic for the simulator: when requests arrive and how long their prompts and outputs are.

Nothing here knows about plans or GPUs: a ``WorkloadSpec`` and a seed become a stream of
``(arrival_s, prompt_tokens, output_tokens)`` in arrival order.

* Arrivals: Poisson at ``rate`` (exponential gaps), gamma at ``rate`` with coefficient of
  variation ``cv`` of the gaps (shape 1/cv^2, scale cv^2/rate: cv > 1 is burstier than Poisson),
  or the timestamps of a trace (JSONL lines ``{"arrival_s": 0.5, "prompt_tokens": 812,
  "output_tokens": 164}``).
* Lengths: fixed (``512``), uniform over integers (``128-1024``, both ends included), or drawn
  from a trace (``trace``: a random line's prompt and output, sampled together so their
  correlation survives). A replayed trace uses its own lengths unless a length is given.
* Every request is capped at the model's context: prompt <= context - 1, then prompt + output
  <= context (the gateway stops a sequence at the same limit); ``RequestStream.truncated``
  counts the requests that were cut.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import SpecError

ARRIVALS = ("poisson", "gamma", "trace")


class TraceRequest(NamedTuple):
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``fixed`` (low), ``uniform`` (low..high) or ``trace``."""

    kind: str
    low: int = 0
    high: int = 0

    @staticmethod
    def parse(text, field: str = "length") -> "LengthDist":
        """``512`` -> fixed, ``128-1024`` -> uniform, ``trace`` -> from the trace."""
        if isinstance(text, LengthDist):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        s = str(text).strip().lower()
        if s == "trace":
            return LengthDist("trace")
        lo, sep, hi = s.partition("-")
        if lo.isdigit() and (not sep or hi.isdigit()):
            a, b = int(lo), int(hi) if sep else int(lo)
            if a < 1:
                raise SpecError(f"lengths must be at least 1 token, got {text!r}", field=field)
            if b < a:
                raise SpecError(f"empty range {text!r}: the low end is above the high end", field=field)
            return LengthDist("uniform", a, b) if sep else LengthDist("fixed", a, a)
        raise SpecError(f"expected a length N, a range A-B or 'trace', got {text!r}", field=field)

    def __str__(self) -> str:
        return {"fixed": f"{self.low}", "uniform": f"{self.low}-{self.high}"}.get(self.kind, "trace")


@dataclass(frozen=True)
class WorkloadSpec:
    """What traffic to replay. Lengths left as None take the plan's workload (P and O)."""

    arrival: str = "poisson"                # poisson | gamma | trace (replay the trace's timestamps)
    rate: float | None = None               # requests/s (poisson, gamma)
    cv: float = 1.0                         # gamma: coefficient of variation of inter-arrival gaps
    duration: float | None = None           # seconds of traffic (trace: default its last arrival)
    prompt_len: LengthDist | None = None    # None: the plan's prompt_tokens (a trace's own when replayed)
    output_len: LengthDist | None = None    # None: the plan's output_tokens (a trace's own when replayed)
    trace: tuple[TraceRequest, ...] = ()    # for arrival="trace" and lengths "trace"
    trace_name: str = ""                    # where the trace came from (messages, reports)
    warmup: float | None = None             # seconds left out of the measurement (default 10% of duration)

    def __post_init__(self):
        if self.arrival not in ARRIVALS:
            raise SpecError(f"unknown arrival process {self.arrival!r}; expected one of {', '.join(ARRIVALS)}",
                            field="arrival")
        for f in ("prompt_len", "output_len"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, LengthDist):
                object.__setattr__(self, f, LengthDist.parse(v, f))
        if self.arrival == "trace":
            if not self.trace:
                raise SpecError("replaying a trace needs a trace file with at least one request", field="workload")
        else:
            _number(self.rate, "rate")
            if self.duration is None:
                raise SpecError("missing: how many seconds of traffic to simulate", field="duration")
        if self.arrival == "gamma":
            _number(self.cv, "cv")
        if self.duration is not None:
            _number(self.duration, "duration", allow_zero=self.arrival == "trace")
        if self.warmup is not None:
            _number(self.warmup, "warmup", allow_zero=True)
            if self.duration is not None and self.duration > 0 and self.warmup >= self.duration:
                raise SpecError(f"warm-up {self.warmup:g} s leaves nothing of the {self.duration:g} s to measure",
                                field="warmup")
        for f in ("prompt_len", "output_len"):
            v = getattr(self, f)
            if v is not None and v.kind == "trace" and not self.trace:
                raise SpecError("'trace' lengths need a trace file (--workload)", field=f)

    @property
    def horizon(self) -> float:
        """Seconds of traffic: arrivals after it are dropped and the simulation stops there.
        0 means a batch that arrives at once (an offline run): it runs until every request is done."""
        if self.duration is not None:
            return float(self.duration)
        return max(r.arrival_s for r in self.trace)

    @property
    def warmup_s(self) -> float:
        if self.warmup is not None:
            return float(self.warmup)
        return 0.1 * self.horizon

    def lengths(self, default_prompt: int, default_output: int) -> tuple[LengthDist, LengthDist]:
        replay = LengthDist("trace") if self.arrival == "trace" else None
        return (self.prompt_len or replay or LengthDist("fixed", default_prompt, default_prompt),
                self.output_len or replay or LengthDist("fixed", default_output, default_output))

    def describe(self, default_prompt: int, default_output: int) -> dict:
        p, o = self.lengths(default_prompt, default_output)
        d: dict = {"arrival": self.arrival}
        if self.arrival != "trace":
            d["rate_per_s"] = self.rate
        if self.arrival == "gamma":
            d["cv"] = self.cv
        if self.trace_name:
            d["trace"] = self.trace_name
        d.update({"duration_s": self.horizon, "warmup_s": self.warmup_s, "prompt_tokens": str(p),
                  "output_tokens": str(o)})
        return d


def _number(v, field: str, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpecError(f"must be a finite number, got {v!r}", field=field)
    if v < 0 or (v == 0 and not allow_zero):
        raise SpecError(f"must be {'non-negative' if allow_zero else 'positive'}, got {v!r}", field=field)
    return float(v)


# ---- trace files ------------------------------------------------------------------------

def parse_trace(text: str, file: str | None = None) -> tuple[TraceRequest, ...]:
    """Parse JSONL: one object per line with arrival_s (s, >= 0), prompt_tokens and output_tokens
    (integers >= 1); other keys are ignored, blank lines skipped. Sorted by arrival (stable)."""
    out = []
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError(f"not a JSON object: {e.msg} (column {e.colno})", file=file, line=ln) from None
        if not isinstance(d, dict):
            raise SpecError('expected an object like {"arrival_s": 0.5, "prompt_tokens": 512, '
                            '"output_tokens": 128}', file=file, line=ln)
        a = d.get("arrival_s")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise SpecError(f"must be a number of seconds >= 0, got {a!r}", file=file, line=ln, field="arrival_s")
        lens = []
        for k in ("prompt_tokens", "output_tokens"):
            v = d.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"must be an integer >= 1, got {v!r}", file=file, line=ln, field=k)
            lens.append(v)
        out.append(TraceRequest(float(a), lens[0], lens[1]))
    if not out:
        raise SpecError("no requests in the trace (expected JSON lines)", file=file)
    out.sort(key=lambda r: r.arrival_s)
    return tuple(out)


def load_trace(path) -> tuple[TraceRequest, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read the trace: {getattr(e, 'strerror', None) or e}", file=str(path)) from None
    return parse_trace(text, str(path))


# ---- the request stream -------------------------------------------------------------------

class RequestStream:
    """``next()`` returns the next ``(arrival_s, prompt, output)`` or None when the traffic ends.

    Separate random streams (seeded from ``seed``) for arrivals and lengths, so changing the
    length distribution does not move the arrival times.
    """

    def __init__(self, spec: WorkloadSpec, default_prompt: int, default_output: int, max_context: int,
                 seed: int = 0):
        self.spec = spec
        self.prompt_dist, self.output_dist = spec.lengths(default_prompt, default_output)
        self.max_context = max(2, int(max_context))
        self.horizon = spec.horizon
        self.truncated = 0
        self._t = 0.0
        self._i = 0
        self._arr = random.Random(f"{seed}:arrivals")
        self._len = random.Random(f"{seed}:lengths")
        if spec.arrival == "gamma":
            k = 1.0 / (spec.cv * spec.cv)
            self._gap = lambda: self._arr.gammavariate(k, 1.0 / (spec.rate * k))
        elif spec.arrival == "poisson":
            self._gap = lambda: self._arr.expovariate(spec.rate)

    def _length(self, dist: LengthDist, rec: TraceRequest | None, which: int) -> int:
        if dist.kind == "fixed":
            return dist.low
        if dist.kind == "uniform":
            return self._len.randint(dist.low, dist.high)
        return rec[which]

    def next(self):
        spec = self.spec
        if spec.arrival == "trace":
            if self._i >= len(spec.trace):
                return None
            rec = spec.trace[self._i]
            self._i += 1
            t = rec.arrival_s
            if t > self.horizon:
                return None
        else:
            t = self._t + self._gap()
            if t >= self.horizon:
                return None
            self._t = t
            rec = None
            if self.prompt_dist.kind == "trace" or self.output_dist.kind == "trace":
                rec = spec.trace[self._len.randrange(len(spec.trace))]
        p = self._length(self.prompt_dist, rec, 1)
        o = self._length(self.output_dist, rec, 2)
        ctx = self.max_context
        if p > ctx - 1 or p + o > ctx:
            self.truncated += 1
            p = min(p, ctx - 1)
            o = min(o, ctx - p)
        return t, p, o


def mean_output_tokens(spec: WorkloadSpec, default_prompt: int, default_output: int) -> float:
    """Expected output tokens per request (for choosing rates in a sweep)."""
    _, o = spec.lengths(default_prompt, default_output)
    if o.kind == "trace":
        return sum(r.output_tokens for r in spec.trace) / len(spec.trace)
    return (o.low + o.high) / 2
