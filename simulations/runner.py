"""Run every policy of a config over the same workload."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from placement import POLICIES, Policy, get_policy
from simulations.config import OPTIMAL, PolicySpec, SimulationConfig
from simulations.engine import RunResult, Simulator
from simulations.optimal import run_optimal
from simulations.traces import Trace, load_workload
from simulations.workload import ModelTable


def make_policy(spec: PolicySpec, cfg: SimulationConfig, models: ModelTable) -> Policy:
    """The policy of ``spec``, seeded from the config.

    Parameters a real runtime would report (the default model size ModelMesh
    uses for its "full" threshold) are filled from the workload unless the
    config sets them.
    """
    params = dict(spec.params)
    fields = {f.name for f in dataclasses.fields(POLICIES[spec.policy])}
    if "default_model_size_bytes" in fields and "default_model_size_bytes" not in params:
        params["default_model_size_bytes"] = int(np.mean(models.sizes))
    return get_policy(spec.policy, seed=cfg.seed, **params)


def run_config(
    cfg: SimulationConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    workload: tuple[ModelTable, Trace] | None = None,
) -> tuple[ModelTable, Trace, list[RunResult]]:
    """Simulate every policy of ``cfg``; returns the workload and one result per policy."""
    models, trace = workload if workload is not None else load_workload(cfg)
    if log is not None:
        log(
            f"workload: {len(models)} models ({models.total_bytes / 2**30:.1f} GiB), "
            f"{trace.description}"
        )
    results: list[RunResult] = []
    for spec in cfg.policies:
        if spec.policy == OPTIMAL:
            if log is not None:
                log(f"{spec.label}: computing the offline optimum")
            result = run_optimal(cfg, models, trace)
            result.label = spec.label
            results.append(result)
            continue
        policy = make_policy(spec, cfg, models)
        with tqdm(
            total=len(trace),
            desc=f"{spec.label:>12}",
            unit="req",
            unit_scale=True,
            disable=not progress,
            file=sys.stderr,
            mininterval=0.5,
        ) as bar:
            sim = Simulator(cfg, models, trace, policy, label=spec.label, progress=bar.update)
            results.append(sim.run())
    return models, trace, results
