"""Seeded synthetic heterogeneous clusters in the cluster YAML format (docs/cluster-format.md).

    python bench/cluster_gen.py --gpus 1024 --seed 1 [--regions 3] [-o cluster_specs/gen-1024.yaml]

A cluster of exactly ``--gpus`` GPUs (8 .. 4096): nodes drawn with these weights (by GPUs, so
the mix is about the same at every size)

    8-GPU nodes  A100-80G 25%, H100-80G 15%       (NVLink)
    4-GPU nodes  L4 20%, A10G 15%                 (PCIe)
    single GPUs  T4 15%, V100-16G 10%

spread over 2 to 4 regions (``--regions``; default drawn from the seed), round-robin by node so
every region gets a mix. Inside a region: 10 Gbps, 0.5 ms; between regions: slow WAN links,
12.5 to 100 Mbps and 30 to 80 ms, drawn per pair of regions. The coordinator is the first node.
The last few GPUs are filled with single T4s so the total is exact. The same arguments always
give the same file (``random.Random(seed)``, no other source of randomness).
"""
from __future__ import annotations

import argparse
import random
import sys

NODE_TYPES = [
    # gpu, GPUs per node, weight (share of GPUs)
    ("A100-80G", 8, 0.25),
    ("H100-80G", 8, 0.15),
    ("L4", 4, 0.20),
    ("A10G", 4, 0.15),
    ("T4", 1, 0.15),
    ("V100-16G", 1, 0.10),
]
REGION_NAMES = ["us", "eu", "asia", "sa"]
WAN_MBPS = [12.5, 25, 50, 100]


def generate(gpus: int, seed: int = 0, regions: int | None = None, name: str | None = None) -> str:
    """The cluster as YAML text."""
    if not 1 <= gpus <= 65536:
        raise ValueError(f"gpus must be in 1..65536, got {gpus}")
    rng = random.Random(seed)
    if regions is None:
        regions = rng.randint(2, 4)
    if not 1 <= regions <= len(REGION_NAMES):
        raise ValueError(f"regions must be in 1..{len(REGION_NAMES)}, got {regions}")
    region_names = REGION_NAMES[:regions]
    nodes = []      # (gpu, count)
    left = gpus
    while left > 0:
        fits = [(g, c, w) for g, c, w in NODE_TYPES if c <= left]
        # weight by share of GPUs: a type's node is drawn with probability ~ weight / count
        g, c, _ = rng.choices(fits, weights=[w / c for _, c, w in fits])[0]
        nodes.append((g, c))
        left -= c
    rng.shuffle(nodes)
    # big nodes first in the file (stable names per type)
    counters: dict = {}
    lines = [f"# Synthetic cluster: {gpus} GPUs, {len(nodes)} nodes, {regions} regions "
             f"(bench/cluster_gen.py --gpus {gpus} --seed {seed} --regions {regions}).",
             f"name: {name or f'gen-{gpus}-s{seed}'}",
             "nodes:"]
    for i, (g, c) in enumerate(nodes):
        short = g.split("-")[0].lower()
        k = counters.get((short, c), 0)
        counters[(short, c)] = k + 1
        node = f"{short}x{c}-{k}" if c > 1 else f"{short}-{k}"
        lines.append(f"  - {{name: {node}, gpu: {g}, count: {c}, region: {region_names[i % regions]}}}")
    lines += ["network:", "  default: {bandwidth: 10Gbps, latency: 0.5ms}"]
    if regions > 1:
        lines.append("  links:")
        for a in range(regions):
            for b in range(a + 1, regions):
                bw = rng.choice(WAN_MBPS)
                lat = rng.randint(30, 80)
                lines.append(f"    - {{between: [{region_names[a]}, {region_names[b]}], "
                             f"bandwidth: {bw:g}Mbps, latency: {lat}ms}}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs (8 .. 4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regions", type=int, default=None, help="2 to 4 (default: drawn from the seed)")
    ap.add_argument("--name", default=None)
    ap.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = ap.parse_args(argv)
    text = generate(args.gpus, args.seed, args.regions, args.name)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
