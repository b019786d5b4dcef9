"""How each pipeline of a plan is scheduled: micro-batch loops, their size, the KV budget, the
prefill chunk and the service estimates mlfq charges. The gateway and the simulator both call
``pipeline_configs``, so they schedule a plan the same way.

Where the numbers come from:

* A plan with a ``workload`` section (what ``hexplan solve`` writes; an explicit override):
  ``ceil(concurrency / batch_size)`` loops of ``batch_size`` sequences, at most ``concurrency``
  in flight, the schedule the planner's predictions assume.
* A plan without one (what a user writes first: ``model`` and ``pipelines``): the schedule is
  chosen from the pipeline itself. One loop per stage, so that while one micro-batch is on a
  stage the others have one each and no stage queues behind another loop's step (a one-stage
  pipeline runs one loop: more would only queue at its one worker, measured 60.7 against 87.3
  tokens/s in docs/executor-benchmark.md); each of the batch size its measured decode steps
  call for (``choose_batch``: the gateway has every stage time decode steps of
  ``CALIBRATION_BATCHES`` when it loads them), else ``batch_size`` sequences (16), so
  ``concurrency = loops x batch``, fewer when the cluster is known and the stages' memory holds
  fewer sequences of the workload's context beside their weights (``memory_concurrency``).
* KV budget: ``concurrency x (prompt + output tokens)`` of the workload, what the planner
  reserved on every stage. A request reserves its prompt plus ``max_new_tokens``; one that
  could never fit is refused (the simulator counts it rejected, the gateway answers
  INVALID_ARGUMENT naming max_new_tokens).
* Service estimates (mlfq's quanta, skip-join and charge): the cost model on the plan's cluster
  when it is known (the simulator's, or the plan's own ``cluster`` section), else the plan's
  predicted TTFT and TPOT, else one quantum per step (``--mlfq-quantum-ms``, default 50 ms)
  and per prefill chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..costmodel import (CostParams, Workload, call_time, decode_layer_time, lm_head_time, prefill_layer_time,
                         shift_weight_factor)
from ..evaluate import splits
from ..plan import Plan

DEFAULT_STEP_S = 0.05     # a step's duration when nothing better is known (mlfq quantum, estimates)
# A bare plan's batch size: the decode batch sizes the stages time at load, and the least gain
# in tokens/s that makes doubling the batch worth it (``choose_batch``).
CALIBRATION_BATCHES = (8, 16, 32, 64, 128, 256)
BATCH_GAIN = 1.10


def choose_batch(step_ms: dict, gain: float = BATCH_GAIN) -> int | None:
    """The batch size for a pipeline whose decode step of ``b`` sequences takes ``step_ms[b]``
    (its slowest stage's time: with one loop per stage, that stage sets the pace): the smallest
    measured size whose next larger one raises tokens/s (b / step time) by less than ``gain``,
    else the largest. Past that point a larger batch mostly lengthens every step (each
    sequence's time per token) for little more throughput: on a CPU, whose decode steps grow
    almost linearly with the batch, that comes early; on a GPU, whose decode steps cost nearly
    the same up to large batches, late. None when nothing was measured."""
    sizes = sorted(b for b, ms in step_ms.items() if b > 0 and ms > 0)
    for b, nxt in zip(sizes, sizes[1:]):
        if (nxt / step_ms[nxt]) < gain * (b / step_ms[b]):
            return b
    return sizes[-1] if sizes else None


def pipeline_step_ms(stage_ms: list[dict]) -> dict:
    """A pipeline's decode step time per batch size from its stages' (``{batch: ms}`` each):
    the slowest stage's, at the batch sizes every stage measured."""
    common = set.intersection(*(set(d) for d in stage_ms)) if stage_ms else set()
    return {b: max(d[b] for d in stage_ms) for b in sorted(common)}


@dataclass(frozen=True)
class PipelineConfig:
    """How one pipeline is scheduled (``Scheduler``'s input)."""

    stages: int
    loops: int                 # micro-batch loops (steps in flight at once)
    batch: int                 # sequences in one step at most
    concurrency: int           # generative sequences holding KV at most
    kv_tokens: int             # KV cache tokens reserved for them
    chunk: int                 # prompt tokens of a step whose loop has sequences decoding
    whole: int                 # prompt tokens of a step with nothing decoding (the first prompt goes whole anyway)
    weight: float = 1.0
    decode_s: float = DEFAULT_STEP_S            # estimated seconds of one decode step (mlfq: per-token charge)
    prefill_s: Callable[[int], float] | None = None   # estimated seconds to prefill a prompt of n tokens
    estimated: bool = False    # decode_s and prefill_s come from the cost model or the plan's predictions


def has_workload(plan: Plan) -> bool:
    """Whether the plan states the workload it was made for (an explicit schedule)."""
    return bool((plan.assumptions or {}).get("workload"))


def pipeline_configs(plan: Plan, workload: Workload, params: CostParams | None = None, cluster=None, *,
                     loops: int | None = None, prefill_chunk: int | None = None,
                     prefill_budget: int | None = None, batch: int | None = None,
                     concurrency: int | None = None, batches: list | None = None) -> list[PipelineConfig]:
    """One PipelineConfig per pipeline of ``plan`` (module docstring). ``workload``: the plan's
    (hexplan.validate.plan_assumptions); ``cluster``: for the cost model's estimates (None:
    the plan's predictions). Keyword arguments override the schedule; ``batches``: a bare
    plan's batch size per pipeline (``choose_batch``'s; None entries: the workload's)."""
    explicit = has_workload(plan)
    params = params or CostParams()
    out = []
    for i, p in enumerate(plan.pipelines):
        n = len(p.stages)
        b = batch or (None if explicit or not batches else batches[i]) or workload.batch_size
        if explicit:
            conc = max(concurrency or workload.concurrency, b)
            nl = loops or -(-conc // b)
        else:
            nl = loops or n
            conc = concurrency or nl * b
            room = memory_concurrency(plan, p, workload, params, cluster) if cluster is not None else None
            if not concurrency and room is not None and room < conc:
                conc = max(1, room)            # what the stages' memory holds
                nl = min(nl, conc)
                b = batch or -(-conc // nl)
            conc = max(conc, b)
        chunk = prefill_chunk or (workload.prefill_chunk(n) if n <= 1 or b == workload.batch_size
                                  else -(-b * workload.prompt_tokens // workload.output_tokens))
        whole = prefill_budget or workload.prompt_tokens
        kv = conc * workload.context
        decode_s, prefill_s, estimated = _estimates(plan, p, workload, params, cluster, chunk)
        out.append(PipelineConfig(stages=n, loops=nl, batch=b, concurrency=conc, kv_tokens=kv, chunk=chunk,
                                  whole=whole, weight=max(0.0, p.weight or 0.0), decode_s=decode_s,
                                  prefill_s=prefill_s, estimated=estimated))
    return out


def estimated_batches(plan: Plan, workload: Workload, params: CostParams | None, cluster) -> list | None:
    """A bare plan's batch size per pipeline as ``choose_batch`` picks it from the cost model's
    decode steps (what the simulator runs; the gateway picks from measured ones), at the sizes
    ``CALIBRATION_BATCHES`` and the workload's mean context. None for a plan with a workload
    section or without a cluster."""
    if has_workload(plan) or cluster is None:
        return None
    params = params or CostParams()
    m = plan.model
    out = []
    for p in plan.pipelines:
        stages = []
        for i, s in enumerate(p.stages):
            node = cluster.node(s.node)
            stages.append({b: 1e3 * (s.num_layers * decode_layer_time(m, node.gpu, s.tp, b, workload.mean_decode_context,
                                                                      node.interconnect, params)
                                     + (lm_head_time(m, node.gpu, s.tp, b, params) if i == len(p.stages) - 1 else 0.0)
                                     + call_time(m, node.gpu, b))
                           for b in CALIBRATION_BATCHES})
        out.append(choose_batch(pipeline_step_ms(stages)))
    return out


def memory_concurrency(plan: Plan, p, workload: Workload, params: CostParams, cluster) -> int:
    """Sequences of the workload's context whose KV cache fits on every stage of pipeline ``p``
    beside its weights (GPU memory less the cost model's headroom, over the stage's TP group)."""
    m = plan.model
    last = len(p.stages) - 1
    room = None
    for i, s in enumerate(p.stages):
        gpu = cluster.node(s.node).gpu
        usable = gpu.memory * s.tp * (1 - params.memory_headroom)
        weights = (s.num_layers * m.layer_bytes * shift_weight_factor(s.shift_sp)   # shift: SP mode's shards
                   + (m.embedding_bytes if i == 0 else 0) + (m.head_bytes if i == last else 0))
        per_seq = s.num_layers * m.kv_bytes_per_token_per_layer * workload.context
        n = int((usable - weights) // per_seq) if per_seq > 0 else 1 << 30
        room = n if room is None else min(room, n)
    return max(0, room or 0)


def _estimates(plan: Plan, p, workload: Workload, params: CostParams, cluster, chunk: int):
    """(decode step seconds, prefill seconds function, whether they are estimates) of pipeline ``p``."""
    model = plan.model
    if cluster is not None:
        parts = workload.interleave if splits([s.tp for s in p.stages]) else 1
        kinds = []
        for s in p.stages:
            node = cluster.node(s.node)
            kinds.append((s.num_layers, node.gpu, s.tp, node.interconnect))
        # One decode step of B sequences at the workload's mean context through every stage (no
        # LM head, no links; each stage's call): what each sequence of a step spends of its
        # quantum per token.
        step = sum(layers * decode_layer_time(model, gpu, tp, workload.batch_size, workload.mean_decode_context,
                                              ic, params, min(parts, workload.batch_size))
                   + call_time(model, gpu, workload.batch_size)
                   for layers, gpu, tp, ic in kinds)
        cache: dict = {}

        def prefill_s(tokens: int) -> float:
            t = cache.get(tokens)
            if t is None:
                t = cache[tokens] = sum(layers * prefill_layer_time(model, gpu, tp, tokens, ic, params)
                                        + call_time(model, gpu, 1) for layers, gpu, tp, ic in kinds)
            return t
        return step, prefill_s, True
    step = (p.decode_ms_per_token or 0) / 1e3
    if step and p.ttft_ms:
        ttft = p.ttft_ms / 1e3
        return step, lambda tokens: ttft * tokens / workload.prompt_tokens, True
    step = step or DEFAULT_STEP_S
    return step, lambda tokens: step * tokens / chunk, False
