"""The placement simulator: placement policies over a virtual cluster in virtual time.

``python -m simulations CONFIG.yaml --out DIR`` runs every policy a config
lists over the same workload and writes a side-by-side report. Modules:
``config`` (YAML format and validation), ``workload`` (the models),
``traces`` (generators and CSV replay), ``engine`` (the discrete-event
simulator's loop), ``cluster`` (its instances, pools, copies and snapshots),
``faults`` (crashes, restarts, load failures), ``optimal`` (offline optimum
and bound), ``metrics``, ``report`` and ``cli``. See simulations/README.md.
"""

from simulations.cli import main
from simulations.config import ConfigError, SimulationConfig, load_config
from simulations.runner import run_config

__all__ = ["ConfigError", "SimulationConfig", "load_config", "main", "run_config"]
