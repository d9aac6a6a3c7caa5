"""Run every benchmark in one go and write the results table (Markdown and JSON).

    benchmarks/run [--quick] [--only NAME,NAME] [--no-peers]

Full mode writes benchmarks/results/results.{md,json} and the summary block of the
README; ``--quick`` (a smoke run in under 3 minutes) writes results-quick.{md,json}
and touches nothing else. A benchmark that fails is reported as failed in the table
(with its error) and the run exits non-zero; the others still run.

Headline figures are ratios against a baseline measured in the same run (the bare
server, the mesh's local path, the model's raw load time); the ``ratios`` object of
the JSON keeps them comparable from run to run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, machine

# In the order they run: the quiet ones first, the data plane (the most sensitive
# to leftover load) last but with nothing else running.
BENCHMARKS = ("simulator_speed", "registry", "density", "churn", "ray_compare", "coldstart",
              "dataplane")
# The benchmarks that run peers (MLServer, KServe, Ray) unless --no-peers.
WITH_PEERS = ("dataplane", "ray_compare")


@dataclass(frozen=True)
class Target:
    """A figure the issue asks for, and how to read it from the ratios."""

    key: str
    text: str
    met: Callable[[float], bool]


TARGETS = (
    Target("local_vs_bare_throughput", "mesh local path >= 0.9x the bare server's req/s",
           lambda v: v >= 0.9),
    Target("local_vs_bare_p50", "mesh local path p50 <= 1.1x the bare server's",
           lambda v: v <= 1.1),
    Target("local_vs_mlserver_throughput", "mesh local path >= 1.5x MLServer's req/s",
           lambda v: v >= 1.5),
    Target("local_vs_mlserver_p99", "mesh local path p99 lower than MLServer's",
           lambda v: v < 1.0),
    Target("forward_vs_local_throughput", "forwarded path >= 0.6x the local path's req/s",
           lambda v: v >= 0.6),
    Target("unmerged_vs_bare_throughput_sklearn_c1",
           "single caller: local path without merging >= 0.95x the bare server's req/s",
           lambda v: v >= 0.95),
    Target("local_vs_kserve_throughput_sklearn_c1",
           "single caller: local path >= 1.2x KServe's req/s", lambda v: v >= 1.2),
    Target("local_vs_kserve_p99_sklearn_c1", "single caller: local path p99 lower than KServe's",
           lambda v: v < 1.0),
    Target("local_vs_mlserver_throughput_sklearn_c1",
           "single caller: local path >= 1.5x MLServer's req/s", lambda v: v >= 1.5),
    Target("local_vs_mlserver_p99_sklearn_c1",
           "single caller: local path p99 lower than MLServer's", lambda v: v < 1.0),
    Target("cold_start_overhead_ms_p50", "cold start <= raw load time + 20 ms at p50",
           lambda v: v <= 20.0),
    Target("cold_over_warm_ms_p50",
           "cold first request <= 2 ms over the warm request (instance alone, p50)",
           lambda v: v <= 2.0),
    Target("load_cpu_vs_bare",
           "server CPU per load (instance + etcd) <= 1.2x a bare process loading the file",
           lambda v: v <= 1.2),
    Target("stampede_loads", "100 concurrent first requests cause exactly one load",
           lambda v: v == 1),
    Target("density_rss_over_accounted",
           "RSS added per model within 2% of the bytes accounted for it",
           lambda v: 0.98 <= v <= 1.02),
    Target("churn_loads_per_miss", "churn: loads per miss <= 1.02 (default policy, density)",
           lambda v: v <= 1.02),
    Target("churn_lru_loads_per_miss", "churn: loads per miss <= 1.02 (--placement lru)",
           lambda v: v <= 1.02),
    Target("churn_vs_fitting_throughput_500",
           "churn req/s >= 0.6x the same mesh's when everything fits", lambda v: v >= 0.6),
    Target("ray_churn_throughput", "churn req/s (gRPC) >= 1.5x Ray Serve's",
           lambda v: v >= 1.5),
    Target("ray_churn_p99", "churn p99 (gRPC) lower than Ray Serve's", lambda v: v < 1.0),
    Target("ray_rest_churn_throughput", "churn req/s (REST, HTTP to HTTP) >= 1.5x Ray Serve's",
           lambda v: v >= 1.5),
    Target("ray_rest_churn_p99", "churn p99 (REST) lower than Ray Serve's",
           lambda v: v < 1.0),
    Target("registry_100k_seconds", "100,000 registrations in under 60 s",
           lambda v: v < 60.0),
    Target("registry_mirror_rss_mb", "under 300 MB RSS for a 100,000-model mirror",
           lambda v: v < 300.0),
)

# Which per-cell ratio stands for the headline: the light scikit-learn model at
# concurrency 16 (every cell is in the table and in dataplane's own ratios).
HEADLINE_CELL = "sklearn_c16"


def headline_ratios(results: dict[str, Any]) -> dict[str, float]:
    """The comparable figures of one run, from every benchmark's own ``ratios``."""
    out: dict[str, float] = {}
    for name, r in results.items():
        for key, value in (r.get("ratios") or {}).items():
            out[key] = value
            if key.endswith("_" + HEADLINE_CELL):
                out[key[: -len(HEADLINE_CELL) - 1]] = value
        del name
    return out


def check_targets(ratios: dict[str, float], quick: bool) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        value = ratios.get(t.key)
        if value is None or value != value:  # missing or NaN
            state = "not measured"
        else:
            state = "met" if t.met(value) else "MISSED"
        if quick and t.key.startswith("registry_") and state != "not measured":
            state += " (quick: extrapolated)"
        rows.append({"key": t.key, "target": t.text, "value": value, "state": state})
    return rows


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def run_all(names: list[str], quick: bool, peers: bool) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(), "benchmarks": {}, "failed": {},
        "seconds": {},
    }
    if peers and "dataplane" in names:
        from peers import ensure_peer_venvs

        report["peer_versions"] = ensure_peer_venvs()
    if peers and "ray_compare" in names:
        from ray_peer import ensure_ray_venv

        report.setdefault("peer_versions", {})["ray"] = ensure_ray_venv()
    for name in names:
        module = importlib.import_module(name)
        print(f"== {name} ({'quick' if quick else 'full'})", flush=True)
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix=f"mm-bench-{name}-") as tmp:
                if name in WITH_PEERS:
                    result = module.run(Path(tmp), quick, peers=peers)
                else:
                    result = module.run(Path(tmp), quick)
            report["benchmarks"][name] = result
            print(result.get("summary", ""), flush=True)
        except Exception as exc:  # noqa: BLE001 - one failure must not hide the others
            report["failed"][name] = "".join(traceback.format_exception(exc))[-4000:]
            print(f"!! {name} failed: {exc}", flush=True)
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    report["ratios"] = headline_ratios(report["benchmarks"])
    report["targets"] = check_targets(report["ratios"], quick)
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Benchmark results ({report['mode']} run)", "",
        f"{report['date']}, commit {report['commit']}, {m['cpus']} CPUs ({m['machine']}), "
        f"Python {m['python']}, load average at start {m['load_avg'][0]:.2f}; "
        f"{report['seconds']['total']:.0f} s in all. Produced by `benchmarks/run"
        f"{' --quick' if report['mode'] == 'quick' else ''}`.", "",
        "## Targets", "", "| target | measured | |", "|---|---|---|",
    ]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:g}"
        lines.append(f"| {t['target']} | {value} | {t['state']} |")
    for name, r in report["benchmarks"].items():
        lines += ["", f"## {name.replace('_', ' ')} ({report['seconds'][name]:.0f} s)", "",
                  r.get("summary", "(no summary)")]
    for name, err in report["failed"].items():
        lines += ["", f"## {name}: FAILED", "", "```", err.strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


README_START = "<!-- benchmark-summary:start -->"
README_END = "<!-- benchmark-summary:end -->"


def update_readme(report: dict[str, Any]) -> None:
    """Rewrite the README's summary block (between its markers) from a full run."""
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    rows = ["| target | measured | |", "|---|---|---|"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:g}"
        rows.append(f"| {t['target']} | {value} | {t['state']} |")
    r = report.get("ratios", {})
    notes = []
    if "registry_100k_single_rpc_seconds" in r:
        single = r["registry_100k_single_rpc_seconds"]
        notes.append("The registry row is the bulk `registerModels` call; one `registerModel` "
                     f"RPC per model (64 in flight) took {single:.0f} s for 100,000.")
    dataplane = report.get("benchmarks", {}).get("dataplane")
    if dataplane is not None:
        import dataplane as dp

        misses = dp.missed_cells(dataplane.get("ratios", {}))
        notes.append("Data-plane rows are the scikit-learn model at concurrency 16; over every "
                     "model and concurrency: " + ("all met." if not misses else
                                                 "missed in " + "; ".join(misses) + "."))
    block = "\n".join([
        README_START,
        f"From `benchmarks/run` on {report['date'][:10]} (commit {report['commit']}, "
        f"{report['machine']['cpus']} CPUs); every figure in "
        "[benchmarks/results/results.md](benchmarks/results/results.md).", "", *rows, "",
        *notes, README_END])
    head, rest = text.split(README_START, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1])


def render(path: Path) -> int:
    """Rewrite an earlier run's Markdown from its JSON (the figures are not touched)."""
    report = json.loads(path.read_text())
    dataplane = report["benchmarks"].get("dataplane")
    if dataplane is not None:
        import dataplane as dp

        dataplane["summary"] = dp.markdown(dataplane)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    if path.stem == "results":
        update_readme(report)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run in under 3 minutes")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--no-peers", action="store_true",
                    help="leave out MLServer, KServe and Ray Serve")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only rewrite the Markdown (and summaries) of an earlier run's JSON")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render))
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    report = run_all(names, args.quick, peers=not args.no_peers)
    stem = "results-quick" if args.quick else "results"
    if args.only or args.no_peers:
        stem += "-partial"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    if stem == "results":
        update_readme(report)
    print(f"\nwrote {RESULTS / stem}.md and .json")
    print("\n".join(markdown(report).splitlines()[4:6 + len(TARGETS) + 2]))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
