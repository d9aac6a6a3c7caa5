"""How fast the placement simulator runs: 1,000,000 requests, 10,000 models, 20 instances.

The workload is simulations/configs/zipf.yaml with the request count raised to one
million (Zipf 0.9 at 500 requests/s, log-normal sizes adding up to 10x the
cluster's 80 GiB). Each policy is simulated in turn and its wall-clock and CPU
time printed; the target is under 30 s of wall-clock time per policy (the
offline optimum is timed too but has no target).

    .venv/bin/python benchmarks/simulator_speed.py [--requests N] [--policies a,b]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulations.config import PolicySpec, load_config  # noqa: E402
from simulations.runner import run_config  # noqa: E402
from simulations.traces import load_workload  # noqa: E402

TARGET_S = 30.0


def run(workdir: Path | None = None, quick: bool = False,
        requests: int | None = None, policies: str | None = None) -> dict[str, Any]:
    """Simulate the workload once per policy; simulated requests per second of wall time."""
    del workdir  # nothing is written
    requests = requests or (100_000 if quick else 1_000_000)
    policies = policies or ("density" if quick else "modelmesh,density")
    cfg = load_config(REPO / "simulations" / "configs" / "zipf.yaml")
    cfg = dataclasses.replace(cfg, trace=dataclasses.replace(cfg.trace, requests=requests))
    started = time.perf_counter()
    workload = load_workload(cfg)
    models, trace = workload
    out: dict[str, Any] = {
        "requests": len(trace), "models": len(models), "instances": cfg.cluster.instances,
        "trace_seconds": time.perf_counter() - started, "policies": {},
    }
    for name in policies.split(","):
        one = dataclasses.replace(cfg, policies=(PolicySpec(name, name, {}),))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        _, _, (result,) = run_config(one, progress=False, workload=workload)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        out["policies"][name] = {
            "wall_seconds": wall, "cpu_seconds": cpu,
            "simulated_requests_per_s": len(trace) / wall,
            "hit_ratio": result.metrics["hit_ratio"],
        }
    main_policy = "density" if "density" in out["policies"] else next(iter(out["policies"]))
    out["ratios"] = {"simulated_requests_per_s": round(
        out["policies"][main_policy]["simulated_requests_per_s"])}
    lines = [f"{len(trace):,} requests over {len(models):,} models on "
             f"{cfg.cluster.instances} simulated instances (simulations/configs/zipf.yaml).", "",
             "| policy | wall s | CPU s | simulated requests/s | hit ratio |",
             "|---|---|---|---|---|"]
    for name, r in out["policies"].items():
        lines.append(f"| {name} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['simulated_requests_per_s']:,.0f} | {r['hit_ratio']:.3f} |")
    out["summary"] = "\n".join(lines)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--policies", default="modelmesh,lru,gdsf,density,optimal")
    args = ap.parse_args()
    out = run(requests=args.requests, policies=args.policies)
    print(out["summary"])
    slow = [n for n, r in out["policies"].items()
            if n != "optimal" and r["wall_seconds"] > TARGET_S]
    if slow:
        print(f"slower than {TARGET_S:.0f} s: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
