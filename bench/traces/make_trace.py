"""Write bench/traces/conversation_sample.jsonl: a synthetic chat trace for `hexplan simulate`.

    python bench/traces/make_trace.py                  # rewrites the committed file (deterministic)
    python bench/traces/make_trace.py -n 10000 --rate 4 -o /tmp/trace.jsonl

Nothing is downloaded: every line is drawn from distributions shaped like published summaries
of public conversation traces (docs/simulator.md, "The sample trace"):

* prompt tokens ~ log-normal, median 320, sigma 1.0 (mean ~530, p90 ~1150, p99 ~3300): chat
  prompts carry the conversation so far, so most are hundreds of tokens with a long tail;
* output tokens ~ log-normal, median 180, sigma 0.75 (mean ~240, p90 ~470, p99 ~1000);
* prompt and output independent; prompt + output capped at 4096 tokens (Llama-2's context):
  prompts at 3968, then outputs cut to fit;
* arrivals: gamma-distributed gaps, mean 1 s, coefficient of variation 1.5 (burstier than
  Poisson, as production traces are).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

CONTEXT = 4096
MAX_PROMPT = CONTEXT - 128


def make(n: int, rate: float, cv: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    k = 1 / (cv * cv)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.gammavariate(k, 1 / (rate * k))
        p = min(MAX_PROMPT, max(1, round(rng.lognormvariate(math.log(320), 1.0))))
        o = max(1, round(rng.lognormvariate(math.log(180), 0.75)))
        o = min(o, CONTEXT - p)
        out.append({"arrival_s": round(t, 3), "prompt_tokens": p, "output_tokens": o})
    return out


def _pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3000, help="requests (default 3000)")
    ap.add_argument("--rate", type=float, default=1.0, help="mean requests/s (default 1)")
    ap.add_argument("--cv", type=float, default=1.5, help="coefficient of variation of the gaps (default 1.5)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_name("conversation_sample.jsonl")))
    a = ap.parse_args()
    rows = make(a.n, a.rate, a.cv, a.seed)
    with open(a.output, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for key in ("prompt_tokens", "output_tokens"):
        v = [r[key] for r in rows]
        print(f"{key}: median {_pct(v, 50)}, mean {sum(v) / len(v):.0f}, p90 {_pct(v, 90)}, p99 {_pct(v, 99)}, "
              f"max {max(v)}")
    print(f"{len(rows)} requests over {rows[-1]['arrival_s']:.0f} s -> {a.output}")


if __name__ == "__main__":
    main()
