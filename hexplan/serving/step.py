"""What the scheduler hands its executor (a ``Step``) and what it gets back (a ``StepResult``).

A Step is one iteration of one micro-batch loop of one pipeline: the batch that goes down the
pipeline's stages next. The gateway turns it into a ``Forward`` call over gRPC; the simulator
turns it into service times from the cost model. Neither decides anything the Step does not say.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    """One micro-batch step. Sequences are the scheduler's ids (``Scheduler.add``)."""

    pipeline: int
    loop: int
    decode: tuple = ()         # sequences decoding: one new token each
    prefill: tuple = ()        # (seq, start, tokens, last): prompt chunks; ``last``: the chunk ends the context
    decode_context: int = 0    # sum over ``decode`` of the tokens each attends to (for the cost model)
    logits: int = 0            # positions whose logits are needed: decode + prefill chunks with ``last``
    preempted: tuple = ()      # mlfq: sequences of this loop's previous step left out (they keep their KV)
    offloaded: tuple = ()      # mlfq: KV caches to move to host memory before this step
    restored: tuple = ()       # mlfq: sequences whose KV comes back from host memory for this step
    restored_tokens: int = 0   # ... context tokens they bring back
    released: tuple = ()       # KV caches to free before this step (cancelled sequences)
    dropped: tuple = ()        # prefill-only sequences whose last chunk is here: the stages keep no KV

    @property
    def size(self) -> int:
        """Sequences in the step."""
        return len(self.decode) + len(self.prefill)

    @property
    def tokens(self) -> int:
        """Input tokens the step carries."""
        return len(self.decode) + sum(c[2] for c in self.prefill)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What came back: ``finished``, sequences that ended on their own (a stop token, the
    context limit: the scheduler itself ends those that reach their ``max_new_tokens``);
    ``failed``, the step did not complete (its pipeline is handled by ``Scheduler.fail``)."""

    finished: tuple = ()
    failed: bool = False


DONE_OK = StepResult()
