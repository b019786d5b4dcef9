"""Token sampling for the gateway: greedy, temperature, top-k, top-p, seeded per request."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 16
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.seed if self.seed is not None else torch.seed())


def sample(logits: torch.Tensor, s: Sampling) -> int:
    """One token from ``logits`` [V] (float32). Safe for any positive temperature: the logits
    are shifted so their largest is 0 before dividing, so a tiny temperature gives -inf for
    every other token (greedy among the top ties), never inf - inf = NaN. Non-finite logits
    raise ValueError (the request fails, not the loop)."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model returned non-finite logits")
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    x = logits.double()
    x = (x - x.max()) / s.temperature
    if s.top_k and s.top_k < x.numel():
        kth = torch.topk(x, s.top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    if 0 < s.top_p < 1:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = cum - probs > s.top_p     # keep the smallest prefix whose mass reaches top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, idx, sorted_x)
    probs = torch.softmax(x, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError(f"sampling probabilities are not a distribution (temperature {s.temperature:g})")
    return int(torch.multinomial(probs, 1, generator=s.generator))
