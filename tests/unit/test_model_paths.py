"""Model paths meeting the filesystem: confinement to the models root, and clean refusals.

A model file is opened only if it resolves (symlinks followed) inside the models
root, or inside its disk cache entry for a pulled model, and only if it is a
regular file of a size the instance could hold. A path the filesystem cannot
take is INVALID_ARGUMENT, never an ``embedded null byte`` ValueError; every
other failure is a domain error (FAILED_PRECONDITION, RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from modelmesh.api.status import status_of
from modelmesh.demo import write_demo_models
from modelmesh.errors import (
    CapacityExceeded,
    Code,
    InvalidArgument,
    MeshError,
    ModelLoadFailed,
    StorageError,
)
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes import get_runtime
from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.settings import Settings
from modelmesh.storage import DiskCache, ModelFiles, Puller, StorageConfigs, check_model_location
from modelmesh.storage.puller import resolve_source
from modelmesh.storage.remote import Listing, RemoteObject
from modelmesh.tensor import Tensor

DEMO_TYPES = ("sklearn", "xgboost", "lightgbm", "onnx", "identity")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    return directory, {m.model_type: m for m in write_demo_models(directory)}


@pytest.fixture
def root(tmp_path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    return models


@pytest.fixture
def outside(tmp_path) -> Path:
    away = tmp_path / "elsewhere"
    away.mkdir()
    return away


def loader(root: Path, max_file_bytes: int = 0) -> EmbeddedLoader:
    if not max_file_bytes:
        return EmbeddedLoader(ModelFiles(root))
    return EmbeddedLoader(ModelFiles(root, max_file_bytes=max_file_bytes))


def refused(fn, kind: type[MeshError], code: Code, match: str) -> str:
    """Run ``fn``; it must raise ``kind`` mapping to ``code`` with ``match`` in its message."""
    with pytest.raises(kind) as info:
        fn()
    got, message = status_of(info.value)
    assert got is code, (got, message)
    assert match in message, message
    return message


class _TouchOnLoad:
    """Unpickling this creates ``marker``: loading a joblib file runs its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# ---------------------------------------------------------------------- item 11: confinement


def test_a_symlink_to_a_pickle_outside_the_root_is_never_opened(root, outside):
    marker = outside / "code-ran"
    (outside / "evil.joblib").write_bytes(pickle.dumps(_TouchOnLoad(marker)))
    (root / "m").mkdir()
    (root / "m" / "model.joblib").symlink_to(outside / "evil.joblib")
    # The registered path itself is inside the root: registration keeps accepting it...
    check_model_location(Settings(models_root=root), "m")
    record = ModelRecord("m", "sklearn", "m")
    # ...but no load, size estimate or direct runtime call opens the file it links to.
    message = refused(lambda: loader(root).load(record), StorageError,
                      Code.FAILED_PRECONDITION, "resolves outside the models root")
    assert str(outside) not in message  # where the link points is not told
    refused(lambda: loader(root).predict_size(record), StorageError,
            Code.FAILED_PRECONDITION, "outside the models root")
    refused(lambda: get_runtime("sklearn").load(root / "m", "m"), StorageError,
            Code.FAILED_PRECONDITION, "outside the model's directory")
    assert not marker.exists()


@pytest.mark.parametrize("model_type", DEMO_TYPES)
def test_every_format_refuses_a_file_linked_from_outside(demo, root, outside, model_type):
    directory, models = demo
    model = models[model_type]
    shutil.copy(directory / model.path, outside / model.path.name)
    (root / "m").mkdir()
    (root / "m" / model.path.name).symlink_to(outside / model.path.name)
    refused(lambda: loader(root).load(ModelRecord("m", model_type, "m")), StorageError,
            Code.FAILED_PRECONDITION, "outside the models root")
    # A file path that is itself the link is refused at registration, as before.
    with pytest.raises(InvalidArgument, match="outside the models root"):
        check_model_location(Settings(models_root=root), f"m/{model.path.name}")


def test_links_that_stay_inside_the_root_still_load(demo, root):
    directory, models = demo
    shutil.copytree(directory / "iris-sklearn", root / "shared")
    (root / "m").mkdir()
    (root / "m" / "model.joblib").symlink_to(root / "shared" / "model.joblib")
    (root / "alias").symlink_to(root / "shared")
    for path in ("m", "alias", "alias/model.joblib"):
        model = loader(root).load(ModelRecord("m", "sklearn", path))
        assert model.size_bytes > 0


def test_a_linked_directory_inside_a_model_may_not_lead_out(demo, root, outside):
    """Files anywhere in a model's directory are checked: a runtime server's repository
    (MLServer, Triton) is given the whole tree."""
    directory, models = demo
    shutil.copytree(directory / "iris-sklearn", root / "m")
    (outside / "secret.txt").write_text("secret")
    (root / "m" / "extra").mkdir()
    (root / "m" / "extra" / "notes.txt").symlink_to(outside / "secret.txt")
    files = ModelFiles(root)
    with pytest.raises(StorageError, match="'m/extra/notes.txt' resolves outside"), \
            files.local_files(ModelRecord("m", "sklearn", "m")):
        pass


def _onnx_with_external_data(directory: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    weights = numpy_helper.from_array(np.ones(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin",
                                   size_threshold=0)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(directory / "model.onnx"))
    assert (directory / "w.bin").is_file()
    return directory / "model.onnx"


def _relocate(model_file: Path, location: str) -> None:
    """Point every external data entry of ``model_file`` at ``location``."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_file.write_bytes(model.SerializeToString())


def test_onnx_external_data_must_stay_in_the_models_directory(root, outside):
    file = _onnx_with_external_data(root / "m")
    model = loader(root).load(ModelRecord("m", "onnx", "m"))
    x = np.zeros((1, 4), dtype=np.float32)
    assert model.predict([Tensor("x", "FP32", x)], {})[0].data.tolist() == [[1.0] * 4]

    shutil.move(root / "m" / "w.bin", outside / "w.bin")
    (root / "m" / "w.bin").symlink_to(outside / "w.bin")  # a link out: refused
    refused(lambda: loader(root).load(ModelRecord("m", "onnx", "m")), StorageError,
            Code.FAILED_PRECONDITION, "'m/w.bin' resolves outside the models root")
    # A model file given alone: the tree is not walked, its external data is checked.
    refused(lambda: loader(root).load(ModelRecord("m", "onnx", "m/model.onnx")),
            StorageError, Code.FAILED_PRECONDITION,
            "external data location 'w.bin': 'm/w.bin' resolves outside the models root")
    refused(lambda: get_runtime("onnx").load(file, "m"), StorageError,
            Code.FAILED_PRECONDITION, "external data location 'w.bin'")

    (root / "m" / "w.bin").unlink()
    _relocate(file, "../../elsewhere/w.bin")  # a relative escape: refused
    refused(lambda: get_runtime("onnx").load(file, "m"), StorageError,
            Code.FAILED_PRECONDITION, "outside")
    _relocate(file, str(outside / "w.bin"))  # an absolute location: refused
    refused(lambda: get_runtime("onnx").load(file, "m"), StorageError,
            Code.FAILED_PRECONDITION, "must be a relative path")
    _relocate(file, "sub")  # a directory where the data file should be
    (root / "m" / "sub").mkdir()
    refused(lambda: get_runtime("onnx").load(file, "m"), StorageError,
            Code.FAILED_PRECONDITION, "is a directory")
    _relocate(file, "pipe")  # a FIFO would block onnxruntime's read
    os.mkfifo(root / "m" / "pipe")
    refused(lambda: get_runtime("onnx").load(file, "m"), StorageError,
            Code.FAILED_PRECONDITION, "FIFO")


# ----------------------------------------------------------------------- item 11: disk cache


def test_a_fill_that_leaves_a_symlink_is_not_cached(tmp_path, outside):
    (outside / "secret").write_text("secret")
    cache = DiskCache(tmp_path / "cache", 10**6)

    def fill(data: Path) -> int:
        (data / "model.bin").symlink_to(outside / "secret")
        return 6

    with pytest.raises(StorageError, match="symbolic link"):
        cache.store("e", 6, "g", fill, {})
    assert cache.entry_ids() == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def _plant_entry(cache_root: Path, entry_id: str, meta: dict, files: dict[str, bytes]) -> Path:
    data = cache_root / "objects" / entry_id / "data"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
    size = sum(len(c) for c in files.values())
    (data.parent / "meta.json").write_text(json.dumps(
        {"entry_id": entry_id, "group": "g", "bytes": size, **meta}))
    return data


def test_entries_with_links_or_escaping_names_are_dropped_at_start(tmp_path, outside):
    (outside / "secret").write_bytes(b"12345")
    cache_root = tmp_path / "cache"
    # A link where a model file should be (same size as the link's target, so the
    # old size check passed): removed.
    linked = _plant_entry(cache_root, "linked", {}, {})
    (linked / "model.bin").symlink_to(outside / "secret")
    meta = json.loads((linked.parent / "meta.json").read_text())
    (linked.parent / "meta.json").write_text(json.dumps({**meta, "bytes": 5}))
    # A single-file name in meta.json that leads out of the entry: removed.
    _plant_entry(cache_root, "escapes", {"single_file": "../../../elsewhere/secret"},
                 {"model.bin": b"abc"})
    good = _plant_entry(cache_root, "good", {"single_file": "model.bin"},
                        {"model.bin": b"abc"})
    cache = DiskCache(cache_root, 10**6)
    assert cache.entry_ids() == ["good"]
    assert not linked.parent.exists() and (outside / "secret").exists()
    assert good.is_dir()


def test_a_fifo_meta_file_does_not_hang_the_start(tmp_path):
    cache_root = tmp_path / "cache"
    (cache_root / "objects" / "fifo" / "data").mkdir(parents=True)
    fifo = cache_root / "objects" / "fifo" / "meta.json"
    os.mkfifo(fifo)
    done = threading.Event()
    caches: list[DiskCache] = []
    thread = threading.Thread(target=lambda: (caches.append(DiskCache(cache_root, 10**6)),
                                              done.set()), daemon=True)
    thread.start()
    try:
        assert done.wait(10), "DiskCache blocked reading a FIFO"
        assert caches[0].entry_ids() == []
    finally:
        if not done.is_set():  # release the blocked reader (EOF), then let it finish
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        thread.join(10)


class _FakeStore:
    """An object store listing whatever the test says, serving b'{}' per object."""

    def __init__(self, rels: list[str]) -> None:
        self.rels = rels

    def list(self, loc):
        return Listing(tuple(RemoteObject(f"p/{r}", r, 2, "e") for r in self.rels), single=False)

    def stream(self, loc, obj):
        yield b"{}"


def _pull(tmp_path: Path, rels: list[str]):
    puller = Puller(StorageConfigs(), DiskCache(tmp_path / "cache", 10**6))
    source = resolve_source("s3://bucket/p/", "", puller.configs)
    assert source is not None
    puller._stores[source.spec] = _FakeStore(rels)  # type: ignore[assignment]
    return puller, source


@pytest.mark.parametrize(("rels", "match"), [
    (["../../x"], "'..' or '.' segment"),
    (["/etc/x"], "absolute"),
    (["a/b", "a//b"], "two objects map to the local file"),
    (["a", "a/b"], "two objects map to the local file"),
    (["x" * 300], "local file names are at most 255 bytes"),
])
def test_object_keys_cannot_leave_or_collide_in_the_cache(tmp_path, rels, match):
    puller, source = _pull(tmp_path, rels)
    with pytest.raises(StorageError, match=match), puller.pull(source):
        pass
    assert puller.cache.entry_ids() == []
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["cache"]


def test_a_link_planted_in_a_cached_model_is_refused(tmp_path, outside):
    (outside / "secret.json").write_text("{}")
    puller, source = _pull(tmp_path, ["model.json"])
    files = ModelFiles(tmp_path / "models", puller)
    record = ModelRecord("r", "identity", "s3://bucket/p/")
    assert EmbeddedLoader(files).load(record).size_bytes >= 1
    [entry] = puller.cache.entry_ids()
    data = tmp_path / "cache" / "objects" / entry / "data"
    (data / "model.json").unlink()
    (data / "model.json").symlink_to(outside / "secret.json")
    refused(lambda: EmbeddedLoader(files).load(record), StorageError,
            Code.FAILED_PRECONDITION, "symbolic link")


# ------------------------------------------------------------------- item 12: clean refusals


BAD_TEXT = [
    ("m\x00/model.joblib", "NUL byte"),
    ("file://m\x00", "NUL byte"),
    ("a/" + "x" * 300, "file names are at most 255 bytes"),
    ("/".join(["d" * 200] * 25), "at most 4096"),
    ("m\ud800", "lone surrogate"),
]


@pytest.mark.parametrize(("path", "match"), BAD_TEXT)
def test_paths_the_filesystem_cannot_take_are_invalid_arguments(root, path, match):
    settings = Settings(models_root=root)
    record = ModelRecord("m", "sklearn", path)
    for call in (lambda: check_model_location(settings, path),
                 lambda: loader(root).load(record),
                 lambda: loader(root).predict_size(record)):
        refused(call, InvalidArgument, Code.INVALID_ARGUMENT, match)


@pytest.mark.parametrize("path", ["s3://bucket/a\x00b", "https://host/a\x00b.json"])
def test_remote_locations_with_a_nul_are_refused_at_registration(root, path):
    settings = Settings(models_root=root)
    with pytest.raises(InvalidArgument):
        check_model_location(settings, path)


def test_a_missing_model_is_a_storage_error(root):
    refused(lambda: loader(root).load(ModelRecord("m", "sklearn", "nope/model.joblib")),
            StorageError, Code.FAILED_PRECONDITION, "not found under the models root")


def test_a_fifo_or_a_device_is_refused_unread(root):
    os.mkfifo(root / "pipe.json")
    (root / "d").mkdir()
    os.mkfifo(root / "d" / "model.json")
    (root / "z").mkdir()
    (root / "z" / "model.json").symlink_to("/dev/zero")
    for path, match in (("pipe.json", "FIFO"), ("d", "FIFO"), ("z", "outside the models root")):
        refused(lambda p=path: loader(root).load(ModelRecord("m", "identity", p)),
                StorageError, Code.FAILED_PRECONDITION, match)
    # Called directly, without the loader's checks, a runtime refuses them too.
    refused(lambda: get_runtime("identity").load(root / "pipe.json", "m"), StorageError,
            Code.FAILED_PRECONDITION, "FIFO")


def test_a_link_to_a_fifo_inside_the_root_is_refused_unread(root):
    """The file ``model_file`` resolves is opened without resolving it again: a link to
    a FIFO is still refused before anything is opened (it would block a reader)."""
    (root / "m").mkdir()
    os.mkfifo(root / "m" / "pipe")
    (root / "m" / "model.joblib").symlink_to(root / "m" / "pipe")
    refused(lambda: loader(root).load(ModelRecord("m", "sklearn", "m/model.joblib")),
            StorageError, Code.FAILED_PRECONDITION, "FIFO")
    refused(lambda: get_runtime("sklearn").load(root / "m" / "model.joblib", "m"),
            StorageError, Code.FAILED_PRECONDITION, "FIFO")


def test_a_directory_where_the_model_file_should_be(root):
    (root / "m" / "model.joblib").mkdir(parents=True)
    (root / "m" / "model.joblib" / "readme").write_text("not a model")
    with pytest.raises(ModelLoadFailed, match="is not a joblib or pickle file"):
        loader(root).load(ModelRecord("m", "sklearn", "m/model.joblib"))
    (root / "m" / "model.joblib" / "readme").unlink()
    with pytest.raises(ModelLoadFailed, match="holds no sklearn model file"):
        loader(root).load(ModelRecord("m", "sklearn", "m/model.joblib"))


def test_permission_denied_is_a_storage_error(demo, root, monkeypatch):
    directory, models = demo
    shutil.copytree(directory / "iris-sklearn", root / "m")
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if str(path).endswith("model.joblib"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    refused(lambda: loader(root).load(ModelRecord("m", "sklearn", "m")), StorageError,
            Code.FAILED_PRECONDITION, "permission denied")


def test_a_file_larger_than_the_model_memory_is_refused_unread(root):
    big = root / "big.json"
    with big.open("wb") as f:
        f.truncate(64 << 20)  # sparse: nothing written, 64 MiB long
    refused(lambda: loader(root, max_file_bytes=1 << 20).load(
        ModelRecord("m", "identity", "big.json")), CapacityExceeded,
        Code.RESOURCE_EXHAUSTED, "67108864 bytes, more than the 1048576 bytes")


def test_real_path_agrees_with_os_path_realpath(tmp_path):
    """The kernel's resolution (``storage.paths.real_path``) and Python's strict realpath
    agree on files, directories, chains of links, relative links, ``..`` after a link,
    and refuse the same missing, looping and through-a-file paths."""
    from modelmesh.storage.paths import real_path

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.pkl").write_bytes(b"x")
    (tmp_path / "link-dir").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "rel").symlink_to("b/f.pkl")
    (tmp_path / "chain").symlink_to(tmp_path / "a" / "rel")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for path in ["a/b/f.pkl", "a/b", "link-dir/b/f.pkl", "a/rel", "chain", "link-dir/b/..",
                 "link-dir/../a/b/./f.pkl", "."]:
        full = str(tmp_path / path)
        assert real_path(full) == os.path.realpath(full, strict=True), path
    for bad in ["missing", "a/b/missing", "loop1", "a/b/f.pkl/below"]:
        full = str(tmp_path / bad)
        with pytest.raises(OSError) as ours:
            real_path(full)
        with pytest.raises(OSError) as theirs:
            os.path.realpath(full, strict=True)
        assert type(ours.value) is type(theirs.value), bad
