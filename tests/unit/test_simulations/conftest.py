"""Small simulation configs for fast tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulations.config import SimulationConfig, parse_config

TINY: dict[str, Any] = {
    "seed": 5,
    "cluster": {"instances": 3, "capacity_bytes": "256MiB", "concurrency": 4},
    "models": {
        "count": 60,
        "size": {"lognormal": {"median_bytes": "16MiB", "sigma": 0.8, "max_bytes": "200MiB"}},
        "load": {"fixed_s": 0.05, "bandwidth_bytes_per_s": "512MiB"},
        "inference": {"mean_ms": 5},
    },
    "trace": {"zipf": {"alpha": 0.9, "requests": 3000, "rate_per_s": 50}},
    "policies": ["modelmesh", "lru", "gdsf", "density", "optimal"],
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def tiny() -> Callable[..., dict[str, Any]]:
    """tiny(**overrides) -> a small config mapping (nested dicts are merged)."""
    return lambda **over: _merge(TINY, over)


@pytest.fixture
def tiny_cfg(tiny) -> Callable[..., SimulationConfig]:
    """tiny_cfg(**overrides) -> a validated small config."""
    return lambda **over: parse_config(tiny(**over))


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """write_config(mapping) -> path of a YAML file holding it."""

    def write(data: dict[str, Any], name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write
