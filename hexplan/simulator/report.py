"""Text renderings of simulation results for the command line (strings only, no IO)."""
from __future__ import annotations

import math

from ..render import table as _table
from .metrics import SimResult, Slo
from .run import Probe, Sweep


def _f(v: float, scale: float = 1.0, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    x = v * scale
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def _s(t: float) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def describe_workload(w: dict) -> str:
    if w.get("arrival") == "trace":
        src = f"trace {w.get('trace', '')} replayed"
    else:
        src = f"{w['arrival']} arrivals at {w['rate_per_s']:g} requests/s" + (
            f" (cv {w['cv']:g})" if w.get("arrival") == "gamma" else "")
    lens = {(k, v) for k, v in (("prompt", w["prompt_tokens"]), ("output", w["output_tokens"]))}
    if all(v == "trace" for _, v in lens):
        return f"{src}, lengths from the trace"
    return f"{src}, prompt {w['prompt_tokens']} and output {w['output_tokens']} tokens"


def format_slo(slo: Slo, att: dict) -> str:
    parts = []
    for key, label, target, unit, scale in (("ttft", "TTFT", slo.ttft_s, "ms", 1e3), ("tpot", "TPOT", slo.tpot_s, "ms", 1e3),
                                            ("e2e", "E2E", slo.e2e_s, "s", 1.0)):
        if target is not None and key in att:
            parts.append(f"{label} <= {target * scale:g} {unit}: {att[key]:.1%}")
    if len(parts) > 1:
        parts.append(f"all: {att['all']:.1%}")
    return "SLO attainment (requests completed in the window): " + ", ".join(parts)


def format_result(r: SimResult, title: str = "") -> str:
    w0, w1 = r.window_s
    out = []
    if title:
        out.append(title)
    out.append(describe_workload(r.workload) + f", seed {r.seed}")
    out.append(f"measured {_s(w0)}-{_s(w1)} s (warm-up {_s(w0)} s left out): {r.requests_arrived} requests arrived, "
               f"{r.requests_completed} completed in the window, {r.requests_unfinished} unfinished at the end"
               + (f", {r.requests_rejected} rejected (larger than the KV cache)" if r.requests_rejected else "")
               + (f", {r.requests_truncated} cut to the model's context" if r.requests_truncated else ""))
    pred = r.predicted_throughput_tokens_per_s
    share = f", {r.throughput_tokens_per_s / pred:.1%} of it" if pred else ""
    out.append("")
    out.append(f"throughput {r.throughput_tokens_per_s:,.1f} output tokens/s (plan predicts {pred:,.1f}{share}), "
               f"{r.requests_per_s:.3g} requests/s")
    out.append("")
    rows = [(name, _f(s.mean, k), _f(s.p50, k), _f(s.p90, k), _f(s.p99, k), _f(s.max, k))
            for name, s, k in (("TTFT (s)", r.ttft_s, 1.0), ("TPOT (ms)", r.tpot_s, 1e3), ("E2E (s)", r.e2e_s, 1.0))]
    out.append(_table(("latency", "mean", "p50", "p90", "p99", "max"), rows))
    if r.slo and r.slo_attainment:
        out.append("")
        out.append(format_slo(r.slo, r.slo_attainment))
    out.append("")
    rows = [(i, f"{p['weight']:.3f}", p["requests_routed"], p["requests_completed"],
             _f(p["throughput_tokens_per_s"] or 0.0, 1.0, 4), " ".join(f"{u:.0%}" for u in util))
            for i, (p, util) in enumerate(zip(r.pipelines, r.stage_utilisation))]
    out.append(_table(("pipeline", "weight", "routed", "completed", "tokens/s", "stage utilisation"), rows))
    busy = [f"{k} {v:.0%}" for k, v in r.link_utilisation.items() if v >= 0.05]
    if busy:
        out.append("links busy >= 5%: " + ", ".join(busy))
    sc = r.scheduler
    if sc.get("policy") == "mlfq":
        out.append(f"scheduler mlfq (whole run): {sc['preemptions']} preemptions, {sc['demotions']} demotions, "
                   f"{sc['promotions']} promotions, {sc['kv_offloads']} KV offloads to host ({sc['kv_swap_ins']} brought back)")
    return "\n".join(out)


def format_probe(p: Probe, percentile: int) -> str:
    r = p.result
    return (f"rate {p.rate:8.4g} req/s: {r.throughput_tokens_per_s:9,.1f} tokens/s, "
            f"P{percentile} TTFT {_f(r.ttft_s.pct(percentile))} s, P{percentile} TPOT "
            f"{_f(r.tpot_s.pct(percentile), 1e3)} ms, P{percentile} E2E {_f(r.e2e_s.pct(percentile))} s: "
            + ("meets the SLO" if p.ok else f"fails ({p.why})"))


def format_sweep(s: Sweep, slo: Slo) -> str:
    target = ", ".join(f"P{s.percentile} {k} <= {v}" for k, v in (
        ("TTFT", f"{slo.ttft_s * 1e3:g} ms" if slo.ttft_s else None), ("TPOT", f"{slo.tpot_s * 1e3:g} ms" if slo.tpot_s else None),
        ("E2E", f"{slo.e2e_s:g} s" if slo.e2e_s else None)) if v)
    if s.best_rate is None:
        return f"no probed rate meets {target} (lowest probed {min(p.rate for p in s.probes):.4g} requests/s)"
    b = s.best.result
    return (f"highest rate meeting {target}: {s.best_rate:.4g} requests/s "
            f"({b.throughput_tokens_per_s:,.1f} output tokens/s, plan predicts {b.predicted_throughput_tokens_per_s:,.1f})")
