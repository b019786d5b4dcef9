"""PNG plots of simulation results. Needs matplotlib (``pip install 'hexplan[plot]'``), which is
imported only here and only when a plot is asked for."""
from __future__ import annotations

from ..errors import HexplanError
from .metrics import SimResult
from .run import Sweep


def require():
    """Import matplotlib with a file-only backend; a clear error when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HexplanError("plotting needs matplotlib, which is not installed: pip install 'hexplan[plot]'") from None
    return plt


def _save(fig, path) -> None:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise HexplanError(f"cannot write the plot {path}: {e.strerror or e}") from None


def latency_cdfs(result: SimResult, path, title: str = "") -> None:
    """TTFT, TPOT and end-to-end latency CDFs of the requests completed in the window."""
    plt = require()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, scale) in zip(axes, (("ttft_s", "TTFT (s)", 1.0), ("tpot_s", "TPOT (ms)", 1e3),
                                              ("e2e_s", "end-to-end latency (s)", 1.0))):
        v = sorted(x * scale for x in result.samples.get(key, ()))
        if v:
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post")
            for q, ls in ((50, ":"), (90, "--"), (99, "-.")):
                ax.axvline(getattr(result, key).pct(q) * scale, color="grey", ls=ls, lw=0.8, label=f"p{q}")
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(title or f"{result.throughput_tokens_per_s:,.1f} output tokens/s, "
                          f"{result.requests_completed} requests")
    _save(fig, path)
    plt.close(fig)


def sweep(s: Sweep, path, title: str = "") -> None:
    """Throughput and P-th percentile latencies against the offered request rate."""
    plt = require()
    probes = sorted(s.probes, key=lambda p: p.rate)
    rates = [p.rate for p in probes]
    q = s.percentile
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(rates, [p.result.throughput_tokens_per_s for p in probes], "o-", label="simulated")
    pred = probes[0].result.predicted_throughput_tokens_per_s if probes else 0
    if pred:
        a1.axhline(pred, color="grey", ls="--", label="plan's prediction")
    a1.set_xlabel("request rate (requests/s)")
    a1.set_ylabel("output tokens/s")
    a1.legend()
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end")):
        a2.plot(rates, [getattr(p.result, key).pct(q) for p in probes], "o-", label=f"P{q} {label}")
    a2.set_yscale("log")
    a2.set_xlabel("request rate (requests/s)")
    a2.set_ylabel("seconds")
    a2.legend()
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        if s.best_rate:
            ax.axvline(s.best_rate, color="green", lw=0.8)
    fig.suptitle(title or (f"highest rate meeting the SLO: {s.best_rate:.3g} requests/s" if s.best_rate
                           else "no probed rate meets the SLO"))
    _save(fig, path)
    plt.close(fig)
