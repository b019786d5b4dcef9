"""The gateway's skip-join multi-level feedback queue (FastServe), one per pipeline.

Pure bookkeeping, no gRPC or tensors, so it is tested on its own (tests/test_mlfq_gateway.py)
and the gateway's ``--policy mlfq`` loop only asks it three things: where a new request goes
(``add``), which requests a step should run (``pick``), and what a step cost them (``charge``).

* K queues; queue i has a quantum of ``q0 * 2**i`` seconds of service.
* Skip-join: a new request joins the first queue whose quantum covers its estimated prefill
  time (hexplan.dispatch.skip_join_level, the simulator's rule too).
* Service is the wall time of the steps a request took part in. A request that used its
  queue's quantum drops one queue (the last queue takes turns: it goes to the back).
* A request that has waited (not run) longer than ``promote_s`` goes back to the top queue.
* ``pick`` returns the highest-priority waiting requests, in queue order and arrival order
  within a queue; the caller decides how many fit a step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from hexplan.dispatch import skip_join_level


@dataclass(eq=False)
class Entry:
    req: object
    level: int
    seq: int                 # order within a queue (lower runs first)
    used_s: float = 0.0      # service in the current queue
    last_run: float = 0.0    # when it last ran (or arrived)


class MLFQ:
    def __init__(self, levels: int = 5, quantum_s: float = 0.05, promote_s: float | None = None):
        if levels < 1 or quantum_s <= 0:
            raise ValueError("mlfq needs levels >= 1 and a positive quantum")
        self.levels, self.q0 = levels, quantum_s
        self.quanta = [quantum_s * 2 ** i for i in range(levels)]
        self.promote_s = promote_s if promote_s is not None else 100 * self.quanta[-1]
        self.entries: dict[int, Entry] = {}          # id(req) -> entry
        self._seq = itertools.count()
        self.demotions = self.promotions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, req, prefill_s: float, now: float) -> int:
        """Skip-join; returns the queue the request joined."""
        level = skip_join_level(prefill_s, self.q0, self.levels)
        self.entries[id(req)] = Entry(req, level, next(self._seq), last_run=now)
        return level

    def remove(self, req) -> None:
        self.entries.pop(id(req), None)

    def level(self, req) -> int:
        return self.entries[id(req)].level

    def pick(self, now: float, eligible=lambda r: True) -> list:
        """Waiting requests in priority order (promoting the starved first)."""
        for e in self.entries.values():
            if e.level > 0 and now - e.last_run > self.promote_s and eligible(e.req):
                e.level, e.used_s, e.seq = 0, 0.0, next(self._seq)
                self.promotions += 1
        order = sorted((e for e in self.entries.values() if eligible(e.req)), key=lambda e: (e.level, e.seq))
        return [e.req for e in order]

    def charge(self, req, seconds: float, now: float) -> None:
        """A step that ran ``req`` took ``seconds``: count it, demote on a used-up quantum."""
        e = self.entries.get(id(req))
        if e is None:
            return
        e.used_s += seconds
        e.last_run = now
        if e.used_s >= self.quanta[e.level]:
            if e.level < self.levels - 1:
                e.level += 1
                self.demotions += 1
            e.used_s = 0.0
            e.seq = next(self._seq)                  # to the back of its (new) queue

    def rank(self, req) -> tuple:
        """Sort key: lower is higher priority."""
        e = self.entries[id(req)]
        return (e.level, e.seq)
