"""Model specs: Llama-family decoder shapes (GQA included), built-ins and HF config.json.

Only shapes matter to the planner: layer count, hidden and intermediate sizes, attention and
key/value heads, vocabulary and dtype. Parameter and byte counts are derived here once.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SpecError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    dtype: str = "float16"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    head_dim: int | None = None    # defaults to hidden_size // num_heads
    attention_bias: bool = False   # Qwen2 has q/k/v biases
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    # ---- derived shapes -------------------------------------------------------------
    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def params_per_layer(self) -> int:
        """q, k, v, o projections + gate/up/down MLP + two RMSNorm weights (+ qkv bias)."""
        h, hd = self.hidden_size, self.dim_head
        q = h * self.num_heads * hd
        kv = 2 * h * self.num_kv_heads * hd
        o = self.num_heads * hd * h
        mlp = 3 * h * self.intermediate_size
        bias = (self.num_heads + 2 * self.num_kv_heads) * hd if self.attention_bias else 0
        return q + kv + o + mlp + 2 * h + bias

    @property
    def layer_bytes(self) -> int:
        return self.params_per_layer * self.bytes_per_param

    @property
    def embedding_bytes(self) -> int:
        return self.vocab_size * self.hidden_size * self.bytes_per_param

    @property
    def head_bytes(self) -> int:
        """Final norm + LM head. Counted even when tied to the embedding: the last stage of a
        pipeline is rarely the first, so it holds its own copy."""
        return (self.vocab_size * self.hidden_size + self.hidden_size) * self.bytes_per_param

    @property
    def total_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (self.num_layers * self.params_per_layer + self.vocab_size * self.hidden_size
                + head + self.hidden_size)

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer, all KV heads."""
        return 2 * self.num_kv_heads * self.dim_head * self.bytes_per_param

    @property
    def activation_bytes_per_token(self) -> int:
        """Hidden state of one token sent between pipeline stages."""
        return self.hidden_size * self.bytes_per_param

    def tp_degree_ok(self, tp: int) -> str | None:
        """None when TP ``tp`` can split this model, else the reason it cannot."""
        if self.num_heads % tp:
            return f"{self.num_heads} attention heads are not divisible by TP {tp}"
        if self.intermediate_size % tp:
            return f"intermediate size {self.intermediate_size} is not divisible by TP {tp}"
        kv = self.num_kv_heads
        if kv % tp and tp % kv:
            return f"{kv} KV heads can be neither split nor replicated over TP {tp}"
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None}


def _m(name, layers, hidden, inter, heads, kv, vocab, ctx, **kw) -> ModelSpec:
    return ModelSpec(name, layers, hidden, inter, heads, kv, vocab, max_position_embeddings=ctx, **kw)


BUILTIN_MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    _m("llama-2-7b", 32, 4096, 11008, 32, 32, 32000, 4096),
    _m("llama-2-13b", 40, 5120, 13824, 40, 40, 32000, 4096),
    _m("llama-2-70b", 80, 8192, 28672, 64, 8, 32000, 4096),
    _m("llama-30b", 60, 6656, 17920, 52, 52, 32000, 2048, rms_norm_eps=1e-6),
    _m("llama-3-8b", 32, 4096, 14336, 32, 8, 128256, 8192, dtype="bfloat16", rope_theta=500000.0),
    _m("llama-3-70b", 80, 8192, 28672, 64, 8, 128256, 8192, dtype="bfloat16", rope_theta=500000.0),
    _m("mistral-7b", 32, 4096, 14336, 32, 8, 32000, 32768, model_type="mistral", dtype="bfloat16"),
    _m("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, 32768, model_type="qwen2",
       dtype="bfloat16", attention_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0),
]}


def model_from_hf_config(cfg: dict, name: str, file: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face ``config.json`` dictionary."""
    def err(field, msg):
        return SpecError(msg, file=file, field=field)

    if not isinstance(cfg, dict):
        raise err(None, "config.json must hold a JSON object")
    mt = cfg.get("model_type", "llama")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise err("model_type", f"unsupported model type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    def pos_int(key, default=None):
        v = cfg.get(key, default)
        if v is None:
            raise err(key, "missing")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise err(key, f"must be a positive integer, got {v!r}")
        return v

    heads = pos_int("num_attention_heads")
    kv = pos_int("num_key_value_heads", heads)
    if heads % kv:
        raise err("num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    if dtype not in DTYPE_BYTES:
        raise err("torch_dtype", f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    hidden = pos_int("hidden_size")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
        raise err("head_dim", f"must be a positive integer, got {head_dim!r}")
    if head_dim is None and hidden % heads:
        raise err("hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}")
    return ModelSpec(
        name=name,
        num_layers=pos_int("num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=pos_int("intermediate_size"),
        num_heads=heads,
        num_kv_heads=kv,
        vocab_size=pos_int("vocab_size"),
        dtype=dtype,
        max_position_embeddings=pos_int("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=mt,
        head_dim=head_dim if head_dim and head_dim != hidden // heads else None,
        attention_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
    )


def model_from_dict(d: dict, file: str | None = None) -> ModelSpec:
    """Inverse of ``ModelSpec.to_dict`` (used for models embedded in plan files)."""
    if not isinstance(d, dict):
        raise SpecError("must be a mapping of model fields", file=file, field="model")
    known = set(ModelSpec.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise SpecError(f"unknown field(s) {sorted(unknown)}", file=file, field="model")
    try:
        spec = ModelSpec(**d)
    except TypeError as e:
        raise SpecError(str(e), file=file, field="model") from None
    for f in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size"):
        v = getattr(spec, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SpecError(f"must be a positive integer, got {v!r}", file=file, field=f"model.{f}")
    if spec.dtype not in DTYPE_BYTES:
        raise SpecError(f"unsupported dtype {spec.dtype!r}", file=file, field="model.dtype")
    if spec.num_heads % spec.num_kv_heads:
        raise SpecError("num_kv_heads must divide num_heads", file=file, field="model.num_kv_heads")
    return spec


def load_model(model) -> ModelSpec:
    """A built-in name, a path to a HF ``config.json`` (or a directory holding one), or a spec."""
    if isinstance(model, ModelSpec):
        return model
    if not isinstance(model, str) or not model:
        raise SpecError("expected a model name or a path to config.json", field="model")
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise SpecError("file not found", file=str(p), field="model")
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            line = getattr(e, "lineno", None)
            raise SpecError(f"not valid JSON ({getattr(e, 'msg', e)})", file=str(p), line=line) from None
        name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
        return model_from_hf_config(cfg, name=name, file=str(p))
    raise SpecError(f"unknown model {model!r}; built-in models: {', '.join(BUILTIN_MODELS)}; "
                    "or give a path to a Hugging Face config.json", field="model")
