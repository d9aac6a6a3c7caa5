"""Several `modelmesh serve` processes on one real etcd behaving as one mesh.

Every test starts its own instances (named mesh, short lease TTL, one-second
rebalancing) and talks to them with the real tritonclient and the mmesh API.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.registry.embedded import EmbeddedEtcd

pytestmark = pytest.mark.integration

ST = mm.ModelStatusInfo
FAST = ["--lease-ttl", "3", "--rebalance-interval", "1"]


# -- helpers ------------------------------------------------------------------------------


def identity_file(root: Path, name: str, memory_bytes: int = 0, delay_ms: float = 0) -> str:
    spec: dict = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
    if memory_bytes:
        spec["memory_bytes"] = memory_bytes
    if delay_ms:
        spec["delay_ms"] = delay_ms
    path = root / "mesh-tests" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return str(path)


def register(endpoint: str, models: dict[str, str], model_type: str = "identity") -> None:
    with grpc.insecure_channel(endpoint) as ch:
        resp = ext_grpc.ModelMeshExtensionsStub(ch).registerModels(ext.RegisterModelsRequest(
            requests=[mm.RegisterModelRequest(modelId=m, modelInfo=mm.ModelInfo(
                type=model_type, path=p)) for m, p in models.items()]), timeout=60)
    assert all(r.code == 0 for r in resp.results), [r.message for r in resp.results if r.code]


def infer(client: triton.InferenceServerClient, model: str, value: float = 1.0,
          headers: dict | None = None) -> np.ndarray:
    x = np.full((1, 4), value, dtype=np.float32)
    inp = triton.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    out = client.infer(model, [inp], headers=headers, client_timeout=60)
    return out.as_numpy("x")


def infer_retrying(client, model: str, tries: int = 6) -> bool:
    """One request with client retries on UNAVAILABLE only (what the issue allows)."""
    for attempt in range(tries):
        try:
            return bool(np.all(infer(client, model, 2.0) == 2.0))
        except InferenceServerException as exc:
            if "UNAVAILABLE" not in str(exc.status()) or attempt == tries - 1:
                return False
            time.sleep(0.2)
    return False


def copies(endpoint: str, model: str) -> dict[str, str]:
    """instance id -> copy state of ``model``, from the mesh's status API."""
    with grpc.insecure_channel(endpoint) as ch:
        st = mm_grpc.ModelMeshStub(ch).getModelStatus(mm.GetStatusRequest(modelId=model),
                                                       timeout=10)
    return {c.location: ST.ModelStatus.Name(c.copyStatus) for c in st.modelCopyInfos}


def instances(endpoint: str) -> dict[str, ext.InstanceInfo]:
    with grpc.insecure_channel(endpoint) as ch:
        out = ext_grpc.ModelMeshExtensionsStub(ch).clusterStatus(
            ext.ClusterStatusRequest(), timeout=10).instances
    return {i.instanceId: i for i in out}


def metric(mp, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mp.metrics_port}/metrics", timeout=5
                                  ).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def start_mesh(mesh_factory, etcd, name: str, n: int = 3, *extra: str, capacity="256MiB"):
    return [mesh_factory("--mesh-name", name, *FAST, *extra, etcd=etcd, capacity=capacity)
            for _ in range(n)]


class Traffic:
    """Steady traffic from background threads; records every outcome with its time."""

    def __init__(self, endpoint: str, models: list[str], threads: int = 4,
                 retry: bool = False) -> None:
        self.endpoint, self.models, self.retry = endpoint, models, retry
        self.results: list[tuple[float, str, bool, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with triton.InferenceServerClient(self.endpoint) as client:
            while not self._stop.is_set():
                model = self.models[int(rng.integers(len(self.models)))]
                err = ""
                if self.retry:
                    ok = infer_retrying(client, model)
                else:
                    try:
                        ok = bool(np.all(infer(client, model, 2.0) == 2.0))
                    except InferenceServerException as exc:
                        ok, err = False, str(exc)
                self.results.append((time.monotonic(), model, ok, err))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def failures(self) -> list[tuple[float, str, bool, str]]:
        return [r for r in self.results if not r[2]]


# -- tests --------------------------------------------------------------------------------


def test_traffic_to_one_instance_spreads_models_over_the_mesh(mesh_factory, etcd_server,
                                                              models_root):
    # 200 models of 100 kB each, 8 MB per instance: one instance holds at most 80.
    capacity = 8_000_000
    meshes = start_mesh(mesh_factory, etcd_server, "spread", capacity=str(capacity))
    models = {f"m{i:03d}": identity_file(models_root, f"spread-{i}", memory_bytes=100_000)
              for i in range(200)}
    register(meshes[0].endpoint, models)
    ingress = meshes[0].endpoint

    def one(model: str) -> bool:
        with triton.InferenceServerClient(ingress) as c:
            return bool(np.all(infer(c, model, 3.0) == 3.0))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, sorted(models)))
    # A second round: every model is served (from wherever it lives), none fails.
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, sorted(models)))

    # Instance records reach the ingress's mirror a moment after the loads: wait for them.
    info = wait_until(lambda: (i := instances(ingress)) and len(i) == 3
                      and sum(x.modelCount for x in i.values()) >= 200 and i, 20) \
        or instances(ingress)
    assert len(info) == 3
    for inst in info.values():
        assert inst.usedBytes <= capacity, inst
        assert inst.modelCount >= 20, f"{inst.instanceId} holds only {inst.modelCount} models"
    assert sum(i.modelCount for i in info.values()) >= 200
    # The ingress forwarded the requests for the models it does not hold.
    assert metric(meshes[0], 'modelmesh_forwarded_requests_total{code="OK"}') >= 100


def test_cold_models_requested_one_by_one_spread_with_room_to_spare(mesh_factory, etcd_server,
                                                                    models_root):
    """Plenty of capacity everywhere, first requests one after the other through one
    instance: placement must still see each instance's growing load (from the instance
    records it reads) and not pile every model onto one of them."""
    meshes = start_mesh(mesh_factory, etcd_server, "even", capacity="256MiB")
    models = {f"e{i:02d}": identity_file(models_root, f"even-{i}", memory_bytes=1_000_000)
              for i in range(30)}
    register(meshes[0].endpoint, models)
    with triton.InferenceServerClient(meshes[0].endpoint) as c:
        for model in sorted(models):
            assert np.all(infer(c, model, 2.0) == 2.0)
    def counts() -> dict[str, int]:
        return {i.instanceId: i.modelCount for i in instances(meshes[0].endpoint).values()}

    assert wait_until(lambda: sum(counts().values()) >= 30, 10), counts()
    counts_now = counts()
    assert len(counts_now) == 3
    # The ingress counts what it sent each peer until that peer's instance record does:
    # an even spread is 10 each; placing from records that lag the loads gave up to 21.
    assert max(counts_now.values()) <= 14, f"models piled onto one instance: {counts_now}"


def test_forwarding_passes_request_and_answer_through_untouched(mesh_factory, etcd_server,
                                                                 models_root):
    a, b = start_mesh(mesh_factory, etcd_server, "fwd", 2)
    register(a.endpoint, {"echo": identity_file(models_root, "fwd-echo")})
    # Load it on b only (mm-load-here is what instances send each other).
    with grpc.insecure_channel(b.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).ensureLoaded(mm.EnsureLoadedRequest(modelId="echo", sync=True),
                                               metadata=[("mm-load-here", "1")], timeout=30)
    assert wait_until(lambda: copies(a.endpoint, "echo").get(f"test-{b.port}") == "LOADED", 5)

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    s = np.array([b"caf\xc3\xa9", b"", b"\x00\xff"], dtype=object)

    def call(endpoint: str):
        with triton.InferenceServerClient(endpoint) as c:
            i1 = triton.InferInput("x", [2, 4], "FP32")
            i1.set_data_from_numpy(x)
            i2 = triton.InferInput("s", [3], "BYTES")
            i2.set_data_from_numpy(s)
            return c.infer("echo", [i1, i2], request_id="req-7",
                           parameters={"k": "v", "n": 3, "flag": True}, client_timeout=30)

    with pytest.raises(InferenceServerException, match="takes inputs x"):
        call(a.endpoint)  # the model's own validation error comes back through the forward

    def call_x(endpoint: str):
        with triton.InferenceServerClient(endpoint) as c:
            i1 = triton.InferInput("x", [2, 4], "FP32")
            i1.set_data_from_numpy(x)
            return c.infer("echo", [i1], request_id="req-7",
                           parameters={"k": "v", "n": 3, "flag": True}, client_timeout=30)

    direct, forwarded = call_x(b.endpoint), call_x(a.endpoint)
    assert forwarded.get_response().id == "req-7"
    np.testing.assert_array_equal(forwarded.as_numpy("x"), x)
    assert forwarded.get_response() == direct.get_response()
    assert json.loads(forwarded.as_numpy("parameters")[0]) == {"flag": True, "k": "v", "n": 3}
    assert metric(a, 'modelmesh_forwarded_requests_total{code="OK"}') >= 1
    assert f"test-{a.port}" not in copies(a.endpoint, "echo")  # a did not load it

    # ModelMetadata for a model held elsewhere comes from its holder as well.
    with triton.InferenceServerClient(a.endpoint) as c:
        meta = c.get_model_metadata("echo")
        assert meta.inputs[0].name == "x"
        assert c.is_model_ready("echo")


def test_hop_limit_and_balanced_requests_are_served_where_they_land(mesh_factory, etcd_server,
                                                                    models_root):
    a, b = start_mesh(mesh_factory, etcd_server, "hops", 2)
    register(a.endpoint, {"h1": identity_file(models_root, "hops-1"),
                          "h2": identity_file(models_root, "hops-2")})
    with triton.InferenceServerClient(b.endpoint) as c:
        infer(c, "h1", headers={"mm-hops": "2"})  # at the limit: never forwarded again
        infer(c, "h2", headers={"mm-balanced": "true"})  # balanced: the ingress loads it
    expected = {f"test-{b.port}": "LOADED"}
    for model in ("h1", "h2"):  # b's copy records reach a's mirror a moment later
        assert wait_until(lambda m=model: copies(a.endpoint, m) == expected, 10), \
            copies(a.endpoint, model)


def test_concurrent_cold_requests_across_ingresses_share_one_load(mesh_factory, etcd_server,
                                                                  demo_models):
    meshes = start_mesh(mesh_factory, etcd_server, "cold", 3)
    register(meshes[0].endpoint, {"cold": str(demo_models["sklearn"].path)}, "sklearn")
    x = np.tile(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32), (1, 1))

    def one(i: int):
        with triton.InferenceServerClient(meshes[i % 3].endpoint) as c:
            inp = triton.InferInput("input-0", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            return c.infer("cold", [inp], client_timeout=60).as_numpy("predict")

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    assert all(r is not None and r.shape == (1,) for r in results)
    loads = sum(metric(mp, "modelmesh_loadmodel_milliseconds_count") for mp in meshes)
    assert loads == 1, f"{loads} loads for one cold model"


@pytest.mark.parametrize("first_copy", ["elsewhere", "on the ingress"])
def test_hot_model_gains_copies_under_load_and_loses_them_after(mesh_factory, etcd_server,
                                                                models_root, first_copy):
    extra = ["--placement", "density:settle_s=2", "--inference-threads", "2"]
    meshes = start_mesh(mesh_factory, etcd_server, "hot", 3, *extra)
    ingress = meshes[0].endpoint
    # 20 ms per request and 2 threads per instance: one copy serves ~100 req/s at most.
    register(ingress, {"hot": identity_file(models_root, "hot", delay_ms=20)})
    # Where the first copy lives decides the path: forwarded to the copies, or served
    # here until the copy here is saturated and then shared with the copies elsewhere.
    holder = meshes[0] if first_copy == "on the ingress" else meshes[1]
    with grpc.insecure_channel(holder.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).ensureLoaded(
            mm.EnsureLoadedRequest(modelId="hot", sync=True),
            metadata=[("mm-load-here", "1")], timeout=60)
    with Traffic(ingress, ["hot"], threads=8) as traffic:
        grown = wait_until(
            lambda: sum(s == "LOADED" for s in copies(ingress, "hot").values()) >= 2, 40, 0.5)

        def served() -> Counter:
            return Counter({mp.port: metric(mp, "modelmesh_invoke_model_milliseconds_count")
                            for mp in meshes})

        # routing now splits the traffic between the copies
        wait_until(lambda: sum(1 for v in served().values() if v > 0) >= 2, 20, 0.5)
    assert grown, f"no second copy under load: {copies(ingress, 'hot')}"
    assert not traffic.failures()
    counts = served()
    assert sum(1 for v in counts.values() if v > 0) >= 2, counts
    shrunk = wait_until(
        lambda: sum(s == "LOADED" for s in copies(ingress, "hot").values()) == 1, 40, 0.5)
    assert shrunk, f"copies stayed after traffic stopped: {copies(ingress, 'hot')}"
    assert sum(metric(mp, 'modelmesh_copy_changes_total{action="remove"}') for mp in meshes) >= 1


def test_kill_9_under_traffic_fails_over(mesh_factory, etcd_server, models_root):
    meshes = start_mesh(mesh_factory, etcd_server, "kill", 3)
    ingress, victim = meshes[0], meshes[2]
    models = {f"k{i:02d}": identity_file(models_root, f"kill-{i}", memory_bytes=1_000_000)
              for i in range(30)}
    register(ingress.endpoint, models)
    with triton.InferenceServerClient(ingress.endpoint) as c:
        for m in models:
            infer(c, m)
    victim_id = f"test-{victim.port}"
    on_victim = [m for m in models if copies(ingress.endpoint, m).get(victim_id) == "LOADED"]
    assert on_victim, "placement put nothing on the victim"

    with Traffic(ingress.endpoint, sorted(models), threads=4, retry=True) as traffic:
        time.sleep(2)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        time.sleep(12)
    results = traffic.results
    ok = sum(1 for r in results if r[2])
    assert len(results) > 200
    assert ok / len(results) >= 0.99, traffic.failures()[:5]
    # Every model the victim held is served again within 10 s of the kill.
    recovered = {}
    for t, model, success, _ in results:
        if success and t > killed_at and model in on_victim and model not in recovered:
            recovered[model] = t - killed_at
    assert set(recovered) == set(on_victim), set(on_victim) - set(recovered)
    assert max(recovered.values()) <= 10.0, recovered
    # No registration was lost, and the victim's copies are gone with its lease.
    with grpc.insecure_channel(ingress.endpoint) as ch:
        listed = ext_grpc.ModelMeshExtensionsStub(ch).listModels(
            ext.ListModelsRequest(page_size=100), timeout=10)
    assert {m.modelId for m in listed.models} == set(models)
    assert wait_until(lambda: victim_id not in instances(ingress.endpoint), 10)
    assert all(victim_id not in copies(ingress.endpoint, m) for m in on_victim)


def test_sigterm_under_traffic_fails_no_request(mesh_factory, etcd_server, models_root):
    meshes = start_mesh(mesh_factory, etcd_server, "term", 3)
    ingress, leaving = meshes[0], meshes[2]
    models = {f"t{i:02d}": identity_file(models_root, f"term-{i}", memory_bytes=1_000_000)
              for i in range(30)}
    register(ingress.endpoint, models)
    with triton.InferenceServerClient(ingress.endpoint) as c:
        for m in models:
            infer(c, m)
    leaving_id = f"test-{leaving.port}"
    held = [m for m in models if copies(ingress.endpoint, m).get(leaving_id) == "LOADED"]
    assert held
    with Traffic(ingress.endpoint, sorted(models), threads=4) as traffic:
        time.sleep(2)
        assert leaving.stop(signal.SIGTERM, timeout=60) == 0
        time.sleep(3)
    assert len(traffic.results) > 200
    assert not traffic.failures(), traffic.failures()[:5]
    # The models it held were moved: each is loaded on a remaining instance.
    for m in held:
        wait_until(lambda m=m: (st := copies(ingress.endpoint, m)) and leaving_id not in st
                   and "LOADED" in st.values(), 10)
        states = copies(ingress.endpoint, m)
        assert leaving_id not in states
        assert "LOADED" in states.values(), (m, states)


def test_etcd_outage_keeps_loaded_models_served(mesh_factory, tmp_path, models_root):
    etcd = EmbeddedEtcd(tmp_path / "etcd-outage")
    etcd.start()
    try:
        meshes = start_mesh(mesh_factory, etcd, "outage", 3)
        ingress = meshes[0].endpoint
        models = {f"o{i:02d}": identity_file(models_root, f"outage-{i}") for i in range(12)}
        register(ingress, models)
        with triton.InferenceServerClient(ingress) as c:
            for m in models:
                infer(c, m)
        with Traffic(ingress, sorted(models), threads=3) as traffic:
            time.sleep(1)
            etcd.stop()
            time.sleep(10)
            etcd.start()
            time.sleep(2)
        assert len(traffic.results) > 100
        assert not traffic.failures(), traffic.failures()[:5]
        # Full operation afterwards: registration, loading and serving from any instance.
        register(meshes[1].endpoint, {"after": identity_file(models_root, "outage-after")})
        for mp in meshes:
            with triton.InferenceServerClient(mp.endpoint) as c:
                assert np.all(infer(c, "after", 4.0) == 4.0)
        assert wait_until(lambda: len(instances(ingress)) == 3, 15)
        for mp in meshes:
            assert mp.stop() == 0  # a clean exit while etcd is up
    finally:
        etcd.stop()


def test_min_and_max_copies(mesh_factory, etcd_server, models_root):
    extra = ["--placement", "density:settle_s=2", "--inference-threads", "2"]
    meshes = start_mesh(mesh_factory, etcd_server, "limits", 3, *extra)
    ingress = meshes[0].endpoint
    with grpc.insecure_channel(ingress) as ch:
        stub = mm_grpc.ModelMeshStub(ch)
        for model, md in (("pinned", [("mm-min-copies", "2")]),
                          ("capped", [("mm-max-copies", "1")])):
            stub.registerModel(mm.RegisterModelRequest(
                modelId=model, modelInfo=mm.ModelInfo(
                    type="identity", path=identity_file(models_root, f"limits-{model}",
                                                        delay_ms=20 if model == "capped" else 0))),
                metadata=md, timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            stub.registerModel(mm.RegisterModelRequest(
                modelId="bad-limits", modelInfo=mm.ModelInfo(
                    type="identity", path=identity_file(models_root, "limits-bad"))),
                metadata=[("mm-min-copies", "3"), ("mm-max-copies", "2")], timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # min copies: loaded on two instances without a single request.
    assert wait_until(
        lambda: sum(s == "LOADED" for s in copies(ingress, "pinned").values()) == 2, 20, 0.5), \
        copies(ingress, "pinned")
    # max copies: as hot as the model that gained copies above, still one copy.
    with Traffic(ingress, ["capped"], threads=8) as traffic:
        time.sleep(8)
        states = copies(ingress, "capped")
    assert not traffic.failures()
    assert list(states.values()) == ["LOADED"], states


def test_rolling_restart_under_traffic_fails_no_request(mesh_factory, etcd_server, models_root):
    meshes = start_mesh(mesh_factory, etcd_server, "rolling", 3)
    models = {f"r{i:02d}": identity_file(models_root, f"rolling-{i}", memory_bytes=1_000_000)
              for i in range(20)}
    register(meshes[0].endpoint, models)
    # Like a Kubernetes Service: clients use the instances that are not terminating.
    ready = [mp.endpoint for mp in meshes]
    results: list[tuple[str, bool, str]] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            endpoint = ready[int(rng.integers(len(ready)))]
            model = sorted(models)[int(rng.integers(len(models)))]
            try:
                with triton.InferenceServerClient(endpoint) as c:
                    results.append((model, bool(np.all(infer(c, model, 2.0) == 2.0)), ""))
            except InferenceServerException as exc:
                results.append((model, False, f"{endpoint}: {exc}"))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        for mp in meshes:
            ready.remove(mp.endpoint)
            time.sleep(0.3)  # the endpoint change reaching clients
            assert mp.stop(signal.SIGTERM, timeout=60) == 0
            mp.start()
            ready.append(mp.endpoint)
            time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(results) > 200
    failed = [r for r in results if not r[1]]
    assert not failed, failed[:5]
