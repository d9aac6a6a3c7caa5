"""Trace generators and CSV replay."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.config import parse_config
from simulations.traces import load_workload, read_csv_trace


def workload(tiny, **trace):
    zipf = {"alpha": 0.9, "requests": 20_000, "rate_per_s": 100}
    zipf.update(trace.pop("zipf", {}))
    cfg = parse_config(tiny(trace={"zipf": zipf, **trace}, models={"count": 500}))
    return load_workload(cfg)


def test_zipf_is_deterministic_for_a_seed_and_has_the_asked_rate(tiny):
    models, a = workload(tiny)
    _, b = workload(tiny)
    assert np.array_equal(a.times, b.times) and np.array_equal(a.models, b.models)
    cfg = parse_config(tiny(seed=6, models={"count": 500}))
    _, c = load_workload(cfg)
    assert not np.array_equal(a.models[:100], c.models[:100])
    assert len(a) == 20_000
    assert np.all(np.diff(a.times) >= 0)
    assert len(a) / a.duration_s == pytest.approx(100, rel=0.05)


def test_zipf_popularity(tiny):
    _, trace = workload(tiny, zipf={"alpha": 1.0})
    counts = np.sort(np.bincount(trace.models, minlength=500))[::-1]
    harmonic = np.sum(1.0 / np.arange(1, 501))
    assert counts[0] / len(trace) == pytest.approx(1 / harmonic, rel=0.1)
    assert counts[1] / counts[0] == pytest.approx(0.5, rel=0.2)


def test_drift_changes_which_models_are_popular(tiny):
    def top(trace, lo, hi, k=20):
        sel = trace.models[(trace.times >= lo) & (trace.times < hi)]
        return set(np.argsort(np.bincount(sel, minlength=500))[::-1][:k])

    _, still = workload(tiny)
    _, drifting = workload(tiny, drift={"every_s": 20, "fraction": 0.5})
    end = still.duration_s
    assert len(top(still, 0, end / 2) & top(still, end / 2, end)) >= 15
    assert len(top(drifting, 0, end / 2) & top(drifting, end / 2, end)) <= 10


def test_new_models_are_requested_only_after_they_register(tiny):
    models, trace = workload(tiny, new_models={"per_s": 0.5})
    new = np.nonzero(models.registered_at > 0)[0]
    assert len(new) > 50 and len(models) == 500 + len(new)
    first = {}
    for t, m in zip(trace.times.tolist(), trace.models.tolist(), strict=True):
        first.setdefault(m, t)
    requested_new = [m for m in new if m in first]
    assert requested_new
    assert all(first[m] >= models.registered_at[m] for m in requested_new)


def dispersion(trace, window: float = 1.0) -> float:
    counts = np.bincount((trace.times // window).astype(int))
    return float(counts.var() / counts.mean())


def test_bursts_and_diurnal_keep_the_mean_rate_but_vary_it(tiny):
    _, plain = workload(tiny)
    _, bursty = workload(tiny, bursts={"mean_on_s": 5, "mean_off_s": 20, "factor": 8})
    _, daily = workload(tiny, diurnal={"period_s": 100, "amplitude": 0.8})
    for trace in (bursty, daily):
        assert len(trace) / trace.duration_s == pytest.approx(100, rel=0.25)
    assert dispersion(plain) < 1.5
    assert dispersion(bursty) > 5 * dispersion(plain)
    assert dispersion(daily, 10.0) > 5 * dispersion(plain, 10.0)


def test_csv_header_comments_sizes_and_order(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "timestamp_s,model_id,size_bytes\n"
        "# recorded on a Tuesday\n"
        "\n"
        "5.0, big, 1GiB\n"
        "1.5,small,1000\n"
        "7,big,1GiB\n"
    )
    csv = read_csv_trace(path)
    assert csv.ids == ["big", "small"]
    assert csv.sizes == [1 << 30, 1000]
    assert csv.first_lines == [4, 5]
    assert csv.times.tolist() == [5.0, 1.5, 7.0]


def test_csv_workload_without_sizes_uses_the_config_models(tiny, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("10.0,m00003\n10.5,m00001\n9.0,m00003\n")
    cfg_map = tiny(trace={"csv": str(path)})
    del cfg_map["trace"]["zipf"]
    models, trace = load_workload(parse_config(cfg_map))
    assert len(models) == 60
    assert trace.times.tolist() == [0.0, 1.0, 1.5]  # sorted, starting at 0
    assert [models.ids[m] for m in trace.models] == ["m00003", "m00003", "m00001"]
