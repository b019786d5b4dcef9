"""Helpers for executor tests: tiny random checkpoints, the transformers reference, plans."""
from __future__ import annotations

import socket

import torch

from hexplan.plan import plan_from_dict


def make_checkpoint(path, *, layers=4, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=256,
                    max_pos=256, seed=0, tie=False):
    """A random Llama checkpoint saved with save_pretrained (safetensors, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_pos, tie_word_embeddings=tie, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    # Larger weights than the default init: logits spread out, so greedy argmax has clear margins.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


_REF_CACHE: dict = {}


def hf_greedy(checkpoint, prompt, max_new_tokens):
    """Token ids transformers' LlamaForCausalLM.generate produces (greedy, float32, CPU)."""
    from transformers import LlamaForCausalLM

    model = _REF_CACHE.get(checkpoint)
    if model is None:
        model = _REF_CACHE[checkpoint] = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def plan(checkpoint, *pipelines, weights=None):
    """A hand-written plan: pipelines of (node, tp, start, end) stages."""
    pls = []
    for i, stages in enumerate(pipelines):
        used: dict = {}
        st = []
        for node, tp, a, b in stages:
            first = used.get(node, 0)
            used[node] = first + tp
            st.append({"node": node, "gpus": list(range(first, first + tp)), "tp": tp, "layers": [a, b]})
        pls.append({"weight": (weights or [1.0 / len(pipelines)] * len(pipelines))[i], "stages": st})
    return plan_from_dict({"model": checkpoint, "pipelines": pls})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
