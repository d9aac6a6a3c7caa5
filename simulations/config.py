"""The simulation config: YAML in, validated frozen dataclasses out.

Every problem is reported as a ``ConfigError`` naming the field (``cluster.
capacity_bytes``) or the file and line, so the CLI can print one line and exit
with status 2. The format is documented in ``simulations/README.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelmesh.units import parse_bytes, parse_duration


class ConfigError(Exception):
    """A config (or a trace it names) is invalid. ``str()`` says where and why."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@dataclass(frozen=True)
class FailureConfig:
    mtbf_s: float
    restart_s: float


@dataclass(frozen=True)
class ClusterConfig:
    instances: int
    capacity_bytes: int
    gpu_capacity_bytes: int = 0
    gpu_instances: int = 0
    concurrency: int = 8
    loading_concurrency: int = 4
    failures: FailureConfig | None = None


@dataclass(frozen=True)
class SizeConfig:
    kind: str  # "lognormal", "fixed" or "uniform"
    median_bytes: int = 0
    sigma: float = 0.0
    min_bytes: int = 0
    max_bytes: int = 0


@dataclass(frozen=True)
class ModelsConfig:
    count: int
    size: SizeConfig
    total_bytes: int | None = None
    gpu_fraction: float = 0.0
    load_fixed_s: float = 0.1
    load_bandwidth_bytes_per_s: float = float(1 << 30)
    load_jitter: float = 0.2
    load_failure_rate: float = 0.0
    inference_mean_ms: float = 10.0
    inference_sigma: float = 0.5


@dataclass(frozen=True)
class TraceConfig:
    kind: str  # "zipf" or "csv"
    requests: int = 0
    rate_per_s: float = 0.0
    alpha: float = 1.0
    csv_path: Path | None = None
    drift_every_s: float | None = None
    drift_fraction: float = 0.0
    diurnal_period_s: float | None = None
    diurnal_amplitude: float = 0.0
    bursts_on_s: float | None = None
    bursts_off_s: float = 0.0
    bursts_factor: float = 1.0
    new_models_per_s: float = 0.0


@dataclass(frozen=True)
class PolicySpec:
    label: str
    policy: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimulationConfig:
    cluster: ClusterConfig
    models: ModelsConfig
    trace: TraceConfig
    policies: tuple[PolicySpec, ...]
    seed: int = 0
    warmup_s: float = 0.0
    tick_s: float = 10.0
    source: Path | None = None


OPTIMAL = "optimal"


def load_config(path: str | Path) -> SimulationConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read config: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p} line {mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(where, f"invalid YAML: {problem}") from None
    return parse_config(data, base_dir=p.parent, source=p)


def parse_config(
    data: Any, *, base_dir: Path = Path("."), source: Path | None = None
) -> SimulationConfig:
    """Validate an already-parsed config mapping."""
    top = _mapping(data, "config")
    _only(top, "config", {"cluster", "models", "trace", "policies", "seed", "simulation"})
    for key in ("cluster", "models", "trace", "policies"):
        if key not in top:
            raise ConfigError(key, "missing (required top-level key)")
    sim = _mapping(top.get("simulation", {}) or {}, "simulation")
    _only(sim, "simulation", {"warmup_s", "tick_s"})
    return SimulationConfig(
        cluster=_cluster(top["cluster"]),
        models=_models(top["models"]),
        trace=_trace(top["trace"], base_dir),
        policies=_policies(top["policies"]),
        seed=_int(top.get("seed", 0), "seed", minimum=0),
        warmup_s=_duration(sim.get("warmup_s", 0), "simulation.warmup_s"),
        tick_s=_duration(sim.get("tick_s", 10), "simulation.tick_s", positive=True),
        source=source,
    )


# -- sections -------------------------------------------------------------------------------


def _cluster(raw: Any) -> ClusterConfig:
    c = _mapping(raw, "cluster")
    _only(
        c,
        "cluster",
        {
            "instances",
            "capacity_bytes",
            "gpu_capacity_bytes",
            "gpu_instances",
            "concurrency",
            "loading_concurrency",
            "failures",
        },
    )
    instances = _int(_need(c, "instances", "cluster"), "cluster.instances", minimum=1)
    capacity = _bytes(_need(c, "capacity_bytes", "cluster"), "cluster.capacity_bytes")
    if capacity <= 0:
        raise ConfigError("cluster.capacity_bytes", "must be greater than 0")
    gpu_cap = _bytes(c.get("gpu_capacity_bytes", 0), "cluster.gpu_capacity_bytes")
    gpu_instances = _int(
        c.get("gpu_instances", instances if gpu_cap else 0), "cluster.gpu_instances", minimum=0
    )
    if gpu_instances > instances:
        raise ConfigError("cluster.gpu_instances", f"is more than cluster.instances ({instances})")
    failures = None
    if c.get("failures") is not None:
        f = _mapping(c["failures"], "cluster.failures")
        _only(f, "cluster.failures", {"mtbf_s", "restart_s"})
        failures = FailureConfig(
            mtbf_s=_duration(
                _need(f, "mtbf_s", "cluster.failures"), "cluster.failures.mtbf_s", positive=True
            ),
            restart_s=_duration(f.get("restart_s", 60), "cluster.failures.restart_s"),
        )
    return ClusterConfig(
        instances=instances,
        capacity_bytes=capacity,
        gpu_capacity_bytes=gpu_cap,
        gpu_instances=gpu_instances,
        concurrency=_int(c.get("concurrency", 8), "cluster.concurrency", minimum=1),
        loading_concurrency=_int(
            c.get("loading_concurrency", 4), "cluster.loading_concurrency", minimum=1
        ),
        failures=failures,
    )


def _models(raw: Any) -> ModelsConfig:
    m = _mapping(raw, "models")
    _only(
        m,
        "models",
        {"count", "size", "total_bytes", "gpu_fraction", "load", "inference", "load_failure_rate"},
    )
    count = _int(_need(m, "count", "models"), "models.count", minimum=1)
    size = _size(m.get("size", {"fixed": "64MiB"}))
    total = None
    if m.get("total_bytes") is not None:
        total = _bytes(m["total_bytes"], "models.total_bytes")
        if total < count:
            raise ConfigError("models.total_bytes", "must be at least one byte per model")
    load = _mapping(m.get("load", {}) or {}, "models.load")
    _only(load, "models.load", {"fixed_s", "bandwidth_bytes_per_s", "jitter"})
    inference = _mapping(m.get("inference", {}) or {}, "models.inference")
    _only(inference, "models.inference", {"mean_ms", "sigma"})
    bandwidth = _bytes(
        load.get("bandwidth_bytes_per_s", "1GiB"), "models.load.bandwidth_bytes_per_s"
    )
    if bandwidth <= 0:
        raise ConfigError("models.load.bandwidth_bytes_per_s", "must be greater than 0")
    return ModelsConfig(
        count=count,
        size=size,
        total_bytes=total,
        gpu_fraction=_fraction(m.get("gpu_fraction", 0.0), "models.gpu_fraction"),
        load_fixed_s=_duration(load.get("fixed_s", 0.1), "models.load.fixed_s"),
        load_bandwidth_bytes_per_s=float(bandwidth),
        load_jitter=_float(load.get("jitter", 0.2), "models.load.jitter", minimum=0.0),
        load_failure_rate=_fraction(m.get("load_failure_rate", 0.0), "models.load_failure_rate"),
        inference_mean_ms=_float(
            inference.get("mean_ms", 10.0), "models.inference.mean_ms", minimum=0.0
        ),
        inference_sigma=_float(inference.get("sigma", 0.5), "models.inference.sigma", minimum=0.0),
    )


def _size(raw: Any) -> SizeConfig:
    s = _mapping(raw, "models.size")
    if len(s) != 1:
        raise ConfigError("models.size", "give exactly one of: lognormal, fixed, uniform")
    kind, spec = next(iter(s.items()))
    where = f"models.size.{kind}"
    if kind == "fixed":
        b = _bytes(spec, where)
        if b <= 0:
            raise ConfigError(where, "must be greater than 0")
        return SizeConfig("fixed", median_bytes=b)
    if kind == "lognormal":
        p = _mapping(spec, where)
        _only(p, where, {"median_bytes", "sigma", "min_bytes", "max_bytes"})
        median = _bytes(_need(p, "median_bytes", where), f"{where}.median_bytes")
        if median <= 0:
            raise ConfigError(f"{where}.median_bytes", "must be greater than 0")
        return SizeConfig(
            "lognormal",
            median_bytes=median,
            sigma=_float(p.get("sigma", 1.0), f"{where}.sigma", minimum=0.0),
            min_bytes=_bytes(p.get("min_bytes", 1), f"{where}.min_bytes"),
            max_bytes=_bytes(p.get("max_bytes", 0), f"{where}.max_bytes"),
        )
    if kind == "uniform":
        p = _mapping(spec, where)
        _only(p, where, {"min_bytes", "max_bytes"})
        lo = _bytes(_need(p, "min_bytes", where), f"{where}.min_bytes")
        hi = _bytes(_need(p, "max_bytes", where), f"{where}.max_bytes")
        if lo <= 0 or hi < lo:
            raise ConfigError(where, "needs 0 < min_bytes <= max_bytes")
        return SizeConfig("uniform", min_bytes=lo, max_bytes=hi)
    raise ConfigError(
        "models.size", f"unknown size distribution {kind!r} (use lognormal, fixed or uniform)"
    )


def _trace(raw: Any, base_dir: Path) -> TraceConfig:
    t = _mapping(raw, "trace")
    _only(t, "trace", {"zipf", "csv", "drift", "diurnal", "bursts", "new_models"})
    if ("zipf" in t) == ("csv" in t):
        raise ConfigError("trace", "give exactly one of 'zipf' (a generator) or 'csv' (a file)")
    if "csv" in t:
        extra = sorted(set(t) - {"csv"})
        if extra:
            raise ConfigError(f"trace.{extra[0]}", "only applies to the zipf generator")
        if not isinstance(t["csv"], str) or not t["csv"]:
            raise ConfigError("trace.csv", "must be the path of a CSV file")
        path = Path(t["csv"])
        if not path.is_absolute():
            path = base_dir / path
        return TraceConfig(kind="csv", csv_path=path)
    z = _mapping(t["zipf"], "trace.zipf")
    _only(z, "trace.zipf", {"alpha", "requests", "rate_per_s"})
    cfg: dict[str, Any] = dict(
        kind="zipf",
        alpha=_float(z.get("alpha", 1.0), "trace.zipf.alpha", minimum=0.0),
        requests=_int(_need(z, "requests", "trace.zipf"), "trace.zipf.requests", minimum=1),
        rate_per_s=_float(_need(z, "rate_per_s", "trace.zipf"), "trace.zipf.rate_per_s"),
    )
    if cfg["rate_per_s"] <= 0:
        raise ConfigError("trace.zipf.rate_per_s", "must be greater than 0")
    if t.get("drift") is not None:
        d = _mapping(t["drift"], "trace.drift")
        _only(d, "trace.drift", {"every_s", "fraction"})
        cfg["drift_every_s"] = _duration(
            _need(d, "every_s", "trace.drift"), "trace.drift.every_s", positive=True
        )
        cfg["drift_fraction"] = _fraction(d.get("fraction", 0.1), "trace.drift.fraction")
    if t.get("diurnal") is not None:
        d = _mapping(t["diurnal"], "trace.diurnal")
        _only(d, "trace.diurnal", {"period_s", "amplitude"})
        cfg["diurnal_period_s"] = _duration(
            d.get("period_s", 86400), "trace.diurnal.period_s", positive=True
        )
        amp = _fraction(d.get("amplitude", 0.5), "trace.diurnal.amplitude")
        if amp >= 1.0:
            raise ConfigError("trace.diurnal.amplitude", "must be below 1")
        cfg["diurnal_amplitude"] = amp
    if t.get("bursts") is not None:
        d = _mapping(t["bursts"], "trace.bursts")
        _only(d, "trace.bursts", {"mean_on_s", "mean_off_s", "factor"})
        cfg["bursts_on_s"] = _duration(
            _need(d, "mean_on_s", "trace.bursts"), "trace.bursts.mean_on_s", positive=True
        )
        cfg["bursts_off_s"] = _duration(
            _need(d, "mean_off_s", "trace.bursts"), "trace.bursts.mean_off_s", positive=True
        )
        cfg["bursts_factor"] = _float(d.get("factor", 5.0), "trace.bursts.factor", minimum=1.0)
    if t.get("new_models") is not None:
        d = _mapping(t["new_models"], "trace.new_models")
        _only(d, "trace.new_models", {"per_s"})
        cfg["new_models_per_s"] = _float(
            _need(d, "per_s", "trace.new_models"), "trace.new_models.per_s", minimum=0.0
        )
    return TraceConfig(**cfg)


def _policies(raw: Any) -> tuple[PolicySpec, ...]:
    from placement import POLICIES, get_policy, policy_params

    if not isinstance(raw, list) or not raw:
        raise ConfigError("policies", "must be a non-empty list of policy names")
    specs: list[PolicySpec] = []
    for n, item in enumerate(raw):
        where = f"policies[{n}]"
        params: dict[str, Any] = {}
        if isinstance(item, str):
            name = label = item
        else:
            d = _mapping(item, where)
            _only(d, where, {"policy", "label", "params"})
            raw_name = d.get("policy")
            if not isinstance(raw_name, str):
                raise ConfigError(f"{where}.policy", "must be a policy name")
            name = raw_name
            raw_label = d.get("label", name)
            if not isinstance(raw_label, str) or not raw_label:
                raise ConfigError(f"{where}.label", "must be a non-empty string")
            label = raw_label
            params = dict(_mapping(d.get("params", {}) or {}, f"{where}.params"))
        if name != OPTIMAL and name not in POLICIES:
            known = ", ".join([*POLICIES, OPTIMAL])
            raise ConfigError(where, f"unknown policy {name!r} (known: {known})")
        if name == OPTIMAL and params:
            raise ConfigError(f"{where}.params", "the optimum takes no parameters")
        if name != OPTIMAL:
            known_params = policy_params(name)
            for key in params:
                if key not in known_params or key == "seed":
                    raise ConfigError(
                        f"{where}.params.{key}",
                        f"not a parameter of {name} (it has: "
                        f"{', '.join(k for k in known_params if k != 'seed')})",
                    )
            try:
                get_policy(name, **params)
            except ValueError as e:
                raise ConfigError(f"{where}.params", str(e)) from None
        if any(s.label == label for s in specs):
            raise ConfigError(where, f"duplicate policy label {label!r}; give a 'label'")
        specs.append(PolicySpec(label=label, policy=name, params=params))
    return tuple(specs)


# -- field helpers --------------------------------------------------------------------------


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"must be a mapping, got {type(raw).__name__}")
    return raw


def _only(d: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}" if where != "config" else str(key),
                f"unknown key (expected one of: {', '.join(sorted(allowed))})",
            )


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}.{key}", "missing (required)")
    return d[key]


def _bytes(raw: Any, where: str) -> int:
    if isinstance(raw, str) and raw.strip().startswith("-"):
        raise ConfigError(where, f"must not be negative (got {raw!r})")
    try:
        return parse_bytes(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(where, str(e)) from None


def _int(raw: Any, where: str, *, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(where, f"must be an integer, got {raw!r}")
    if raw < minimum:
        raise ConfigError(where, f"must be at least {minimum}, got {raw}")
    return raw


def _float(raw: Any, where: str, *, minimum: float | None = None) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(where, f"must be a number, got {raw!r}")
    if minimum is not None and raw < minimum:
        raise ConfigError(where, f"must be at least {minimum:g}, got {raw}")
    return float(raw)


def _fraction(raw: Any, where: str) -> float:
    v = _float(raw, where, minimum=0.0)
    if v > 1.0:
        raise ConfigError(where, f"must be between 0 and 1, got {v}")
    return v


def _duration(raw: Any, where: str, *, positive: bool = False) -> float:
    if (
        isinstance(raw, str)
        and raw.strip().startswith("-")
        or (isinstance(raw, int | float) and not isinstance(raw, bool) and raw < 0)
    ):
        raise ConfigError(where, f"must not be negative (got {raw!r})")
    try:
        v = parse_duration(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(where, str(e)) from None
    if positive and v <= 0:
        raise ConfigError(where, "must be greater than 0")
    return v
