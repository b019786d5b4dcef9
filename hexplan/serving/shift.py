"""Shift Parallelism's mode rule, shared by the executor's workers and the simulator.

A shifted stage of degree d = sp x tp runs a step in TP mode (one tensor-parallel group of d
ranks: lowest latency per token) when the step carries few tokens, and in SP mode (sp groups of
tp ranks with Ulysses all-to-alls around attention: no d-way all-reduce) when it carries more
than the threshold. Arctic Inference switches on the same quantity (tokens scheduled in the
step); its code uses 512 and its docs 256. Our default comes from the cost model's crossover
(`hexplan.costmodel.shift_threshold`).
"""
from __future__ import annotations

TP_MODE = "tp"
SP_MODE = "sp"


def shift_mode(step_tokens: int, threshold: int) -> str:
    """The mode of a step that schedules `step_tokens` tokens (prompt tokens + decode tokens)."""
    return SP_MODE if step_tokens > threshold else TP_MODE
