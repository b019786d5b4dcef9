"""bench/host_noise_bench.py: the summary and table of per-second matmul rates beside steal, and
one real second of sampling."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_noise_bench as hn  # noqa: E402


def test_summary_gives_the_spread_and_the_correlation_with_steal():
    rows = [{"second": i, "gflops": g, "steal_pct": s}
            for i, (g, s) in enumerate([(100.0, 0.0), (75.0, 10.0), (110.0, 0.0), (90.0, 4.0)])]
    s = hn.summary(rows)
    assert (s["gflops_min"], s["gflops_median"], s["gflops_max"]) == (75.0, 95.0, 110.0)
    assert s["gflops_cv"] == pytest.approx(12.93 / 93.75, rel=1e-3)       # pstdev 12.93 of 100, 75, 110, 90
    assert s["steal_pct_mean"] == 3.5 and s["steal_pct_max"] == 10.0
    assert s["corr_gflops_steal"] < -0.9                                   # the slow seconds are the stolen ones
    text = hn.table(rows, s)
    assert "| 1 | 75 | 10.0 |" in text
    assert "min 75, median 95, max 110 (max/min 1.47, CV 13.8%)" in text
    # no steal at all: no correlation to give, and the table says so
    flat = [dict(r, steal_pct=0.0) for r in rows]
    assert hn.summary(flat)["corr_gflops_steal"] is None
    assert "correlation of GFLOPS with steal -" in hn.table(flat, hn.summary(flat))


def test_one_second_sampled_for_real():
    pytest.importorskip("torch")
    rows = hn.sample(1, 1)
    assert len(rows) == 1 and rows[0]["gflops"] > 0
    if Path("/proc/stat").exists():
        assert 0.0 <= rows[0]["steal_pct"] <= 100.0
    assert not math.isnan(hn.summary(rows)["gflops_cv"])
