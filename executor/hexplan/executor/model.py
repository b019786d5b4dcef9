"""One pipeline stage of a Llama-family decoder (Llama 2/3, Mistral, Qwen2), tensor-parallel.

Scope: weights in, tensors out. A stage holds layers ``[layer_start, layer_end)``, plus the
token embedding if it is the first stage and the final norm and LM head if it is the last.
It knows nothing about gRPC, scheduling or tokenisation: ``forward_batch`` takes a ragged
batch (chunks of several sequences concatenated along the token dim), appends their K/V to
per-request caches and returns hidden states, or the last token's logits of each chunk.

Tensor parallelism is Megatron's, over ``TPContext``: q/k/v and gate/up are split by output
rows (heads, intermediate units), o_proj and down_proj by input columns and summed with an
all-reduce; KV heads are split when there are at least as many as ranks, else each rank keeps
the one KV head its query heads use. The LM head is split over the vocabulary (padded to a
multiple of the TP size) and its logits are all-gathered. Loading reads, with safetensors'
``get_slice``, only this stage's tensors and only this rank's slice of them.

A shifted stage (Shift Parallelism, shift.py) runs each step either as above (TP mode) or in SP
mode: its tokens split over sp ranks, Ulysses all-to-alls around the same ``Attention.attend``
on the same KV cache; each layer then also holds SP mode's tp-way weights (``DecoderLayer.sp``),
of which the TP-mode weights are views.

Shapes: T tokens in the batch, H hidden size, D head dim, h / kv this rank's query / KV heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from hexplan.errors import SpecError
from hexplan.models import model_from_hf_config, read_hf_config, rope_parameters

from .distributed import Pending, TPContext
from .shift import SP_MODE, TP_MODE, Shift, ShiftLayout, SPWeights, shift_problem, sp_layer_steps, sp_slices, tp_views


@dataclass(frozen=True)
class ShardSpec:
    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool


@dataclass(frozen=True)
class SeqChunk:
    request_id: str
    start: int      # positions [start, start + length) of one sequence
    length: int
    hidden: bool = False   # last stage: also hand back this chunk's last-token hidden state
    drop: bool = False     # drop the request's KV cache after this step (prefill-only requests)


@dataclass(frozen=True)
class ModelArgs:
    """The shapes and constants of a checkpoint's config.json that the forward pass uses. Built
    from the dict hexplan.models reads (``read_hf_config``): the shapes, norm epsilon and rope
    base come from its ModelSpec; only what the planner does not need (activation, rope type,
    o/mlp biases, sliding window) is read here."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None   # Mistral: attend to the last `sliding_window` positions only

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        def bad(msg):
            return ValueError(f"config.json: {msg}")

        try:
            m = model_from_hf_config(cfg, name="checkpoint")
            rope = rope_parameters(cfg)
        except SpecError as e:
            raise bad(str(e)) from None
        if cfg.get("hidden_act", "silu") != "silu":
            raise bad(f"hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise bad(f"rope {rope} is not supported; only default (unscaled, full) rotary embeddings")
        if m.model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise bad("Qwen2 use_sliding_window is not supported")
        llama_bias = m.model_type == "llama" and m.attention_bias   # Mistral: never
        return cls(
            model_type=m.model_type,
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.dim_head,
            rms_norm_eps=m.rms_norm_eps,
            rope_theta=m.rope_theta,
            qkv_bias=llama_bias or m.model_type == "qwen2",   # Qwen2: always, on q/k/v only
            o_bias=llama_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) and m.model_type == "llama",
            tie_word_embeddings=m.tie_word_embeddings,
            sliding_window=cfg.get("sliding_window") if m.model_type == "mistral" else None,
        )


@dataclass(frozen=True)
class TPLayout:
    """This rank's part of each split dimension (heads, KV heads, MLP units, vocabulary)."""
    heads: int          # query heads on this rank
    head0: int          # first of them
    kv_heads: int
    kv_head0: int
    inter: int
    inter0: int
    vocab: int          # rows of the padded LM-head shard (ceil(vocab / tp))
    vocab0: int

    @classmethod
    def of(cls, a: ModelArgs, ctx: TPContext) -> "TPLayout":
        return cls.at(a, ctx.rank, ctx.size)

    @classmethod
    def at(cls, a: ModelArgs, r: int, tp: int) -> "TPLayout":
        """Rank ``r``'s part of a ``tp``-way layout (a shifted stage's TP mode: its layout rank)."""
        if a.num_heads % tp or a.intermediate_size % tp:
            raise ValueError(f"TP {tp} must divide num_attention_heads {a.num_heads} "
                             f"and intermediate_size {a.intermediate_size}")
        if a.num_kv_heads % tp and tp % a.num_kv_heads:
            raise ValueError(f"{a.num_kv_heads} KV heads can be neither split nor replicated over TP {tp}")
        h = a.num_heads // tp
        if a.num_kv_heads >= tp:
            kv, kv0 = a.num_kv_heads // tp, r * (a.num_kv_heads // tp)
        else:   # replicated: rank r's query heads all use KV head r // (tp / num_kv_heads)
            kv, kv0 = 1, r // (tp // a.num_kv_heads)
        i = a.intermediate_size // tp
        v = -(-a.vocab_size // tp)
        return cls(h, r * h, kv, kv0, i, r * i, v, r * v)


# ---- building blocks ------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):                                          # x: [T, H]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(a: ModelArgs) -> torch.Tensor:
    """Exactly transformers' default LlamaRotaryEmbedding (float32, computed on the CPU)."""
    d = a.head_dim
    return 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device="cpu") / d))


def rope_cos_sin(positions, inv_freq, dtype):
    freqs = positions[:, None].float() * inv_freq                  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                        # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):                                       # x: [T, heads, D]; cos: [T, D]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def row_parallel_start(linear: nn.Linear, x, ctx: TPContext, pieces: int = 1) -> list[Pending]:
    """A linear layer split by input columns, started: this rank's partial product, summed over
    the ranks asynchronously. With ``pieces`` > 1 the product is cut by output features into
    that many slices, each slice's all-reduce issued as soon as it is computed, so the next
    slice's product runs while the previous one is on the link (Liger's GEMM splitting)."""
    if pieces <= 1 or ctx.size == 1:
        return [ctx.all_reduce_async(F.linear(x, linear.weight))]
    rows = linear.weight.shape[0]
    cuts = [rows * i // pieces for i in range(pieces + 1)]
    return [ctx.all_reduce_async(F.linear(x, linear.weight[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]


def row_parallel_finish(linear: nn.Linear, pending: list[Pending]):
    """Wait for ``row_parallel_start``'s all-reduces; the summed product plus the bias."""
    y = pending[0].wait() if len(pending) == 1 else torch.cat([p.wait() for p in pending], dim=-1)
    return y if linear.bias is None else y + linear.bias


def drain(gen):
    """Run one of the layers' step generators to the end (no interleaving); its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


class SeqCache:
    """K and V of one sequence for this stage's layers; capacity grows by doubling."""

    def __init__(self, n_layers, kv_heads, head_dim, dtype, device):
        # Head-major, [L, kv, capacity, D]: one head's keys are rows of one matrix, so a decode
        # token's attention is a batched matrix product over views of the cache, no copies.
        self.k = torch.empty(n_layers, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def reserve(self, n: int):
        cap = self.k.shape[2]
        if n <= cap:
            return
        extra = max(n, 2 * cap, 16) - cap
        L, kv, _, D = self.k.shape
        self.k = torch.cat([self.k, self.k.new_empty(L, kv, extra, D)], dim=2)
        self.v = torch.cat([self.v, self.v.new_empty(L, kv, extra, D)], dim=2)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class Batch:
    """What every layer needs to know about the ragged batch being run."""
    chunks: list[SeqChunk]
    caches: list[SeqCache]
    cos: torch.Tensor        # [T, D]
    sin: torch.Tensor


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, t: TPLayout, ctx: TPContext, local_idx: int):
        super().__init__()
        D = a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, t.heads * D, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, t.kv_heads * D, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, t.kv_heads * D, bias=a.qkv_bias)
        self.o_proj = nn.Linear(t.heads * D, a.hidden_size, bias=a.o_bias)
        self.heads, self.kv_heads, self.head_dim = t.heads, t.kv_heads, D
        self.window = a.sliding_window
        self.ctx, self.idx = ctx, local_idx

    def core(self, x, b: Batch):                                   # x: [T, H] -> [T, h * D]
        """Everything up to o_proj: projections, RoPE, cache append, attention."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.heads, self.head_dim)      # [T, h, D]
        k = self.k_proj(x).view(T, self.kv_heads, self.head_dim)   # [T, kv, D]
        v = self.v_proj(x).view(T, self.kv_heads, self.head_dim)
        return self.attend(q, k, v, b)

    def attend(self, q, k, v, b: Batch):                           # q: [T, h, D]; k, v: [T, kv, D]
        """RoPE, cache append and attention of this rank's heads over the batch's T tokens;
        [T, h * D]. Both modes of a shifted stage come here with the same heads (shift.py)."""
        T = q.shape[0]
        q, k = apply_rope(q, b.cos, b.sin), apply_rope(k, b.cos, b.sin)
        out = torch.empty_like(q)
        # decode rows' queries scaled once for the whole step (one op, not one per sequence)
        qs = q * (self.head_dim ** -0.5) if any(c.length == 1 for c in b.chunks) else q
        i = 0
        for c, cache in zip(b.chunks, b.caches):
            end = c.start + c.length
            cache.k[self.idx, :, c.start:end] = k[i:i + c.length].transpose(0, 1)
            cache.v[self.idx, :, c.start:end] = v[i:i + c.length].transpose(0, 1)
            kc, vc = cache.k[self.idx, :, :end], cache.v[self.idx, :, :end]    # [kv, S, D] views, no copies
            if c.length == 1:
                self._attend_one(qs[i], kc, vc, out[i])
            else:
                out[i:i + c.length] = self._attend(q[i:i + c.length], kc, vc, c.start)
            i += c.length
        return out.view(T, -1)

    def forward(self, x, b: Batch):
        return row_parallel_finish(self.o_proj, row_parallel_start(self.o_proj, self.core(x, b), self.ctx))

    def _attend_one(self, q, k, v, out):  # one decode token. q: [h, D], scaled; k, v: [kv, S, D]; out: [h, D]
        """Attention of one new token over its whole cache, written into ``out``: two batched
        matrix products on views of the head-major cache (no copies; GQA by grouping the query
        heads of a KV head). Gathering a step's caches into one padded batch instead cost 24% of
        a CPU worker's time. This runs once per sequence and layer, so it is a few ops: the
        query comes scaled, the product lands in ``out``."""
        if self.window and k.shape[1] > self.window:
            k, v = k[:, -self.window:], v[:, -self.window:]
        kv, D = self.kv_heads, self.head_dim
        scores = torch.matmul(q.view(kv, self.heads // kv, D), k.transpose(1, 2))   # [kv, rep, S]
        # softmax in float32, as transformers' eager attention does (in bfloat16 it keeps greedy
        # tokens closer to transformers': docs/executor.md, "GPU check")
        if scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        torch.matmul(probs, v, out=out.view(kv, self.heads // kv, D))

    def _attend(self, q, k, v, start):    # q: [t, h, D]; k, v: [kv, S, D], S = start + t
        S = k.shape[1]
        q_pos = torch.arange(start, S, device=q.device)[:, None]             # causal within the chunk,
        k_pos = torch.arange(S, device=q.device)[None, :]                    # full over the cache
        mask = k_pos <= q_pos
        if self.window:
            mask &= k_pos > q_pos - self.window                            # [t, S]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask,
                                             enable_gqa=self.heads != self.kv_heads)   # [h, t, D]
        return out.transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs, t: TPLayout, ctx: TPContext):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, t.inter, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, t.inter, bias=a.mlp_bias)
        self.down_proj = nn.Linear(t.inter, a.hidden_size, bias=a.mlp_bias)
        self.ctx = ctx

    def inner(self, x):                                            # x: [T, H] -> [T, inter]
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x):
        return row_parallel_finish(self.down_proj, row_parallel_start(self.down_proj, self.inner(x), self.ctx))


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, t: TPLayout, ctx: TPContext, local_idx: int, shift: ShiftLayout | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, t, ctx, local_idx)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a, t, ctx)
        # a shifted stage: SP mode's tp-way weights (TP mode's are views of them, shift.tp_views)
        self.sp = SPWeights(a, shift, t.kv_heads) if shift is not None else None

    def steps(self, x, b: Batch, pieces: int = 1):                 # x: [T, H]
        """This layer on one part of a step, as a generator: it yields after starting each of
        its two all-reduces and, resumed, waits for it and goes on; it returns the layer's
        output. A caller that resumes other parts' generators in between overlaps this part's
        all-reduce with their compute (StageModel.forward_parts)."""
        attn, mlp = self.self_attn, self.mlp
        pending = row_parallel_start(attn.o_proj, attn.core(self.input_layernorm(x), b), attn.ctx, pieces)
        yield
        x = x + row_parallel_finish(attn.o_proj, pending)
        pending = row_parallel_start(mlp.down_proj, mlp.inner(self.post_attention_layernorm(x)), mlp.ctx, pieces)
        yield
        return x + row_parallel_finish(mlp.down_proj, pending)

    def forward(self, x, b: Batch):
        return drain(self.steps(x, b))


# ---- the stage -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSlice:
    """Where one local parameter comes from: a checkpoint tensor, optionally one dim's range."""
    name: str
    shape: tuple[int, ...]          # the full tensor's shape, as config.json implies
    dim: int | None = None          # split dim, None if replicated
    start: int = 0
    stop: int = 0


class StageModel(nn.Module):
    def __init__(self, config: dict, shard: ShardSpec, ctx: TPContext, shift: Shift | None = None):
        """``shift``: run shifted (shift.py); its groups come from shift.init_shift over ``ctx``."""
        super().__init__()
        a = ModelArgs.from_hf_config(config)
        if not 0 <= shard.layer_start <= shard.layer_end <= a.num_layers:
            raise ValueError(f"layers [{shard.layer_start}, {shard.layer_end}) are outside "
                             f"the model's {a.num_layers} layers")
        self.config, self.args, self.shard, self.ctx, self.shift = config, a, shard, ctx, shift
        lay = shift.layout if shift is not None else None
        if lay is not None:
            problem = shift_problem(a.num_heads, a.num_kv_heads, a.intermediate_size, ctx.size, lay.sp)
            if problem or lay.size != ctx.size or lay.rank != ctx.rank:
                raise ValueError(problem or f"shift layout {lay} does not match TP rank {ctx.rank} of {ctx.size}")
        self.tp = TPLayout.at(a, lay.layout_rank, ctx.size) if lay else TPLayout.of(a, ctx)
        self.vocab_order = lay.vocab_order if lay else None       # the logits' fixed permutation
        self.mode_steps = {TP_MODE: 0, SP_MODE: 0}                # steps run in each mode
        n = shard.layer_end - shard.layer_start
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size) if shard.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(a, self.tp, ctx, j, lay) for j in range(n))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps) if shard.is_last else None
        self.lm_head = nn.Linear(a.hidden_size, self.tp.vocab, bias=False) if shard.is_last else None
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
        self.caches: dict[str, SeqCache] = {}
        self.offloaded: dict[str, tuple] = {}     # request id -> (k, v, length) in host memory

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint_dir, shard: ShardSpec, ctx: TPContext,
             dtype=torch.float32, device="cpu", shift: Shift | None = None) -> "StageModel":
        """Build on the meta device, read this rank's slices, move to ``device``. A shifted
        stage reads SP mode's tp-way weights only; TP mode's are views of them (on ``device``,
        so the views share its memory)."""
        ckpt = Path(checkpoint_dir)
        config = read_hf_config(ckpt / "config.json")
        with torch.device("meta"):
            model = cls(config, shard, ctx, shift)
        state = read_slices(ckpt, model.checkpoint_slices())
        state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
        if shift is not None:
            state = model._shift_state(state)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).requires_grad_(False).eval()

    def _shift_state(self, state: dict) -> dict:
        """A shifted stage's state: k/v pieces (``name@s``) concatenated, TP mode's weights as
        views of SP mode's."""
        out = {}
        for k in sorted(state):
            name, _, piece = k.partition("@")
            if not piece:
                out[k] = state[k]
            elif piece == "0":
                pieces = [state[f"{name}@{s}"] for s in range(self.shift.layout.sp)]
                out[name] = torch.cat(pieces, dim=0)
        views = tp_views(self.args, self.shift.layout, self.tp.kv_heads)
        keys = set(self.state_dict(keep_vars=True))
        for j in range(len(self.layers)):
            for suffix, (src, dim, a, b) in views.items():
                key = f"layers.{j}.{suffix}"
                if key not in keys:                                # an absent bias
                    continue
                t = out[f"layers.{j}.{src}"]
                out[key] = t if dim is None else t.narrow(dim, a, b - a)
        return out

    def checkpoint_slices(self) -> dict[str, TensorSlice]:
        """For each parameter of this stage, the checkpoint tensor and slice it is read from."""
        if self.shift is not None:
            return self._shift_slices()
        a, t = self.args, self.tp
        H, D, I = a.hidden_size, a.head_dim, a.intermediate_size
        q_rows = (t.head0 * D, (t.head0 + t.heads) * D)
        kv_rows = (t.kv_head0 * D, (t.kv_head0 + t.kv_heads) * D)
        i_rows = (t.inter0, t.inter0 + t.inter)
        full = {   # suffix -> (full shape, split dim, range); None: replicated
            "input_layernorm.weight": ((H,), None, None),
            "post_attention_layernorm.weight": ((H,), None, None),
            "self_attn.q_proj.weight": ((a.num_heads * D, H), 0, q_rows),
            "self_attn.q_proj.bias": ((a.num_heads * D,), 0, q_rows),
            "self_attn.k_proj.weight": ((a.num_kv_heads * D, H), 0, kv_rows),
            "self_attn.k_proj.bias": ((a.num_kv_heads * D,), 0, kv_rows),
            "self_attn.v_proj.weight": ((a.num_kv_heads * D, H), 0, kv_rows),
            "self_attn.v_proj.bias": ((a.num_kv_heads * D,), 0, kv_rows),
            "self_attn.o_proj.weight": ((H, a.num_heads * D), 1, q_rows),
            "self_attn.o_proj.bias": ((H,), None, None),
            "mlp.gate_proj.weight": ((I, H), 0, i_rows),
            "mlp.gate_proj.bias": ((I,), 0, i_rows),
            "mlp.up_proj.weight": ((I, H), 0, i_rows),
            "mlp.up_proj.bias": ((I,), 0, i_rows),
            "mlp.down_proj.weight": ((H, I), 1, i_rows),
            "mlp.down_proj.bias": ((H,), None, None),
        }
        out = {}
        for local in self.state_dict():
            if local.startswith("layers."):
                _, j, suffix = local.split(".", 2)
                name = f"model.layers.{self.shard.layer_start + int(j)}.{suffix}"
                shape, dim, rng = full[suffix]
                out[local] = TensorSlice(name, shape, dim, *(rng or (0, 0)))
            elif local == "embed_tokens.weight":
                out[local] = TensorSlice("model.embed_tokens.weight", (a.vocab_size, H))
            elif local == "norm.weight":
                out[local] = TensorSlice("model.norm.weight", (H,))
            elif local == "lm_head.weight":
                name = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
                out[local] = TensorSlice(name, (a.vocab_size, H), 0, t.vocab0, t.vocab0 + t.vocab)
        return out

    def _shift_slices(self) -> dict[str, TensorSlice]:
        """A shifted stage's slices: SP mode's tp-way layer weights (k/v in one piece per sp
        index, ``name@s``), the embedding, norms and the d-way LM head; TP mode's layer weights
        are views of SP mode's (``_shift_state``), not read."""
        a, t, lay = self.args, self.tp, self.shift.layout
        D = a.head_dim

        def kv_rows(k):
            kt = TPLayout.at(a, k, lay.size)
            return kt.kv_head0 * D, (kt.kv_head0 + kt.kv_heads) * D
        sp = sp_slices(a, lay, kv_rows)
        own = {"input_layernorm.weight", "post_attention_layernorm.weight"}
        out = {}
        for local in self.state_dict():
            if local.startswith("layers."):
                _, j, suffix = local.split(".", 2)
                layer = f"model.layers.{self.shard.layer_start + int(j)}"
                if suffix in own:
                    out[local] = TensorSlice(f"{layer}.{suffix}", (a.hidden_size,))
                elif suffix in sp:
                    proj = suffix.removeprefix("sp.")                 # q/k/v/o_proj: attention; gate/up/down: MLP
                    name = f"{layer}.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}"
                    shape, dim, ranges = sp[suffix]
                    if ranges is None:
                        out[local] = TensorSlice(name, shape)
                    elif len(ranges) == 1:
                        out[local] = TensorSlice(name, shape, dim, *ranges[0])
                    else:
                        for s, rng in enumerate(ranges):
                            out[f"{local}@{s}"] = TensorSlice(name, shape, dim, *rng)
            elif local == "embed_tokens.weight":
                out[local] = TensorSlice("model.embed_tokens.weight", (a.vocab_size, a.hidden_size))
            elif local == "norm.weight":
                out[local] = TensorSlice("model.norm.weight", (a.hidden_size,))
            elif local == "lm_head.weight":
                name = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
                out[local] = TensorSlice(name, (a.vocab_size, a.hidden_size), 0, t.vocab0, t.vocab0 + t.vocab)
        return out

    # -- running ---------------------------------------------------------------------------
    def forward_batch(self, chunks: list[SeqChunk], inputs: torch.Tensor, parts=None,
                      pieces: int = 1) -> torch.Tensor:
        """Run a ragged batch; see the module docstring. inputs: token ids [T] on the first
        stage, hidden states [T, H] otherwise. Returns [T, H], or float32 logits
        [len(chunks), vocab] of each chunk's last token on the last stage. ``parts`` and
        ``pieces``: see ``forward_parts``; the result is the same."""
        return torch.cat(self.forward_parts(chunks, inputs, parts, pieces))

    @torch.inference_mode()
    def forward_parts(self, chunks: list[SeqChunk], inputs: torch.Tensor, parts=None, pieces: int = 1,
                      on_part=None, hidden_out: dict | None = None) -> list[torch.Tensor]:
        """Run a ragged batch cut into parts: ``parts`` = [(first chunk, end chunk), ...],
        contiguous and covering ``chunks`` (None: one part). Returns each part's output (as
        ``forward_batch``) and hands it, as soon as it is done, to ``on_part(index, output)``.
        On the last stage, ``hidden_out`` (a dict) receives request id -> float32 [H] hidden
        state of the last token (after the final norm) of each chunk marked ``hidden``. Chunks
        marked ``drop`` leave no KV cache behind.

        Interleaving (Liger-style). On a TP stage the parts run layer by layer in turn: a part
        starts an all-reduce and the next part computes while it is on the link. Without TP
        they run one after the other (``on_part`` lets the caller send part i on while part
        i + 1 computes). ``pieces`` > 1 cuts each row-parallel product so its slices' all-reduces
        overlap the rest of the product. Every TP rank must call this with the same arguments:
        the order of the collectives depends only on them."""
        self._check_batch(chunks, inputs)
        parts = parts or [(0, len(chunks))]
        if [a for a, _ in parts] != [0] + [b for _, b in parts[:-1]] or parts[-1][1] != len(chunks) \
                or any(b <= a for a, b in parts):
            raise ValueError(f"parts {parts} do not cut {len(chunks)} chunks into contiguous, non-empty runs")
        device, dtype = self.inv_freq.device, self.layers_dtype
        for c in chunks:
            if c.request_id in self.offloaded:
                self.restore(c.request_id)
        new = [c.request_id for c in chunks if c.request_id not in self.caches]
        for rid in new:
            self.caches[rid] = SeqCache(len(self.layers), self.tp.kv_heads, self.args.head_dim,
                                        dtype, device)
        try:
            caches = [self.caches[c.request_id] for c in chunks]
            for c, cache in zip(chunks, caches):
                cache.reserve(c.start + c.length)
            positions = torch.cat([torch.arange(c.start, c.start + c.length) for c in chunks])
            cos, sin = rope_cos_sin(positions.to(device), self.inv_freq, dtype)
            offsets = [0]
            for c in chunks:
                offsets.append(offsets[-1] + c.length)
            # a shifted stage's mode: every rank runs the same step, so all agree (shift.py)
            mode = self.shift.mode(offsets[-1]) if self.shift is not None else TP_MODE
            self.mode_steps[mode] += 1
            if mode == SP_MODE:                                    # each rank embeds its own tokens
                x = inputs.to(device) if self.shard.is_first else inputs.to(device, dtype)
            else:
                x = self.embed_tokens(inputs.to(device)) if self.shard.is_first else inputs.to(device, dtype)
            runs = []                                              # one generator per part
            for a, e in parts:
                t0, t1 = offsets[a], offsets[e]
                b = Batch(chunks[a:e], caches[a:e], cos[t0:t1], sin[t0:t1])
                run = self._run_part_sp if mode == SP_MODE else self._run_part
                runs.append(run(x[t0:t1], b, pieces))
            outs: list = [None] * len(runs)
            if self.ctx.size == 1 or len(runs) == 1:               # nothing to overlap between parts
                for i, run in enumerate(runs):
                    outs[i] = self._finish_part(drain(run), chunks[parts[i][0]:parts[i][1]], i, on_part,
                                                hidden_out)
            else:                                                  # round robin: resume each in turn
                live = list(range(len(runs)))
                while live:
                    for i in list(live):
                        try:
                            next(runs[i])
                        except StopIteration as stop:
                            live.remove(i)
                            outs[i] = self._finish_part(stop.value, chunks[parts[i][0]:parts[i][1]], i,
                                                        on_part, hidden_out)
        except BaseException:
            for rid in new:                                        # leave no half-made caches
                del self.caches[rid]
            raise
        for c, cache in zip(chunks, caches):
            cache.length = c.start + c.length
            if c.drop:
                del self.caches[c.request_id]
        return outs

    def _run_part(self, x, b: Batch, pieces: int):
        for layer in self.layers:                                  # x: [t, H]
            x = yield from layer.steps(x, b, pieces)
        return x

    def _run_part_sp(self, inputs, b: Batch, pieces: int):
        """A part in SP mode (shift.py): this rank takes block s of its T tokens (ids or hidden
        states), padded with zero rows to ceil(T / sp); the SP group gathers the result [T, H]."""
        lay = self.shift.layout
        T = inputs.shape[0]
        Ts = -(-T // lay.sp)
        mine = inputs[lay.s * Ts:(lay.s + 1) * Ts]
        x = self.embed_tokens(mine) if self.shard.is_first else mine
        if x.shape[0] < Ts:
            x = F.pad(x, (0, 0, 0, Ts - x.shape[0]))
        for layer in self.layers:                                  # x: [Ts, H]
            x = yield from sp_layer_steps(layer, x, b, self.shift, T, pieces)
        return self.shift.sp_ctx.all_gather_first_dim(x)[:T]

    def _finish_part(self, x, chunks: list[SeqChunk], index: int, on_part, hidden_out=None):
        """A part's output: its hidden states, or on the last stage its chunks' last-token logits."""
        if self.shard.is_last:
            last = torch.tensor([c.length for c in chunks], device=x.device).cumsum(0) - 1
            h = self.norm(x[last])                                 # [n, H], replicated over TP
            if hidden_out is not None:
                for c, row in zip(chunks, h):
                    if c.hidden:
                        hidden_out[c.request_id] = row.float()
            logits = F.linear(h, self.lm_head.weight)              # [n, vocab / tp]
            if self.vocab_order is None:
                x = self.ctx.all_gather_last_dim(logits)
            else:                                                  # a shifted stage's shards (shift.py)
                x = self.ctx.all_gather_last_dim(logits, self.vocab_order)
            x = x[:, :self.args.vocab_size].float()
        if on_part is not None:
            on_part(index, x)
        return x

    def _check_batch(self, chunks, inputs):
        if not chunks:
            raise ValueError("empty batch")
        seen = set()
        for c in chunks:
            if c.request_id in seen:
                raise ValueError(f"request {c.request_id!r} appears twice in one batch")
            seen.add(c.request_id)
            if c.length < 1:
                raise ValueError(f"request {c.request_id!r}: chunk length {c.length} < 1")
            cache = self.caches.get(c.request_id)
            off = self.offloaded.get(c.request_id)
            have = cache.length if cache else (off[2] if off else 0)
            if c.start != have:
                raise ValueError(f"request {c.request_id!r}: chunk starts at position {c.start} "
                                 f"but its KV cache holds {have} positions")
        T = sum(c.length for c in chunks)
        if self.shard.is_first:
            if inputs.shape != (T,) or inputs.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"first stage takes token ids int64 [{T}], got "
                                 f"{inputs.dtype} {list(inputs.shape)}")
            if T and (inputs.min() < 0 or inputs.max() >= self.args.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.args.vocab_size})")
        elif inputs.shape != (T, self.args.hidden_size) or not inputs.is_floating_point():
            raise ValueError(f"stage takes hidden states [{T}, {self.args.hidden_size}], got "
                             f"{inputs.dtype} {list(inputs.shape)}")

    @property
    def layers_dtype(self) -> torch.dtype:
        return next(self.parameters(), self.inv_freq).dtype

    def release(self, request_id: str) -> bool:
        """Drop a request's KV cache (on the device or offloaded); False if this stage holds none."""
        on_device = self.caches.pop(request_id, None) is not None
        return self.offloaded.pop(request_id, None) is not None or on_device

    def offload(self, request_id: str) -> bool:
        """Move a request's KV cache to host memory (only the positions it holds), freeing the
        device copy; the next step that carries the request brings it back (``restore``).
        On a CPU-only stage host and device memory are the same, but the same path runs: the
        cache is copied out and the original dropped. False if the stage holds none for it."""
        cache = self.caches.pop(request_id, None)
        if cache is None:
            return False
        n = cache.length
        pin = cache.k.device.type == "cuda"
        k, v = cache.k[:, :, :n].to("cpu", copy=True), cache.v[:, :, :n].to("cpu", copy=True)
        if pin:
            k, v = k.pin_memory(), v.pin_memory()
        self.offloaded[request_id] = (k, v, n)
        return True

    def restore(self, request_id: str) -> None:
        """Bring an offloaded KV cache back to the device (before a step that runs it)."""
        k, v, n = self.offloaded.pop(request_id)
        device, dtype = self.inv_freq.device, self.layers_dtype
        cache = SeqCache(len(self.layers), self.tp.kv_heads, self.args.head_dim, dtype, device)
        cache.reserve(n + 1)
        cache.k[:, :, :n] = k.to(device, non_blocking=True)
        cache.v[:, :, :n] = v.to(device, non_blocking=True)
        cache.length = n
        self.caches[request_id] = cache

    def kv_bytes(self) -> int:
        """Bytes allocated to KV caches on this rank's device (reserved capacity, not only used)."""
        return sum(c.nbytes for c in self.caches.values())

    def offloaded_bytes(self) -> int:
        """Bytes of KV caches offloaded to host memory."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v, _ in self.offloaded.values())

    def num_sequences(self) -> int:
        """Sequences whose KV cache this rank holds, on the device or offloaded."""
        return len(self.caches) + len(self.offloaded)


# ---- checkpoint reading --------------------------------------------------------------------

def read_slices(ckpt: Path, slices: dict[str, TensorSlice]) -> dict[str, torch.Tensor]:
    """Read each slice from a single-file or sharded safetensors checkpoint, opening only the
    files that hold them. Rows of a vocab split past the vocabulary are zero padding."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for s in slices.values():
            if s.name not in weight_map:
                raise ValueError(f"{index}: missing tensor {s.name}")
            name = weight_map[s.name]
            # only files inside the checkpoint directory (a node confines LoadShard to its roots)
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{index}: tensor {s.name}: file {name!r} is not inside the checkpoint directory")
        file_of = {s.name: ckpt / weight_map[s.name] for s in slices.values()}
    elif (ckpt / "model.safetensors").exists():
        file_of = {s.name: ckpt / "model.safetensors" for s in slices.values()}
    else:
        raise ValueError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")

    out = {}
    for file in sorted(set(file_of.values())):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = set(f.keys())
            for local, s in slices.items():
                if file_of[s.name] != file:
                    continue
                if s.name not in names:
                    raise ValueError(f"{file}: missing tensor {s.name}")
                src = f.get_slice(s.name)
                shape = tuple(src.get_shape())
                if shape != s.shape:
                    raise ValueError(f"{file}: tensor {s.name} has shape {list(shape)}, "
                                     f"config.json implies {list(s.shape)}")
                out[local] = _read(src, s)
    return out


def _read(src, s: TensorSlice) -> torch.Tensor:
    if s.dim is None:
        return src[:]
    n = s.shape[s.dim]
    stop = min(s.stop, n)
    if s.start >= stop:                                            # all padding
        part = torch.zeros(*s.shape[:s.dim], 0, *s.shape[s.dim + 1:])
    else:
        part = src[s.start:stop] if s.dim == 0 else src[:, s.start:stop]
    pad = s.stop - s.start - part.shape[s.dim]
    if pad:
        zeros = part.new_zeros(*part.shape[:s.dim], pad, *part.shape[s.dim + 1:])
        part = torch.cat([part, zeros], dim=s.dim)
    return part
