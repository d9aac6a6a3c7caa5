"""Storage without an S3 server: configuration, locations, escapes, the disk cache, and
pulling over HTTP from a real local HTTP server (``http.server`` in a thread)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelmesh.errors import InvalidArgument, StorageError
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.settings import Settings, from_sources
from modelmesh.storage import (
    DiskCache,
    ModelFiles,
    Puller,
    StorageConfigs,
    check_model_location,
    load_storage_config,
    parse_location,
    resolve_source,
)
from modelmesh.storage import config as config_mod
from modelmesh.storage import puller as puller_mod
from modelmesh.storage.config import StorageConfigError, parse_model_key, spec_from_mapping
from modelmesh.storage.uri import safe_relative

S3 = {"type": "s3", "access_key_id": "AK", "secret_access_key": "SECRET",
      "endpoint_url": "http://minio:9000", "region": "us-east-1", "default_bucket": "models"}


# -- storage configuration ----------------------------------------------------------------


def test_config_values_may_be_objects_or_json_strings(tmp_path):
    path = tmp_path / "storage.json"
    path.write_text(json.dumps({"a": S3, "b": json.dumps({**S3, "default_bucket": "b"})}))
    specs = load_storage_config(str(path))
    assert specs["a"].bucket == "models" and specs["b"].bucket == "b"
    assert specs["a"].endpoint_url == "http://minio:9000" and specs["a"].kind == "s3"
    assert "SECRET" not in repr(specs["a"])  # secrets stay out of logs


def test_config_directory_of_files_as_a_mounted_secret(tmp_path):
    (tmp_path / "localMinIO").write_text(json.dumps(S3))
    (tmp_path / "web").write_text(json.dumps({"type": "https", "url": "https://h/m/"}))
    (tmp_path / "..data").mkdir()  # Kubernetes' mount bookkeeping is skipped
    specs = load_storage_config(str(tmp_path))
    assert sorted(specs) == ["localMinIO", "web"]
    assert specs["web"].kind == "http"


def test_config_kubernetes_secret_manifest(tmp_path):
    manifest = tmp_path / "secret.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: storage-config\n"
        f"data:\n  encoded: {base64.b64encode(json.dumps(S3).encode()).decode()}\n"
        "stringData:\n  plain: |\n    {\"type\": \"gcs\", \"bucket\": \"pub\"}\n")
    specs = load_storage_config(str(manifest))
    assert specs["encoded"].access_key_id == "AK"
    assert specs["plain"].kind == "gcs" and specs["plain"].bucket == "pub"


def test_config_inline_json_and_errors(tmp_path):
    assert load_storage_config(json.dumps({"x": S3}))["x"].region == "us-east-1"
    assert load_storage_config("") == {}
    with pytest.raises(StorageConfigError, match="'type' is required"):
        load_storage_config(json.dumps({"x": {"endpoint_url": "e"}}))
    with pytest.raises(StorageConfigError, match="does not exist"):
        load_storage_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StorageConfigError, match="neither JSON nor YAML"):
        load_storage_config(str(bad))
    with pytest.raises(StorageConfigError, match="storage key 'x' is not JSON"):
        load_storage_config(json.dumps({"x": "{oops"}))


def test_settings_fail_fast_on_a_bad_storage_config(tmp_path):
    with pytest.raises(ValueError, match="MM_STORAGE_CONFIG: storage config .* does not exist"):
        from_sources(None, {"MM_STORAGE_CONFIG": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="--max-concurrent-downloads must be at least 1"):
        from_sources(None, {"MM_MAX_CONCURRENT_DOWNLOADS": "0"})
    s = from_sources(None, {"MM_DISK_CACHE_CAPACITY": "2GiB", "MM_DOWNLOAD_TIMEOUT": "5s"})
    assert s.disk_cache_capacity == 2 * 1024**3 and s.download_timeout == 5.0


def test_config_is_reread_when_its_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "_RELOAD_CHECK_S", 0.0)
    path = tmp_path / "storage.json"
    path.write_text(json.dumps({"a": S3}))
    configs = StorageConfigs(str(path))
    assert configs.keys() == ["a"]
    path.write_text(json.dumps({"a": S3, "b": S3}))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert configs.keys() == ["a", "b"]
    path.write_text("{broken")  # a bad edit keeps the last good configuration
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert configs.keys() == ["a", "b"]


def test_model_key_name_or_modelmesh_json():
    assert parse_model_key("myStorage").storage_key == "myStorage"
    assert parse_model_key("").storage_key == ""
    key = parse_model_key('{"storage_key": "s", "storage_params": {"bucket": "b2"}}')
    assert key.storage_key == "s" and key.params_dict == {"bucket": "b2"}
    legacy = parse_model_key('{"storage_key": "s", "bucket": "old"}')
    assert legacy.params_dict == {"bucket": "old"}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_model_key("{nope")


# -- locations ----------------------------------------------------------------------------


def test_location_forms():
    loc = parse_location("s3://models/iris/model.joblib")
    assert (loc.scheme, loc.bucket, loc.key, loc.is_prefix) == (
        "s3", "models", "iris/model.joblib", False)
    assert parse_location("gs://pub/dir/").is_prefix
    assert parse_location("s3://models").is_prefix  # the whole bucket
    assert parse_location("https://h.example/m/model.onnx").url == "https://h.example/m/model.onnx"
    assert parse_location("file:///abs/m.json").is_local
    assert parse_location("iris/model.joblib").is_local
    digest = "ab" * 32
    assert parse_location(f"s3://b/k.joblib#sha256={digest.upper()}").sha256 == digest
    assert parse_location("s3://b/odd#name").key == "odd#name"  # only #sha256= is special


@pytest.mark.parametrize("path, message", [
    ("s3://models/../etc/passwd", "'..'"),
    ("s3://models/a/./b", "'.'"),
    ("s3://models//etc/passwd", "absolute"),
    ("s3://models/a\\..\\b", "backslash"),
    ("s3://models/a\x00b", "control"),
    ("https://h/a/../../etc/passwd", "'..'"),
    ("https://h/a/%2e%2e/b", "'..'"),
    ("https://h/dir/", "one file"),
    ("s3:///k", "not a bucket name"),
    ("s3://b@d/k", "not a bucket name"),
    ("s3://b/dir/#sha256=" + "0" * 64, "single file"),
    ("s3://b/k#sha256=xyz", "64 hexadecimal"),
    ("ftp://h/k", "'ftp://' is not supported"),
    ("", "must not be empty"),
])
def test_bad_locations_are_refused(path, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_location(path)


@given(st.lists(st.sampled_from(["a", "b", ".", "/", "\\", "\x00", "..", "%2e"]),
                max_size=12).map("".join))
def test_safe_relative_never_leaves_the_directory(rel):
    try:
        p = safe_relative(rel, "t")
    except InvalidArgument:
        return
    assert not p.is_absolute() and ".." not in p.parts and "." not in p.parts
    assert (Path("/root/dir") / p).resolve().is_relative_to("/root/dir")


# -- which storage a registration uses ------------------------------------------------------


CONFIGS = StorageConfigs.of({
    "minio": spec_from_mapping("minio", S3),
    "nobucket": spec_from_mapping("nobucket", {**S3, "default_bucket": ""}),
    "web": spec_from_mapping("web", {"type": "http", "url": "https://h.example/models"}),
    "gcs-sa": spec_from_mapping("gcs-sa", {"type": "gcs", "private_key": "k",
                                           "client_email": "e"}),
    "azure": spec_from_mapping("azure", {"type": "azure", "container": "c"}),
    "default_gcs": spec_from_mapping("default_gcs", {"type": "gcs", "access_key_id": "HMAC"}),
})


def test_resolve_uses_the_named_storage():
    src = resolve_source("s3://other/m.joblib", "minio", CONFIGS)
    assert src is not None and src.spec.key == "minio" and src.location.bucket == "other"
    # ModelMesh's form: a plain path with a storage key is a key in its default bucket
    src = resolve_source("iris/model.joblib", "minio", CONFIGS)
    assert src is not None and str(src.location) == "s3://models/iris/model.joblib"
    src = resolve_source("iris/model.joblib",
                         '{"storage_key": "minio", "storage_params": {"bucket": "b2"}}', CONFIGS)
    assert src is not None and str(src.location) == "s3://b2/iris/model.joblib"
    src = resolve_source("m/model.onnx", "web", CONFIGS)
    assert src is not None and src.location.url == "https://h.example/models/m/model.onnx"
    # no key: local paths stay local; remote ones use default_<type> or no configuration
    assert resolve_source("iris/model.joblib", "", CONFIGS) is None
    assert resolve_source("file://iris/model.joblib", "minio", CONFIGS) is None
    src = resolve_source("gs://pub/m.joblib", "", CONFIGS)
    assert src is not None and src.spec.key == "default_gcs"
    src = resolve_source("s3://pub/m.joblib", "", CONFIGS)
    assert src is not None and src.spec.key == "" and src.spec.kind == "s3"


@pytest.mark.parametrize("path, key, message", [
    ("s3://models/m", "nope", r"unknown storage key 'nope' \(known: azure, default_gcs,"),
    ("m.joblib", "nobucket", "has no bucket"),
    ("gs://b/m", "minio", "gs:// location but storage key 'minio' is of type 's3'"),
    ("gs://b/m", "gcs-sa", "service-account keys"),
    ("s3://b/m", "azure", "type 'azure', which this mesh cannot pull"),
    ("../escape.joblib", "minio", "'..'"),
    ("m.joblib", "{bad json", "not valid JSON"),
])
def test_resolve_refuses_what_cannot_work(path, key, message):
    with pytest.raises(InvalidArgument, match=message):
        resolve_source(path, key, CONFIGS)


def test_registration_check_keeps_local_rules(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "m.json").write_text("{}")
    (root / "out").symlink_to(tmp_path)
    settings = Settings(models_root=root, storage_config=json.dumps({"minio": S3}))
    check_model_location(settings, "m.json")
    check_model_location(settings, "s3://models/m.joblib", "minio")
    with pytest.raises(InvalidArgument, match="outside the models root"):
        check_model_location(settings, "../secret")
    with pytest.raises(InvalidArgument, match="outside the models root"):
        check_model_location(settings, "out/anything")  # a symlink out is refused too
    with pytest.raises(InvalidArgument, match="unknown storage key 'x'"):
        check_model_location(settings, "s3://models/m.joblib", "x")


# -- the disk cache -----------------------------------------------------------------------------


def _fill(content: bytes, name: str = "model.bin"):
    def fill(data: Path) -> int:
        (data / name).write_bytes(content)
        return len(content)
    return fill


def test_disk_cache_keeps_within_budget_least_recently_used_first(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=250)
    for name in ("a", "b"):
        cache.release(cache.store(name, 100, "g" + name, _fill(b"x" * 100), {}))
        time.sleep(0.01)
    cache.release(cache.acquire("a"))  # a is now more recent than b
    cache.release(cache.store("c", 100, "gc", _fill(b"x" * 100), {}))
    assert sorted(cache.entry_ids()) == ["a", "c"] and cache.used_bytes == 200
    assert cache.evictions == 1
    assert not (tmp_path / "objects" / "b").exists()


def test_disk_cache_never_evicts_a_pinned_entry(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=150)
    pinned = cache.store("a", 100, "ga", _fill(b"x" * 100), {})
    cache.release(cache.store("small", 40, "gs", _fill(b"s" * 40), {}))
    # b cannot fit without evicting a, which is in use: b is handed out uncached, and
    # the idle small entry is not evicted for nothing
    b = cache.store("b", 100, "gb", _fill(b"y" * 100), {})
    assert b.cached is False and (b.data / "model.bin").read_bytes() == b"y" * 100
    assert sorted(cache.entry_ids()) == ["a", "small"]
    cache.release(b)
    assert not b.data.exists()  # the temporary copy is gone after use
    cache.release(pinned)


def test_disk_cache_capacity_zero_keeps_nothing(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=0)
    m = cache.store("a", 10, "ga", _fill(b"0123456789"), {})
    assert not m.cached and (m.data / "model.bin").exists()
    cache.release(m)
    assert cache.entry_ids() == [] and not m.data.exists()


def test_a_failed_fill_leaves_nothing_behind(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=1000)

    def broken(data: Path) -> int:
        (data / "model.bin").write_bytes(b"half")
        raise StorageError("connection reset")

    with pytest.raises(StorageError):
        cache.store("a", 100, "ga", broken, {})
    assert cache.entry_ids() == [] and cache.used_bytes == 0
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "objects").iterdir()) == []


def test_disk_cache_survives_a_restart_and_drops_damage(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=1000)
    cache.release(cache.store("good", 5, "g1", _fill(b"hello"), {"location": "s3://b/k"}))
    cache.release(cache.store("cut", 5, "g2", _fill(b"world"), {}))
    # a crash mid-download leaves a directory in tmp/; a damaged entry has the wrong size
    (tmp_path / "tmp" / "half.1234" / "data").mkdir(parents=True)
    (tmp_path / "objects" / "cut" / "data" / "model.bin").write_bytes(b"wor")
    restarted = DiskCache(tmp_path, capacity_bytes=1000)
    assert restarted.entry_ids() == ["good"]
    m = restarted.acquire("good")
    assert m is not None and (m.data / "model.bin").read_bytes() == b"hello"
    assert m.meta["location"] == "s3://b/k"
    restarted.release(m)
    assert list((tmp_path / "tmp").iterdir()) == []
    # a smaller budget on restart evicts down to it
    assert DiskCache(tmp_path, capacity_bytes=3).entry_ids() == []


def test_same_entry_filled_once_under_concurrency(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=1000)
    fills = []

    def fill(data: Path) -> int:
        fills.append(1)
        time.sleep(0.05)
        (data / "f").write_bytes(b"abc")
        return 3

    def one() -> None:
        with cache.fill_lock("e"):
            m = cache.acquire("e") or cache.store("e", 3, "g", fill, {})
        cache.release(m)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fills) == 1 and cache.entry_ids() == ["e"]


# -- pulling over HTTP from a real HTTP server --------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, str]] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).requests.append(("GET", self.path))
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        type(self).requests.append(("HEAD", self.path))
        super().do_HEAD()


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _Handler.requests = []

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
    thread.join()


def _puller(tmp_path, capacity=10**8, timeout=5.0) -> Puller:
    return Puller(StorageConfigs(), DiskCache(tmp_path / "cache", capacity),
                  max_concurrent_downloads=2, timeout=timeout)


def test_http_pull_verifies_and_then_comes_from_disk(tmp_path, http_root, monkeypatch):
    monkeypatch.setattr(puller_mod, "_PULL_MAX_AGE_S", 0.0)  # as after an eviction: re-list
    root, base, server = http_root
    body = os.urandom(3 * 1024 * 1024 + 7)  # several chunks
    (root / "model.bin").write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    puller = _puller(tmp_path)
    source = resolve_source(f"{base}/model.bin#sha256={digest}", "", puller.configs)
    assert source is not None
    with puller.pull(source) as path:
        assert path.name == "model.bin" and path.read_bytes() == body
    gets = [r for r in _Handler.requests if r[0] == "GET"]
    heads = [r for r in _Handler.requests if r[0] == "HEAD"]
    with puller.pull(source) as path:  # second pull: a HEAD to check the version, no GET
        assert path.read_bytes() == body
    assert [r for r in _Handler.requests if r[0] == "GET"] == gets
    assert len([r for r in _Handler.requests if r[0] == "HEAD"]) == len(heads) + 1
    assert (puller.downloads, puller.hits, puller.misses) == (1, 1, 1)
    assert puller.bytes_downloaded == len(body)

    wrong = resolve_source(f"{base}/model.bin#sha256={'0' * 64}", "", puller.configs)
    assert wrong is not None
    with pytest.raises(StorageError, match="SHA-256 mismatch"), puller.pull(wrong):
        pass
    with pytest.raises(StorageError, match="not found \\(HTTP 404\\)"), \
            puller.pull(resolve_source(f"{base}/missing.bin", "", puller.configs)):
        pass


def test_a_changed_file_is_pulled_again_and_the_old_copy_dropped(tmp_path, http_root,
                                                                  monkeypatch):
    monkeypatch.setattr(puller_mod, "_PULL_MAX_AGE_S", 0.0)
    root, base, _server = http_root
    (root / "m.bin").write_bytes(b"version one")
    puller = _puller(tmp_path)
    source = resolve_source(f"{base}/m.bin", "", puller.configs)
    assert source is not None
    with puller.pull(source) as path:
        assert path.read_bytes() == b"version one"
    (root / "m.bin").write_bytes(b"version two!")
    os.utime(root / "m.bin", (time.time() + 5, time.time() + 5))  # a new Last-Modified
    with puller.pull(source) as path:
        assert path.read_bytes() == b"version two!"
    assert puller.downloads == 2 and len(puller.cache.entry_ids()) == 1


def test_cached_copy_is_used_while_the_server_is_down(tmp_path, http_root, monkeypatch):
    monkeypatch.setattr(puller_mod, "_PULL_MAX_AGE_S", 0.0)  # re-list on every pull
    monkeypatch.setattr(puller_mod, "_LISTING_TTL_S", 0.0)
    root, base, server = http_root
    (root / "m.bin").write_bytes(b"model bytes")
    puller = _puller(tmp_path, timeout=1.0)
    source = resolve_source(f"{base}/m.bin", "", puller.configs)
    assert source is not None
    with puller.pull(source):
        pass
    server.shutdown()
    server.server_close()
    with puller.cached(source) as path:  # what predict_size looks at
        assert path is not None and path.read_bytes() == b"model bytes"
    with puller.pull(source) as path:
        assert path.read_bytes() == b"model bytes"
    assert puller.downloads == 1 and puller.hits == 1
    # a model never pulled cannot be served from disk: the storage error stands
    other = resolve_source(f"{base}/other.bin", "", puller.configs)
    assert other is not None
    with pytest.raises(StorageError, match="cannot reach the server"), puller.pull(other):
        pass


def test_loader_pulls_remote_and_reads_local(tmp_path, http_root, demo_models, models_root):
    root, base, _server = http_root
    identity = demo_models["identity"]
    (root / "echo.json").write_bytes((models_root / identity.path).read_bytes())
    loader = EmbeddedLoader(ModelFiles(models_root, _puller(tmp_path)))
    remote = ModelRecord("r", "identity", f"{base}/echo.json")
    local = ModelRecord("l", "identity", str(identity.path))
    assert loader.predict_size(remote) >= 1  # from the HEAD's Content-Length
    assert loader.load(remote).signature is not None
    assert loader.load(local).signature is not None
    # once on disk, the runtime's own estimate is used
    assert loader.predict_size(remote) == loader.predict_size(local)
    with pytest.raises(StorageError, match="this loader has no storage configured"):
        EmbeddedLoader(ModelFiles(models_root)).load(remote)
