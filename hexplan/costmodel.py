"""The cost model: one source of truth for stage times, link times and memory.

The planner, the plan validator, the simulator and the executor's router all read their
numbers from here. docs/cost-model.md writes every formula out; tests/test_costmodel.py checks
them against hand calculations. Notation: H hidden size, I intermediate size, b bytes per
element, d TP degree, B decode batch (sequences per step), P prompt tokens, O output tokens.

* Roofline per layer:  t = max(bytes / (BW * eta_mem), flops / (F * eta_flops)) + 2 * allreduce
* Ring all-reduce of m bytes over d GPUs:  2 (d - 1) (alpha + m / (d * beta))
* Activation send of n tokens over a link:  latency + n * H * b / bandwidth
* Memory per GPU:  layers * (layer_bytes / d + KV shard(concurrency, P + O)) + embedding / LM head
  shares on the first / last stage + workspace, within (1 - headroom) of the GPU's memory. The KV
  shard is KV / d while KV heads can be split, and one KV head per GPU once they are replicated.
* The last stage also runs the LM head (a roofline of its own) on every decode step and on the
  last position of every prompt.
* A measured profile of the model on the GPU type (gpus.Profile) replaces rooflines: per-layer
  ``decode_ms`` / ``prefill_ms``, the LM head's ``lm_head_ms``, and ``allreduce_ms`` in place of
  the ring formula (scaled by the ring's steps from the degree it was measured at). A TP degree
  with its own measured tables (``by_tp``) is charged by them (``group_profile``).
* Interleaving (``Workload.interleave`` N > 1, Liger-style): a step runs as N parts. Compute is
  the sum of the N parts' rooflines (the weights are read N times), the all-reduces move the same
  bytes in N times as many messages, and communication hides under compute up to
  ``CostParams.contention`` times the compute: t = compute + comm - min(comm, contention * compute).
  docs/cost-model.md, section 13.
* Shift Parallelism (a stage with ``shift: {sp: S}``): a step in SP mode (``sp=S``) splits its
  tokens over S ranks of d / S-way TP weights, attention head-parallel over all d GPUs, two
  all-to-alls per layer: ``sp_layer_split``. ``shift_threshold`` is the TP/SP crossover in step
  tokens; a shifted stage holds its layers' SP-mode shards, S x W / d per GPU (TP mode reads
  views of them: hexplan's executor keeps one copy where Arctic keeps two). docs/cost-model.md,
  section 14.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from .errors import SpecError
from .gpus import GpuType, Profile
from .models import ModelSpec

TOKEN_ID_BYTES = 4
# Tokens a one-stage pipeline's step carries at most while prompts wait (decode tokens plus prompt
# chunks; ``Workload.prefill_chunk``): vLLM's default token budget for chunked prefill, 512.
ONE_STAGE_STEP_TOKENS = 512


@dataclass(frozen=True)
class Workload:
    """What the plan is optimised for. Defaults are documented in docs/cost-model.md."""

    prompt_tokens: int = 512   # average prompt length
    output_tokens: int = 128   # average generated tokens per request
    batch_size: int = 16       # sequences in one decode step of a stage (a micro-batch)
    concurrency: int = 64      # sequences in flight per pipeline; KV cache is reserved for them
    interleave: int = 1        # parts each step is cut into (Liger-style overlap; 1: off)

    def __post_init__(self):
        for f in ("prompt_tokens", "output_tokens", "batch_size", "concurrency", "interleave"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"must be a positive integer, got {v!r}", field=f)
        if self.concurrency < self.batch_size:
            raise SpecError(f"concurrency {self.concurrency} is below batch_size {self.batch_size}",
                            field="concurrency")

    @property
    def context(self) -> int:
        """Tokens of KV cache reserved per sequence (prompt + output)."""
        return self.prompt_tokens + self.output_tokens

    @property
    def mean_decode_context(self) -> float:
        """Average context length seen by a decode step."""
        return self.prompt_tokens + (self.output_tokens + 1) / 2

    @property
    def micro_batches(self) -> int:
        """Micro-batches a pipeline keeps in flight, whatever its length: ceil(C / B), enough
        to hold the concurrency in batches of ``batch_size`` (the gateway and the simulator both
        run this many loops). Steps of B sequences are what the stage rates assume; a pipeline
        with more stages than that leaves stages idle while the micro-batches travel, which is
        the concurrency / round-trip bound. (One loop per stage, C / k sequences each, was
        measured worse: on the 42-node plan its 6-stage pipelines reached 80-87% of their
        prediction, bound by their slowest stage running 6 thin steps per round, against 96%.)"""
        return -(-self.concurrency // self.batch_size)

    def prefill_chunk(self, stages: int = 2) -> int:
        """Prompt tokens a micro-batch step carries while it has sequences decoding (chunked
        prefill) on a pipeline of ``stages`` stages: B * P / O, the share of prompts a full
        micro-batch needs per step in steady state (B sequences, each ending after O steps,
        each bringing P prompt tokens). Steps then cost about the same, so no stage waits on
        a long step of another micro-batch. A one-stage pipeline has no such wait (its stage
        is busy either way) and takes at least whole prompts, P (a prompt being chunked holds
        its batch slot for P / chunk steps before its first token, which costs 3-7% there), and
        up to vLLM's step budget of ``ONE_STAGE_STEP_TOKENS`` tokens less the B decode tokens:
        with prompts waiting, several go in one step, so a burst fills the batch sooner (64
        requests at once on the executor benchmark's model: 5% more tokens/s, simulated and
        measured, docs/executor-benchmark.md), and under Poisson load P50 TTFT drops 10-20%
        with TPOT unchanged (simulated). A step with nothing decoding takes its first prompt
        whole in any case."""
        if stages <= 1:
            return max(self.prompt_tokens, ONE_STAGE_STEP_TOKENS - self.batch_size)
        return -(-self.batch_size * self.prompt_tokens // self.output_tokens)

    @property
    def parts(self) -> int:
        """Parts a full step of ``batch_size`` sequences is cut into: ``interleave``, at most one
        per sequence (the executor never cuts a sequence's chunk)."""
        return min(self.interleave, self.batch_size)

    def to_dict(self) -> dict:
        d = {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
             "batch_size": self.batch_size, "concurrency": self.concurrency}
        if self.interleave != 1:   # absent means 1: plans made without interleaving stay as they were
            d["interleave"] = self.interleave
        return d


@dataclass(frozen=True)
class CostParams:
    """Efficiency factors and overheads (calibrated against Helix's published profiles)."""

    mem_efficiency: float = 0.7      # achieved / datasheet memory bandwidth
    flops_efficiency: float = 0.5    # achieved / datasheet dense fp16 FLOPS
    allreduce_alpha: float = 10e-6   # s, per ring step inside a node
    memory_headroom: float = 0.10    # share of GPU memory kept free (CUDA context, allocator)
    contention: float = 0.8          # interleaving: comm hidden <= contention x compute (Liger+)
    shift_threshold: float | None = None  # shifted stages: step tokens above which SP mode runs (None: each stage's crossover)

    def to_dict(self) -> dict:
        d = {"mem_efficiency": self.mem_efficiency, "flops_efficiency": self.flops_efficiency,
             "allreduce_alpha": self.allreduce_alpha, "memory_headroom": self.memory_headroom,
             "contention": self.contention}
        if self.shift_threshold is not None:   # absent: the crossover; plans made before Shift Parallelism stay as they were
            d["shift_threshold"] = self.shift_threshold
        return d


DEFAULT_PARAMS = CostParams()


def ring_allreduce_time(nbytes: float, d: int, bandwidth: float, alpha: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``d`` GPUs: 2 (d-1) steps of alpha + nbytes/(d*bw)."""
    if d <= 1:
        return 0.0
    return 2 * (d - 1) * (alpha + nbytes / (d * bandwidth))


def group_profile(model: ModelSpec, gpu: GpuType, tp: int) -> Profile | None:
    """The GPU type's measured profile of the model as a TP group of degree ``tp`` is charged by
    it (``Profile.at_tp``: that degree's own layer and head tables where ``hexplan profile --tp``
    measured them, ``by_tp``), or None."""
    prof = gpu.profile_for(model.name)
    return prof.at_tp(tp) if prof is not None else None


def allreduce_time(model: ModelSpec, gpu: GpuType, tp: int, rows: float, interconnect: float,
                   p: CostParams = DEFAULT_PARAMS) -> float:
    """One all-reduce of ``rows`` hidden states (rows x H x b bytes) over a TP group of ``tp``.
    With a measured ``allreduce_ms`` table in the GPU type's profile of the model: the table at
    ``rows``, scaled by the ring's step count from the degree it was measured at,
    (tp - 1) / (allreduce_tp - 1); else the ring formula (``ring_allreduce_time``)."""
    if tp <= 1:
        return 0.0
    prof = gpu.profile_for(model.name)
    if prof is not None and prof.allreduce_ms is not None:
        return prof.allreduce_ms.ms(rows) / 1e3 * (tp - 1) / max(1, prof.allreduce_tp - 1)
    return ring_allreduce_time(rows * model.hidden_size * model.bytes_per_param, tp, interconnect, p.allreduce_alpha)


def call_time(model: ModelSpec, gpu: GpuType, seqs: float) -> float:
    """Seconds one call to a stage costs beyond its layers and LM head, for a step of ``seqs``
    sequences: the ``call_ms`` table of the GPU type's profile of the model (``hexplan profile
    --served``: the gRPC round trip, (de)serialising, the worker's per-call work), charged once
    per stage a step visits and not split over TP ranks; 0 without one (a GPU's is small beside
    its step, and rooflines have none)."""
    prof = gpu.profile_for(model.name)
    if prof is None or prof.call_ms is None:
        return 0.0
    return prof.call_ms.ms(seqs) / 1e3


def send_time(nbytes: float, bandwidth: float, latency: float) -> float:
    """One message over a link: latency + bytes / bandwidth."""
    return latency + nbytes / bandwidth


def local_kv_heads(model: ModelSpec, tp: int) -> int:
    """KV heads held by one TP rank: split when there are enough, else replicated (GQA)."""
    return max(1, model.num_kv_heads // tp)


@dataclass(frozen=True)
class StageCost:
    """Per-layer costs of one TP group (``tp`` GPUs of one type inside one node)."""

    gpu: str
    tp: int
    decode_layer_s: float      # one decode step of ``batch_size`` sequences, one layer (in ``parts``)
    prefill_layer_s: float     # prefill of one prompt of ``prompt_tokens``, one layer (in ``parts``)
    layer_rate: float          # output tokens x layers per second (decode + amortised prefill)
    mem_per_layer: float       # bytes per GPU per layer: weight shard + KV cache shard
    usable_memory: float       # bytes per GPU available for layers
    embed_bytes: float         # bytes per GPU for the embedding (first stage)
    head_bytes: float          # bytes per GPU for final norm + LM head (last stage)
    head_decode_s: float = 0.0   # LM head on one decode step (last stage only)
    head_prefill_s: float = 0.0  # LM head on the last token of one prompt (last stage only)
    batch_size: int = 1
    output_tokens: int = 1
    prefill_whole_s: float | None = None   # interleaving: one prompt alone, not cut (None: prefill_layer_s)
    parts: int = 1             # parts a full step runs in (Workload.parts; 1: not interleaved)
    shift_sp: int = 1          # Shift Parallelism: SP ranks of a shifted stage (1: not shifted)
    shift_threshold: int = 0   # ... and the step tokens above which it runs in SP mode
    call_decode_s: float = 0.0   # the call's own cost (profile call_ms) on one decode step, any stage
    call_prefill_s: float = 0.0  # ... on one prompt's step

    @property
    def call_cost_per_token(self) -> float:
        """Seconds of the stage's call cost per output token (decode step share + prefill share)."""
        return self.call_decode_s / self.batch_size + self.call_prefill_s / self.output_tokens

    @property
    def ttft_layer_s(self) -> float:
        """Prefill of one prompt on its own through one layer (what TTFT counts): one chunk,
        which interleaving does not cut."""
        return self.prefill_layer_s if self.prefill_whole_s is None else self.prefill_whole_s

    @property
    def head_cost_per_token(self) -> float:
        """Seconds of LM head work per output token (decode step share + prefill share)."""
        return self.head_decode_s / self.batch_size + self.head_prefill_s / self.output_tokens

    def max_layers(self, first: bool = False, last: bool = False) -> int:
        extra = (self.embed_bytes if first else 0.0) + (self.head_bytes if last else 0.0)
        return max(0, math.floor((self.usable_memory - extra) / self.mem_per_layer + 1e-9))

    def memory_used(self, layers: int, first: bool, last: bool, workspace: bool = True) -> float:
        """Bytes per GPU for ``layers`` layers (without the headroom)."""
        extra = (self.embed_bytes if first else 0.0) + (self.head_bytes if last else 0.0)
        return layers * self.mem_per_layer + extra

    def slowed(self, factor: float) -> "StageCost":
        """These costs on a machine that runs the group ``factor`` times slower than its profile
        (a shared host's ``Host.slowdown``): every time scaled, the layer rate divided."""
        if factor == 1.0:
            return self
        return replace(self, decode_layer_s=self.decode_layer_s * factor,
                       prefill_layer_s=self.prefill_layer_s * factor, layer_rate=self.layer_rate / factor,
                       head_decode_s=self.head_decode_s * factor, head_prefill_s=self.head_prefill_s * factor,
                       prefill_whole_s=None if self.prefill_whole_s is None else self.prefill_whole_s * factor,
                       call_decode_s=self.call_decode_s * factor, call_prefill_s=self.call_prefill_s * factor)

    def capacity(self, layers: int, last: bool = False) -> float:
        """Output tokens/s this stage sustains when it holds ``layers`` layers (and, for the
        last stage, the LM head): 1 / (layers / layer_rate + head cost per token + call cost
        per token)."""
        per_token = layers / self.layer_rate + (self.head_cost_per_token if last else 0.0) + self.call_cost_per_token
        return 1.0 / per_token if per_token > 0 else math.inf


def _roofline(nbytes: float, flops: float, gpu: GpuType, p: CostParams) -> float:
    return max(nbytes / (gpu.memory_bandwidth * p.mem_efficiency), flops / (gpu.flops * p.flops_efficiency))


@dataclass(frozen=True)
class LayerTime:
    """One layer of a step on a TP group, in parts: compute, all-reduce time, and how much of
    the all-reduce time hides under compute (0 unless the step runs in several parts)."""

    compute: float
    comm: float
    hidden: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.comm - self.hidden


def _parts(parts: int, items: float) -> int:
    """Parts a step of ``items`` sequences (or prompt tokens) can be cut into: at most one each."""
    return parts if parts <= items else max(1, int(items))


def _overlap(compute: float, comm: float, parts: int, p: CostParams) -> LayerTime:
    """Interleaved parts: one part's all-reduce is in flight while another part computes. Under
    contention (Liger+: 0.8) a span of compute hides at most ``contention`` times its length of
    communication."""
    if parts <= 1:
        return LayerTime(compute, comm)
    return LayerTime(compute, comm, min(comm, p.contention * compute))


def decode_layer_split(model: ModelSpec, gpu: GpuType, tp: int, batch: float, context: float,
                       interconnect: float, p: CostParams = DEFAULT_PARAMS, parts: int = 1,
                       sp: int = 1) -> LayerTime:
    """One decode step of ``batch`` sequences through one layer on a TP group, in ``parts`` equal
    parts (interleaving): each part reads the layer's weights and its sequences' KV cache
    (compute = sum of the parts' rooflines), each part all-reduces its own activations (same
    bytes, ``parts`` times the alpha terms). ``sp`` > 1: the step in Shift Parallelism's SP mode
    on the ``tp`` GPUs (``sp_layer_split``; not cut into parts)."""
    if sp > 1:
        return sp_layer_split(model, gpu, tp, sp, batch, interconnect, p, context=context)
    hd, b = model.dim_head, model.bytes_per_param
    heads_local = model.num_heads // tp
    kv_tok = 2 * local_kv_heads(model, tp) * hd * b
    n = _parts(parts, batch)
    prof = group_profile(model, gpu, tp)
    if n == 1:
        if prof and prof.decode_ms:
            compute = prof.decode_ms.ms(batch) / 1e3 / tp
        else:
            nbytes = model.layer_bytes / tp + batch * context * kv_tok
            flops = 2 * model.params_per_layer / tp * batch + 4 * batch * context * hd * heads_local
            compute = _roofline(nbytes, flops, gpu, p)
        comm = 2 * allreduce_time(model, gpu, tp, batch, interconnect, p)
        return LayerTime(compute, comm)
    part = batch / n
    if prof and prof.decode_ms:   # a measured step of batch / n sequences, n times
        compute = n * prof.decode_ms.ms(part) / 1e3 / tp
    else:
        nbytes = model.layer_bytes / tp + part * context * kv_tok
        flops = 2 * model.params_per_layer / tp * part + 4 * part * context * hd * heads_local
        compute = n * _roofline(nbytes, flops, gpu, p)
    comm = n * 2 * allreduce_time(model, gpu, tp, part, interconnect, p)
    return _overlap(compute, comm, n, p)


def decode_layer_time(model: ModelSpec, gpu: GpuType, tp: int, batch: int, context: float,
                      interconnect: float, p: CostParams = DEFAULT_PARAMS, parts: int = 1,
                      sp: int = 1) -> float:
    """Seconds for one decode step of ``batch`` sequences through one layer on a TP group
    (``parts`` > 1: interleaved, see ``decode_layer_split``; ``sp`` > 1: SP mode)."""
    return decode_layer_split(model, gpu, tp, batch, context, interconnect, p, parts, sp).total


def prefill_layer_split(model: ModelSpec, gpu: GpuType, tp: int, tokens: int, interconnect: float,
                        p: CostParams = DEFAULT_PARAMS, parts: int = 1, sp: int = 1) -> LayerTime:
    """Prefill of one prompt of ``tokens`` tokens through one layer on a TP group, in ``parts``
    equal parts of its tokens (interleaving; causal attention's FLOPs split evenly). ``sp`` > 1:
    in Shift Parallelism's SP mode on the ``tp`` GPUs (``sp_layer_split``; not cut into parts)."""
    if sp > 1:
        return sp_layer_split(model, gpu, tp, sp, tokens, interconnect, p)
    hd, b = model.dim_head, model.bytes_per_param
    heads_local = model.num_heads // tp
    kv_tok = 2 * local_kv_heads(model, tp) * hd * b
    n = _parts(parts, tokens)
    prof = group_profile(model, gpu, tp)
    if n == 1:
        if prof and prof.prefill_ms:
            compute = prof.prefill_ms.ms(tokens) / 1e3 / tp
        else:
            nbytes = model.layer_bytes / tp + tokens * kv_tok
            flops = 2 * model.params_per_layer / tp * tokens + 2 * tokens * tokens * hd * heads_local
            compute = _roofline(nbytes, flops, gpu, p)
        comm = 2 * allreduce_time(model, gpu, tp, tokens, interconnect, p)
        return LayerTime(compute, comm)
    part = tokens / n
    if prof and prof.prefill_ms:   # a measured prompt of tokens / n, n times
        compute = n * prof.prefill_ms.ms(part) / 1e3 / tp
    else:
        nbytes = model.layer_bytes / tp + part * kv_tok
        flops = 2 * model.params_per_layer / tp * part + 2 * tokens * tokens * hd * heads_local / n
        compute = n * _roofline(nbytes, flops, gpu, p)
    comm = n * 2 * allreduce_time(model, gpu, tp, part, interconnect, p)
    return _overlap(compute, comm, n, p)


def prefill_layer_time(model: ModelSpec, gpu: GpuType, tp: int, tokens: int, interconnect: float,
                       p: CostParams = DEFAULT_PARAMS, parts: int = 1, sp: int = 1) -> float:
    """Seconds to prefill one prompt of ``tokens`` tokens through one layer on a TP group
    (``parts`` > 1: interleaved, see ``prefill_layer_split``; ``sp`` > 1: SP mode)."""
    return prefill_layer_split(model, gpu, tp, tokens, interconnect, p, parts, sp).total


@functools.lru_cache(maxsize=256)
def _quadratic_fit(table) -> tuple[float, float, float] | None:
    """(a, b, q) of the least-squares fit ms = a + b P + q P^2 to a prefill table's points;
    None with fewer than 3 points or a singular fit."""
    pts = table.points
    if len(pts) < 3:
        return None
    # normal equations of the 3-parameter fit, solved by Cramer's rule
    s = [sum(x ** k for x, _ in pts) for k in range(5)]
    t = [sum(y * x ** k for x, y in pts) for k in range(3)]
    m = [[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]]

    def det(a):
        return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    d = det(m)
    if d == 0:
        return None

    def col(j):   # m with its column j replaced by t
        return [[t[i] if k == j else m[i][k] for k in range(3)] for i in range(3)]
    return det(col(0)) / d, det(col(1)) / d, det(col(2)) / d


def _quadratic(table) -> float:
    """The P^2 coefficient of ``_quadratic_fit`` (the attention's share of a prompt's cost),
    >= 0; 0 with fewer than 3 points."""
    fit = _quadratic_fit(table)
    return max(0.0, fit[2]) if fit else 0.0


def step_fixed_time(model: ModelSpec, gpu: GpuType, tp: int) -> float:
    """Seconds per layer that a step pays once, whatever its tokens, in a measured prefill
    table: the intercept a of ``_quadratic_fit`` (>= 0) / tp. On a CPU it is most of a small
    forward (the fidelity bench's profile: a = 4.7 ms of a 32-token prompt's 6.8 ms a layer).
    A step of decodes and a prompt chunk pays it once, in its decode step, so the simulator's
    share rule charges a chunk its share of its prompt's prefill less it
    (``Engine._layer_times``).
    0 without a measured table: a roofline prefill of a prompt is its FLOPs or its reads, not
    a fixed cost plus per-token work."""
    prof = group_profile(model, gpu, tp)
    if prof is None or prof.prefill_ms is None:
        return 0.0
    fit = _quadratic_fit(prof.prefill_ms)
    return max(0.0, fit[0]) / 1e3 / tp if fit else 0.0


def attention_pair_time(model: ModelSpec, gpu: GpuType, tp: int, p: CostParams = DEFAULT_PARAMS) -> float:
    """Seconds per layer of attention per unit of P^2 on a TP group, the unit in which a prompt
    of P tokens attends (its P^2 / 2 causal pairs) and the simulator counts a step's attention
    (``_Kind.mixed``: a chunk of c tokens at position s is c^2 + 2 s c). With a measured
    ``prefill_ms`` table, the P^2 coefficient q of a least-squares quadratic through its points
    (a CPU profile: q = 9e-5 ms, so a 32-token chunk at position 96 costs 2 x 96 x 32 q = 0.55 ms
    a layer more than a 32-token prompt from 0, where bench/served_step_bench.py measured
    0.3-0.8); else the prefill roofline's attention FLOPs per unit, 2 x d_h x heads / tp, at its
    FLOP rate."""
    prof = group_profile(model, gpu, tp)
    if prof is not None and prof.prefill_ms is not None:
        return _quadratic(prof.prefill_ms) / 1e3 / tp
    return 2 * model.dim_head * (model.num_heads // tp) / (gpu.flops * p.flops_efficiency)


def decode_attention_time(model: ModelSpec, gpu: GpuType, tp: int, context: float,
                          p: CostParams = DEFAULT_PARAMS) -> float:
    """Seconds per layer one decoding sequence adds to a step that also carries a prompt chunk,
    beyond its row in the step's matrix products (which ``prefill_layer_time`` of all the step's
    tokens charges): its attention over its ``context`` cached positions and its own per-sequence
    work. With measured ``decode_ms`` and ``prefill_ms`` tables: how much faster the decode table
    grows per sequence than the prefill table per token between the decode table's two largest
    batches (both add a row to the products; a sequence also attends and is handled apart; the
    prefill table's first span where it has no points that low), >= 0,
    at the profiled context (a CPU profile: 0.12-0.14 ms, where served steps of n decodes and a
    32-token chunk grew by about 0.14 ms a layer per decode, docs/fidelity.md); else the
    roofline of reading its KV cache."""
    prof = group_profile(model, gpu, tp)
    if prof is not None and prof.decode_ms is not None and prof.prefill_ms is not None \
            and len(prof.decode_ms.points) >= 2:
        (b1, d1), (b2, d2) = prof.decode_ms.points[-2:]
        pre = prof.prefill_ms
        # the prefill table's growth per token over the same span, or its first span where it
        # has no points that low (it is flat below its first point)
        lo = max(b1, pre.points[0][0])
        hi = max(b2, pre.points[1][0] if len(pre.points) > 1 else b2, lo + 1)
        per_seq = (d2 - d1) / (b2 - b1) - (pre.ms(hi) - pre.ms(lo)) / (hi - lo)
        return max(0.0, per_seq) / 1e3 / tp
    hd = model.dim_head
    nbytes = context * 2 * local_kv_heads(model, tp) * hd * model.bytes_per_param
    return _roofline(nbytes, 4 * context * hd * (model.num_heads // tp), gpu, p)


def lm_head_time(model: ModelSpec, gpu: GpuType, tp: int, tokens: int, p: CostParams = DEFAULT_PARAMS,
                 parts: int = 1, sp: int = 1) -> float:
    """Seconds for the final norm + LM head (vocab-parallel over TP) on ``tokens`` tokens; in
    ``parts`` parts each reads the head's weights. With a measured ``lm_head_ms`` table in the GPU
    type's profile of the model (TP 1, the last stage's whole head work on a step of that many
    logits rows): the table / tp, per part. ``sp`` > 1 (Shift Parallelism's SP mode): the same as
    TP mode's: the executor gathers the step's hidden states over the SP ranks and runs the d-way
    head of TP mode on all rows (the gather itself is not modelled)."""
    n = _parts(parts, tokens)
    prof = group_profile(model, gpu, tp)
    if prof is not None and prof.lm_head_ms is not None:
        return n * prof.lm_head_ms.ms(tokens / n) / 1e3 / tp
    if n == 1:
        nbytes = model.head_bytes / tp + tokens * model.vocab_size / tp * 4  # weights + fp32 logits
        flops = 2 * model.vocab_size * model.hidden_size / tp * tokens
        return _roofline(nbytes, flops, gpu, p)
    part = tokens / n
    nbytes = model.head_bytes / tp + part * model.vocab_size / tp * 4
    flops = 2 * model.vocab_size * model.hidden_size / tp * part
    return n * _roofline(nbytes, flops, gpu, p)


# ---------------------------------------------------------------------------------------
# Shift Parallelism (docs/cost-model.md, section 14). A shifted stage of degree d = tp runs a
# step in TP mode (all d GPUs one TP group: the functions above with sp = 1) or in SP mode: sp
# groups of t = d / sp GPUs, Ulysses sequence parallelism across the groups. The step's tokens
# are split over the sp ranks (ceil(n / sp) each, with the d/sp-way TP weights), attention runs
# head-parallel over all d GPUs (n_h / d query heads, the same KV heads as TP mode), and each
# layer has two all-to-alls over the sp ranks (q/k/v in, attention output back) besides the two
# all-reduces of each t-way group. The rule that picks the mode is hexplan.serving.shift.

MIN_SHIFT_THRESHOLD = 16      # steps of at most this many tokens always run in TP mode
MAX_SHIFT_THRESHOLD = 16384   # SP mode is never slower than TP mode beyond this


def alltoall_time(model: ModelSpec, gpu: GpuType, sp: int, nbytes: float, interconnect: float,
                  p: CostParams = DEFAULT_PARAMS) -> float:
    """One all-to-all over ``sp`` ranks, each holding ``nbytes`` and keeping 1/sp of them:
    pairwise exchange, sp - 1 steps of alpha + nbytes / (sp * beta), each rank sending
    (sp - 1) / sp of its bytes -- half a ring all-reduce of the same bytes (``allreduce_time``'s
    conventions). With a measured ``allreduce_ms`` table: half the table at the same bytes
    (nbytes / (H b) rows), scaled by (sp - 1) / (allreduce_tp - 1)."""
    if sp <= 1:
        return 0.0
    prof = gpu.profile_for(model.name)
    if prof is not None and prof.allreduce_ms is not None:
        rows = nbytes / (model.hidden_size * model.bytes_per_param)
        return 0.5 * prof.allreduce_ms.ms(rows) / 1e3 * (sp - 1) / max(1, prof.allreduce_tp - 1)
    return (sp - 1) * (p.allreduce_alpha + nbytes / (sp * interconnect))


def sp_layer_split(model: ModelSpec, gpu: GpuType, tp: int, sp: int, tokens: float, interconnect: float,
                   p: CostParams = DEFAULT_PARAMS, context: float | None = None) -> LayerTime:
    """One layer of a step in SP mode on a shifted stage of ``tp`` GPUs (sp groups of t = tp / sp):
    with ``context`` None, the prefill of one prompt of ``tokens`` tokens; else a decode step of
    ``tokens`` sequences at mean context ``context``. The busiest rank has n = ceil(tokens / sp)
    tokens:

        bytes = layer_bytes / t + KV (tokens x context x kv_tok(d) read, or tokens x kv_tok(d) written)
        flops = 2 params_layer / t x n + attention over all tokens on n_h / d heads
        comm  = 2 AR(n rows, t) + A2A(n (n_h / t + 2 n_kv(t)) h_d b) + A2A(n (n_h / t) h_d b)

    A measured profile (TP-1 tables) replaces the roofline by the larger of the rank's own
    work, ms(n) / t, and its share of the whole step's, ms(tokens) / tp."""
    t = tp // sp
    hd, b = model.dim_head, model.bytes_per_param
    heads = model.num_heads // tp          # query heads per GPU in attention (head-parallel over all tp)
    kv_tok = 2 * local_kv_heads(model, tp) * hd * b
    n = math.ceil(tokens / sp)
    prof = group_profile(model, gpu, t)
    table = (prof.decode_ms if context is not None else prof.prefill_ms) if prof else None
    if table:
        compute = max(table.ms(n) / t, table.ms(tokens) / tp) / 1e3
    elif context is not None:
        nbytes = model.layer_bytes / t + tokens * context * kv_tok
        flops = 2 * model.params_per_layer / t * n + 4 * tokens * context * hd * heads
        compute = _roofline(nbytes, flops, gpu, p)
    else:
        nbytes = model.layer_bytes / t + tokens * kv_tok
        flops = 2 * model.params_per_layer / t * n + 2 * tokens * tokens * hd * heads
        compute = _roofline(nbytes, flops, gpu, p)
    qkv = n * (model.num_heads // t + 2 * local_kv_heads(model, t)) * hd * b
    out = n * (model.num_heads // t) * hd * b
    comm = (2 * allreduce_time(model, gpu, t, n, interconnect, p)
            + alltoall_time(model, gpu, sp, qkv, interconnect, p) + alltoall_time(model, gpu, sp, out, interconnect, p))
    return LayerTime(compute, comm)


def shift_threshold(model: ModelSpec, gpu: GpuType, tp: int, sp: int, interconnect: float,
                    p: CostParams = DEFAULT_PARAMS) -> int:
    """The step size, in tokens, above which SP mode is faster than TP mode on a shifted stage of
    ``tp`` GPUs with ``sp`` SP ranks: the cost model's crossover for a step of one prompt chunk
    of n tokens (``prefill_layer_time`` with sp = 1 against sp = ``sp``), the largest n at which
    TP mode is still at least as fast. Clamped to [MIN_SHIFT_THRESHOLD, MAX_SHIFT_THRESHOLD]:
    steps of a few tokens (decode of a few sequences: where the latency is felt) stay in TP mode
    even where the model calls SP mode faster, and where SP mode never wins the threshold is
    the maximum (large prompts only). ``p.shift_threshold`` (not None) overrides it, unclamped
    (0: every step in SP mode). Memoised; about
    30 evaluations of the layer time on a first call. Assumes one crossover (TP faster below
    it, SP faster above it), which holds for the roofline: SP mode reads sp times the weights
    per GPU (a fixed cost) and moves fewer bytes per token."""
    if p.shift_threshold is not None:
        return int(p.shift_threshold)
    if sp <= 1:
        return MAX_SHIFT_THRESHOLD
    return _crossover(model, gpu, tp, sp, interconnect, p)


@functools.lru_cache(maxsize=4096)
def _crossover(model: ModelSpec, gpu: GpuType, tp: int, sp: int, interconnect: float, p: CostParams) -> int:
    def sp_faster(n: int) -> bool:
        return (prefill_layer_time(model, gpu, tp, n, interconnect, p, sp=sp)
                < prefill_layer_time(model, gpu, tp, n, interconnect, p))

    lo, hi = MIN_SHIFT_THRESHOLD, MAX_SHIFT_THRESHOLD
    if sp_faster(lo + 1):
        return lo
    if not sp_faster(hi + 1):
        return hi
    # TP mode is at least as fast at lo + 1, SP mode faster at hi + 1: bisect for the last TP n.
    a, b = lo + 1, hi + 1
    while b - a > 1:
        m = (a + b) // 2
        if sp_faster(m):
            b = m
        else:
            a = m
    return a


def shift_weight_factor(sp: int) -> float:
    """Layer weight bytes per GPU of a shifted stage over those of a plain TP stage of the same
    degree d: SP mode's shard W / (d / sp), sp x W / d (1 when not shifted). TP mode's d-way
    shard is a view of it (the d-way block t x sp + s lies inside tp-block t: executor shift.py),
    so hexplan holds one copy where Arctic Inference holds both (1 + sp). The embedding and the
    LM head are as in an unshifted stage (the head runs d-way in both modes)."""
    return float(sp) if sp > 1 else 1.0


def stage_cost(model: ModelSpec, gpu: GpuType, tp: int, workload: Workload, interconnect: float,
               p: CostParams = DEFAULT_PARAMS, shift_sp: int = 1) -> StageCost:
    """All per-layer figures of a TP group of ``tp`` GPUs of type ``gpu``. With interleaving
    (``workload.interleave`` > 1) its steps run in ``workload.parts`` parts: decode steps, the
    prompt tokens riding in them and the LM head's decode call; a prompt on its own (TTFT) is one
    chunk, which the executor does not cut (``prefill_whole_s``).

    ``shift_sp`` > 1: a shifted stage (Shift Parallelism). Each step takes the mode the shared
    rule (hexplan.serving.shift.shift_mode) gives at ``shift_threshold``: a decode step of B
    sequences is a step of B tokens, a prompt one of P tokens; SP-mode steps are not cut into
    parts. Each GPU holds its layers' SP-mode shards (``shift_weight_factor``: TP mode reads views
    of them); the embedding and the LM head are an unshifted stage's."""
    w = workload
    n = w.parts
    sp_dec = sp_pre = sp_head = 1
    threshold = 0
    if shift_sp > 1:
        from .serving.shift import SP_MODE, shift_mode   # the one copy of the rule

        threshold = shift_threshold(model, gpu, tp, shift_sp, interconnect, p)
        sp_dec = shift_sp if shift_mode(w.batch_size, threshold) == SP_MODE else 1
        sp_pre = shift_sp if shift_mode(w.prompt_tokens, threshold) == SP_MODE else 1
        sp_head = sp_dec
    dec = decode_layer_time(model, gpu, tp, w.batch_size, w.mean_decode_context, interconnect, p, n, sp_dec)
    pre = prefill_layer_time(model, gpu, tp, w.prompt_tokens, interconnect, p, n, sp_pre)
    # Each output token costs 1/B of a decode step plus 1/O of its request's prefill.
    rate = 1.0 / (dec / w.batch_size + pre / w.output_tokens)
    b = model.bytes_per_param
    kv_tok = 2 * local_kv_heads(model, tp) * model.dim_head * b
    kv_layer = w.concurrency * w.context * kv_tok
    copies = shift_weight_factor(shift_sp)   # a shifted stage: SP mode's shards (TP mode's are views)
    mem_per_layer = model.layer_bytes / tp * copies + kv_layer
    # Workspace: activations of one prompt in flight (hidden, q/k/v/o and the MLP shard).
    workspace = w.prompt_tokens * (4 * model.hidden_size + 2 * model.intermediate_size / tp) * b
    usable = gpu.memory * (1 - p.memory_headroom) - workspace
    embed = model.embedding_bytes / tp
    head = model.head_bytes / tp
    head_dec = lm_head_time(model, gpu, tp, w.batch_size, p, n, sp_head)
    # only the prompt's last position needs logits (one row: the SP-mode rank that has it)
    head_pre = lm_head_time(model, gpu, tp, 1, p, sp=sp_pre)
    whole = None if n == 1 or sp_pre > 1 else prefill_layer_time(model, gpu, tp, w.prompt_tokens, interconnect, p)
    return StageCost(gpu.name, tp, dec, pre, rate, mem_per_layer, usable, embed, head,
                     head_dec, head_pre, w.batch_size, w.output_tokens, whole, n,
                     shift_sp, threshold, call_time(model, gpu, w.batch_size), call_time(model, gpu, 1))


def hop_decode_time(model: ModelSpec, workload: Workload, bandwidth: float, latency: float) -> float:
    """Activations of one decode micro-batch over one link."""
    return send_time(workload.batch_size * model.activation_bytes_per_token, bandwidth, latency)


def hop_prefill_time(model: ModelSpec, workload: Workload, bandwidth: float, latency: float) -> float:
    """Activations of one prompt over one link."""
    return send_time(workload.prompt_tokens * model.activation_bytes_per_token, bandwidth, latency)


def link_token_capacity(model: ModelSpec, workload: Workload, bandwidth: float) -> float:
    """Output tokens/s a link between two stages can carry (decode + the prompt's activations)."""
    per_token = model.activation_bytes_per_token * (1 + workload.prompt_tokens / workload.output_tokens)
    return bandwidth / per_token


def coordinator_token_capacity(workload: Workload, bandwidth: float) -> float:
    """Output tokens/s the coordinator -> first stage link carries: the prompt's token ids
    (P/O per output token) and each generated token fed back (1 per output token)."""
    per_token = TOKEN_ID_BYTES * (1 + workload.prompt_tokens / workload.output_tokens)
    return bandwidth / per_token


def coordinator_out_capacity(bandwidth: float) -> float:
    """Output tokens/s the last stage -> coordinator link carries: one token id each."""
    return bandwidth / TOKEN_ID_BYTES
