"""Model specs: Llama-family decoder shapes (GQA included), built-ins and HF config.json.

Only shapes matter to the planner: layer count, hidden and intermediate sizes, attention and
key/value heads, vocabulary and dtype. Parameter and byte counts are derived here once.

This module is the one place a Hugging Face ``config.json`` is read (``read_hf_config``) and
its shapes parsed (``model_from_hf_config``); the executor (gateway checks, the stage model's
forward-pass constants) builds on what these return.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SpecError
from .yamlio import show

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


def read_hf_config(path) -> dict:
    """The JSON object of a Hugging Face ``config.json``; ``path`` is the file or a checkpoint
    directory holding one. SpecError naming the file (and line) when it is missing, unreadable,
    not JSON or not a JSON object."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError("file not found", file=str(p)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", None)
        raise SpecError(f"not valid JSON ({getattr(e, 'msg', e)})", file=str(p), line=line) from None
    except RecursionError:
        raise SpecError("not valid JSON (nested too deeply)", file=str(p)) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", file=str(p)) from None
    if not isinstance(cfg, dict):
        raise SpecError(f"must hold a JSON object, got {show(cfg)}", file=str(p))
    return cfg


def rope_parameters(cfg: dict) -> dict:
    """A config's rotary-embedding parameters: ``rope_parameters`` (transformers >= 5, which
    also holds rope_theta) or ``rope_scaling`` (older); {} when there are none."""
    for key in ("rope_parameters", "rope_scaling"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, dict):
            raise SpecError(f"must be a JSON object, got {show(v)}", field=key)
        if v:
            return v
    return {}


def model_from_hf_config(cfg: dict, name: str, file: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face ``config.json`` dictionary (``read_hf_config``).
    Keys a config leaves out take transformers' defaults for these model types."""
    def err(field, msg):
        return SpecError(msg, file=file, field=field)

    if not isinstance(cfg, dict):
        raise err(None, "config.json must hold a JSON object")
    mt = cfg.get("model_type", "llama")
    if not isinstance(mt, str) or mt not in SUPPORTED_MODEL_TYPES:
        raise err("model_type", f"unsupported model type {show(mt)}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    def pos_int(key, default=None):
        v = cfg.get(key)
        if v is None:
            v = default
        if v is None:
            raise err(key, "missing")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise err(key, f"must be a positive integer, got {show(v)}")
        return v

    def number(key, default, where=None, field=None):
        v = (cfg if where is None else where).get(key)
        if v is None:
            return float(default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise err(field or key, f"must be a positive number, got {show(v)}")
        return float(v)

    def flag(key, default):
        v = cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise err(key, f"must be true or false, got {show(v)}")
        return v

    try:
        rope = rope_parameters(cfg)
    except SpecError as e:
        raise e.located(file) from None
    heads = pos_int("num_attention_heads")
    kv = pos_int("num_key_value_heads", heads)
    if heads % kv:
        raise err("num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise err("torch_dtype", f"unsupported dtype {show(dtype)}; use one of {', '.join(DTYPE_BYTES)}")
    hidden = pos_int("hidden_size")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0):
        raise err("head_dim", f"must be a positive integer, got {show(head_dim)}")
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
        tie_word_embeddings=flag("tie_word_embeddings", False),
        model_type=mt,
        head_dim=head_dim if head_dim and head_dim != hidden // heads else None,
        attention_bias=flag("attention_bias", mt == "qwen2"),
        rms_norm_eps=number("rms_norm_eps", 1e-6),
        rope_theta=number("rope_theta", number("rope_theta", 10000.0, rope, "rope_parameters.rope_theta")),
    )


def model_from_dict(d: dict, file: str | None = None) -> ModelSpec:
    """Inverse of ``ModelSpec.to_dict`` (used for models embedded in plan files)."""
    if not isinstance(d, dict):
        raise SpecError("must be a mapping of model fields", file=file, field="model")
    known = set(ModelSpec.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise SpecError(f"unknown field(s) {sorted(unknown)}", file=file, field="model")
    def bad(f, msg):
        return SpecError(msg, file=file, field=f"model.{f}")

    missing = [f for f in ("name", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                           "num_kv_heads", "vocab_size") if f not in d]
    if missing:
        raise SpecError(f"missing field(s) {missing}", file=file, field="model")
    clean = dict(d)
    for f in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size",
              "max_position_embeddings", "head_dim"):
        if f not in d or (f == "head_dim" and d[f] is None):
            continue
        v = d[f]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise bad(f, f"must be a positive integer, got {show(v)}")
    for f in ("name", "dtype", "model_type"):
        if f in d and (not isinstance(d[f], str) or not d[f]):
            raise bad(f, f"must be a non-empty string, got {show(d[f])}")
    for f in ("tie_word_embeddings", "attention_bias"):
        if f in d and not isinstance(d[f], bool):
            raise bad(f, f"must be true or false, got {show(d[f])}")
    for f in ("rms_norm_eps", "rope_theta"):
        if f in d:
            v = d[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(f, f"must be a positive number, got {show(v)}")
            clean[f] = float(v)
    if clean.get("dtype", "float16") not in DTYPE_BYTES:
        raise bad("dtype", f"unsupported dtype {show(clean['dtype'])}; use one of {', '.join(DTYPE_BYTES)}")
    spec = ModelSpec(**clean)
    if spec.num_heads % spec.num_kv_heads:
        raise bad("num_kv_heads", "num_kv_heads must divide num_heads")
    if spec.head_dim is None and spec.hidden_size % spec.num_heads:
        raise bad("hidden_size", f"{spec.hidden_size} is not divisible by num_heads {spec.num_heads}")
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
        name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
        return model_from_hf_config(read_hf_config(p), name=name, file=str(p))
    raise SpecError(f"unknown model {show(model)}; built-in models: {', '.join(BUILTIN_MODELS)}; "
                    "or give a path to a Hugging Face config.json", field="model")
