"""Registering, loading, unregistering models and managing vmodels (transport-neutral).

The management servicer translates ModelMesh's protobuf messages onto this.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelmesh.errors import (
    InvalidArgument,
    MeshError,
    ModelNotFound,
    PreconditionFailed,
    Rejected,
    VModelNotFound,
)
from modelmesh.registry.records import (
    CopyState,
    ModelRecord,
    VModelRecord,
    VModelState,
)
from modelmesh.registry.store import Change, now_ms, validate_id
from modelmesh.runtimes import MODEL_TYPES
from modelmesh.storage import check_model_location

if TYPE_CHECKING:
    from modelmesh.instance import MeshInstance

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CopyStatus:
    instance_id: str
    state: str  # LOADING | LOADED | LOADING_FAILED
    time_ms: int


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """ModelMesh's ModelStatusInfo in domain terms."""

    status: str  # NOT_FOUND | NOT_LOADED | LOADING | LOADED | LOADING_FAILED
    errors: tuple[str, ...] = ()
    copies: tuple[CopyStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class VModelStatus:
    status: str  # NOT_FOUND | DEFINED | TRANSITIONING | TRANSITION_FAILED
    active_model: str = ""
    target_model: str = ""
    owner: str = ""
    active_status: ModelStatus = field(default_factory=lambda: ModelStatus("NOT_FOUND"))
    target_status: ModelStatus = field(default_factory=lambda: ModelStatus("NOT_FOUND"))


_COPY_STATE = {CopyState.LOADING: "LOADING", CopyState.LOADED: "LOADED",
               CopyState.FAILED: "LOADING_FAILED"}


class ModelLifecycle:
    def __init__(self, instance: MeshInstance) -> None:
        self.instance = instance
        self.registry = instance.registry
        instance.registry.add_listener(self._on_change)

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
        if model_type not in MODEL_TYPES:
            raise InvalidArgument(
                f"model '{model_id}': unknown model type '{model_type}' "
                f"(known: {', '.join(sorted(MODEL_TYPES))})"
            )
        check_model_location(self.instance.settings, path, key)  # refuses escapes
        return ModelRecord(model_id=model_id, model_type=model_type, path=path,
                           storage_key=key, created_ms=now_ms(), auto_delete=auto_delete,
                           min_copies=min_copies, max_copies=max_copies)

    async def register(self, record: ModelRecord, *, replace: bool = False,
                       load_now: bool = False, sync: bool = False) -> ModelStatus:
        before = self.registry.models.get(record.model_id)
        stored = await self.registry.register_model(record, replace=replace)
        if before is not None and not before.same_definition(stored):
            self.instance.cache.unload(record.model_id, reason="replaced")
        log.info("model registered: %s (%s, %s)", record.model_id, record.model_type,
                 record.path)
        if load_now:
            return await self.ensure_loaded(record.model_id, sync=sync)
        return self.status(record.model_id)

    async def unregister(self, model_id: str) -> None:
        users = [v.vmodel_id for v in self.registry.vmodels_referencing(model_id)]
        if users:
            raise PreconditionFailed(
                f"model '{model_id}' is used by vmodel(s) {', '.join(sorted(users))}; "
                "delete or retarget them first"
            )
        if not await self.registry.unregister_model(model_id):
            raise ModelNotFound(model_id)
        self.instance.cache.unload(model_id, reason="unregistered")
        log.info("model unregistered: %s", model_id)

    async def ensure_loaded(self, model_id: str, sync: bool = False,
                            here: bool = False) -> ModelStatus:
        """Make sure a copy exists somewhere (``here``: on this instance), loading if needed.

        Without ``here`` the model is left alone when a live copy exists anywhere;
        otherwise placement picks the instance, which is asked to load it. With
        ``sync`` the call returns once the load has finished (or failed).
        """
        record = await self.registry.require_model(model_id)
        router = self.instance.router
        if here:
            if self.instance.draining and self.instance.cache.get(model_id) is None:
                raise Rejected(f"instance {self.instance.instance_id} is shutting down")
            try:
                await router.load_on(router.me, model_id, sync=sync)
            except MeshError:
                if not sync:
                    raise
            return self.status(model_id)
        status = self.status(model_id)
        live = self._live_states(model_id)
        if "LOADED" in live or ("LOADING" in live and not sync):
            return status
        if "LOADING" not in live:
            target, _ = router.choose(record)
            try:
                await router.load_on(target or router.me, model_id, sync=sync,
                                     timeout=self.instance.settings.load_timeout)
            except MeshError:
                if not sync:
                    raise
        if sync:
            await self._wait_loaded(model_id)
        return self.status(model_id)

    def _live_states(self, model_id: str) -> set[str]:
        """Copy states of ``model_id`` on live instances that are not shutting down."""
        live = self.registry.instances
        me = self.instance.instance_id
        states = {_COPY_STATE[c.state] for iid, c in self.registry.copies.get(model_id, {}).items()
                  if iid != me and iid in live and not live[iid].shutting_down}
        entry = self.instance.cache.get(model_id)
        if entry is not None and not self.instance.draining:
            states.add({"LOADING": "LOADING", "LOADED": "LOADED",
                        "FAILED": "LOADING_FAILED"}[entry.state.value])
        return states

    async def _wait_loaded(self, model_id: str) -> None:
        """Wait (bounded by the load timeout) until no live copy is LOADING any more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.instance.settings.load_timeout
        while loop.time() < deadline:
            states = self._live_states(model_id)
            if "LOADED" in states or "LOADING" not in states:
                return
            await asyncio.sleep(0.05)

    def status(self, model_id: str) -> ModelStatus:
        """The model's status across the mesh (local cache state is the freshest)."""
        if model_id not in self.registry.models:
            return ModelStatus("NOT_FOUND")
        copies: dict[str, CopyStatus] = {}
        errors: list[str] = []
        for inst, c in self.registry.copies.get(model_id, {}).items():
            copies[inst] = CopyStatus(inst, _COPY_STATE[c.state], c.updated_ms)
            if c.state is CopyState.FAILED and c.error:
                errors.append(c.error)
        me = self.instance.instance_id
        entry = self.instance.cache.get(model_id)
        if entry is not None:
            state = {"LOADING": "LOADING", "LOADED": "LOADED", "FAILED": "LOADING_FAILED"}[
                entry.state.value]
            copies[me] = CopyStatus(me, state, now_ms())
            if state == "LOADING_FAILED" and entry.error not in errors:
                errors.insert(0, entry.error)
        else:
            copies.pop(me, None)
        states = {c.state for c in copies.values()}
        for candidate in ("LOADED", "LOADING", "LOADING_FAILED"):
            if candidate in states:
                status = candidate
                break
        else:
            status = "NOT_LOADED"
        return ModelStatus(status, tuple(errors), tuple(copies.values()))

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
                if expected_target:
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
                if owner and old.owner and owner != old.owner:
                    raise PreconditionFailed(
                        f"vmodel '{vmodel_id}' is owned by '{old.owner}', not '{owner}'")
                if expected_target and expected_target != old.target_model:
                    raise PreconditionFailed(
                        f"vmodel '{vmodel_id}' targets '{old.target_model}', not the expected "
                        f"'{expected_target}'"
                    )
                if old.target_model == target_model and not force:
                    new = old
                else:
                    switch_now = force or target_model == old.active_model or \
                        self.status(target_model).status == "LOADED"
                    new = VModelRecord(
                        vmodel_id,
                        active_model=target_model if switch_now else old.active_model,
                        target_model=target_model, owner=old.owner or owner,
                        state=VModelState.DEFINED if switch_now else VModelState.TRANSITIONING,
                        updated_ms=now_ms(),
                    )
            if not registered:
                # Preconditions hold: only now register the target (a refused request
                # must leave nothing behind).
                if record is not None:
                    await self.registry.register_model(record)
                elif await self.registry.get_model(target_model) is None:
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
        current = await self.registry.get_vmodel(vmodel_id)
        if current is None:
            return  # deleting what is not there succeeds, as in ModelMesh
        vm, rev = current
        if owner and vm.owner and owner != vm.owner:
            raise PreconditionFailed(f"vmodel '{vmodel_id}' is owned by '{vm.owner}'")
        if not await self.registry.delete_vmodel(vmodel_id, rev):
            raise MeshError(f"vmodel '{vmodel_id}' changed while deleting; retry")
        await self._collect_orphans({vm.active_model, vm.target_model})

    def vmodel_status(self, vmodel_id: str) -> VModelStatus:
        vm = self.registry.vmodels.get(vmodel_id)
        if vm is None:
            return VModelStatus("NOT_FOUND")
        return VModelStatus(
            vm.state.value, vm.active_model, vm.target_model, vm.owner,
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
            if await self.registry.unregister_model(model_id):
                self.instance.cache.unload(model_id, reason="unregistered")
                log.info("auto-deleted model %s (no vmodel uses it)", model_id)

    # -- transitions ----------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Registry listener: model deletions unload; loaded targets complete transitions."""
        if change.table == "models" and change.new is None:
            self.instance.cache.unload(change.key, reason="unregistered")
        elif change.table == "models" and change.old is not None and change.new is not None \
                and not change.old.same_definition(change.new):
            self.instance.cache.unload(change.key, reason="replaced")
        elif change.table == "copies" and change.new is not None:
            # The instance holding the copy completes the transition at once; the
            # leader's periodic chores are the backstop (see routing/chores.py).
            model_id, _, holder = change.key.rpartition("/")
            if holder == self.instance.instance_id and \
                    change.new.state in (CopyState.LOADED, CopyState.FAILED):
                self.instance.spawn(self.advance_transitions(model_id))

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
            if status.status == "LOADED":
                new = VModelRecord(fresh.vmodel_id, active_model=model_id,
                                   target_model=model_id, owner=fresh.owner,
                                   updated_ms=now_ms())
            elif status.status == "LOADING_FAILED":
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
