"""Model locations: ``s3://``, ``gs://``, ``http(s)://``, ``file://`` and plain paths.

| form                          | means                                                   |
|-------------------------------|---------------------------------------------------------|
| `s3://BUCKET/KEY`             | an object in an S3-compatible store (AWS, MinIO, Ceph)  |
| `s3://BUCKET/PREFIX/`         | every object under the prefix (a model directory)       |
| `gs://BUCKET/KEY[/]`          | Google Cloud Storage, through its S3-compatible XML API |
| `https://HOST/PATH`           | one file over HTTP(S)                                   |
| `file://PATH`, `PATH`         | a file or directory under the models root               |

A key that names no object but is a "directory" (objects exist under ``KEY/``)
is pulled as a prefix too. Any location may end in ``#sha256=<64 hex digits>``:
the downloaded file must have that SHA-256 (single files only).

Object keys that would escape the local model directory are refused: ``..`` or
``.`` segments, a leading ``/``, backslashes and control characters.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath

from modelmesh.errors import InvalidArgument
from modelmesh.storage.paths import NAME_MAX

REMOTE_SCHEMES = ("s3", "gs", "http", "https")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@dataclass(frozen=True)
class Location:
    """Where a model's files are: a scheme, a bucket (or host) and a key (or path)."""

    scheme: str  # file | s3 | gs | http | https
    bucket: str = ""  # s3/gs bucket; empty for file and http(s)
    key: str = ""  # object key or prefix; the local path for file; the URL for http(s)
    sha256: str = ""  # expected digest of the single file, lower-case hex

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def is_prefix(self) -> bool:
        """Names a "directory" by its form (the store may still say a plain key is one)."""
        return self.scheme in ("s3", "gs") and (self.key == "" or self.key.endswith("/"))

    @property
    def url(self) -> str:
        return self.key if self.scheme in ("http", "https") else ""

    def __str__(self) -> str:
        if self.scheme in ("http", "https"):
            return self.key
        if self.scheme == "file":
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}"


def split_checksum(text: str) -> tuple[str, str]:
    """``"s3://b/k#sha256=ab.."`` -> (``"s3://b/k"``, ``"ab.."``); other ``#`` stay in the key."""
    base, sep, fragment = text.rpartition("#")
    if not sep or not fragment.lower().startswith("sha256="):
        return text, ""
    digest = fragment.split("=", 1)[1]
    if not _SHA256.match(digest):
        raise InvalidArgument(
            f"model path '{text}': '#sha256=' must be followed by 64 hexadecimal digits")
    return base, digest.lower()


def check_object_key(key: str, where: str) -> None:
    """Refuse an object key (or key suffix) that could land outside the local directory."""
    if key.startswith("/"):
        raise InvalidArgument(f"{where}: object key '{key}' is absolute (starts with '/')")
    if "\\" in key or any(ord(c) < 32 for c in key):
        raise InvalidArgument(f"{where}: object key '{key}' contains a backslash or a "
                              "control character")
    if any(part in ("..", ".") for part in key.split("/")):
        raise InvalidArgument(f"{where}: object key '{key}' has a '..' or '.' segment, "
                              "which would escape the model directory")


def safe_relative(rel: str, where: str) -> PurePosixPath:
    """A relative local path for an object, refusing escapes (see ``check_object_key``)."""
    check_object_key(rel, where)
    parts = [p for p in rel.split("/") if p]
    if not parts:
        raise InvalidArgument(f"{where}: object key '{rel}' names no file")
    long = next((p for p in parts if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX), None)
    if long is not None:
        raise InvalidArgument(f"{where}: object key '{rel[:80]}...' has a component of "
                              f"{len(long.encode('utf-8', 'surrogateescape'))} bytes; local "
                              f"file names are at most {NAME_MAX} bytes")
    return PurePosixPath(*parts)


def parse_location(path: str) -> Location:
    """Parse a registered model path; raises InvalidArgument saying what is wrong."""
    if not path:
        raise InvalidArgument("model path must not be empty")
    if "\x00" in path:
        raise InvalidArgument(f"model path {path!r} contains a NUL byte (a control character)")
    text, digest = split_checksum(path.strip())
    scheme, sep, rest = text.partition("://")
    if not sep:
        return Location("file", key=text, sha256=digest)
    scheme = scheme.lower()
    if scheme == "file":
        return Location("file", key=rest, sha256=digest)
    if scheme in ("s3", "gs"):
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise InvalidArgument(
                f"model path '{path}': '{bucket}' is not a bucket name; use "
                f"{scheme}://BUCKET/KEY")
        check_object_key(key, f"model path '{path}'")
        loc = Location(scheme, bucket, key, digest)
        if digest and loc.is_prefix:
            raise InvalidArgument(f"model path '{path}': '#sha256=' applies to a single file, "
                                  "not to a prefix")
        return loc
    if scheme in ("http", "https"):
        parsed = urllib.parse.urlsplit(text)
        if not parsed.hostname:
            raise InvalidArgument(f"model path '{path}': no host in the URL")
        unquoted = urllib.parse.unquote(parsed.path)
        if any(part == ".." for part in unquoted.split("/")):
            raise InvalidArgument(f"model path '{path}': '..' segments are not allowed")
        if not parsed.path.rstrip("/") or parsed.path.endswith("/"):
            raise InvalidArgument(
                f"model path '{path}': an {scheme}:// location names one file, not a directory")
        return Location(scheme, key=text, sha256=digest)
    raise InvalidArgument(
        f"model path '{path}': storage scheme '{scheme}://' is not supported "
        "(use s3://, gs://, https://, http://, file:// or a path under the models root)")


def basename(loc: Location) -> str:
    """The local file name for a single-file location."""
    if loc.scheme in ("http", "https"):
        name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(loc.key).path)).name
    else:
        name = PurePosixPath(loc.key).name
    return name or "model"
