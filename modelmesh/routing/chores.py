"""Periodic work: measuring copies, scaling them, and the leader's cluster-wide chores.

Every instance, every rebalance interval:
- measures the request rate of each of its copies over the interval and
  publishes it with the copy record when it changed noticeably (placement's
  ``rebalance`` sizes copies from these rates);
- runs ``policy.rebalance`` over the models it holds and applies the actions
  that are its own: it unloads its own surplus copies (never below a model's
  ``min_copies`` or its last loaded copy) and, for models where it is the
  coordinator (the holder with the lowest instance id), asks the chosen
  instance to load an extra copy (never above ``max_copies``).

The leader (one instance, elected through a lease-bound etcd key) also:
- completes vmodel transitions whose target has loaded (a backstop: the
  instance that loads a target completes its transition at once);
- loads copies of models below their ``min_copies``;
- loads valuable unloaded models into free memory (the policy's fill actions);
- deletes copy records of failed loads once the failure has expired, and
  records left by instances that are gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from modelmesh.cache.local import EntryState
from modelmesh.errors import MeshError, Unavailable
from modelmesh.registry.records import CopyState, ModelRecord, VModelState
from placement import AddCopy, ModelSnapshot, RemoveCopy

if TYPE_CHECKING:
    from modelmesh.instance import MeshInstance

log = logging.getLogger(__name__)


class Chores:
    def __init__(self, instance: MeshInstance) -> None:
        self.instance = instance
        self.router = instance.router
        self.registry = instance.registry
        self.cache = instance.cache
        self.policy = instance.router.policy
        s = instance.settings
        self.interval = s.rebalance_interval or self.policy.rebalance_interval_s or 10.0
        self.leader = False
        self._samples: dict[str, tuple[float, int, float]] = {}  # model -> (loaded_at, hits, t)
        self._published: dict[str, float] = {}  # model -> rate last published
        self._inflight: set[str] = set()  # models with a copy request under way from here

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Unavailable as exc:
                log.debug("chores skipped: %s", exc)
            except Exception:  # one bad round must not end the chores
                log.exception("periodic chores failed")

    async def tick(self) -> None:
        self.measure()
        if self.instance.draining:
            return
        self.rebalance_own()
        self.leader = await self.registry.try_lead(self.instance.instance_id,
                                                   self.instance.lease)
        if self.leader:
            await self.lead()

    # -- every instance ---------------------------------------------------------------

    def measure(self) -> None:
        """Request rate of each local copy over the last interval; publish big changes."""
        now = time.monotonic()
        rates: dict[str, float] = {}
        for entry in self.cache.entries():
            if entry.state is not EntryState.LOADED:
                continue
            prev = self._samples.get(entry.model_id)
            if prev is not None and prev[0] == entry.loaded_at and now > prev[2]:
                rate = (entry.hits - prev[1]) / (now - prev[2])
            else:
                rate = 0.0
            self._samples[entry.model_id] = (entry.loaded_at, entry.hits, now)
            rates[entry.model_id] = rate
            published = self._published.get(entry.model_id, 0.0)
            if abs(rate - published) > max(0.25 * published, 0.5):
                self._published[entry.model_id] = rate
                self.instance.republish_copy(entry.model_id, rate)
        for gone in self._samples.keys() - rates.keys():
            self._samples.pop(gone, None)
            self._published.pop(gone, None)
        self.router.copy_rates = rates

    def _live_copies(self, model_id: str, states: tuple[CopyState, ...]) -> list[str]:
        """Instances (live, not shutting down) with a copy of ``model_id`` in ``states``."""
        live = self.registry.instances
        me = self.instance.instance_id
        out = [iid for iid, c in self.registry.copies.get(model_id, {}).items()
               if iid != me and c.state in states and iid in live
               and not live[iid].shutting_down]
        entry = self.cache.get(model_id)
        if entry is not None and not self.instance.draining:
            state = {EntryState.LOADED: CopyState.LOADED, EntryState.LOADING: CopyState.LOADING,
                     EntryState.FAILED: CopyState.FAILED}[entry.state]
            if state in states:
                out.append(me)
        return sorted(out)

    def rebalance_own(self) -> None:
        me = self.instance.instance_id
        mine = [e.model_id for e in self.cache.entries() if e.state is EntryState.LOADED]
        models = [self.router.model_snapshot(rec) for m in mine
                  if (rec := self.registry.models.get(m)) is not None]
        if not models:
            return
        cluster = self.router.cluster_snapshot()
        now = time.time()
        for action in self.policy.rebalance(cluster, models, now):
            rec = self.registry.models.get(action.model_id)
            if rec is None:
                continue
            if isinstance(action, RemoveCopy):
                if action.instance_id != me:
                    continue
                loaded = self._live_copies(rec.model_id, (CopyState.LOADED,))
                if len(loaded) - 1 >= max(1, rec.min_copies):
                    log.info("scaling down %s here (%s)", rec.model_id, action.reason)
                    self.router.last_removed[rec.model_id] = now
                    self.cache.unload(rec.model_id, reason="scaled down")
                    self.instance.metrics.copy_changes.labels("remove").inc()
            elif isinstance(action, AddCopy):
                holders = self._live_copies(rec.model_id, (CopyState.LOADED, CopyState.LOADING))
                if not holders or holders[0] != me:
                    continue  # the coordinator for this model is another holder
                if rec.max_copies and len(holders) >= rec.max_copies:
                    continue
                log.info("adding a copy of %s on %s (%s)", rec.model_id, action.instance_id,
                         action.reason)
                self.add_copy(rec.model_id, action.instance_id)

    def add_copy(self, model_id: str, target: str) -> None:
        if model_id in self._inflight:
            return
        self._inflight.add(model_id)

        async def go() -> None:
            try:
                await self.router.load_on(target, model_id, timeout=30.0)
                self.instance.metrics.copy_changes.labels("add").inc()
            except MeshError as exc:
                log.info("could not add a copy of %s on %s: %s", model_id, target, exc)
            finally:
                self._inflight.discard(model_id)

        self.instance.spawn(go(), name=f"add-copy:{model_id}")

    # -- the leader ---------------------------------------------------------------------

    async def lead(self) -> None:
        lifecycle = self.instance.lifecycle
        for vm in list(self.registry.vmodels.values()):
            if vm.state is VModelState.TRANSITIONING:
                await lifecycle.advance_transitions(vm.target_model)
        cluster = self.router.cluster_snapshot()
        now = time.time()
        unloaded: list[ModelSnapshot] = []
        for rec in list(self.registry.models.values()):
            holders = self._live_copies(rec.model_id, (CopyState.LOADED, CopyState.LOADING))
            if len(holders) < rec.min_copies:
                self._top_up(rec, cluster, frozenset(holders))
            elif not holders and rec.last_used_ms:
                snap = self.router.model_snapshot(rec)
                unloaded.append(ModelSnapshot(
                    snap.model_id, snap.size_bytes, failed_on=snap.failed_on,
                    last_used=rec.last_used_ms / 1000, request_rate=rec.request_rate,
                ))
        if unloaded:
            for action in self.policy.rebalance(cluster, unloaded, now):
                if isinstance(action, AddCopy):
                    self.add_copy(action.model_id, action.instance_id)
        await self._janitor()

    def _top_up(self, rec: ModelRecord, cluster, holders: frozenset[str]) -> None:
        target = self.policy.place(self.router.model_snapshot(rec), cluster, holders)
        if target is not None:
            log.info("loading a copy of %s on %s (min_copies %d)", rec.model_id, target,
                     rec.min_copies)
            self.add_copy(rec.model_id, target)

    async def _janitor(self) -> None:
        """Remove copy records of expired failures and of instances that are gone."""
        now_ms = time.time() * 1000
        ttl_ms = self.instance.settings.load_failure_ttl * 1000
        for model_id, holders in list(self.registry.copies.items()):
            for iid, c in list(holders.items()):
                gone = iid not in self.registry.instances
                expired = c.state is CopyState.FAILED and now_ms - c.updated_ms > ttl_ms
                if gone or expired:
                    await self.registry.delete_copy(model_id, iid)
