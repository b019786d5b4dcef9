"""GPU types: the built-in catalog of datasheet figures and optional measured profiles.

Figures are vendor datasheet values: dense fp16/bf16 tensor TFLOPS (no sparsity), memory
bandwidth, and ``interconnect``, the per-GPU one-direction bandwidth of the intra-node fabric
(NVLink where the part has it, else the PCIe slot). ``price_per_hour`` is an approximate
on-demand cloud list price per GPU-hour (2024-2025), used only for budget comparisons.
"""
from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass, field

GB = 1e9


@dataclass(frozen=True)
class ProfileTable:
    """Measured milliseconds per transformer layer (TP 1) against batch size or token count.

    Between points the time is interpolated linearly; beyond the last point it is extrapolated
    from the last two points (or scaled proportionally from a single point).
    """

    points: tuple[tuple[float, float], ...]  # sorted (x, ms)

    def ms(self, x: float) -> float:
        xs = [p[0] for p in self.points]
        if len(self.points) == 1:
            x0, y0 = self.points[0]
            return y0 * x / x0 if x > x0 else y0
        i = bisect.bisect_left(xs, x)
        if i == 0:
            return self.points[0][1]
        if i >= len(xs):
            (x0, y0), (x1, y1) = self.points[-2], self.points[-1]
        else:
            (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


GROUP_TABLES = ("decode_ms", "prefill_ms", "lm_head_ms")   # the tables a TP degree may have its own of


@dataclass(frozen=True)
class Profile:
    """Measured times of one model on one GPU type: per-layer tables at TP 1, the step's LM head
    at TP 1, one TP all-reduce as measured at TP ``allreduce_tp``, and what one call to a stage
    costs beyond its layers (``hexplan profile --served``: gRPC, (de)serialising, per-call work).

    ``by_tp``: a TP degree's own layer and head tables (``hexplan profile --tp d``: the slowest
    rank's compute x d, in the same units as the TP-1 ones), for the groups of that degree;
    ``at_tp`` picks them."""

    decode_ms: ProfileTable | None = None   # x = batch size (sequences per decode step)
    prefill_ms: ProfileTable | None = None  # x = prompt tokens in the step
    lm_head_ms: ProfileTable | None = None  # x = logits rows (sequences in the step); whole step, not per layer
    allreduce_ms: ProfileTable | None = None  # x = rows of the hidden state (tokens in the step); one all-reduce
    allreduce_tp: int = 0                   # the TP degree allreduce_ms was measured at (>= 2 when it is set)
    call_ms: ProfileTable | None = None     # x = sequences in the step; once per stage a step visits
    by_tp: tuple[tuple[int, Profile], ...] = ()   # (degree >= 2, its decode_ms / prefill_ms / lm_head_ms)

    def at_tp(self, tp: int) -> Profile:
        """The profile a TP group of degree ``tp`` is charged by: each of ``GROUP_TABLES`` from the
        largest measured degree not above ``tp`` (the top-level tables are degree 1), else from the
        smallest measured degree above it; the all-reduce and call tables as they are. Without
        ``by_tp``, this profile itself."""
        if not self.by_tp:
            return self
        cache = self.__dict__.setdefault("_at_tp", {})   # not a field: eq and hash ignore it
        got = cache.get(tp)
        if got is None:
            measured = [(1, self)] + list(self.by_tp)
            chosen = {}
            for kind in GROUP_TABLES:
                have = sorted((d, getattr(p, kind)) for d, p in measured if getattr(p, kind) is not None)
                below = [t for d, t in have if d <= tp]
                chosen[kind] = below[-1] if below else (have[0][1] if have else None)
            got = cache[tp] = dataclasses.replace(self, by_tp=(), **chosen)
        return got


@dataclass(frozen=True)
class GpuType:
    name: str
    memory: float             # bytes
    memory_bandwidth: float   # bytes/s
    fp16_tflops: float        # dense fp16/bf16 tensor TFLOPS
    interconnect: float       # bytes/s, per GPU, one direction, inside a node
    price_per_hour: float = 0.0
    profiles: tuple[tuple[str, Profile], ...] = field(default=())  # (model name, profile)

    @property
    def flops(self) -> float:
        return self.fp16_tflops * 1e12

    def profile_for(self, model_name: str) -> Profile | None:
        for name, prof in self.profiles:
            if name == model_name:
                return prof
        return None


def _g(name, mem_gb, bw_gbs, tflops, link_gbs, price):
    return GpuType(name, mem_gb * GB, bw_gbs * GB, float(tflops), link_gbs * GB, price)


# name: memory GB, memory bandwidth GB/s, dense fp16 TFLOPS, intra-node GB/s per direction, $/h
CATALOG: dict[str, GpuType] = {g.name: g for g in [
    _g("H100-80G", 80, 3350, 989, 450, 3.00),   # SXM5, NVLink 4 (900 GB/s both ways)
    _g("H200", 141, 4800, 989, 450, 3.80),      # SXM, NVLink 4
    _g("A100-80G", 80, 2039, 312, 300, 1.80),   # SXM4, NVLink 3 (600 GB/s both ways)
    _g("A100-40G", 40, 1555, 312, 300, 1.30),   # SXM4
    _g("L40S", 48, 864, 362, 32, 1.00),         # PCIe 4.0 x16
    _g("L4", 24, 300, 121, 32, 0.70),           # PCIe 4.0 x16
    _g("A10G", 24, 600, 125, 32, 1.00),         # PCIe 4.0 x16
    _g("T4", 16, 320, 65, 16, 0.35),            # PCIe 3.0 x16
    _g("V100-16G", 16, 900, 125, 150, 2.48),    # SXM2, NVLink 2
    _g("V100-32G", 32, 900, 125, 150, 2.90),    # SXM2, NVLink 2
    _g("A6000", 48, 768, 155, 32, 0.80),        # RTX A6000, PCIe 4.0 x16
    _g("A5000", 24, 768, 111, 32, 0.45),        # RTX A5000, PCIe 4.0 x16
    _g("A4000", 16, 448, 77, 32, 0.30),         # RTX A4000, PCIe 4.0 x16
    _g("RTX3090", 24, 936, 142, 32, 0.30),      # fp16 accumulate; PCIe 4.0 x16
    _g("RTX4090", 24, 1008, 330, 32, 0.45),     # fp16 accumulate; PCIe 4.0 x16
    # One CPU worker process of the executor (no GPU): modest figures for planning CPU tests.
    _g("cpu", 16, 20, 0.5, 10, 0.05),
]}


def known_gpu_names() -> list[str]:
    return list(CATALOG)


# What torch.cuda.get_device_name says (NVIDIA's marketing names, e.g. "NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-40GB", "Tesla T4", "NVIDIA GeForce RTX 4090") -> catalog name. Parts whose
# figures differ from the catalog's (H100 PCIe/NVL, L40 without S, RTX 3090 Ti) match nothing.
_DEVICE_PATTERNS = [
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\b(SXM|HBM3)\b", "H100-80G"),
    (r"\bA100\b", "A100-{mem}G"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10G\b", "A10G"),
    (r"\bT4\b", "T4"),
    (r"\bV100\b", "V100-{mem}G"),
    (r"\bRTX A6000\b", "A6000"),
    (r"\bRTX A5000\b", "A5000"),
    (r"\bRTX A4000\b", "A4000"),
    (r"\bRTX 3090\b(?! Ti)", "RTX3090"),
    (r"\bRTX 4090\b(?! D)", "RTX4090"),
]


def catalog_name_for_device(device_name: str, memory_bytes: float | None = None) -> str | None:
    """The catalog GPU type of a CUDA device, from its name (and, for parts sold with two memory
    sizes, its memory, read from the name or ``memory_bytes``); None when nothing fits."""
    for pattern, name in _DEVICE_PATTERNS:
        if not re.search(pattern, device_name):
            continue
        if "{mem}" not in name:
            return name
        m = re.search(r"(\d+)\s*GB", device_name)
        gb = int(m.group(1)) if m else (memory_bytes / 2**30 if memory_bytes else None)
        if gb is None:
            return None
        sizes = sorted(int(n.split("-")[-1][:-1]) for n in CATALOG if n.startswith(name.split("-")[0] + "-"))
        best = min(sizes, key=lambda s: abs(s - gb))   # 80 GB parts show 79.2 GiB, say
        return name.format(mem=best) if abs(best - gb) <= 0.15 * best else None
    return None
