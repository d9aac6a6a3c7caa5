"""Registering, loading, unregistering models and managing vmodels (transport-neutral).

The management servicer translates ModelMesh's protobuf messages onto this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from modelmesh.cache.local import ModelCache, UnloadReason
from modelmesh.errors import (
    AlreadyExists,
    InvalidArgument,
    MeshError,
    ModelNotFound,
    PreconditionFailed,
    Rejected,
    VModelNotFound,
)
from modelmesh.node import Node, Spawn
from modelmesh.registry.records import (
    CopyState,
    ModelRecord,
    VModelRecord,
    VModelState,
)
from modelmesh.registry.store import COPIES, MODELS, Change, Registry, now_ms, validate_id
from modelmesh.runtimes.formats import accepted
from modelmesh.view import MeshView, ModelStatus, Status

log = logging.getLogger(__name__)

#: Longest a synchronous load waits for its new copy record to reach this instance's view.
COPY_VISIBLE_S = 5.0


class CopyPlacer(Protocol):
    """Where a model's next copy goes, and asking an instance to load one (the router)."""

    def choose(self, record: ModelRecord) -> tuple[str | None, bool]: ...

    async def load_on(self, target: str, model_id: str, sync: bool = False,
                      timeout: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class VModelStatus:
    """ModelMesh's VModelStatusInfo in domain terms (``state`` None: no such vmodel)."""

    state: VModelState | None
    active_model: str = ""
    target_model: str = ""
    owner: str = ""
    active_status: ModelStatus = field(default_factory=lambda: ModelStatus(Status.NOT_FOUND))
    target_status: ModelStatus = field(default_factory=lambda: ModelStatus(Status.NOT_FOUND))


def _require_id(model_id: str) -> None:
    if not model_id:
        raise InvalidArgument("modelId is required")


def _owned(vmodel_id: str, owner: str, asked: str) -> str:
    held = f"owned by '{owner}'" if owner else "unowned"
    given = f"owner '{asked}'" if asked else "no owner"
    return f"vmodel '{vmodel_id}' already exists, {held}; this request gives {given}"


class ModelLifecycle:
    """Registrations and vmodels; ``on_registry_change`` is to be a registry listener."""

    def __init__(self, node: Node, registry: Registry, cache: ModelCache, view: MeshView,
                 placer: CopyPlacer, spawn: Spawn, *,
                 check_model: Callable[[str, str, str], None], load_timeout: float,
                 accepted_types: frozenset[str] = frozenset()) -> None:
        self.node = node
        self.registry = registry
        self.cache = cache
        self.view = view
        self.placer = placer
        self.spawn = spawn
        #: Checks a registration's (type, path, key) against where models run: the
        #: embedded runtimes need a known format and a location the mesh can read; a
        #: runtime server gets them untouched and its loadModel decides.
        self.check_model = check_model
        self.load_timeout = load_timeout
        #: ``--accepted-model-types`` (empty: every type).
        self.accepted_types = accepted_types

    # -- models ---------------------------------------------------------------------

    def new_record(self, model_id: str, model_type: str, path: str, key: str = "",
                   auto_delete: bool = False, min_copies: int = 0,
                   max_copies: int = 0) -> ModelRecord:
        """Validate a registration and build its record (nothing is written).

        ``min_copies``: copies kept loaded even without traffic; ``max_copies``:
        most copies scaling may create (0: no limit).
        """
        validate_id("model id", model_id)
        if not 0 <= min_copies <= 64 or not 0 <= max_copies <= 64:
            raise InvalidArgument(f"model '{model_id}': copy limits must be between 0 and 64")
        if max_copies and min_copies > max_copies:
            raise InvalidArgument(
                f"model '{model_id}': min copies ({min_copies}) exceed max copies ({max_copies})")
        if not model_type:
            raise InvalidArgument(f"model '{model_id}': modelInfo.type is required")
        if not accepted(model_type, key, self.accepted_types):
            raise InvalidArgument(
                f"model '{model_id}': model type '{model_type}' is not accepted here "
                f"(accepted: {', '.join(sorted(self.accepted_types))})")
        self.check_model(model_type, path, key)  # refuses unknown formats, escapes
        return ModelRecord(model_id=model_id, model_type=model_type, path=path,
                           storage_key=key, created_ms=now_ms(), auto_delete=auto_delete,
                           min_copies=min_copies, max_copies=max_copies)

    async def register(self, record: ModelRecord, *, replace: bool = False,
                       load_now: bool = False, sync: bool = False) -> ModelStatus:
        before = self.registry.models.get(record.model_id)
        stored = await self.registry.register_model(record, replace_existing=replace)
        if before is not None and not before.same_definition(stored):
            self.cache.unload(record.model_id, reason=UnloadReason.REPLACED)
        log.info("model registered: %s (%s, %s)", record.model_id, record.model_type,
                 record.path)
        if load_now:
            return await self.ensure_loaded(record.model_id, sync=sync)
        return self.status(record.model_id)

    async def unregister(self, model_id: str) -> None:
        """Unregister a model; one that is not registered is no error (idempotent clean-up,
        as in ModelMesh). Refused while a vmodel uses the model, checked inside the
        delete's transaction."""
        _require_id(model_id)
        if not await self.registry.unregister_model(model_id):
            return
        self.cache.unload(model_id, reason=UnloadReason.UNREGISTERED)
        log.info("model unregistered: %s", model_id)

    async def ensure_loaded(self, model_id: str, sync: bool = False,
                            here: bool = False) -> ModelStatus:
        """Make sure a copy exists somewhere (``here``: on this instance), loading if needed.

        Without ``here`` the model is left alone when a live copy exists anywhere;
        otherwise placement picks the instance, which is asked to load it. With
        ``sync`` the call returns once the load has finished (or failed).
        """
        _require_id(model_id)
        record = await self.registry.require_model(model_id)
        me = self.node.instance_id
        if here:
            if self.node.draining and self.cache.get(model_id) is None:
                raise Rejected(f"instance {me} is shutting down")
            try:
                await self.placer.load_on(me, model_id, sync=sync)
            except MeshError:
                if not sync:
                    raise
            return self.status(model_id)
        status = self.status(model_id)
        live = set(self.view.copy_states(model_id).values())
        if CopyState.LOADED in live or (CopyState.LOADING in live and not sync):
            return status
        started = False
        if CopyState.LOADING not in live:
            target, _ = self.placer.choose(record)
            try:
                await self.placer.load_on(target or me, model_id, sync=sync,
                                          timeout=self.load_timeout)
                started = True
            except MeshError:
                if not sync:
                    raise
        if sync:
            await self._wait_loaded(model_id, copy_expected=started)
        return self.status(model_id)

    async def _wait_loaded(self, model_id: str, copy_expected: bool = False) -> None:
        """Wait (bounded by the load timeout) until no live copy is LOADING any more.

        ``copy_expected``: a load was just done (on another instance, perhaps), so
        wait, briefly, for its copy record to reach this instance's view too: the
        peer's answer can arrive before the watch event does, and the status then
        said NOT_LOADED for a model that was loaded.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout
        seen_by = loop.time() + min(COPY_VISIBLE_S, self.load_timeout)
        while loop.time() < deadline:
            states = set(self.view.copy_states(model_id).values())
            if CopyState.LOADED in states:
                return
            if CopyState.LOADING not in states and \
                    (states or not copy_expected or loop.time() >= seen_by):
                return
            await asyncio.sleep(0.02)

    def status(self, model_id: str) -> ModelStatus:
        """The model's status across the mesh (``MeshView.model_status``)."""
        return self.view.model_status(model_id)

    # -- vmodels --------------------------------------------------------------------

    async def set_vmodel(
        self, vmodel_id: str, target_model: str, *, record: ModelRecord | None = None,
        update_only: bool = False, expected_target: str = "", force: bool = False,
        load_now: bool = True, sync: bool = False, owner: str = "",
    ) -> VModelStatus:
        validate_id("vmodel id", vmodel_id)
        validate_id("target model id", target_model)
        registered = False
        for _ in range(10):
            current = await self.registry.get_vmodel(vmodel_id)
            if current is None:
                if update_only:
                    raise VModelNotFound(vmodel_id)
                if expected_target and expected_target != target_model:
                    raise PreconditionFailed(
                        f"vmodel '{vmodel_id}' does not exist, so its target is not "
                        f"'{expected_target}'"
                    )
                new = VModelRecord(vmodel_id, active_model=target_model,
                                   target_model=target_model, owner=owner,
                                   updated_ms=now_ms())
                expected_rev = 0
                old: VModelRecord | None = None
            else:
                old, expected_rev = current
                if owner != old.owner:  # as ModelMesh: the owner must match, "" included
                    raise AlreadyExists(_owned(vmodel_id, old.owner, owner))
                if expected_target and expected_target != old.target_model:
                    raise PreconditionFailed(
                        f"vmodel '{vmodel_id}' targets '{old.target_model}', not the expected "
                        f"'{expected_target}'"
                    )
                if old.target_model == target_model and not force:
                    new = old
                else:
                    # Switch at once when the target is loaded, or when the active model
                    # has no loaded copy anywhere (nothing would be served meanwhile).
                    switch_now = force or target_model == old.active_model or \
                        self.status(target_model).status is Status.LOADED or \
                        self.status(old.active_model).status is not Status.LOADED
                    new = VModelRecord(
                        vmodel_id,
                        active_model=target_model if switch_now else old.active_model,
                        target_model=target_model, owner=old.owner,
                        state=VModelState.DEFINED if switch_now else VModelState.TRANSITIONING,
                        updated_ms=now_ms(),
                    )
            if not registered:
                # Preconditions hold: only now register the target (a refused request
                # must leave nothing behind).
                if record is not None:
                    await self.registry.register_model(record)
                elif await self.registry.get_model(target_model, strict=True) is None:
                    raise ModelNotFound(target_model)
                registered = True
            if new is old or await self.registry.put_vmodel(new, expected_rev):
                break
        else:
            raise MeshError(f"vmodel '{vmodel_id}' is changing concurrently; retry")
        if old is not None and new is not old:
            await self._collect_orphans({old.active_model, old.target_model})
        if load_now or new.state is VModelState.TRANSITIONING:
            await self.ensure_loaded(target_model, sync=sync)
        if sync and new.state is VModelState.TRANSITIONING:
            await self._wait_transition(vmodel_id)
        return self.vmodel_status(vmodel_id)

    async def _wait_transition(self, vmodel_id: str, timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            vm = self.registry.vmodels.get(vmodel_id)
            if vm is None or vm.state is not VModelState.TRANSITIONING:
                return
            await asyncio.sleep(0.05)

    async def delete_vmodel(self, vmodel_id: str, owner: str = "") -> None:
        """Delete a vmodel. As in ModelMesh, deleting one that is not there, or (with
        ``owner``) one owned by someone else, succeeds and changes nothing."""
        current = await self.registry.get_vmodel(vmodel_id)
        if current is None:
            return
        vm, rev = current
        if owner and owner != vm.owner:
            log.info("vmodel %s not deleted: owned by '%s', not '%s'", vmodel_id, vm.owner,
                     owner)
            return
        if not await self.registry.delete_vmodel(vmodel_id, rev):
            raise MeshError(f"vmodel '{vmodel_id}' changed while deleting; retry")
        await self._collect_orphans({vm.active_model, vm.target_model})

    def vmodel_status(self, vmodel_id: str, owner: str = "") -> VModelStatus:
        """The vmodel's status; with ``owner``, one owned by someone else is not found."""
        vm = self.registry.vmodels.get(vmodel_id)
        if vm is None or (owner and owner != vm.owner):
            return VModelStatus(None)
        return VModelStatus(
            vm.state, vm.active_model, vm.target_model, vm.owner,
            self.status(vm.active_model), self.status(vm.target_model),
        )

    async def _collect_orphans(self, model_ids: set[str]) -> None:
        """Unregister auto-delete models that no vmodel references any more."""
        for model_id in model_ids:
            rec = self.registry.models.get(model_id)
            if rec is None or not rec.auto_delete:
                continue
            if any(True for _ in self.registry.vmodels_referencing(model_id)):
                continue
            try:
                deleted = await self.registry.unregister_model(model_id)
            except PreconditionFailed:
                continue  # a vmodel took it up meanwhile
            if deleted:
                self.cache.unload(model_id, reason=UnloadReason.UNREGISTERED)
                log.info("auto-deleted model %s (no vmodel uses it)", model_id)

    # -- transitions ----------------------------------------------------------------

    def on_registry_change(self, change: Change) -> None:
        """Registry listener: model deletions unload; loaded targets complete transitions."""
        if change.table == MODELS and change.new is None:
            self.forget(change.key)
        elif change.table == MODELS and change.old is not None and change.new is not None \
                and not change.old.same_definition(change.new):
            self.cache.unload(change.key, reason=UnloadReason.REPLACED)
        elif change.table == COPIES and change.new is not None:
            # The instance holding the copy completes the transition at once; the
            # leader's periodic chores are the backstop (see modelmesh/scaling.py).
            model_id, holder = change.new.model_id, change.new.instance_id
            if holder == self.node.instance_id and \
                    change.new.state in (CopyState.LOADED, CopyState.FAILED) and \
                    any(vm.target_model == model_id and vm.state is VModelState.TRANSITIONING
                        for vm in self.registry.vmodels.values()):
                self.spawn(self.advance_transitions(model_id), f"transition:{model_id}")

    def forget(self, model_id: str) -> None:
        """An unregistered model leaves this instance with everything kept about it:
        its copy (unloaded once its in-flight requests finish), use history,
        statistics, batching and scaling state."""
        self.cache.forget(model_id)
        self.view.forget(model_id)
        self.view.dataplane.forget(model_id)

    async def advance_transitions(self, model_id: str) -> None:
        """Switch vmodels whose target ``model_id`` is now loaded (or mark them failed)."""
        status = self.status(model_id)
        for vm in list(self.registry.vmodels.values()):
            if vm.target_model != model_id or vm.state is not VModelState.TRANSITIONING:
                continue
            current = await self.registry.get_vmodel(vm.vmodel_id)
            if current is None:
                continue
            fresh, rev = current
            if fresh.target_model != model_id or fresh.state is not VModelState.TRANSITIONING:
                continue
            if status.status is Status.LOADED:
                new = VModelRecord(fresh.vmodel_id, active_model=model_id,
                                   target_model=model_id, owner=fresh.owner,
                                   updated_ms=now_ms())
            elif status.status is Status.LOADING_FAILED:
                new = VModelRecord(fresh.vmodel_id, active_model=fresh.active_model,
                                   target_model=model_id, owner=fresh.owner,
                                   state=VModelState.TRANSITION_FAILED,
                                   error="; ".join(status.errors), updated_ms=now_ms())
            else:
                continue
            if await self.registry.put_vmodel(new, rev):
                log.info("vmodel %s: %s -> %s (%s)", fresh.vmodel_id, fresh.active_model,
                         new.active_model, new.state.value)
                if new.active_model != fresh.active_model:
                    await self._collect_orphans({fresh.active_model})
