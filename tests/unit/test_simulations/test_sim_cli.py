"""The simulator CLI: reports on success, one-line errors with exit status 2 on bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.cli import main
from simulations.config import load_config
from simulations.runner import run_config

REPO = Path(__file__).resolve().parents[3]
REQUIRED = {
    "requests",
    "hit_ratio",
    "cold_starts",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "loads",
    "evictions",
    "mean_memory_utilization",
}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def assert_config_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_end_to_end_writes_every_report(tiny, write_config, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli([str(write_config(tiny())), "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["modelmesh", "lru", "gdsf", "density", "optimal"]
    for name, figures in results.items():
        assert REQUIRED <= set(figures), name
        assert figures["requests"] == 3000
        assert 0.0 <= figures["hit_ratio"] <= 1.0
    md = (out / "results.md").read_text()
    assert "| density |" in md and "| optimal |" in md
    for png in ("hit_ratio.png", "latency_cdf.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["count"] == 60 and run["trace"]["requests"] == 3000


def test_negative_capacity(tiny, write_config, tmp_path, capsys):
    cfg = tiny(cluster={"capacity_bytes": "-4GiB"})
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, "cluster.capacity_bytes", "negative")
    cfg = tiny(cluster={"capacity_bytes": -1000})
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, "cluster.capacity_bytes", "negative")


def test_model_bigger_than_every_instance(tiny, write_config, tmp_path, capsys):
    cfg = tiny()
    cfg["models"]["size"] = {"fixed": "1GiB"}
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, "models.size", "bigger than every instance", "m00000")


def test_model_in_csv_bigger_than_every_instance(tiny, write_config, tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,model_id,size_bytes\n0.0,a,10MiB\n1.0,huge,1GiB\n")
    cfg = tiny(trace={"csv": str(trace)})
    del cfg["trace"]["zipf"]
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, f"{trace} line 3", "huge", "bigger than every instance")


def test_sizeless_csv_with_unknown_model(tiny, write_config, tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("0.0,m00001\n0.5,m00002\n1.0,nope\n")
    cfg = tiny(trace={"csv": str(trace)})
    del cfg["trace"]["zipf"]
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, f"{trace} line 3", "'nope'", "not a model of this config")


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ("0.0,m00001\n1.0\n", "line 2: expected 'timestamp_s,model_id[,size_bytes]'"),
        ("0.0,m00001\nsoon,m00002\n", "line 2: timestamp 'soon' is not a number"),
        ("0.0,m00001\n1.0,m00002,1,extra\n", "line 2: expected"),
        ("# header comment\n0.0,a,1MiB\n1.0,b\n", "line 3: has no size_bytes column"),
        ("0.0,a,1MiB\n1.0,a,2MiB\n", "line 2: model 'a' has size 2097152 here but 1048576 on"),
        ("0.0,a,lots\n", "line 1: size_bytes: not a byte size"),
        ("nan,m00001\n", "line 1: timestamp 'nan' is not a finite number"),
    ],
)
def test_malformed_csv_lines(tiny, write_config, tmp_path, capsys, lines, needle):
    trace = tmp_path / "t.csv"
    trace.write_text(lines)
    cfg = tiny(trace={"csv": str(trace)})
    del cfg["trace"]["zipf"]
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, str(trace), needle)


@pytest.mark.parametrize(
    ("over", "needles"),
    [
        ({"cluster": {"instance": 3}}, ["cluster.instance", "unknown key"]),
        ({"cluster": {"instances": 0}}, ["cluster.instances", "at least 1"]),
        ({"policies": ["modelmesh", "fifo"]}, ["policies[1]", "unknown policy 'fifo'"]),
        (
            {"policies": [{"policy": "modelmesh", "params": {"churn": 1}}]},
            ["policies[0].params.churn", "not a parameter of modelmesh"],
        ),
        (
            {"policies": [{"policy": "modelmesh", "params": {"scale_up_rpm": "x"}}]},
            ["policies[0].params", "must be a number"],
        ),
        ({"policies": ["lru", "lru"]}, ["policies[1]", "duplicate policy label"]),
        ({"trace": {"zipf": {"alpha": "big"}}}, ["trace.zipf.alpha", "must be a number"]),
        ({"models": {"size": None}}, ["models.size", "must be a mapping"]),
        ({"models": {"load": {"fixed_s": "-2s"}}}, ["models.load.fixed_s", "negative"]),
        ({"simulation": {"tick_s": 0}}, ["simulation.tick_s", "greater than 0"]),
    ],
)
def test_invalid_fields_are_named(tiny, write_config, tmp_path, capsys, over, needles):
    rc, err = run_cli([str(write_config(tiny(**over))), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, *needles)


def test_unknown_size_distribution(tiny, write_config, tmp_path, capsys):
    cfg = tiny()
    cfg["models"]["size"] = {"pareto": {"alpha": 1.2}}
    rc, err = run_cli([str(write_config(cfg)), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, "models.size", "unknown size distribution 'pareto'")


def test_unreadable_and_invalid_files(tmp_path, capsys):
    rc, err = run_cli([str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, "missing.yaml", "cannot read config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {instances: 3\nmodels: [\n")
    rc, err = run_cli([str(bad), "--out", str(tmp_path / "o")], capsys)
    assert_config_error(rc, err, "bad.yaml line", "invalid YAML")
    rc, _ = run_cli(["--out", str(tmp_path)], capsys)
    assert rc == 2  # usage error


def test_python_dash_m_runs_and_reports_errors_without_traceback(tiny, write_config, tmp_path):
    ok = write_config(tiny(policies=["lru", "density"]), "ok.yaml")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations", str(ok), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| density |" in proc.stdout
    bad = write_config(tiny(cluster={"capacity_bytes": "-1GiB"}), "bad.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "simulations", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cluster.capacity_bytes" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "path", sorted((REPO / "simulations" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_configs_run(path: Path):
    cfg = load_config(path)
    if cfg.trace.kind == "zipf":  # the same config, shrunk to keep the test fast
        cfg = dataclasses.replace(cfg, trace=dataclasses.replace(cfg.trace, requests=4000))
    _, trace, results = run_config(cfg, progress=False)
    assert [r.label for r in results] == [p.label for p in cfg.policies]
    assert all(r.metrics["requests"] > 0 for r in results)
