"""Failure injection: instances crash and restart empty, loads fail.

``FaultyCluster`` adds to the cluster's books what breaks them. With
``cluster.failures`` set, every instance crashes after an exponential time
with mean ``mtbf_s`` from the start of the trace and after each restart; a
crash drops its copies (the requests waiting for their loads retry elsewhere)
and the instance comes back empty ``restart_s`` later. A load fails with
probability ``models.load_failure_rate`` when it completes (the event loop
draws, so that loads that succeed pay nothing more); the copy is dropped, the
instance is remembered as failed for the model (placement avoids it for 15
minutes) and the waiting requests retry.

All draws come from one ``random.Random(seed)`` in the order the events
happen, so runs are deterministic for a config's seed. The retries themselves
are the request path's (``Simulator._retry`` in ``simulations.engine``).
"""

from __future__ import annotations

import random

from simulations.cluster import EV_DOWN, EV_UP, Cluster, Copy, Instance
from simulations.config import SimulationConfig
from simulations.workload import ModelTable


class FaultyCluster(Cluster):
    """A ``Cluster`` whose instances crash and restart and whose loads fail."""

    def __init__(self, cfg: SimulationConfig, models: ModelTable) -> None:
        super().__init__(cfg, models)
        self.random = random.Random(cfg.seed)

    def _retry(self, k: int, arrival: float, m: int, svc: float, now: float) -> None:
        """Dispatch request ``k`` again after its load was lost (the event loop's)."""
        raise NotImplementedError

    def _schedule_crashes(self, t0: float) -> None:
        """Queue every instance's first crash, if the config has failures."""
        failures = self.cfg.cluster.failures
        if failures is None:
            return
        for inst in self.instances:
            self._push(t0 + self.random.expovariate(1 / failures.mtbf_s), EV_DOWN, inst)

    def _load_failed(self, c: Copy, now: float) -> None:
        """The load of ``c`` failed: drop it, remember where, and retry its waiters."""
        inst, m = c.inst, c.m
        self.counters["load_failures"] += 1
        waiters = c.waiters
        c.waiters = []
        self._drop_copy(c)
        failed = self.failed_on[m]
        if failed is None:
            failed = self.failed_on[m] = {}
        failed[inst.idx] = now
        for k, arrival, svc in waiters:
            self._retry(k, arrival, m, svc, now)

    def _instance_down(self, inst: Instance, now: float) -> None:
        if not inst.alive:
            return
        self.counters["instance_failures"] += 1
        inst.alive = False
        self.alive = [i for i in self.instances if i.alive]
        stranded: list[tuple[int, float, float, int]] = []
        for c in list(inst.copies.values()):
            stranded += [(k, a, s, c.m) for k, a, s in c.waiters]
            c.waiters = []
            self._drop_copy(c)
        inst.restart()
        inst.alive = False
        assert self.cfg.cluster.failures is not None
        self._push(now + self.cfg.cluster.failures.restart_s, EV_UP, inst)
        for k, arrival, svc, m in stranded:
            self._retry(k, arrival, m, svc, now)

    def _instance_up(self, inst: Instance, now: float) -> None:
        inst.restart()
        inst.alive = True
        self.alive = [i for i in self.instances if i.alive]
        assert self.cfg.cluster.failures is not None
        self._push(
            now + self.random.expovariate(1 / self.cfg.cluster.failures.mtbf_s), EV_DOWN, inst
        )
