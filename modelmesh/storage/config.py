"""Named storage configurations, in the format of ModelMesh's ``storage-config`` secret.

A storage configuration says where a model's files live and how to reach them:
type, endpoint, credentials, default bucket. Models refer to one by its *storage
key* (``ModelInfo.key``). The source (``--storage-config`` / ``MM_STORAGE_CONFIG``)
is one of:

- a JSON file mapping each storage key to a JSON object, or to a JSON *string*
  holding an object (the shape of the secret's ``stringData``)::

      {"localMinIO": {"type": "s3", "access_key_id": "...", "secret_access_key": "...",
                      "endpoint_url": "http://minio:9000", "region": "us-east-1",
                      "default_bucket": "models"}}

- a Kubernetes Secret manifest (YAML or JSON) with ``stringData`` or base64 ``data``;
- a directory with one file per key, as a mounted secret looks (hidden entries such
  as Kubernetes' ``..data`` are skipped);
- the JSON mapping itself, inline (a value starting with ``{``).

Fields, as ModelMesh's puller reads them: ``type`` (``s3``, ``gcs``/``gs``,
``http``/``https``), ``access_key_id``, ``secret_access_key``, ``endpoint_url``,
``region``, ``bucket`` or ``default_bucket``, ``certificate`` (a PEM CA bundle to
trust), ``url`` and ``headers`` (http), plus our own ``anonymous`` (send unsigned
requests). Other fields are kept and ignored. Entries of a type this mesh cannot
pull (``azure``, ``pvc``, ...) load fine and are refused when a model uses them,
so an existing secret carries over whole.

A model's key may also be ModelMesh's JSON model key,
``{"storage_key": "localMinIO", "storage_params": {"bucket": "other"}}``, whose
``storage_params`` override the configuration's fields for that model.

The source is re-read when its files change (a rotated secret takes effect
without a restart); a change that does not parse keeps the previous contents.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Storage types this mesh can pull from, by every name a configuration may use.
TYPE_ALIASES = {"s3": "s3", "gcs": "gcs", "gs": "gcs", "http": "http", "https": "http"}
SUPPORTED_TYPES = ("s3", "gcs", "http")

_RELOAD_CHECK_S = 1.0  # look at the source's files at most this often


class StorageConfigError(ValueError):
    """The storage configuration source cannot be read or parsed."""


@dataclass(frozen=True)
class StorageSpec:
    """One named storage configuration (secrets are kept out of ``repr``)."""

    key: str
    type: str  # as written; ``kind`` is the normalised one
    endpoint_url: str = ""
    region: str = ""
    bucket: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    certificate: str = field(default="", repr=False)
    url: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    anonymous: bool = False
    service_account: bool = False  # a GCS private_key/client_email entry (not supported)

    @property
    def kind(self) -> str:
        """``s3``, ``gcs`` or ``http``; the type as written if unsupported."""
        return TYPE_ALIASES.get(self.type.lower(), self.type)

    @property
    def supported(self) -> bool:
        return self.kind in SUPPORTED_TYPES

    def identity(self) -> str:
        """What distinguishes the store's contents (not its secrets), for cache keys."""
        text = "\0".join((self.kind, self.endpoint_url, self.region, self.url, self.key))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_params(self, params: Mapping[str, Any]) -> StorageSpec:
        """This configuration with a model's ``storage_params`` applied over it."""
        if not params:
            return self
        merged = spec_from_mapping(self.key, {**_as_mapping(self), **params})
        return replace(merged, key=self.key)


@dataclass(frozen=True)
class ModelKey:
    """A model's ``key`` field: a storage key name, or ModelMesh's JSON model key."""

    storage_key: str = ""
    params: tuple[tuple[str, str], ...] = ()

    @property
    def params_dict(self) -> dict[str, str]:
        return dict(self.params)


def parse_model_key(key: str) -> ModelKey:
    """Read ``ModelInfo.key``: ``NAME`` or ``{"storage_key": NAME, "storage_params": {...}}``.

    Raises ValueError when the JSON form is malformed.
    """
    text = (key or "").strip()
    if not text.startswith("{"):
        return ModelKey(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model key is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("model key JSON must be an object")
    storage_key = data.get("storage_key") or ""
    params = data.get("storage_params") or {}
    if not isinstance(storage_key, str) or not isinstance(params, dict):
        raise ValueError("model key: storage_key must be a string, storage_params an object")
    if data.get("bucket") and "bucket" not in params:  # ModelMesh's deprecated top-level bucket
        params = {**params, "bucket": data["bucket"]}
    return ModelKey(storage_key, tuple(sorted((str(k), str(v)) for k, v in params.items())))


def spec_from_mapping(key: str, data: Mapping[str, Any]) -> StorageSpec:
    """Build a StorageSpec from one configuration object. Raises ValueError if malformed."""
    if not isinstance(data, Mapping):
        raise ValueError(f"storage key '{key}': configuration must be a JSON object")
    type_ = str(data.get("type") or "").strip()
    if not type_:
        raise ValueError(f"storage key '{key}': 'type' is required (s3, gcs or http)")
    headers = data.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ValueError(f"storage key '{key}': 'headers' must be an object")
    header_items: list[tuple[str, str]] = []
    for name, value in headers.items():
        for v in value if isinstance(value, list) else [value]:
            header_items.append((str(name), str(v)))
    anonymous = data.get("anonymous", False)
    return StorageSpec(
        key=key,
        type=type_,
        endpoint_url=str(data.get("endpoint_url") or "").rstrip("/"),
        region=str(data.get("region") or ""),
        bucket=str(data.get("bucket") or data.get("default_bucket") or ""),
        access_key_id=str(data.get("access_key_id") or ""),
        secret_access_key=str(data.get("secret_access_key") or ""),
        certificate=str(data.get("certificate") or ""),
        url=str(data.get("url") or ""),
        headers=tuple(header_items),
        anonymous=anonymous is True or str(anonymous).lower() == "true",
        service_account=bool(data.get("private_key") or data.get("client_email")),
    )


def _as_mapping(spec: StorageSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": spec.type, "endpoint_url": spec.endpoint_url, "region": spec.region,
        "bucket": spec.bucket, "access_key_id": spec.access_key_id,
        "secret_access_key": spec.secret_access_key, "certificate": spec.certificate,
        "url": spec.url, "anonymous": spec.anonymous,
    }
    if spec.headers:
        merged: dict[str, list[str]] = {}
        for name, value in spec.headers:
            merged.setdefault(name, []).append(value)
        out["headers"] = merged
    if spec.service_account:
        out["private_key"] = "(set)"
    return out


def parse_storage_config(data: Mapping[str, Any], origin: str = "storage config"
                         ) -> dict[str, StorageSpec]:
    """Parse the key -> configuration mapping (values: objects or JSON strings of objects)."""
    if not isinstance(data, Mapping):
        raise StorageConfigError(f"{origin}: must be a JSON object mapping storage keys")
    specs: dict[str, StorageSpec] = {}
    for key, value in data.items():
        if isinstance(value, str | bytes):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise StorageConfigError(
                    f"{origin}: storage key '{key}' is not JSON ({exc.msg})") from None
        try:
            specs[str(key)] = spec_from_mapping(str(key), value)
        except ValueError as exc:
            raise StorageConfigError(f"{origin}: {exc}") from None
    return specs


def _secret_manifest(doc: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The key -> value mapping of a Kubernetes Secret manifest."""
    out: dict[str, Any] = {}
    for key, value in (doc.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value).decode()
        except (ValueError, UnicodeDecodeError):
            raise StorageConfigError(f"{origin}: data.{key} is not base64 text") from None
    out.update(doc.get("stringData") or {})
    return out


def _read_file(path: Path) -> dict[str, StorageSpec]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise StorageConfigError(f"cannot read storage config {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as json_exc:
        try:
            import yaml

            doc = yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - report the JSON error, the expected format
            raise StorageConfigError(
                f"storage config {path} is neither JSON nor YAML ({json_exc.msg} at line "
                f"{json_exc.lineno})") from None
    if isinstance(doc, dict) and doc.get("kind") == "Secret":
        doc = _secret_manifest(doc, str(path))
    return parse_storage_config(doc, str(path))


def _read_dir(path: Path) -> dict[str, StorageSpec]:
    raw: dict[str, Any] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            raw[entry.name] = entry.read_text()
        except OSError as exc:
            raise StorageConfigError(f"cannot read {entry}: {exc.strerror}") from None
    return parse_storage_config(raw, str(path))


def load_storage_config(source: str) -> dict[str, StorageSpec]:
    """Read a storage configuration source: "" (none), inline JSON, a file or a directory."""
    source = (source or "").strip()
    if not source:
        return {}
    if source.startswith("{"):
        try:
            return parse_storage_config(json.loads(source), "inline storage config")
        except json.JSONDecodeError as exc:
            raise StorageConfigError(f"inline storage config is not JSON ({exc.msg})") from None
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_dir(path)
    if not path.exists():
        raise StorageConfigError(f"storage config {path} does not exist")
    return _read_file(path)


def _signature(source: str) -> tuple[Any, ...]:
    """Changes whenever the files behind ``source`` change."""
    source = source.strip()
    if not source or source.startswith("{"):
        return (source,)
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            items: list[tuple[Any, ...]] = [("dir", path.stat().st_mtime_ns)]
            for entry in os.scandir(path):
                if entry.name.startswith(".."):
                    items.append((entry.name, os.readlink(entry.path)
                                  if entry.is_symlink() else ""))
                    continue
                st = entry.stat()
                items.append((entry.name, st.st_mtime_ns, st.st_size))
            return tuple(sorted(items, key=repr))
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return ("missing",)


class StorageConfigs:
    """The storage configurations from one source, re-read when its files change."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._lock = threading.Lock()
        self._signature = _signature(source)
        self._specs = load_storage_config(source)
        self._checked = time.monotonic()

    @classmethod
    def of(cls, specs: Mapping[str, StorageSpec]) -> StorageConfigs:
        """Fixed configurations (tests, embedding)."""
        configs = cls("")
        configs._specs = dict(specs)
        return configs

    def _refresh(self) -> None:
        if not self.source or time.monotonic() - self._checked < _RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = time.monotonic()
            sig = _signature(self.source)
            if sig == self._signature:
                return
            try:
                specs = load_storage_config(self.source)
            except StorageConfigError as exc:
                log.warning("storage config changed but cannot be used (keeping the previous "
                            "one): %s", exc)
                return
            self._signature, self._specs = sig, specs
            log.info("storage config reloaded: %d storage keys", len(specs))

    def get(self, key: str) -> StorageSpec | None:
        self._refresh()
        return self._specs.get(key)

    def keys(self) -> list[str]:
        self._refresh()
        return sorted(self._specs)


_SHARED: dict[str, StorageConfigs] = {}
_SHARED_LOCK = threading.Lock()


def shared_storage_configs(source: str) -> StorageConfigs:
    """One ``StorageConfigs`` per source in this process (the loader and registration share it)."""
    with _SHARED_LOCK:
        configs = _SHARED.get(source)
        if configs is None:
            configs = _SHARED[source] = StorageConfigs(source)
        return configs


def check_source(text: str) -> str:
    """Settings parser for ``--storage-config``: the source must load now (fail fast)."""
    source = str(text).strip()
    try:
        load_storage_config(source)
    except StorageConfigError as exc:
        raise ValueError(str(exc)) from None
    return source
