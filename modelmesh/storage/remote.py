"""Object stores a model can be pulled from: S3-compatible (boto3) and plain HTTP(S).

A store does two things, both synchronous (the loader runs in a thread):
``list(location)`` says which files make up the model, with their sizes and
versions (one HEAD or a listing; no data moves), and ``stream(location, obj)``
yields one file's bytes in chunks, so nothing is ever held whole in memory.
Every failure is raised as ``StorageError`` with a message naming the location
and what to check.

Google Cloud Storage is reached through its S3-compatible XML API
(``https://storage.googleapis.com``) with HMAC keys in ``access_key_id`` /
``secret_access_key``, or unsigned for public objects when no keys are given.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from modelmesh.errors import InvalidArgument, StorageError
from modelmesh.storage.config import StorageSpec
from modelmesh.storage.uri import Location, basename, safe_relative

CHUNK_BYTES = 1024 * 1024
GCS_ENDPOINT = "https://storage.googleapis.com"


@dataclass(frozen=True)
class RemoteObject:
    """One file of a model in the store."""

    key: str  # object key, or the URL for http(s)
    rel: str  # path relative to the model's local directory
    size: int  # bytes; -1 when the store does not say
    etag: str = ""  # the store's version tag (ETag, or Last-Modified for plain HTTP)


@dataclass(frozen=True)
class Listing:
    """The files that make up a model: one file, or the objects under a prefix."""

    objects: tuple[RemoteObject, ...]
    single: bool  # one file: the runtime gets the file itself, else the directory

    @property
    def total_bytes(self) -> int:
        return sum(max(o.size, 0) for o in self.objects)

    def version(self) -> str:
        """A digest of every file's name, size and tag: changes when the model changes."""
        h = hashlib.sha256()
        for o in sorted(self.objects, key=lambda o: o.rel):
            h.update(f"{o.rel}\0{o.size}\0{o.etag}\n".encode())
        return h.hexdigest()


class ObjectStore(Protocol):
    def list(self, loc: Location) -> Listing: ...

    def stream(self, loc: Location, obj: RemoteObject) -> Iterator[bytes]: ...


# -- S3-compatible stores (AWS, MinIO, SeaweedFS, Ceph; GCS via its XML API) ------------

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed", "Forbidden",
           "AllAccessDisabled", "InvalidSecurity"}


class S3Store:
    """An S3-compatible store reached with boto3 (``pip install pymodelmesh[s3]``)."""

    def __init__(self, spec: StorageSpec, timeout: float, cert_dir: Path) -> None:
        try:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config
        except ImportError as exc:
            raise StorageError(
                "s3:// and gs:// models need boto3: pip install pymodelmesh[s3]") from exc
        self.spec = spec
        endpoint = spec.endpoint_url or (GCS_ENDPOINT if spec.kind == "gcs" else "")
        self.endpoint = endpoint or "the AWS S3 endpoint"
        anonymous = spec.anonymous or (spec.kind == "gcs" and not spec.access_key_id)
        options: dict[str, Any] = {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"max_attempts": 2, "mode": "standard"},
            # Third-party stores reject the newer default checksum headers.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "user_agent_extra": "pymodelmesh",
        }
        if endpoint:
            options["s3"] = {"addressing_style": "path"}
        if anonymous:
            options["signature_version"] = UNSIGNED
        verify: str | None = None
        if spec.certificate:
            verify = str(_write_certificate(spec.certificate, cert_dir))
        region = spec.region or ("auto" if spec.kind == "gcs" else None)
        if endpoint and not region:
            region = "us-east-1"
        # A session per client: boto3's default session is not safe to share across threads.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, region_name=region,
            aws_access_key_id=spec.access_key_id or None,
            aws_secret_access_key=spec.secret_access_key or None,
            verify=verify, config=Config(**options),
        )

    def list(self, loc: Location) -> Listing:
        from botocore.exceptions import ClientError

        if not loc.is_prefix:
            head: dict[str, Any] | None = None
            try:
                head = self.client.head_object(Bucket=loc.bucket, Key=loc.key)
            except ClientError as exc:
                if _code(exc) in _DENIED:
                    head = self._head_by_get(loc)  # a HEAD's 403 has no body to say why
                elif _code(exc) not in _NOT_FOUND:
                    raise self._error(exc, loc) from None
            except Exception as exc:  # noqa: BLE001 - network errors, mapped below
                raise self._error(exc, loc) from None
            if head is not None:
                obj = RemoteObject(loc.key, basename(loc), int(head.get("ContentLength", -1)),
                                   str(head.get("ETag", "")).strip('"'))
                return Listing((obj,), single=True)
        prefix = loc.key if loc.is_prefix else loc.key + "/"
        objects: list[RemoteObject] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/"):
                        continue  # "directory" marker objects
                    rel = key[len(prefix):]
                    try:
                        safe_relative(rel, f"{loc}")
                    except InvalidArgument as exc:
                        raise StorageError(f"{exc.message}; refusing to pull {loc}") from None
                    objects.append(RemoteObject(key, rel, int(item.get("Size", -1)),
                                                str(item.get("ETag", "")).strip('"')))
        except StorageError:
            raise
        except ClientError as exc:
            if not loc.is_prefix and _code(exc) in _DENIED:
                # HEAD said 404; a listing we may not do cannot say more.
                raise StorageError(f"{loc}: object not found") from None
            raise self._error(exc, loc) from None
        except Exception as exc:  # noqa: BLE001 - network errors, mapped below
            raise self._error(exc, loc) from None
        if not objects:
            what = "no objects under the prefix" if loc.is_prefix else \
                f"object not found (and no objects under '{prefix}')"
            raise StorageError(f"{loc}: {what}")
        return Listing(tuple(objects), single=False)

    def _head_by_get(self, loc: Location) -> dict[str, Any]:
        """Size and ETag from a one-byte GET, whose error (unlike a HEAD's) says why."""
        try:
            resp = self.client.get_object(Bucket=loc.bucket, Key=loc.key, Range="bytes=0-0")
        except Exception as exc:  # noqa: BLE001 - mapped below
            raise self._error(exc, loc) from None
        resp["Body"].close()
        total = str(resp.get("ContentRange", "")).rpartition("/")[2]
        return {"ContentLength": int(total) if total.isdigit() else -1,
                "ETag": resp.get("ETag", "")}

    def stream(self, loc: Location, obj: RemoteObject) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        extra = {"IfMatch": f'"{obj.etag}"'} if obj.etag else {}
        try:
            resp = self.client.get_object(Bucket=loc.bucket, Key=obj.key, **extra)
        except ClientError as exc:
            if _code(exc) in ("412", "PreconditionFailed"):
                raise StorageError(f"{loc}: '{obj.key}' changed while being pulled; retry",
                                   transient=True) from None
            raise self._error(exc, loc, obj.key) from None
        except Exception as exc:  # noqa: BLE001 - network errors, mapped below
            raise self._error(exc, loc, obj.key) from None
        body = resp["Body"]
        try:
            while True:
                try:
                    chunk = body.read(CHUNK_BYTES)
                except Exception as exc:  # noqa: BLE001 - timeouts, resets, mapped below
                    raise self._error(exc, loc, obj.key) from None
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def _error(self, exc: BaseException, loc: Location, key: str = "") -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"{loc}" if not key or key == loc.key else f"{loc} ('{key}')"
        store = f"storage key '{self.spec.key}'" if self.spec.key else "the default credentials"
        if isinstance(exc, ClientError):
            code = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "") or ""
            detail = f"{code}: {message}" if message and message != code else code
            if code in _NOT_FOUND:
                return StorageError(f"{where}: object not found ({detail})")
            if code == "NoSuchBucket":
                return StorageError(f"{where}: bucket '{loc.bucket}' does not exist")
            if code in _DENIED:
                return StorageError(f"{where}: access denied ({detail}); check the credentials "
                                    f"of {store}")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return StorageError(f"{where}: {self.endpoint} answered {detail}",
                                transient=int(status or 0) >= 500)
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"{where}: no credentials: give {store} access_key_id and "
                                "secret_access_key, set AWS_* variables, or 'anonymous': true")
        if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError
                      | socket.timeout):
            return StorageError(f"{where}: timed out talking to {self.endpoint} ({exc})",
                                transient=True)
        if isinstance(exc, EndpointConnectionError):
            return StorageError(f"{where}: cannot reach {self.endpoint} ({exc})", transient=True)
        return StorageError(f"{where}: {type(exc).__name__}: {exc}", transient=True)


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _write_certificate(pem: str, cert_dir: Path) -> Path:
    """A CA bundle given inline in the configuration, as a file boto3 can read."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    path = cert_dir / f"{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem"
    if not path.exists():
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(pem)
        tmp.replace(path)
    return path


# -- plain HTTP(S) ---------------------------------------------------------------------


class HTTPStore:
    """One file over HTTP(S) with urllib: HEAD for the size, a streamed GET for the bytes."""

    def __init__(self, spec: StorageSpec, timeout: float) -> None:
        self.spec = spec
        self.timeout = timeout
        self.headers = dict(spec.headers)
        self.context = ssl.create_default_context(cadata=spec.certificate) \
            if spec.certificate else None

    def _open(self, url: str, method: str) -> http.client.HTTPResponse:
        req = urllib.request.Request(url, method=method, headers=self.headers)
        response: http.client.HTTPResponse = urllib.request.urlopen(  # noqa: S310 - http(s) only
            req, timeout=self.timeout, context=self.context)
        return response

    def list(self, loc: Location) -> Listing:
        size, etag = -1, ""
        try:
            with self._open(loc.url, "HEAD") as resp:
                size = int(resp.headers.get("Content-Length") or -1)
                etag = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
        except urllib.error.HTTPError as exc:
            # Some servers (and presigned URLs) refuse HEAD; the GET will tell.
            if exc.code not in (403, 405, 501):
                raise self._error(exc, loc) from None
        except Exception as exc:  # noqa: BLE001 - network errors, mapped below
            raise self._error(exc, loc) from None
        return Listing((RemoteObject(loc.url, basename(loc), size, etag.strip('"')),),
                       single=True)

    def stream(self, loc: Location, obj: RemoteObject) -> Iterator[bytes]:
        try:
            resp = self._open(loc.url, "GET")
        except Exception as exc:  # noqa: BLE001 - mapped below
            raise self._error(exc, loc) from None
        try:
            length = resp.headers.get("Content-Length")
            if obj.size >= 0 and length is not None and int(length) != obj.size:
                raise StorageError(f"{loc}: size changed since it was listed ({obj.size} -> "
                                   f"{length} bytes); retry", transient=True)
            while True:
                try:
                    chunk = resp.read(CHUNK_BYTES)
                except Exception as exc:  # noqa: BLE001 - mapped below
                    raise self._error(exc, loc) from None
                if not chunk:
                    return
                yield chunk
        finally:
            resp.close()

    def _error(self, exc: BaseException, loc: Location) -> StorageError:
        if isinstance(exc, urllib.error.HTTPError):
            if exc.code in (404, 410):
                return StorageError(f"{loc}: not found (HTTP {exc.code})")
            if exc.code in (401, 403):
                return StorageError(f"{loc}: access denied (HTTP {exc.code}); check the "
                                    f"headers of storage key '{self.spec.key}'")
            return StorageError(f"{loc}: HTTP {exc.code} {exc.reason}",
                                transient=exc.code >= 500)
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError | socket.timeout):
            return StorageError(f"{loc}: timed out after {self.timeout:g}s", transient=True)
        return StorageError(f"{loc}: cannot reach the server ({reason})", transient=True)


def open_store(spec: StorageSpec, timeout: float, cert_dir: Path) -> ObjectStore:
    """The store for a storage configuration (its type decides)."""
    if spec.kind in ("s3", "gcs"):
        return S3Store(spec, timeout, cert_dir)
    if spec.kind == "http":
        return HTTPStore(spec, timeout)
    raise StorageError(f"storage type '{spec.type}' is not supported")
