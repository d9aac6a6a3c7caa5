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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulations.config import PolicySpec, load_config  # noqa: E402
from simulations.runner import run_config  # noqa: E402
from simulations.traces import load_workload  # noqa: E402

TARGET_S = 30.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--policies", default="modelmesh,lru,gdsf,density,optimal")
    args = ap.parse_args()

    cfg = load_config(REPO / "simulations" / "configs" / "zipf.yaml")
    cfg = dataclasses.replace(cfg, trace=dataclasses.replace(cfg.trace, requests=args.requests))
    started = time.perf_counter()
    workload = load_workload(cfg)
    models, trace = workload
    print(
        f"workload: {len(trace):,} requests over {len(models):,} models on "
        f"{cfg.cluster.instances} instances, generated in {time.perf_counter() - started:.1f} s"
    )
    slow = []
    for name in args.policies.split(","):
        one = dataclasses.replace(cfg, policies=(PolicySpec(name, name, {}),))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        _, _, (result,) = run_config(one, progress=False, workload=workload)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        m = result.metrics
        flag = ""
        if name != "optimal" and wall > TARGET_S:
            flag = f"  SLOWER THAN {TARGET_S:.0f} s"
            slow.append(name)
        print(
            f"{name:>10}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, "
            f"{len(trace) / wall:9,.0f} requests/s, hit ratio {m['hit_ratio']:.3f}{flag}"
        )
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
