"""A real ``Registry`` whose mirror is fed by hand, for unit tests without etcd.

Records go in through ``Registry.apply_change``, the path the etcd watch uses,
so listeners fire as they do in a running instance. The registry's etcd client
points at a closed port: a test that reaches etcd by mistake fails with
UNAVAILABLE instead of passing against a stand-in.
"""

from __future__ import annotations

from typing import Any

from modelmesh.registry.etcd import EtcdClient
from modelmesh.registry.records import CopyRecord, InstanceRecord, ModelRecord, VModelRecord
from modelmesh.registry.store import COPIES, INSTANCES, MODELS, VMODELS, Registry

PREFIX = "/modelmesh/unit/"


def in_memory_registry() -> Registry:
    return Registry(EtcdClient(["127.0.0.1:1"], timeout=0.5), PREFIX)


def _key(registry: Registry, record: Any) -> bytes:
    if isinstance(record, ModelRecord):
        return registry.key(MODELS, record.model_id)
    if isinstance(record, VModelRecord):
        return registry.key(VMODELS, record.vmodel_id)
    if isinstance(record, InstanceRecord):
        return registry.key(INSTANCES, record.instance_id)
    if isinstance(record, CopyRecord):
        return registry.key(COPIES, record.model_id, record.instance_id)
    raise TypeError(f"not a registry record: {record!r}")


def put(registry: Registry, *records: Any) -> None:
    """Store ``records`` in the mirror as if etcd had sent them."""
    for record in records:
        registry.apply_change(_key(registry, record), record.to_json())


def delete(registry: Registry, *records: Any) -> None:
    """Remove ``records`` from the mirror as if etcd had sent their deletion."""
    for record in records:
        registry.apply_change(_key(registry, record), None)
