"""Pulling a model from storage into the local disk cache, for the loader.

``resolve_source(path, key, configs)`` turns a registration's path and storage
key into a ``Source`` (None for a local path), refusing what cannot work with
``InvalidArgument``: it is what registration validates with. ``Puller.pull``
lists the model's files, takes them from the disk cache when that version is
there, and otherwise streams them from the store into a new cache entry:
at most ``max_concurrent_downloads`` files at a time across the instance, each
checked against its listed size and the location's ``#sha256=`` if it has one.

Which storage configuration a remote location uses:
- the model's storage key, if it names one (an unknown key is refused);
- else ``default_<type>`` or ``default`` when configured with a matching type
  (as ModelMesh's puller does);
- else none: boto3's own credential chain (AWS_* variables, instance roles) for
  ``s3://``, unsigned requests for ``gs://``, plain requests for ``https://``.
A plain path with a storage key is an object key in that storage's bucket
(ModelMesh's form); without a key it is a file under the models root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelmesh.errors import InvalidArgument, StorageError
from modelmesh.storage.config import (
    SUPPORTED_TYPES,
    StorageConfigs,
    StorageSpec,
    parse_model_key,
)
from modelmesh.storage.diskcache import CachedModel, DiskCache
from modelmesh.storage.remote import Listing, ObjectStore, RemoteObject, open_store
from modelmesh.storage.uri import Location, check_object_key, parse_location, safe_relative

if TYPE_CHECKING:
    from modelmesh.metrics import Metrics

log = logging.getLogger(__name__)

_LISTING_TTL_S = 10.0  # predict_size and load list the same model within moments
_PULL_MAX_AGE_S = 2.0  # a pull re-lists unless the listing is this fresh (version check)
_SCHEME_KIND = {"s3": "s3", "gs": "gcs", "http": "http", "https": "http"}


@dataclass(frozen=True)
class Source:
    """A remote model: where it is and the storage configuration to reach it with."""

    location: Location
    spec: StorageSpec

    @property
    def group(self) -> str:
        """Identifies the location in the disk cache, whatever its version."""
        # The expected digest is part of it: a copy verified against one digest is not
        # a copy verified against another.
        text = f"{self.spec.identity()}\0{self.location}\0{self.location.sha256}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def entry_id(self, listing: Listing) -> str:
        """Identifies this version of the model's files in the disk cache."""
        text = f"{self.group}\0{listing.version()}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def __str__(self) -> str:
        return str(self.location)


def resolve_source(path: str, key: str, configs: StorageConfigs) -> Source | None:
    """The remote source a registration names, None for a local path.

    Raises InvalidArgument (with what to fix) for malformed locations, unknown
    storage keys, unsupported storage types and keys that escape.
    """
    try:
        model_key = parse_model_key(key)
    except ValueError as exc:
        raise InvalidArgument(f"model key '{key}': {exc}") from None
    loc = parse_location(path)
    storage_key = model_key.storage_key
    spec: StorageSpec | None = None
    if storage_key:
        spec = configs.get(storage_key)
        if spec is None:
            known = ", ".join(configs.keys()) or "none configured; see --storage-config"
            raise InvalidArgument(f"model path '{path}': unknown storage key '{storage_key}' "
                                  f"(known: {known})")
        spec = spec.with_params(model_key.params_dict)
    if loc.is_local:
        if spec is None or path.startswith("file://"):
            return None
        loc = _in_storage(path, loc, spec)
    kind = _SCHEME_KIND[loc.scheme]
    if spec is None:
        spec = _default_spec(kind, configs) or StorageSpec(key="", type=kind)
        spec = spec.with_params(model_key.params_dict)
    if not spec.supported:
        raise InvalidArgument(
            f"storage key '{spec.key}' has type '{spec.type}', which this mesh cannot pull "
            f"from (supported: {', '.join(SUPPORTED_TYPES)})")
    if spec.kind != kind:
        raise InvalidArgument(f"model path '{path}' is a {loc.scheme}:// location but storage "
                              f"key '{spec.key}' is of type '{spec.type}'")
    if spec.service_account:
        raise InvalidArgument(
            f"storage key '{spec.key}': GCS service-account keys (private_key) are not "
            "supported; create an HMAC key and give access_key_id / secret_access_key")
    return Source(loc, spec)


def _default_spec(kind: str, configs: StorageConfigs) -> StorageSpec | None:
    for name in (f"default_{kind}", "default"):
        spec = configs.get(name)
        if spec is not None and spec.kind == kind:
            return spec
    return None


def _in_storage(path: str, loc: Location, spec: StorageSpec) -> Location:
    """A plain path with a storage key: an object key in that storage (ModelMesh's form)."""
    if not spec.supported:
        raise InvalidArgument(
            f"storage key '{spec.key}' has type '{spec.type}', which this mesh cannot pull "
            f"from (supported: {', '.join(SUPPORTED_TYPES)})")
    if spec.kind == "http":
        if not spec.url:
            raise InvalidArgument(f"storage key '{spec.key}' (http) has no 'url' to resolve "
                                  f"the path '{path}' against")
        check_object_key(loc.key, f"model path '{path}'")
        url = urllib.parse.urljoin(spec.url.rstrip("/") + "/", loc.key)
        return parse_location(url + (f"#sha256={loc.sha256}" if loc.sha256 else ""))
    if not spec.bucket:
        raise InvalidArgument(
            f"model path '{path}': storage key '{spec.key}' has no bucket (default_bucket); "
            f"give the full location, e.g. {'gs' if spec.kind == 'gcs' else 's3'}://BUCKET/KEY")
    scheme = "gs" if spec.kind == "gcs" else "s3"
    return parse_location(f"{scheme}://{spec.bucket}/{loc.key}"
                          + (f"#sha256={loc.sha256}" if loc.sha256 else ""))


class Puller:
    """Pulls remote models into the disk cache; thread-safe, called from load threads."""

    def __init__(self, configs: StorageConfigs, cache: DiskCache, *,
                 max_concurrent_downloads: int = 4, timeout: float = 30.0,
                 metrics: Metrics | None = None) -> None:
        self.configs = configs
        self.cache = cache
        self.timeout = timeout
        self.max_concurrent_downloads = max(1, max_concurrent_downloads)
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(self.max_concurrent_downloads)
        self._stores: dict[StorageSpec, ObjectStore] = {}
        self._stores_lock = threading.Lock()
        self._listings: dict[tuple[StorageSpec, Location], tuple[float, Listing]] = {}
        # Counted here too, so tests and tools can read them without Prometheus.
        self._count_lock = threading.Lock()
        self.downloads = 0
        self.bytes_downloaded = 0
        self.hits = 0
        self.misses = 0

    def resolve(self, path: str, key: str) -> Source | None:
        return resolve_source(path, key, self.configs)

    # -- listing --------------------------------------------------------------------

    def _store(self, spec: StorageSpec) -> ObjectStore:
        with self._stores_lock:
            store = self._stores.get(spec)
            if store is None:
                store = self._stores[spec] = open_store(spec, self.timeout,
                                                        self.cache.root / "certs")
            return store

    def listing(self, source: Source, *, max_age: float | None = None) -> Listing:
        """The model's files, from a listing at most ``max_age`` seconds old (default a few)."""
        memo_key = (source.spec, source.location)
        now = time.monotonic()
        hit = self._listings.get(memo_key)
        if hit is not None and now - hit[0] < (_LISTING_TTL_S if max_age is None else max_age):
            return hit[1]
        listing = self._store(source.spec).list(source.location)
        if source.location.sha256 and not listing.single:
            raise StorageError(f"{source}: '#sha256=' applies to a single file, but this is a "
                               f"directory of {len(listing.objects)} objects")
        with self._count_lock:
            if len(self._listings) > 4096:
                self._listings = {k: v for k, v in self._listings.items()
                                  if now - v[0] < _LISTING_TTL_S}
            self._listings[memo_key] = (now, listing)
        return listing

    def remote_bytes(self, source: Source) -> int:
        return self.listing(source).total_bytes

    # -- pulling --------------------------------------------------------------------

    @contextmanager
    def pull(self, source: Source) -> Iterator[Path]:
        """The local path of the model's files (a file or a directory), pinned in the block."""
        with self.pulled(source) as (path, _entry):
            yield path

    @contextmanager
    def pulled(self, source: Source) -> Iterator[tuple[Path, Path]]:
        """``pull``'s path and the directory of its disk cache entry (every file is in it)."""
        model, listing = self._acquire(source)
        try:
            yield self._local_path(model, listing), model.data
        finally:
            self.cache.release(model)

    @contextmanager
    def cached(self, source: Source) -> Iterator[Path | None]:
        """The local path if this version is in the disk cache, else None (no download).

        While the store is unreachable, the newest cached copy of any version counts.
        """
        with self.cached_entry(source) as local:
            yield local[0] if local is not None else None

    @contextmanager
    def cached_entry(self, source: Source) -> Iterator[tuple[Path, Path] | None]:
        """``cached``'s path and the directory of its disk cache entry, or None."""
        listing: Listing | None = None
        try:
            listing = self.listing(source)
            model = self.cache.acquire(source.entry_id(listing))
        except StorageError as exc:
            model = self.cache.acquire_latest(source.group) if exc.transient else None
            if model is None:
                raise
        if model is None:
            yield None
            return
        try:
            yield self._local_path(model, listing), model.data
        finally:
            self.cache.release(model)

    @staticmethod
    def _local_path(model: CachedModel, listing: Listing | None) -> Path:
        if listing is None:  # a stale copy used while the store is unreachable
            single = model.meta.get("single_file")
            if not single:
                return model.data
            try:  # meta.json is read back from disk: it must not lead out of the entry
                return model.data / safe_relative(str(single), f"disk cache entry "
                                                  f"{model.entry_id}")
            except InvalidArgument as exc:
                raise StorageError(exc.message) from None
        return model.data / listing.objects[0].rel if listing.single else model.data

    def _acquire(self, source: Source) -> tuple[CachedModel, Listing | None]:
        try:
            listing = self.listing(source, max_age=_PULL_MAX_AGE_S)
        except StorageError as exc:
            if not exc.transient:
                raise
            stale = self.cache.acquire_latest(source.group)
            if stale is None:
                raise
            log.warning("storage unreachable for %s (%s); using the copy in the disk cache",
                        source, exc.message)
            self._count_hit()
            return stale, None
        entry_id = source.entry_id(listing)
        with self.cache.fill_lock(entry_id):
            model = self.cache.acquire(entry_id)
            if model is not None:
                self._count_hit()
                return model, listing
            self._count_miss()
            meta = {"location": str(source), "storage_key": source.spec.key,
                    "version": listing.version(),
                    "single_file": listing.objects[0].rel if listing.single else ""}
            model = self.cache.store(entry_id, listing.total_bytes, source.group,
                                     lambda data: self._download(source, listing, data), meta)
        self.cache.drop_group(source.group, keep=entry_id)  # older versions of the model
        return model, listing

    def _download(self, source: Source, listing: Listing, into: Path) -> int:
        """Stream every file of ``listing`` into ``into``; returns the bytes written."""
        started = time.perf_counter()
        scheme = source.location.scheme
        try:
            if len(listing.objects) == 1:
                total = self._download_one(source, listing.objects[0], into)
            else:
                total = self._download_many(source, listing, into)
        except Exception:
            if self.metrics is not None:
                self.metrics.storage_download_failures.labels(scheme).inc()
            raise
        seconds = time.perf_counter() - started
        with self._count_lock:
            self.downloads += 1
        if self.metrics is not None:
            self.metrics.storage_downloads.labels(scheme).inc()
            self.metrics.storage_download_seconds.observe(seconds)
        log.info("pulled %s: %d files, %d bytes in %.2f s", source, len(listing.objects), total,
                 seconds)
        return total

    def _download_many(self, source: Source, listing: Listing, into: Path) -> int:
        stop = threading.Event()
        workers = min(self.max_concurrent_downloads, len(listing.objects))
        with ThreadPoolExecutor(workers, thread_name_prefix="mm-pull") as pool:
            futures = [pool.submit(self._download_one, source, obj, into, stop)
                       for obj in listing.objects]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                stop.set()
                for f in futures:
                    f.cancel()
                exc = failed.exception()
                assert exc is not None
                raise exc
            return sum(f.result() for f in futures)

    def _download_one(self, source: Source, obj: RemoteObject, into: Path,
                      stop: threading.Event | None = None) -> int:
        try:
            rel = safe_relative(obj.rel, str(source))
        except InvalidArgument as exc:
            raise StorageError(exc.message) from None
        target = into / rel
        if not target.resolve().is_relative_to(into.resolve()):
            raise StorageError(f"{source}: '{obj.rel}' would be written outside the model "
                               "directory")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # A new file, never through a symlink: two objects cannot land on one file,
            # and nothing planted in the cache can redirect the write.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise StorageError(f"{source}: two objects map to the local file '{rel}' (or one "
                               "is a file and another a directory under it)") from None
        except OSError as exc:
            raise StorageError(f"{source}: cannot write '{rel}' into the disk cache: "
                               f"{exc.strerror or exc}") from None
        digest = hashlib.sha256() if source.location.sha256 else None
        written = 0
        with self._slots:
            if stop is not None and stop.is_set():
                os.close(fd)
                raise StorageError(f"{source}: cancelled")
            with os.fdopen(fd, "wb") as out:
                for chunk in self._store(source.spec).stream(source.location, obj):
                    out.write(chunk)
                    written += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    if self.metrics is not None:
                        self.metrics.storage_downloaded_bytes.inc(len(chunk))
                    if stop is not None and stop.is_set():
                        raise StorageError(f"{source}: cancelled")
        with self._count_lock:
            self.bytes_downloaded += written
        if obj.size >= 0 and written != obj.size:
            raise StorageError(f"{source}: '{obj.rel}' is {written} bytes, but the store listed "
                               f"{obj.size}; the download was cut short or the object changed",
                               transient=True)
        if digest is not None and digest.hexdigest() != source.location.sha256:
            raise StorageError(f"{source}: SHA-256 mismatch: got {digest.hexdigest()}, the "
                               f"location says {source.location.sha256}")
        return written

    def _count_hit(self) -> None:
        with self._count_lock:
            self.hits += 1
        if self.metrics is not None:
            self.metrics.disk_cache_hits.inc()

    def _count_miss(self) -> None:
        with self._count_lock:
            self.misses += 1
        if self.metrics is not None:
            self.metrics.disk_cache_misses.inc()
