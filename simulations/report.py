"""Reports of a simulation: results.json, results.md, run.json and PNG plots.

``results.json`` maps each policy label to its figures (see ``metrics.
summarize``); ``run.json`` records what was simulated; ``results.md`` is the
side-by-side table; ``hit_ratio.png``, ``latency_cdf.png`` and ``memory.png``
plot hit ratio over time, the latency distribution and memory use over time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from modelmesh.units import format_bytes
from simulations.config import SimulationConfig
from simulations.engine import FAILED, RunResult
from simulations.metrics import hit_ratio_curve
from simulations.traces import Trace
from simulations.workload import ModelTable

_COLUMNS = [
    ("hit ratio", "hit_ratio", "{:.3f}"),
    ("miss ratio", "miss_ratio", "{:.3f}"),
    ("cold starts", "cold_starts", "{:,}"),
    ("failed", "failed", "{:,}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p95 ms", "p95_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("loads/min", "loads_per_min", "{:,.0f}"),
    ("evictions/min", "evictions_per_min", "{:,.0f}"),
    ("mean memory use", "mean_memory_utilization", "{:.1%}"),
    ("copies/model", "mean_copies_per_model", "{:.2f}"),
]


def write_report(
    out: Path,
    cfg: SimulationConfig,
    models: ModelTable,
    trace: Trace,
    results: list[RunResult],
    *,
    plots: bool = True,
) -> list[Path]:
    """Write every report file into ``out`` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    results_json = out / "results.json"
    results_json.write_text(
        json.dumps({r.label: _clean(r.metrics) for r in results}, indent=2) + "\n"
    )
    written.append(results_json)
    run_json = out / "run.json"
    run_json.write_text(json.dumps(_clean(run_info(cfg, models, trace, results)), indent=2) + "\n")
    written.append(run_json)
    md = out / "results.md"
    md.write_text(markdown(cfg, models, trace, results))
    written.append(md)
    if plots:
        written += write_plots(out, results)
    return written


def run_info(
    cfg: SimulationConfig, models: ModelTable, trace: Trace, results: list[RunResult]
) -> dict[str, Any]:
    cl = cfg.cluster
    return {
        "config": str(cfg.source) if cfg.source else None,
        "seed": cfg.seed,
        "cluster": {
            "instances": cl.instances,
            "capacity_bytes": cl.capacity_bytes,
            "gpu_capacity_bytes": cl.gpu_capacity_bytes,
            "gpu_instances": cl.gpu_instances,
            "concurrency": cl.concurrency,
            "loading_concurrency": cl.loading_concurrency,
        },
        "models": {
            "count": len(models),
            "total_bytes": models.total_bytes,
            "median_bytes": int(np.median(models.sizes)),
            "max_bytes": int(models.sizes.max()),
        },
        "trace": {
            "description": trace.description,
            "requests": len(trace),
            "duration_s": trace.duration_s,
        },
        "warmup_s": cfg.warmup_s,
        "policies": {
            spec.label: {"policy": spec.policy, "params": dict(spec.params)}
            for spec in cfg.policies
        },
    }


def markdown(
    cfg: SimulationConfig, models: ModelTable, trace: Trace, results: list[RunResult]
) -> str:
    cl = cfg.cluster
    memory = cl.instances * cl.capacity_bytes
    lines = [
        "# Placement simulation",
        "",
        f"- Cluster: {cl.instances} instances x {format_bytes(cl.capacity_bytes)} "
        f"= {format_bytes(memory)}, {cl.concurrency} request slots and "
        f"{cl.loading_concurrency} load slots each",
        f"- Models: {len(models):,}, {format_bytes(models.total_bytes)} in all "
        f"({models.total_bytes / memory:.1f}x the cluster's memory), median "
        f"{format_bytes(int(np.median(models.sizes)))}, largest "
        f"{format_bytes(int(models.sizes.max()))}",
        f"- Trace: {trace.description}; {trace.duration_s:,.0f} s of virtual time",
    ]
    if cfg.warmup_s:
        lines.append(f"- Figures exclude the first {cfg.warmup_s:g} s (warm-up)")
    lines += ["", "| policy | " + " | ".join(c[0] for c in _COLUMNS) + " |"]
    lines.append("|---" * (len(_COLUMNS) + 1) + "|")
    for r in results:
        cells = [_fmt(r.metrics.get(key), fmt) for _, key, fmt in _COLUMNS]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Hit: a loaded copy was ready when the request arrived. Cold start: the request "
        "waited for a load. Failed: no instance would load the model (for `modelmesh`, "
        "mostly its churn guard refusing loads). Latencies are of served requests and "
        "include queueing, load waits and inference.",
    ]
    for r in results:
        method = r.metrics.get("method")
        if method:
            lines.append("")
            lines.append(f"`{r.label}` is the offline {method}; its latencies assume no queueing.")
    return "\n".join(lines) + "\n"


def write_plots(out: Path, results: list[RunResult]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        t, ratio = hit_ratio_curve(r.times, r.outcome)
        ax.plot(t / 60.0, ratio, label=r.label, linestyle="--" if r.policy == "optimal" else "-")
    ax.set_xlabel("time (minutes)")
    ax.set_ylabel("hit ratio")
    ax.set_ylim(0, 1)
    ax.set_title("Hit ratio over time")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "hit_ratio.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        served = r.latency_s[r.outcome != FAILED] * 1000.0
        served = served[np.isfinite(served)]
        if not len(served):
            continue
        xs = np.sort(served)
        if len(xs) > 20_000:
            xs = xs[np.linspace(0, len(xs) - 1, 20_000).astype(int)]
        ax.plot(xs, np.linspace(0, 1, len(xs)), label=r.label)
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms, log scale)")
    ax.set_ylabel("fraction of served requests")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    paths.append(_save(fig, out / "latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if r.memory_curve is None or not len(r.memory_curve[0]):
            continue
        t, used = r.memory_curve
        ax.plot(t / 60.0, used, label=r.label)
    ax.set_xlabel("time (minutes)")
    ax.set_ylabel("memory in use (fraction of capacity)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Memory use")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "memory.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to null, floats rounded."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 6)
    return obj
