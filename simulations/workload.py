"""The models a simulation serves: ids, sizes, devices, load and inference times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelmesh.units import format_bytes
from simulations.config import ConfigError, SimulationConfig


@dataclass(frozen=True)
class ModelTable:
    """Every model of a run, indexed 0..n-1 (requests refer to models by index).

    ``load_seconds`` is the expected load time (fixed cost plus size over
    bandwidth); each load draws a jitter around it. ``service_seconds`` is the
    mean inference time. ``registered_at`` is when a model appears (0 for
    models that exist from the start).
    """

    ids: list[str]
    sizes: np.ndarray
    gpu: np.ndarray
    load_seconds: np.ndarray
    service_seconds: np.ndarray
    registered_at: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def total_bytes(self) -> int:
        return int(self.sizes.sum())


def model_ids(count: int) -> list[str]:
    """Generated model ids: m00000, m00001, ... (zero-padded to a common width)."""
    width = max(5, len(str(count - 1)))
    return [f"m{i:0{width}d}" for i in range(count)]


def sample_sizes(cfg: SimulationConfig, count: int, rng: np.random.Generator) -> np.ndarray:
    """Model sizes from ``models.size``, rescaled to ``models.total_bytes`` if given."""
    size = cfg.models.size
    if size.kind == "fixed":
        sizes = np.full(count, float(size.median_bytes))
    elif size.kind == "uniform":
        sizes = rng.uniform(size.min_bytes, size.max_bytes, count)
    else:
        sizes = size.median_bytes * np.exp(size.sigma * rng.standard_normal(count))
        sizes = np.maximum(sizes, max(1, size.min_bytes))
        if size.max_bytes:
            sizes = np.minimum(sizes, size.max_bytes)
    if cfg.models.total_bytes is not None:
        initial = min(count, cfg.models.count)
        sizes *= cfg.models.total_bytes / sizes[:initial].sum()
    return np.maximum(1, np.rint(sizes)).astype(np.int64)


def build_models(
    cfg: SimulationConfig,
    ids: list[str],
    sizes: np.ndarray,
    rng: np.random.Generator,
    *,
    registered_at: np.ndarray | None = None,
    where: list[str] | None = None,
) -> ModelTable:
    """Complete a model table from ids and sizes, checking every model fits somewhere.

    ``where`` names, per model, the config field or trace line its size came
    from, for the error message when a model fits no instance.
    """
    n = len(ids)
    m = cfg.models
    gpu = np.zeros(n, dtype=bool)
    if m.gpu_fraction > 0:
        if cfg.cluster.gpu_capacity_bytes <= 0 or cfg.cluster.gpu_instances <= 0:
            raise ConfigError(
                "models.gpu_fraction", "needs cluster.gpu_capacity_bytes on some instances"
            )
        gpu = rng.random(n) < m.gpu_fraction
    cpu_cap = cfg.cluster.capacity_bytes
    gpu_cap = cfg.cluster.gpu_capacity_bytes if cfg.cluster.gpu_instances else 0
    limit = np.where(gpu, gpu_cap, cpu_cap)
    too_big = np.nonzero(sizes > limit)[0]
    if len(too_big):
        i = int(too_big[0])
        pool = "GPU memory" if gpu[i] else "memory"
        field = where[i] if where is not None else "models.size"
        raise ConfigError(
            field,
            f"model {ids[i]} is {format_bytes(int(sizes[i]))}, bigger than every instance's "
            f"{pool} ({format_bytes(int(limit[i]))}); {len(too_big)} model(s) do not fit. "
            "Lower the model sizes (e.g. sigma or max_bytes) or raise the instance capacity.",
        )
    load = m.load_fixed_s + sizes / m.load_bandwidth_bytes_per_s
    service = np.full(n, m.inference_mean_ms / 1000.0)
    reg = registered_at if registered_at is not None else np.zeros(n)
    return ModelTable(
        ids=ids,
        sizes=sizes,
        gpu=gpu,
        load_seconds=load,
        service_seconds=service,
        registered_at=reg,
    )
