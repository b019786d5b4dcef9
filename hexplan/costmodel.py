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
  the ring formula (scaled by the ring's steps from the degree it was measured at).
* Interleaving (``Workload.interleave`` N > 1, Liger-style): a step runs as N parts. Compute is
  the sum of the N parts' rooflines (the weights are read N times), the all-reduces move the same
  bytes in N times as many messages, and communication hides under compute up to
  ``CostParams.contention`` times the compute: t = compute + comm - min(comm, contention * compute).
  docs/cost-model.md, section 13.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SpecError
from .gpus import GpuType
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

    def to_dict(self) -> dict:
        return {"mem_efficiency": self.mem_efficiency, "flops_efficiency": self.flops_efficiency,
                "allreduce_alpha": self.allreduce_alpha, "memory_headroom": self.memory_headroom,
                "contention": self.contention}


DEFAULT_PARAMS = CostParams()


def ring_allreduce_time(nbytes: float, d: int, bandwidth: float, alpha: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``d`` GPUs: 2 (d-1) steps of alpha + nbytes/(d*bw)."""
    if d <= 1:
        return 0.0
    return 2 * (d - 1) * (alpha + nbytes / (d * bandwidth))


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

    def capacity(self, layers: int, last: bool = False) -> float:
        """Output tokens/s this stage sustains when it holds ``layers`` layers (and, for the
        last stage, the LM head): 1 / (layers / layer_rate + head cost per token)."""
        per_token = layers / self.layer_rate + (self.head_cost_per_token if last else 0.0)
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
                       interconnect: float, p: CostParams = DEFAULT_PARAMS, parts: int = 1) -> LayerTime:
    """One decode step of ``batch`` sequences through one layer on a TP group, in ``parts`` equal
    parts (interleaving): each part reads the layer's weights and its sequences' KV cache
    (compute = sum of the parts' rooflines), each part all-reduces its own activations (same
    bytes, ``parts`` times the alpha terms)."""
    hd, b = model.dim_head, model.bytes_per_param
    heads_local = model.num_heads // tp
    kv_tok = 2 * local_kv_heads(model, tp) * hd * b
    n = _parts(parts, batch)
    prof = gpu.profile_for(model.name)
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
                      interconnect: float, p: CostParams = DEFAULT_PARAMS, parts: int = 1) -> float:
    """Seconds for one decode step of ``batch`` sequences through one layer on a TP group
    (``parts`` > 1: interleaved, see ``decode_layer_split``)."""
    return decode_layer_split(model, gpu, tp, batch, context, interconnect, p, parts).total


def prefill_layer_split(model: ModelSpec, gpu: GpuType, tp: int, tokens: int, interconnect: float,
                        p: CostParams = DEFAULT_PARAMS, parts: int = 1) -> LayerTime:
    """Prefill of one prompt of ``tokens`` tokens through one layer on a TP group, in ``parts``
    equal parts of its tokens (interleaving; causal attention's FLOPs split evenly)."""
    hd, b = model.dim_head, model.bytes_per_param
    heads_local = model.num_heads // tp
    kv_tok = 2 * local_kv_heads(model, tp) * hd * b
    n = _parts(parts, tokens)
    prof = gpu.profile_for(model.name)
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
                       p: CostParams = DEFAULT_PARAMS, parts: int = 1) -> float:
    """Seconds to prefill one prompt of ``tokens`` tokens through one layer on a TP group
    (``parts`` > 1: interleaved, see ``prefill_layer_split``)."""
    return prefill_layer_split(model, gpu, tp, tokens, interconnect, p, parts).total


def lm_head_time(model: ModelSpec, gpu: GpuType, tp: int, tokens: int, p: CostParams = DEFAULT_PARAMS,
                 parts: int = 1) -> float:
    """Seconds for the final norm + LM head (vocab-parallel over TP) on ``tokens`` tokens; in
    ``parts`` parts each reads the head's weights. With a measured ``lm_head_ms`` table in the GPU
    type's profile of the model (TP 1, the last stage's whole head work on a step of that many
    logits rows): the table / tp, per part."""
    n = _parts(parts, tokens)
    prof = gpu.profile_for(model.name)
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


def stage_cost(model: ModelSpec, gpu: GpuType, tp: int, workload: Workload, interconnect: float,
               p: CostParams = DEFAULT_PARAMS) -> StageCost:
    """All per-layer figures of a TP group of ``tp`` GPUs of type ``gpu``. With interleaving
    (``workload.interleave`` > 1) its steps run in ``workload.parts`` parts: decode steps, the
    prompt tokens riding in them and the LM head's decode call; a prompt on its own (TTFT) is one
    chunk, which the executor does not cut (``prefill_whole_s``)."""
    w = workload
    n = w.parts
    dec = decode_layer_time(model, gpu, tp, w.batch_size, w.mean_decode_context, interconnect, p, n)
    pre = prefill_layer_time(model, gpu, tp, w.prompt_tokens, interconnect, p, n)
    # Each output token costs 1/B of a decode step plus 1/O of its request's prefill.
    rate = 1.0 / (dec / w.batch_size + pre / w.output_tokens)
    b = model.bytes_per_param
    kv_tok = 2 * local_kv_heads(model, tp) * model.dim_head * b
    kv_layer = w.concurrency * w.context * kv_tok
    mem_per_layer = model.layer_bytes / tp + kv_layer
    # Workspace: activations of one prompt in flight (hidden, q/k/v/o and the MLP shard).
    workspace = w.prompt_tokens * (4 * model.hidden_size + 2 * model.intermediate_size / tp) * b
    usable = gpu.memory * (1 - p.memory_headroom) - workspace
    embed = model.embedding_bytes / tp
    head = model.head_bytes / tp
    head_dec = lm_head_time(model, gpu, tp, w.batch_size, p, n)
    head_pre = lm_head_time(model, gpu, tp, 1, p)  # only the prompt's last position needs logits
    whole = None if n == 1 else prefill_layer_time(model, gpu, tp, w.prompt_tokens, interconnect, p)
    return StageCost(gpu.name, tp, dec, pre, rate, mem_per_layer, usable, embed, head,
                     head_dec, head_pre, w.batch_size, w.output_tokens, whole, n)


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
