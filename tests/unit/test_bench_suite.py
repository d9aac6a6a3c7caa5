"""The benchmark runner's bookkeeping: headline ratios, target checks, the README block.

Pure functions of benchmarks/suite.py; no benchmark runs here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import suite  # noqa: E402


def test_headline_ratios_take_the_headline_cell_and_keep_every_cell():
    results = {
        "dataplane": {"ratios": {"local_vs_bare_throughput_sklearn_c16": 0.95,
                                 "local_vs_bare_throughput_sklearn_c1": 0.8,
                                 "local_vs_bare_throughput_onnx_c16": 0.7}},
        "coldstart": {"ratios": {"cold_start_overhead_ms_p50": 12.5}},
        "simulator_speed": {},
    }
    ratios = suite.headline_ratios(results)
    assert ratios["local_vs_bare_throughput"] == 0.95
    assert ratios["local_vs_bare_throughput_sklearn_c1"] == 0.8
    assert ratios["local_vs_bare_throughput_onnx_c16"] == 0.7
    assert ratios["cold_start_overhead_ms_p50"] == 12.5


@pytest.mark.parametrize(("key", "value", "state"), [
    ("local_vs_bare_throughput", 0.9, "met"),
    ("local_vs_bare_throughput", 0.89, "MISSED"),
    ("local_vs_bare_p50", 1.2, "MISSED"),
    ("local_vs_mlserver_p99", 0.99, "met"),
    ("local_vs_mlserver_p99", 1.0, "MISSED"),
    ("cold_start_overhead_ms_p50", 20.0, "met"),
    ("stampede_loads", 2, "MISSED"),
    ("registry_100k_seconds", 59.9, "met"),
    ("registry_mirror_rss_mb", float("nan"), "not measured"),
])
def test_targets(key, value, state):
    rows = {r["key"]: r for r in suite.check_targets({key: value}, quick=False)}
    assert rows[key]["state"] == state
    others = [r["state"] for k, r in rows.items() if k != key]
    assert others and set(others) == {"not measured"}


def test_readme_block_is_replaced_between_its_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{suite.README_START}\nstale figures\n{suite.README_END}\nrest\n")
    monkeypatch.setattr(suite, "REPO", tmp_path)
    report = {"date": "2026-11-30T12:00:00+00:00", "commit": "abc", "machine": {"cpus": 2},
              "targets": suite.check_targets({"stampede_loads": 1}, quick=False)}
    suite.update_readme(report)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "stale figures" not in text
    assert "| 100 concurrent first requests cause exactly one load | 1 | met |" in text
