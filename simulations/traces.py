"""Request traces: synthetic generators and replay of recorded CSV traces.

A trace is two arrays in time order: arrival times (seconds from 0) and the
index of the requested model in the run's ``ModelTable``.

Generator (``trace: {zipf: ...}`` plus optional modifiers)
    Popularity is Zipf: the model at rank r gets a share proportional to
    1 / r^alpha; ranks are assigned to models at random. Modifiers:
    ``drift`` reshuffles a fraction of the ranks every ``every_s`` seconds;
    ``new_models`` registers new models as a Poisson stream, each taking over
    the rank of a randomly chosen model, which is then no longer requested;
    ``diurnal`` scales the arrival rate by 1 + amplitude x sin(2 pi t / period);
    ``bursts`` alternates exponentially long quiet and busy periods (a
    two-state Markov-modulated Poisson process), busy ones ``factor`` times
    the quiet rate. Rate modulations are normalised so that ``rate_per_s`` is
    the mean rate.

CSV (``trace: {csv: PATH}``)
    One request per line: ``timestamp_s,model_id[,size_bytes]``; an optional
    header line naming those columns; blank lines and lines starting with ``#``
    are skipped. Either every line has a size or none does. With sizes, the CSV
    defines the model set (``models.count`` and ``models.size`` are ignored);
    without, every id must be a model of the config (m00000, m00001, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelmesh.units import parse_bytes
from simulations.config import ConfigError, SimulationConfig, TraceConfig
from simulations.workload import ModelTable, build_models, model_ids, sample_sizes


@dataclass(frozen=True)
class Trace:
    times: np.ndarray  # float64, non-decreasing, seconds
    models: np.ndarray  # int32 index into the ModelTable
    description: str

    def __len__(self) -> int:
        return len(self.times)

    @property
    def duration_s(self) -> float:
        return float(self.times[-1] - self.times[0]) if len(self.times) else 0.0


def load_workload(cfg: SimulationConfig) -> tuple[ModelTable, Trace]:
    """The models and the request trace a config describes (deterministic for its seed)."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.trace.kind == "csv":
        assert cfg.trace.csv_path is not None
        return _csv_workload(cfg, cfg.trace.csv_path, rng)
    return _zipf_workload(cfg, rng)


# -- generator ------------------------------------------------------------------------------


def _zipf_workload(cfg: SimulationConfig, rng: np.random.Generator) -> tuple[ModelTable, Trace]:
    t = cfg.trace
    n0 = cfg.models.count
    horizon = t.requests / t.rate_per_s
    reg_times = np.empty(0)
    if t.new_models_per_s > 0:
        n_new = rng.poisson(t.new_models_per_s * horizon)
        reg_times = np.sort(rng.uniform(0.0, horizon, n_new))
    n = n0 + len(reg_times)
    ids = model_ids(n)
    sizes = sample_sizes(cfg, n, rng)
    registered = np.concatenate([np.zeros(n0), reg_times])
    models = build_models(cfg, ids, sizes, rng, registered_at=registered)
    times = arrival_times(t, rng)
    chosen = _zipf_models(t, n0, reg_times, times, rng)
    parts = [f"zipf alpha={t.alpha:g}, {t.requests} requests at {t.rate_per_s:g}/s"]
    if t.drift_every_s:
        parts.append(f"drift {t.drift_fraction:.0%} every {t.drift_every_s:g}s")
    if t.diurnal_period_s:
        parts.append(f"diurnal amplitude {t.diurnal_amplitude:g}")
    if t.bursts_on_s:
        parts.append(f"bursts x{t.bursts_factor:g}")
    if len(reg_times):
        parts.append(f"{len(reg_times)} new models")
    return models, Trace(times, chosen, ", ".join(parts))


def arrival_times(t: TraceConfig, rng: np.random.Generator) -> np.ndarray:
    """``t.requests`` arrival times of a (possibly modulated) Poisson process."""
    n = t.requests
    gaps = rng.exponential(1.0, n)
    if not t.diurnal_period_s and not t.bursts_on_s:
        return np.cumsum(gaps) / t.rate_per_s
    # Time rescaling: arrivals of a unit-rate process mapped through the inverse
    # of the cumulative intensity.
    horizon = n / t.rate_per_s
    span = 3.0 * horizon
    steps = int(min(2_000_000, max(10_000, span / 0.05)))
    grid = np.linspace(0.0, span, steps + 1)
    mod = np.ones(steps + 1)
    if t.diurnal_period_s:
        mod *= 1.0 + t.diurnal_amplitude * np.sin(2 * math.pi * grid / t.diurnal_period_s)
    if t.bursts_on_s:
        mod *= _burst_profile(grid, t.bursts_on_s, t.bursts_off_s, t.bursts_factor, rng)
    in_horizon = grid <= horizon
    mod /= mod[in_horizon].mean()
    dt = span / steps
    cum = np.concatenate([[0.0], np.cumsum((mod[:-1] + mod[1:]) * 0.5 * dt)]) * t.rate_per_s
    targets = np.cumsum(gaps)
    if targets[-1] > cum[-1]:
        raise ConfigError("trace", "rate modulation too extreme to generate the requests")
    return np.interp(targets, cum, grid)


def _burst_profile(
    grid: np.ndarray, on_s: float, off_s: float, factor: float, rng: np.random.Generator
) -> np.ndarray:
    out = np.ones_like(grid)
    t, busy = 0.0, False
    end = float(grid[-1])
    while t < end:
        length = rng.exponential(on_s if busy else off_s)
        if busy:
            lo, hi = np.searchsorted(grid, [t, t + length])
            out[lo:hi] = factor
        t += length
        busy = not busy
    return out


def _zipf_models(
    t: TraceConfig,
    n0: int,
    reg_times: np.ndarray,
    times: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    weights = 1.0 / np.power(np.arange(1, n0 + 1, dtype=np.float64), t.alpha)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(len(times)), side="right"), n0 - 1)
    perm = rng.permutation(n0).astype(np.int32)  # rank -> model

    # Popularity changes at drift ticks and registrations; between changes the
    # rank -> model map is fixed, so each segment is mapped in one step.
    changes: list[tuple[float, int]] = [(float(x), n0 + k) for k, x in enumerate(reg_times)]
    if t.drift_every_s and t.drift_fraction > 0 and len(times):
        step = t.drift_every_s
        changes += [(step * k, -1) for k in range(1, int(times[-1] // step) + 1)]
    changes.sort()
    out = np.empty(len(times), dtype=np.int32)
    bounds = np.searchsorted(times, [c[0] for c in changes], side="left")
    start = 0
    for (_, what), stop in zip(changes, bounds, strict=True):
        out[start:stop] = perm[ranks[start:stop]]
        start = int(stop)
        if what < 0:
            k = max(2, int(round(t.drift_fraction * n0)))
            pos = rng.choice(n0, size=min(k, n0), replace=False)
            perm[pos] = perm[rng.permutation(pos)]
        else:
            perm[rng.integers(n0)] = what
    out[start:] = perm[ranks[start:]]
    return out


# -- CSV ------------------------------------------------------------------------------------

_HEADER = ("timestamp_s", "model_id", "size_bytes")


def _csv_workload(
    cfg: SimulationConfig, path: Path, rng: np.random.Generator
) -> tuple[ModelTable, Trace]:
    csv = read_csv_trace(path)
    if csv.sizes is not None:
        ids = csv.ids
        sizes = np.asarray(csv.sizes, dtype=np.int64)
        where = [f"{path} line {line}" for line in csv.size_lines]
        models = build_models(cfg, ids, sizes, rng, where=where)
        indices = csv.indices
    else:
        ids = model_ids(cfg.models.count)
        sizes = sample_sizes(cfg, len(ids), rng)
        models = build_models(cfg, ids, sizes, rng)
        known = {mid: i for i, mid in enumerate(ids)}
        remap = np.empty(len(csv.ids), dtype=np.int32)
        for j, mid in enumerate(csv.ids):
            i = known.get(mid)
            if i is None:
                raise ConfigError(
                    f"{path} line {csv.first_lines[j]}",
                    f"model {mid!r} is not a model of this config (the trace has no sizes, so "
                    f"ids must be {ids[0]}..{ids[-1]}; add a size_bytes column to define "
                    "your own models)",
                )
            remap[j] = i
        indices = remap[csv.indices]
    times = csv.times - csv.times.min()
    order = np.argsort(times, kind="stable")
    desc = f"csv {path.name}: {len(times)} requests over {len(csv.ids)} models"
    return models, Trace(times[order], indices[order].astype(np.int32), desc)


@dataclass(frozen=True)
class CsvTrace:
    times: np.ndarray
    indices: np.ndarray  # into ids
    ids: list[str]  # in order of first appearance
    first_lines: list[int]
    sizes: list[int] | None
    size_lines: list[int]


def read_csv_trace(path: Path) -> CsvTrace:
    """Parse a CSV trace, naming the file and line of the first problem found."""
    try:
        f = path.open()
    except OSError as e:
        raise ConfigError("trace.csv", f"cannot read {path}: {e.strerror or e}") from None
    times: list[float] = []
    indices: list[int] = []
    index: dict[str, int] = {}
    ids: list[str] = []
    first_lines: list[int] = []
    sizes: list[int] = []
    with_sizes: bool | None = None
    with f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = [x.strip() for x in line.split(",")]
            where = f"{path} line {line_no}"
            if not times and tuple(fields) in (_HEADER[:2], _HEADER):
                continue
            if len(fields) not in (2, 3) or not fields[1]:
                raise ConfigError(
                    where,
                    f"expected 'timestamp_s,model_id[,size_bytes]', got {_clip(line)!r}",
                )
            try:
                ts = float(fields[0])
            except ValueError:
                raise ConfigError(where, f"timestamp {fields[0]!r} is not a number") from None
            if not math.isfinite(ts):
                raise ConfigError(where, f"timestamp {fields[0]!r} is not a finite number")
            has_size = len(fields) == 3
            if with_sizes is None:
                with_sizes = has_size
            elif has_size != with_sizes:
                raise ConfigError(
                    where,
                    "has a size_bytes column but earlier lines do not"
                    if has_size
                    else "has no size_bytes column but earlier lines do",
                )
            mid = fields[1]
            i = index.get(mid)
            if has_size:
                try:
                    size = parse_bytes(fields[2])
                except ValueError as e:
                    raise ConfigError(where, f"size_bytes: {e}") from None
                if size <= 0:
                    raise ConfigError(where, "size_bytes must be greater than 0")
            if i is None:
                i = index[mid] = len(ids)
                ids.append(mid)
                first_lines.append(line_no)
                if has_size:
                    sizes.append(size)
            elif has_size and sizes[i] != size:
                raise ConfigError(
                    where,
                    f"model {mid!r} has size {size} here but {sizes[i]} on line {first_lines[i]}",
                )
            times.append(ts)
            indices.append(i)
    if not times:
        raise ConfigError("trace.csv", f"{path} has no requests")
    return CsvTrace(
        times=np.asarray(times, dtype=np.float64),
        indices=np.asarray(indices, dtype=np.int32),
        ids=ids,
        first_lines=first_lines,
        sizes=sizes if with_sizes else None,
        size_lines=first_lines,
    )


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
