"""Shift Parallelism on one stage (Snowflake's Arctic Inference): d = sp x tp ranks that run each
step either as one TP group of d ranks (TP mode: lowest latency per token) or as sp groups of tp
ranks with Ulysses sequence parallelism (SP mode: no d-way all-reduce), on the same KV cache.
The mode of a step is ``hexplan.serving.shift.shift_mode(step tokens, threshold)``; every rank
runs the same step, so every rank picks the same mode with no message.

Geometry (S = sp, tp = d / S). Process rank r sits at sp index s = r // tp and tp index
t = r % tp, so SP mode's tp groups are runs of consecutive ranks {s*tp .. s*tp + tp-1} (as vLLM
puts TP innermost) and its SP groups are strided, {t, tp + t, ..}. In TP mode rank (t, s) holds
the d-way block k = t*S + s (``ShiftLayout.layout_rank``) of the query heads, KV heads, MLP units
and vocabulary: an ordinary d-way TP layout (model.TPLayout) at rank k, not at rank r.

SP mode, one layer, on rank (t, s) holding the tokens of block s of the step (padded to a
multiple of S): q/k/v from the tp-way weights of tp block t. The q heads of tp block t are the
d-way blocks t*S + 0 .. t*S + S-1, in order; the k/v weights are built the same way (for each s',
the KV heads of d-way block t*S + s', repeated when there are fewer KV heads than d). One
all-to-all in the SP group of t sends rank s' the part for block t*S + s', so afterwards rank
(t, s) has every token of the step for d-way block k = t*S + s: the very heads it attends in TP
mode, with the same cache tensors. Attention is the TP-mode code (model.Attention.attend). The
second all-to-all sends each token's output back to the rank that owns the token; o_proj,
gate/up and down_proj are row/column-parallel over tp with all-reduces in the tp group only. At
the end the SP group all-gathers the tokens' hidden states; the last stage's norm and LM head
run as in TP mode (d-way vocabulary shards).

Logits. Vocabulary shard k lives on rank r(k) = (k % S)*tp + k // S, so the d-way all-gather,
which returns shards in process-rank order, is put back in vocabulary order by the fixed
permutation ``ShiftLayout.vocab_order`` = [r(0), .., r(d-1)].

Weights. Each rank loads the tp-way weights SP mode needs (W / tp per rank). Its d-way block
k = t*S + s lies inside tp block t (rows s*h_d.. of q, s*kv_d.. of k/v, s*I_d.. of gate/up, the
same columns of o/down), so TP mode's weights are views of them (``tp_views``): no second copy.
Arctic holds two copies (W / tp + W / d); with unfused q/k/v and gate/up there is no need here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hexplan.serving.shift import SP_MODE, TP_MODE, shift_mode

from .distributed import TPContext

# The threshold of a stage that has no cost-model crossover (a plan without a cluster section) or
# a LoadShardRequest without one: Arctic Inference's documented value.
DEFAULT_SHIFT_THRESHOLD = 256

__all__ = ["DEFAULT_SHIFT_THRESHOLD", "ShiftLayout", "Shift", "SPWeights", "init_shift", "shift_problem",
           "sp_layer_steps", "sp_slices", "tp_views", "SP_MODE", "TP_MODE"]


def shift_problem(num_heads: int, num_kv_heads: int, intermediate_size: int, degree: int, sp: int) -> str | None:
    """Why a stage of ``degree`` ranks cannot run shifted with ``sp`` (None: it can). TP mode is
    an ordinary d-way TP layout, so heads and MLP units must split d ways and KV heads split or
    replicate d ways; SP mode's tp-way layout follows from that."""
    if sp < 1:
        return f"shift sp must be at least 1, got {sp}"
    if degree % sp:
        return f"shift sp {sp} must divide the stage's tp {degree}"
    if sp == 1:
        return None
    if num_heads % degree:
        return (f"shift sp {sp} x tp {degree // sp}: {num_heads} attention heads do not split over the stage's "
                f"{degree} ranks (TP mode needs whole heads per rank)")
    if intermediate_size % degree:
        return (f"shift sp {sp} x tp {degree // sp}: intermediate_size {intermediate_size} does not split over "
                f"{degree} ranks")
    if num_kv_heads % degree and degree % num_kv_heads:
        return (f"shift sp {sp} x tp {degree // sp}: {num_kv_heads} KV heads can be neither split nor replicated "
                f"over {degree} ranks")
    return None


@dataclass(frozen=True)
class ShiftLayout:
    """Where process ``rank`` of a shifted stage of ``size`` = sp x tp ranks sits (module docstring)."""
    size: int
    sp: int
    rank: int

    def __post_init__(self):
        if self.sp < 2 or self.size % self.sp or not 0 <= self.rank < self.size:
            raise ValueError(f"shift: rank {self.rank} of {self.size} with sp {self.sp} (sp >= 2 must divide the size)")

    @property
    def tp(self) -> int:
        return self.size // self.sp

    @property
    def s(self) -> int:                      # this rank's sp index: which block of a step's tokens
        return self.rank // self.tp

    @property
    def t(self) -> int:                      # this rank's tp index: which tp-way block of weights
        return self.rank % self.tp

    @property
    def layout_rank(self) -> int:
        """The d-way block (heads, KV heads, MLP units, vocabulary) this rank holds in TP mode."""
        return self.t * self.sp + self.s

    def rank_of(self, s: int, t: int) -> int:
        return s * self.tp + t

    def tp_group(self, s: int) -> list[int]:
        """SP mode's tp group of sp index ``s`` (all-reduces)."""
        return [self.rank_of(s, t) for t in range(self.tp)]

    def sp_group(self, t: int) -> list[int]:
        """SP mode's SP group of tp index ``t`` (the all-to-alls), in sp order."""
        return [self.rank_of(s, t) for s in range(self.sp)]

    @property
    def vocab_order(self) -> list[int]:
        """The process rank whose LM-head shard is the i-th of the vocabulary, for each i."""
        return [self.rank_of(k % self.sp, k // self.sp) for k in range(self.size)]


@dataclass(frozen=True)
class Shift:
    """A rank's shift state: its layout, the mode threshold and SP mode's two groups."""
    layout: ShiftLayout
    threshold: int
    tp_ctx: TPContext        # SP mode's tp group (all-reduces); rank t of tp
    sp_ctx: TPContext        # the SP group (all-to-alls, the final gather); rank s of sp

    def mode(self, step_tokens: int) -> str:
        return shift_mode(step_tokens, self.threshold)


def init_shift(ctx: TPContext, sp: int, threshold: int) -> Shift:
    """Make SP mode's sub-groups of the stage's group (``ctx``, from distributed.init_tp). Every
    rank must call it: each torch.distributed group is created by all ranks, in the same order."""
    import torch.distributed as dist

    if threshold < 0:
        raise ValueError(f"shift threshold must be >= 0 tokens, got {threshold}")
    lay = ShiftLayout(ctx.size, sp, ctx.rank)
    tp_ctx = sp_ctx = None
    if lay.tp > 1:
        for s in range(sp):
            g = dist.new_group(lay.tp_group(s))
            if s == lay.s:
                tp_ctx = TPContext(lay.t, lay.tp, g, ctx.device, ctx.link)
    for t in range(lay.tp):
        g = dist.new_group(lay.sp_group(t))
        if t == lay.t:
            sp_ctx = TPContext(lay.s, sp, g, ctx.device)
    return Shift(lay, threshold, tp_ctx or TPContext(0, 1, None, ctx.device), sp_ctx)


# ---- SP mode's weights --------------------------------------------------------------------------

class SPWeights(nn.Module):
    """One layer's tp-way weights for SP mode (the norms are the layer's own). q: tp block t's
    heads; k/v: for each s', d-way block t*S + s''s KV heads; o/down by input columns."""

    def __init__(self, a, lay: ShiftLayout, kv_heads: int):
        super().__init__()
        D, H, S, tp = a.head_dim, a.hidden_size, lay.sp, lay.tp
        h, inter = a.num_heads // tp, a.intermediate_size // tp
        self.q_proj = nn.Linear(H, h * D, bias=a.qkv_bias)
        self.k_proj = nn.Linear(H, S * kv_heads * D, bias=a.qkv_bias)
        self.v_proj = nn.Linear(H, S * kv_heads * D, bias=a.qkv_bias)
        self.o_proj = nn.Linear(h * D, H, bias=a.o_bias)
        self.gate_proj = nn.Linear(H, inter, bias=a.mlp_bias)
        self.up_proj = nn.Linear(H, inter, bias=a.mlp_bias)
        self.down_proj = nn.Linear(inter, H, bias=a.mlp_bias)


def sp_slices(a, lay: ShiftLayout, kv_rows_of) -> dict:
    """suffix -> (full shape, split dim, [ranges]) of SP mode's weights; k/v take one range per
    sp index (``kv_rows_of(k)``: the KV rows of d-way block k), concatenated at load."""
    H, D, I, tp, t, S = a.hidden_size, a.head_dim, a.intermediate_size, lay.tp, lay.t, lay.sp
    h, i = a.num_heads // tp, I // tp
    q = [(t * h * D, (t + 1) * h * D)]
    kv = [kv_rows_of(t * S + s) for s in range(S)]
    mlp = [(t * i, (t + 1) * i)]
    return {
        "sp.q_proj.weight": ((a.num_heads * D, H), 0, q),
        "sp.q_proj.bias": ((a.num_heads * D,), 0, q),
        "sp.k_proj.weight": ((a.num_kv_heads * D, H), 0, kv),
        "sp.k_proj.bias": ((a.num_kv_heads * D,), 0, kv),
        "sp.v_proj.weight": ((a.num_kv_heads * D, H), 0, kv),
        "sp.v_proj.bias": ((a.num_kv_heads * D,), 0, kv),
        "sp.o_proj.weight": ((H, a.num_heads * D), 1, q),
        "sp.o_proj.bias": ((H,), None, None),
        "sp.gate_proj.weight": ((I, H), 0, mlp),
        "sp.gate_proj.bias": ((I,), 0, mlp),
        "sp.up_proj.weight": ((I, H), 0, mlp),
        "sp.up_proj.bias": ((I,), 0, mlp),
        "sp.down_proj.weight": ((H, I), 1, mlp),
        "sp.down_proj.bias": ((H,), None, None),
    }


def tp_views(a, lay: ShiftLayout, kv_heads: int) -> dict:
    """TP-mode suffix -> (SP-mode suffix, dim, start, stop): TP mode's d-way weights as views of
    SP mode's tp-way ones (block k = t*S + s is the s-th sub-block of tp block t)."""
    D, s = a.head_dim, lay.s
    hd, kd, idd = a.num_heads // lay.size * D, kv_heads * D, a.intermediate_size // lay.size
    q, kv, mlp = (s * hd, (s + 1) * hd), (s * kd, (s + 1) * kd), (s * idd, (s + 1) * idd)
    out = {}
    for name, rng, dim in (("self_attn.q_proj", q, 0), ("self_attn.k_proj", kv, 0), ("self_attn.v_proj", kv, 0),
                           ("self_attn.o_proj", q, 1), ("mlp.gate_proj", mlp, 0), ("mlp.up_proj", mlp, 0),
                           ("mlp.down_proj", mlp, 1)):
        sp_name = "sp." + name.split(".")[1]
        out[name + ".weight"] = (sp_name + ".weight", dim, *rng)
        out[name + ".bias"] = (sp_name + ".bias", 0 if dim == 0 else None, *rng)
    return out


# ---- SP mode's layer step -----------------------------------------------------------------------

def sp_layer_steps(layer, x, b, shift: Shift, T: int, pieces: int = 1):
    """One decoder layer in SP mode on this rank's block of a step's tokens, as a generator like
    DecoderLayer.steps (yields after starting each tp all-reduce). x: [Ts, H], this rank's Ts
    tokens (block s of the step, zero rows past its T tokens); b: the whole step's Batch."""
    from .model import row_parallel_finish, row_parallel_start

    w, attn, S = layer.sp, layer.self_attn, shift.layout.sp
    Ts, D = x.shape[0], attn.head_dim
    hd, kd = attn.heads * D, attn.kv_heads * D                     # one d-way block's q / k widths
    h = layer.input_layernorm(x)
    qkv = torch.cat([w.q_proj(h).view(Ts, S, hd), w.k_proj(h).view(Ts, S, kd), w.v_proj(h).view(Ts, S, kd)],
                    dim=-1)                                        # [Ts, S, hd + 2 kd]: column s' for rank s'
    got = shift.sp_ctx.all_to_all(qkv.transpose(0, 1))             # [S, Ts, .]: row s' = rank s''s tokens
    got = got.reshape(S * Ts, hd + 2 * kd)[:T]                     # the step's tokens, in order, my heads
    q, k, v = got.split([hd, kd, kd], dim=-1)
    out = attn.attend(q.view(T, attn.heads, D), k.view(T, attn.kv_heads, D), v.view(T, attn.kv_heads, D), b)
    out = F.pad(out, (0, 0, 0, S * Ts - T)).view(S, Ts, hd)       # [T, hd] -> row s' = rank s''s tokens
    back = shift.sp_ctx.all_to_all(out)                           # [S, Ts, hd]: my tokens, block t*S + s'
    back = back.transpose(0, 1).reshape(Ts, S * hd)                # tp block t's heads, in order
    pending = row_parallel_start(w.o_proj, back, shift.tp_ctx, pieces)
    yield
    x = x + row_parallel_finish(w.o_proj, pending)
    h = layer.post_attention_layernorm(x)
    pending = row_parallel_start(w.down_proj, F.silu(w.gate_proj(h)) * w.up_proj(h), shift.tp_ctx, pieces)
    yield
    return x + row_parallel_finish(w.down_proj, pending)
