"""How many copies each model has, and where: scaling, the leader's chores, the drain.

Every instance, every rebalance interval:
- measures the request rate of each of its copies over the interval and
  publishes it with the copy record when it changed noticeably (placement's
  ``rebalance`` sizes copies from these rates);
- runs ``policy.rebalance`` over the models it holds and applies the actions
  that are its own: it unloads its own surplus copies (never below a model's
  ``min_copies`` or its last loaded copy, checked in etcd so that two holders
  never both let go) and, for models where it is the
  coordinator (the holder with the lowest instance id), asks the chosen
  instance to load an extra copy (never above ``max_copies``).

The leader (one instance, elected through a lease-bound etcd key) also:
- completes vmodel transitions whose target has loaded (a backstop: the
  instance that loads a target completes its transition at once);
- loads copies of models below their ``min_copies``;
- loads valuable unloaded models into free memory (the policy's fill actions);
- deletes copy records of failed loads once the failure has expired, and
  records left by instances that are gone.

On SIGTERM (``drain``) the instance hands its recently used models that have no
other copy to the instances placement picks, before it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time

from modelmesh.cache.local import ModelCache, UnloadReason
from modelmesh.errors import MeshError, Unavailable
from modelmesh.lifecycle import CopyPlacer, ModelLifecycle
from modelmesh.membership import Membership
from modelmesh.metrics import Metrics
from modelmesh.node import Node, Spawn
from modelmesh.registry.records import CopyState, ModelRecord, VModelState
from modelmesh.registry.store import Registry
from modelmesh.view import USABLE, MeshView
from placement import AddCopy, ClusterSnapshot, ModelSnapshot, Policy, RemoveCopy

log = logging.getLogger(__name__)


#: A model used within this many seconds is moved elsewhere when its instance drains.
DRAIN_RECENT_S = 3600.0


class CopyScaling:
    """Copy scaling on this instance, the leader's chores, and the drain on SIGTERM."""

    def __init__(self, node: Node, registry: Registry, cache: ModelCache, view: MeshView,
                 policy: Policy, placer: CopyPlacer, lifecycle: ModelLifecycle,
                 membership: Membership, metrics: Metrics, spawn: Spawn, *,
                 interval: float, load_failure_ttl: float) -> None:
        self.node = node
        self.registry = registry
        self.cache = cache
        self.view = view
        self.policy = policy
        self.placer = placer
        self.lifecycle = lifecycle
        self.membership = membership
        self.metrics = metrics
        self.spawn = spawn
        self.interval = interval or policy.rebalance_interval_s or 10.0
        self.load_failure_ttl = load_failure_ttl
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
        if self.node.draining:
            return
        await self.rebalance_own()
        self.leader = await self.registry.try_lead(self.node.instance_id, self.node.lease)
        if self.leader:
            await self.lead()

    # -- every instance ---------------------------------------------------------------

    def measure(self) -> None:
        """Request rate of each local copy over the last interval; publish big changes."""
        now = time.monotonic()
        rates: dict[str, float] = {}
        for entry in self.cache.entries():
            if entry.state is not CopyState.LOADED:
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
                self.membership.republish_copy(entry.model_id, rate)
        for gone in self._samples.keys() - rates.keys():
            self._samples.pop(gone, None)
            self._published.pop(gone, None)
        self.view.copy_rates = rates

    async def rebalance_own(self) -> None:
        me = self.node.instance_id
        mine = [e.model_id for e in self.cache.entries() if e.state is CopyState.LOADED]
        models = [self.view.model_snapshot(rec) for m in mine
                  if (rec := self.registry.models.get(m)) is not None]
        if not models:
            return
        cluster = self.view.cluster_snapshot()
        now = time.time()
        for action in self.policy.rebalance(cluster, models, now):
            rec = self.registry.models.get(action.model_id)
            if rec is None:
                continue
            if isinstance(action, RemoveCopy):
                if action.instance_id == me:
                    await self._remove_own(rec, action.reason, now)
            elif isinstance(action, AddCopy):
                holders = self.view.live_copies(rec.model_id, USABLE)
                if not holders or holders[0] != me:
                    continue  # the coordinator for this model is another holder
                if rec.max_copies and len(holders) >= rec.max_copies:
                    continue
                log.info("adding a copy of %s on %s (%s)", rec.model_id, action.instance_id,
                         action.reason)
                self.add_copy(rec.model_id, action.instance_id)

    async def _remove_own(self, rec: ModelRecord, reason: str, now: float) -> None:
        """Unload this instance's surplus copy, never below ``min_copies`` or the last one.

        Each holder decides from its own measurements, so two of them may find
        their own copy the surplus one at the same moment: the copy record goes
        first, in one etcd transaction that holds only while another holder's
        record exists, so only one of them unloads.
        """
        others = self.view.live_copies(rec.model_id, (CopyState.LOADED,), include_self=False)
        if len(others) < max(1, rec.min_copies):
            return
        try:
            released = await self.registry.release_copy(rec.model_id, self.node.instance_id,
                                                        others[0])
        except MeshError as exc:
            log.debug("not scaling down %s: %s", rec.model_id, exc)
            return
        if not released:
            return  # the other copy went first: this one stays
        log.info("scaling down %s here (%s)", rec.model_id, reason)
        self.view.last_removed[rec.model_id] = now
        self.cache.unload(rec.model_id, reason=UnloadReason.SCALED_DOWN)
        self.metrics.copy_changes.labels("remove").inc()

    def add_copy(self, model_id: str, target: str) -> None:
        if model_id in self._inflight:
            return
        self._inflight.add(model_id)

        async def go() -> None:
            try:
                await self.placer.load_on(target, model_id, timeout=30.0)
                self.metrics.copy_changes.labels("add").inc()
            except MeshError as exc:
                log.info("could not add a copy of %s on %s: %s", model_id, target, exc)
            finally:
                self._inflight.discard(model_id)

        self.spawn(go(), f"add-copy:{model_id}")

    # -- the leader ---------------------------------------------------------------------

    async def lead(self) -> None:
        for vm in list(self.registry.vmodels.values()):
            if vm.state is VModelState.TRANSITIONING:
                await self.lifecycle.advance_transitions(vm.target_model)
        cluster = self.view.cluster_snapshot()
        now = time.time()
        unloaded: list[ModelSnapshot] = []
        for rec in list(self.registry.models.values()):
            holders = self.view.live_copies(rec.model_id, USABLE)
            if len(holders) < rec.min_copies:
                self._top_up(rec, cluster, frozenset(holders))
            elif not holders and rec.last_used_ms:
                snap = self.view.model_snapshot(rec)
                unloaded.append(ModelSnapshot(
                    snap.model_id, snap.size_bytes, failed_on=snap.failed_on,
                    last_used=rec.last_used_ms / 1000, request_rate=rec.request_rate,
                ))
        if unloaded:
            for action in self.policy.rebalance(cluster, unloaded, now):
                if isinstance(action, AddCopy):
                    self.add_copy(action.model_id, action.instance_id)
        await self._janitor()

    def _top_up(self, rec: ModelRecord, cluster: ClusterSnapshot,
                holders: frozenset[str]) -> None:
        target = self.policy.place(self.view.model_snapshot(rec), cluster, holders)
        if target is not None:
            log.info("loading a copy of %s on %s (min_copies %d)", rec.model_id, target,
                     rec.min_copies)
            self.add_copy(rec.model_id, target)

    async def _janitor(self) -> None:
        """Remove copy records of expired failures and of instances that are gone."""
        now_ms = time.time() * 1000
        ttl_ms = self.load_failure_ttl * 1000
        for model_id, holders in list(self.registry.copies.items()):
            for iid, c in list(holders.items()):
                gone = iid not in self.registry.instances
                expired = c.state is CopyState.FAILED and now_ms - c.updated_ms > ttl_ms
                if gone or expired:
                    await self.registry.delete_copy(model_id, iid)

    # -- the drain -----------------------------------------------------------------------

    async def evacuate(self, deadline: float) -> None:
        """Have each recently used model that has no other copy loaded elsewhere.

        Asks placement where each should go and waits (until ``deadline``, loop
        time) for those loads. The caller has marked the instance draining.
        """
        loop = asyncio.get_running_loop()
        recent = time.time() - DRAIN_RECENT_S
        entries = sorted(
            (e for e in self.cache.entries() if e.state is CopyState.LOADED),
            key=lambda e: e.priority, reverse=True,
        )
        cluster = self.view.cluster_snapshot()
        me = frozenset({self.node.instance_id})
        moves = []
        for entry in entries:
            usage = self.cache.usage.get(entry.model_id)
            record = self.registry.models.get(entry.model_id)
            if record is None or usage is None or (usage.last_used or 0) < recent:
                continue
            if self.view.live_copies(entry.model_id, USABLE, include_self=False):
                continue
            target = self.policy.place(self.view.model_snapshot(record), cluster, me)
            if target is None:
                continue
            moves.append(self.spawn(
                self.placer.load_on(target, entry.model_id, sync=True,
                                    timeout=max(deadline - loop.time(), 0.1)),
                f"drain:{entry.model_id}"))
        if moves:
            log.info("draining: moving %d model(s) to other instances", len(moves))
            await asyncio.wait(moves, timeout=max(deadline - loop.time(), 0.1))
