"""Models in object storage, end to end: a real S3 server (SeaweedFS), real
`modelmesh serve` processes, the real tritonclient. No mocked S3."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.demo import demo_input
from modelmesh.registry.embedded import free_port
from modelmesh.storage import DiskCache, Puller, StorageConfigs, resolve_source
from modelmesh.storage.config import spec_from_mapping
from modelmesh.storage.remote import S3Store

pytestmark = pytest.mark.integration
ST = mm.ModelStatusInfo
IRIS_KEY = "iris/model.joblib"


@pytest.fixture(scope="module")
def blackhole():
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def uploaded(seaweedfs, models_root, demo_models):
    """The demo sklearn model in the bucket, as one object and as a "directory"."""
    s3 = seaweedfs.client()
    local = models_root / demo_models["sklearn"].path
    s3.upload_file(str(local), "models", IRIS_KEY)
    s3.upload_file(str(local), "models", "iris-dir/model.joblib")
    s3.put_object(Bucket="models", Key="iris-dir/docs/README.txt", Body=b"an iris forest")
    return local


@pytest.fixture(scope="module")
def storage_config(seaweedfs, blackhole, tmp_path_factory):
    path = tmp_path_factory.mktemp("storage") / "storage-config.json"
    path.write_text(json.dumps({
        "seaweed": seaweedfs.storage_config(),
        # the GCS type, pointed at SeaweedFS: the same XML-API code path with HMAC keys
        "gcs-hmac": {**seaweedfs.storage_config(), "type": "gcs"},
        # values may be JSON strings, as in the storage-config secret's stringData
        "wrong-secret": json.dumps(seaweedfs.storage_config(secret_access_key="wrong")),
        "unreachable": seaweedfs.storage_config(endpoint_url=f"http://127.0.0.1:{free_port()}"),
        "blackhole": seaweedfs.storage_config(endpoint_url=f"http://127.0.0.1:{blackhole}"),
    }))
    return path


@pytest.fixture(scope="module")
def mesh(module_mesh_factory, etcd_server, storage_config, uploaded):
    return module_mesh_factory("--storage-config", str(storage_config),
                               "--download-timeout", "2s", etcd=etcd_server)


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        yield mm_grpc.ModelMeshStub(ch)


def register(stub, model_id: str, path: str, key: str = "", model_type: str = "sklearn",
             load_now: bool = True):
    return stub.registerModel(mm.RegisterModelRequest(
        modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=path, key=key),
        loadNow=load_now, sync=load_now), timeout=60)


def infer(endpoint: str, model_id: str) -> np.ndarray:
    x = demo_input().astype(np.float32)
    with triton.InferenceServerClient(endpoint) as client:
        inp = triton.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model_id, [inp], client_timeout=60).as_numpy("predict")


def local_predict(path) -> np.ndarray:
    import joblib

    return joblib.load(path).predict(demo_input().astype(np.float32))


def metric(mesh, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics",
                                  timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def name(status) -> str:
    return ST.ModelStatus.Name(status.status)


# -- serving from S3 -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_id, path, key", [
    ("s3-iris", f"s3://models/{IRIS_KEY}", "seaweed"),
    ("s3-iris-default-bucket", IRIS_KEY, "seaweed"),  # ModelMesh's form: key in default_bucket
    ("s3-iris-prefix", "s3://models/iris-dir/", "seaweed"),
    ("s3-iris-dir", "s3://models/iris-dir", "seaweed"),  # names a "directory" without the '/'
    ("s3-iris-json-key", IRIS_KEY, '{"storage_key": "seaweed", '
                                    '"storage_params": {"bucket": "models"}}'),
    ("gs-iris", f"gs://models/{IRIS_KEY}", "gcs-hmac"),
])
def test_model_in_s3_serves_the_same_predictions(mesh, stub, uploaded, model_id, path, key):
    status = register(stub, model_id, path, key)
    assert name(status) == "LOADED", status.errors
    np.testing.assert_array_equal(infer(mesh.endpoint, model_id), local_predict(uploaded))


def test_checksum_in_the_location_is_verified(mesh, stub, uploaded):
    digest = hashlib.sha256(uploaded.read_bytes()).hexdigest()
    ok = register(stub, "s3-sha-ok", f"s3://models/{IRIS_KEY}#sha256={digest}", "seaweed")
    assert name(ok) == "LOADED", ok.errors
    bad = register(stub, "s3-sha-bad", f"s3://models/{IRIS_KEY}#sha256={'0' * 64}", "seaweed")
    assert name(bad) == "LOADING_FAILED"
    assert "SHA-256 mismatch" in " ".join(bad.errors)


# -- storage failures: the model fails, nothing else is affected ---------------------------------


@pytest.mark.parametrize("model_id, path, key, expected", [
    ("bad-missing", "s3://models/iris/nope.joblib", "seaweed", "object not found"),
    ("bad-bucket", "s3://other/iris/model.joblib", "seaweed", "object not found"),
    ("bad-credentials", f"s3://models/{IRIS_KEY}", "wrong-secret",
     "access denied (SignatureDoesNotMatch"),
    ("bad-unreachable", f"s3://models/{IRIS_KEY}", "unreachable", "cannot reach"),
    ("bad-timeout", f"s3://models/{IRIS_KEY}", "blackhole", "timed out"),
])
def test_storage_failure_fails_only_that_model(mesh, stub, uploaded, model_id, path, key,
                                               expected):
    register(stub, "healthy", f"s3://models/{IRIS_KEY}", "seaweed")
    status = register(stub, model_id, path, key)
    assert name(status) == "LOADING_FAILED"
    errors = " ".join(status.errors)
    assert expected in errors and path.split("#")[0].split("://")[-1] in errors, errors
    # the status stays readable, and the other model keeps serving
    again = stub.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)
    assert name(again) == "LOADING_FAILED" and expected in " ".join(again.errors)
    np.testing.assert_array_equal(infer(mesh.endpoint, "healthy"), local_predict(uploaded))


@pytest.mark.parametrize("path, key, expected", [
    (f"s3://models/{IRIS_KEY}", "no-such-key", "unknown storage key 'no-such-key' (known: "
                                               "blackhole, gcs-hmac, seaweed, unreachable"),
    ("s3://models/../../etc/passwd", "seaweed", "'..'"),
    ("s3://models//etc/passwd", "seaweed", "absolute"),
    ("../../etc/passwd", "seaweed", "'..'"),
    ("../../etc/passwd", "", "outside the models root"),
    ("gs://models/x.joblib", "seaweed", "is of type 's3'"),
    ("ftp://host/model.joblib", "", "'ftp://' is not supported"),
])
def test_bad_locations_are_refused_at_registration(stub, path, key, expected):
    with pytest.raises(grpc.RpcError) as err:
        register(stub, "refused", path, key)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details()
    status = stub.getModelStatus(mm.GetStatusRequest(modelId="refused"), timeout=10)
    assert name(status) == "NOT_FOUND"  # nothing was registered


# -- the disk cache: a third tier below memory -----------------------------------------------------


def test_evicted_model_reloads_from_disk_without_a_second_download(
        mesh_factory, etcd_server, storage_config, seaweedfs, uploaded, demo_models, tmp_path):
    # Room for one demo forest (~16 KB measured, ~20 KB predicted) but not two.
    data_dir = tmp_path / "data"
    args = ("--storage-config", str(storage_config))
    small = mesh_factory(*args, etcd=etcd_server, capacity="25000", data_dir=data_dir)
    with grpc.insecure_channel(small.endpoint) as ch:
        stub = mm_grpc.ModelMeshStub(ch)
        register(stub, "from-s3", f"s3://models/{IRIS_KEY}", "seaweed", load_now=False)
        register(stub, "from-disk", str(demo_models["sklearn"].path), load_now=False)
        want = local_predict(uploaded)

        np.testing.assert_array_equal(infer(small.endpoint, "from-s3"), want)
        sent = seaweedfs.bytes_sent("models")
        np.testing.assert_array_equal(infer(small.endpoint, "from-disk"), want)  # evicts it
        assert name(stub.getModelStatus(mm.GetStatusRequest(modelId="from-s3"))) == \
            "NOT_LOADED"
        np.testing.assert_array_equal(infer(small.endpoint, "from-s3"), want)  # reload

    assert metric(small, 'modelmesh_unloadmodel_total{reason="evicted"}') >= 1
    assert metric(small, 'modelmesh_storage_downloads_total{scheme="s3"}') == 1
    assert metric(small, "modelmesh_disk_cache_misses_total") == 1
    assert metric(small, "modelmesh_disk_cache_hits_total") == 1
    assert metric(small, "modelmesh_storage_downloaded_bytes_total") == uploaded.stat().st_size
    assert seaweedfs.bytes_sent("models") == sent  # the S3 server sent no object bytes again

    # The disk cache survives a restart: the new process loads it without downloading.
    small.stop()
    again = mesh_factory(*args, etcd=etcd_server, capacity="25000", data_dir=data_dir,
                         port=small.port)
    np.testing.assert_array_equal(infer(again.endpoint, "from-s3"), want)
    assert metric(again, 'modelmesh_storage_downloads_total{scheme="s3"}') == 0
    assert metric(again, "modelmesh_disk_cache_hits_total") == 1
    assert seaweedfs.bytes_sent("models") == sent


# -- the puller on its own, against the same server -------------------------------------------


def test_prefix_pull_streams_every_file_with_bounded_parallelism(seaweedfs, tmp_path,
                                                                  monkeypatch):
    s3 = seaweedfs.client()
    files = {f"many/part-{i}.bin": bytes([i]) * (300_000 + i) for i in range(6)}
    files["many/nested/deeper/meta.json"] = b"{}"
    for key, body in files.items():
        s3.put_object(Bucket="models", Key=key, Body=body)
    active, peak, lock = [0], [0], threading.Lock()
    real_stream = S3Store.stream

    def counting_stream(self, loc, obj):  # the real stream, with a count of how many run
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            yield from real_stream(self, loc, obj)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(S3Store, "stream", counting_stream)
    configs = StorageConfigs.of({"sw": spec_from_mapping("sw", seaweedfs.storage_config())})
    puller = Puller(configs, DiskCache(tmp_path / "cache", 10**8), max_concurrent_downloads=2)
    source = resolve_source("s3://models/many/", "sw", configs)
    assert source is not None
    with puller.pull(source) as directory:
        got = {str(p.relative_to(directory)): p.read_bytes()
               for p in directory.rglob("*") if p.is_file()}
    assert got == {k.removeprefix("many/"): v for k, v in files.items()}
    assert peak[0] == 2  # parallel, and never more than the limit
    assert puller.bytes_downloaded == sum(len(v) for v in files.values())
