"""V2 REST (with the binary tensor extension) and KServe V1 against real `modelmesh serve`
processes, driven by the real tritonclient.http (sync and aio), plain HTTP and curl."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from tritonclient.utils import InferenceServerException

from modelmesh.demo import demo_input
from tests.integration.test_mesh import FAST, identity_file, register, wait_until

pytestmark = pytest.mark.integration

LIMIT = 1 << 20  # --max-message-bytes of the test mesh

#: Every V2 datatype with values that test its edges; FP16 / BF16 go binary only.
DATATYPES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 1, 255]], np.uint8),
    "UINT16": np.array([[0, 1, 65535]], np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], np.float16),
    "FP32": np.array([[-1.5, 0.25, 3.4e38]], np.float32),
    "FP64": np.array([[-1.5, 0.1, 1e308]], np.float64),
    "BYTES": np.array([[b"", b"abc", "h\u00e9llo \u2603".encode()]], dtype=object),
}
BINARY_ONLY = {"FP16"}


@pytest.fixture(scope="module")
def mesh(module_mesh_factory, etcd_server, models_root, demo_models):
    mp = module_mesh_factory("--mesh-name", "rest", "--max-message-bytes", str(LIMIT),
                             etcd=etcd_server, capacity="512MiB")
    register(mp.endpoint, {"echo": str(demo_models["identity"].path)})
    register(mp.endpoint, {"echo4": identity_file(models_root, "rest-echo4")})
    for kind in ("sklearn", "xgboost", "lightgbm", "onnx"):
        register(mp.endpoint, {f"rest-{kind}": str(demo_models[kind].path)}, kind)
    return mp


@pytest.fixture(scope="module")
def client(mesh):
    c = thttp.InferenceServerClient(mesh.http_endpoint, network_timeout=60)
    yield c
    c.close()


def request(mesh, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One plain HTTP/1.1 request: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(mesh, path: str, doc, headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = request(mesh, "POST", path, json.dumps(doc).encode(),
                              {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(body) if body else {}


def echo_input(name: str, arr: np.ndarray, datatype: str, binary: bool, mod=thttp):
    inp = mod.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


# -- health, metadata, repository ------------------------------------------------------


def test_health_and_server_metadata(mesh, client):
    assert client.is_server_live() and client.is_server_ready()
    assert request(mesh, "GET", "/v2/health/live")[2] == b'{"live":true}'
    assert request(mesh, "GET", "/v2/health/ready")[2] == b'{"ready":true}'
    meta = client.get_server_metadata()
    assert meta["name"] == "modelmesh" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_ready(mesh, client):
    meta = client.get_model_metadata("rest-sklearn")
    assert meta["inputs"][0]["name"] == "input__0" and meta["platform"] == "sklearn"
    assert client.get_model_metadata("rest-sklearn", model_version="1")["name"] == "rest-sklearn"
    assert client.is_model_ready("rest-sklearn")
    assert not client.is_model_ready("rest-sklearn", model_version="7")
    status, _, body = request(mesh, "GET", "/v2/models/nope/ready")
    assert status == 404 and "not registered" in json.loads(body)["error"]
    with pytest.raises(InferenceServerException, match="not registered"):
        client.get_model_metadata("nope")


def test_repository_index_load_and_unload(mesh, client):
    client.load_model("rest-onnx")
    names = {m["name"]: m for m in client.get_model_repository_index()}
    assert names["rest-onnx"]["state"] == "READY"
    client.unload_model("rest-onnx")
    assert wait_until(lambda: {m["name"]: m for m in client.get_model_repository_index()}
                      ["rest-onnx"]["state"] != "READY", 20)
    client.load_model("rest-onnx")
    assert client.is_model_ready("rest-onnx")
    ready = [m["name"] for m in post_json(mesh, "/v2/repository/index", {"ready": True})[1]]
    assert "rest-onnx" in ready
    status, doc = post_json(mesh, "/v2/repository/models/nope/load", {})
    assert status == 404, doc


# -- inference: datatypes, binary on and off, sync and aio ---------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips(client, datatype, binary):
    arr = DATATYPES[datatype]
    if datatype in BINARY_ONLY and not binary:
        pytest.skip("JSON cannot carry FP16")
    inp = echo_input("t", arr, datatype, binary)
    result = client.infer("echo", [inp], outputs=[thttp.InferRequestedOutput("t", binary)],
                          request_id="req-7")
    got = result.as_numpy("t")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == "1"  # the version served, as Triton
    assert result.get_output("t")["datatype"] == datatype
    if datatype == "BYTES":
        got = np.vectorize(lambda v: v if isinstance(v, bytes) else v.encode())(got)
        assert got.tolist() == arr.tolist()
    else:
        np.testing.assert_array_equal(got.reshape(arr.shape), arr)


def test_bf16_travels_binary(mesh):
    bits = np.array([0x3F80, 0xC000, 0x7F80], "<u2")  # 1.0, -2.0, inf
    header = json.dumps({"inputs": [{"name": "b", "datatype": "BF16", "shape": [3],
                                     "parameters": {"binary_data_size": 6}}],
                         "outputs": [{"name": "b", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = request(mesh, "POST", "/v2/models/echo/infer", header + bits.tobytes(),
                                    {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    n = int(headers["inference-header-content-length"])
    doc = json.loads(body[:n])
    assert doc["outputs"][0]["datatype"] == "BF16" and body[n:] == bits.tobytes()
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", json.dumps(
        {"inputs": [{"name": "b", "datatype": "BF16", "shape": [1], "data": [1.0]}]}).encode())
    assert status == 400 and b"send it binary" in body


def test_nested_json_data_parameters_and_requested_outputs(mesh):
    status, doc = post_json(mesh, "/v2/models/echo/infer", {
        "id": "n1", "parameters": {"flag": True, "n": 3, "s": "x"},
        "inputs": [{"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
                   {"name": "b", "datatype": "FP32", "shape": [2], "data": [0.5, 1.5]}],
        "outputs": [{"name": "parameters"}, {"name": "a"}]})
    assert status == 200, doc
    assert [o["name"] for o in doc["outputs"]] == ["parameters", "a"]
    assert json.loads(doc["outputs"][0]["data"][0]) == {"flag": True, "n": 3, "s": "x"}
    assert doc["outputs"][1] == {"name": "a", "datatype": "INT32", "shape": [2, 2],
                                 "data": [1, 2, 3, 4]}
    # binary_data_output: every output binary; the JSON part says how big each is
    status, headers, body = request(mesh, "POST", "/v2/models/echo/infer", json.dumps(
        {"parameters": {"binary_data_output": True},
         "inputs": [{"name": "a", "datatype": "INT32", "shape": [2], "data": [7, 8]}],
         "outputs": [{"name": "a"}]}).encode())
    n = int(headers["inference-header-content-length"])
    out = json.loads(body[:n])["outputs"][0]
    assert out["parameters"] == {"binary_data_size": 8} and "data" not in out
    assert np.frombuffer(body[n:], "<i4").tolist() == [7, 8]


def test_aio_client_binary_and_json(mesh):
    async def run() -> list[np.ndarray]:
        c = thttp_aio.InferenceServerClient(mesh.http_endpoint)
        try:
            assert await c.is_server_ready()
            results = []
            for binary in (True, False):
                x = np.arange(8, dtype=np.float32).reshape(2, 4) + binary
                inp = echo_input("x", x, "FP32", binary, thttp_aio)
                r = await c.infer("echo4", [inp], outputs=[
                    thttp_aio.InferRequestedOutput("x", binary_data=binary)])
                results.append(r.as_numpy("x") - x)
            return results
        finally:
            await c.close()

    for diff in asyncio.run(run()):
        assert not diff.any()


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm", "onnx"])
def test_demo_models_answer_as_over_grpc(mesh, client, kind):
    x = demo_input(7).astype(np.float32)
    name = "input" if kind == "onnx" else "input__0"
    grpc_client = tgrpc.InferenceServerClient(mesh.endpoint)
    try:
        ginp = tgrpc.InferInput(name, list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        want = grpc_client.infer(f"rest-{kind}", [ginp])
    finally:
        grpc_client.close()
    for binary in (True, False):
        got = client.infer(f"rest-{kind}", [echo_input(name, x, "FP32", binary)])
        for out in want.get_response().outputs:
            np.testing.assert_allclose(got.as_numpy(out.name), want.as_numpy(out.name),
                                       rtol=1e-6)


# -- KServe V1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm"])
def test_v1_predict_and_model_ready(mesh, client, kind):
    rows = demo_input(4).tolist()
    status, doc = post_json(mesh, f"/v1/models/rest-{kind}:predict", {"instances": rows})
    assert status == 200, doc
    want = client.infer(f"rest-{kind}", [echo_input("input__0", np.array(rows), "FP64", True)])
    assert doc["predictions"] == want.as_numpy("predict").tolist()
    assert post_json(mesh, f"/v1/models/rest-{kind}:predict", {"inputs": rows})[1] == doc
    status, _, body = request(mesh, "GET", f"/v1/models/rest-{kind}")
    assert status == 200 and json.loads(body) == {"name": f"rest-{kind}", "ready": True}
    assert request(mesh, "GET", "/v1/models/nope")[0] == 404
    status, doc = post_json(mesh, f"/v1/models/rest-{kind}:predict", {"instances": [[1, 2], [3]]})
    assert status == 400 and "one length" in doc["error"]


# -- routing: headers, vmodels, forwarding ------------------------------------------------------


def test_id_headers_and_url_encoded_names(mesh, client, models_root):
    register(mesh.endpoint, {"with/slash é": identity_file(models_root, "rest-odd")})
    x = np.ones((1, 4), np.float32)
    status, doc = post_json(mesh, "/v2/models/with%2Fslash%20%C3%A9/infer",
                            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                         "data": [1, 2, 3, 4]}]})
    assert status == 200 and doc["model_name"] == "with/slash é", doc
    register(mesh.endpoint, {"spaced é": identity_file(models_root, "rest-spaced")})
    r = client.infer("spaced é", [echo_input("x", x, "FP32", True)])  # tritonclient quotes it
    assert r.get_response()["model_name"] == "spaced é"
    r = client.infer("whatever", [echo_input("x", x, "FP32", True)],
                     headers={"mm-model-id": "echo4"})
    assert (r.as_numpy("x") == 1).all()
    status, doc = post_json(mesh, "/v2/models/echo4/infer", {"inputs": []},
                            {"mm-model-id": "echo4", "mm-vmodel-id": "v"})
    assert status == 400 and "only one of" in doc["error"]


def test_forwarded_in_a_three_instance_mesh(mesh_factory, etcd_server, models_root):
    meshes = [mesh_factory("--mesh-name", "rest-fwd", *FAST, etcd=etcd_server)
              for _ in range(3)]
    models = {f"f{i}": identity_file(models_root, f"rest-fwd-{i}") for i in range(6)}
    register(meshes[0].endpoint, models)
    clients = [thttp.InferenceServerClient(m.http_endpoint) for m in meshes]
    try:
        for i, model in enumerate(models):  # each cold model through a different ingress
            x = np.full((1, 4), i, np.float32)
            c = clients[i % 3]
            assert (c.infer(model, [echo_input("x", x, "FP32", True)]).as_numpy("x") == i).all()
        # now every model is loaded somewhere: ask each instance for every model
        for c in clients:
            for i, model in enumerate(models):
                x = np.full((1, 4), i + 0.5, np.float32)
                got = c.infer(model, [echo_input("x", x, "FP32", i % 2 == 0)]).as_numpy("x")
                assert (got == i + 0.5).all()
    finally:
        for c in clients:
            c.close()
    held = [sum(1 for m in c_models(mesh) if m["state"] == "READY") for mesh in meshes]
    assert sum(held) >= len(models) and sum(1 for h in held if h) >= 2, held


def c_models(mesh) -> list[dict]:
    return post_json(mesh, "/v2/repository/index", {})[1]


# -- errors --------------------------------------------------------------------------------


def test_client_mistakes_are_4xx_json_and_never_logged(mesh):
    def infer(doc, model="echo"):
        return post_json(mesh, f"/v2/models/{model}/infer", doc)

    x = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}
    cases = [
        (infer({"inputs": [x]}, "nope"), 404, "not registered"),
        (infer({"inputs": [{**x, "shape": [3]}]}), 400, "needs 3"),
        (infer({"inputs": [{**x, "datatype": "FP99"}]}), 400, "unknown datatype"),
        (infer({"inputs": [{**x, "data": ["a", "b"]}]}), 400, "must be numbers"),
        (infer({"inputs": [{**x, "shape": [-1]}]}), 400, "non-negative"),
        (infer({"inputs": [{**x, "datatype": "UINT8", "data": [1, 256]}]}), 400, "range"),
        (infer({"inputs": [{**x, "data": [[1], [2, 3]]}]}), 400, "rectangular"),
        (infer({"inputs": [x, x]}), 400, "more than once"),
        (infer({"inputs": [x], "outputs": [{"name": "zz"}]}), 400, "unknown requested output"),
        (infer({"inputs": [{**x, "shape": [2**40, 2**40]}]}), 400, "too many elements"),
        (infer({"inputs": [{**x, "parameters": {"binary_data_size": 8}, "data": None}]}), 400,
         "both"),
        (infer({"inputs": [{k: v for k, v in x.items() if k != "data"}
                           | {"parameters": {"binary_data_size": 8}}]}), 400, "remain"),
    ]
    for (status, doc), want_status, text in cases:
        assert status == want_status and text in doc["error"], (doc, want_status, text)
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", b"{not json")
    assert status == 400 and b"not valid JSON" in body
    assert request(mesh, "GET", "/v2/models/echo/infer")[0] == 405
    assert request(mesh, "GET", "/v3/anything")[0] == 404
    assert "Traceback" not in mesh.log() and "failed unexpectedly" not in mesh.log()


def test_binary_sizes_checked_against_shape_and_body(mesh):
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", header + b"\0" * 8,
                              {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"needs 12" in body
    header2 = header.replace(b"[3]", b"[2]")
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", header2 + b"\0" * 9,
                              {"Inference-Header-Content-Length": str(len(header2))})
    assert status == 400 and b"add up to 8" in body, body
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", header,
                              {"Inference-Header-Content-Length": str(len(header) + 5)})
    assert status == 400 and b"Inference-Header-Content-Length" in body


def test_oversized_body_is_413_before_it_is_read(mesh):
    # no Content-Length (chunked): counted as it arrives, refused once past the limit
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=30)
    try:
        conn.request("POST", "/v2/models/echo/infer", body=iter([b"x" * (LIMIT + 1)]),
                     encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and b"max-message-bytes" in resp.read()
        assert resp.getheader("connection") == "close"
    finally:
        conn.close()
    # Content-Length alone decides: the server answers without waiting for any of the body
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
    try:
        conn.putrequest("POST", "/v2/models/echo/infer")
        conn.putheader("Content-Length", str(10 * LIMIT))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and b"limit" in resp.read()
    finally:
        conn.close()


def test_gzip_and_deflate_bodies_and_a_gzip_bomb(mesh):
    doc = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}]}
    raw = json.dumps(doc).encode()
    for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        status, _, body = request(mesh, "POST", "/v2/models/echo/infer", data,
                                  {"Content-Encoding": encoding})
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1, 2, 3], body
    bomb = gzip.compress(b"[" * (64 * LIMIT))  # 64 MiB inflated from ~64 KiB sent
    assert len(bomb) < LIMIT
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", bomb,
                              {"Content-Encoding": "gzip"})
    assert status == 413 and b"inflates to more than" in body
    status, _, body = request(mesh, "POST", "/v2/models/echo/infer", b"\x1f\x8b junk",
                              {"Content-Encoding": "gzip"})
    assert status == 400 and b"compressed" in body


def test_tritonclient_request_compression(client):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for algorithm in ("gzip", "deflate"):
        r = client.infer("echo4", [echo_input("x", x, "FP32", True)],
                         request_compression_algorithm=algorithm)
        assert (r.as_numpy("x") == x).all()


def test_keep_alive_serves_many_requests_on_one_connection(mesh):
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=30)
    try:
        for i in range(20):
            conn.request("POST", "/v2/models/echo/infer", json.dumps(
                {"inputs": [{"name": "i", "datatype": "INT32", "shape": [1], "data": [i]}]}))
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["outputs"][0]["data"] == [i]
        sock = conn.sock
        assert sock is not None  # the same socket throughout
    finally:
        conn.close()


def test_metrics_have_a_protocol_label(mesh, client):
    client.infer("echo4", [echo_input("x", np.ones((1, 4), np.float32), "FP32", True)])
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics").read()
    assert b'method="ModelInfer",protocol="rest"' in text
    assert b'modelmesh_request_size_bytes_count{protocol="rest"}' in text


# -- curl: the README's examples ------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_curl_readme_examples(mesh):
    base = mesh.http_url

    def curl(*args: str) -> dict:
        out = subprocess.run(["curl", "-sS", "--fail-with-body", *args], check=True,
                             capture_output=True, timeout=60)
        return json.loads(out.stdout)

    assert curl(f"{base}/v2/health/ready") == {"ready": True}
    doc = curl("-H", "Content-Type: application/json", "-d",
               '{"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 4], '
               '"data": [5.1, 3.5, 1.4, 0.2]}]}',
               f"{base}/v2/models/rest-sklearn/infer")
    assert doc["outputs"][0]["name"] == "predict" and doc["outputs"][0]["data"] == [0]
    doc = curl("-d", '{"instances": [[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]]}',
               f"{base}/v1/models/rest-sklearn:predict")
    assert doc == {"predictions": [0, 2]}
    assert curl(f"{base}/v1/models/rest-sklearn") == {"name": "rest-sklearn", "ready": True}


# -- graceful stop ------------------------------------------------------------------------


def test_sigterm_lets_in_flight_rest_requests_finish(mesh_factory, etcd_server, models_root):
    """A request sent before SIGTERM (its model takes 3 s, longer than the drain) is answered;
    afterwards the port is closed."""
    import socket
    import threading

    mp = mesh_factory("--mesh-name", "rest-stop", *FAST, etcd=etcd_server)
    register(mp.endpoint, {"slow": identity_file(models_root, "rest-slow", delay_ms=3000)})
    assert request(mp, "POST", "/v2/repository/models/slow/load")[0] == 200
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": [1, 2, 3, 4]}]}).encode()
    sent = threading.Event()
    answer: list[bytes] = []

    def slow_request() -> None:
        with socket.create_connection(("127.0.0.1", mp.http_port), timeout=60) as sock:
            sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            sent.set()
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and data.endswith(b"}"):
                    break
            answer.append(data)

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert sent.wait(30)
    assert mp.proc is not None
    mp.proc.send_signal(15)
    thread.join(60)
    assert answer and answer[0].startswith(b"HTTP/1.1 200"), answer
    assert b'"data":[1.0,2.0,3.0,4.0]' in answer[0]
    assert mp.proc.wait(60) == 0
    with pytest.raises(ConnectionError):
        request(mp, "GET", "/v2/health/live")


def test_vmodels_resolve_by_path_and_header(mesh, client):
    import grpc

    from modelmesh._proto.mmesh import model_mesh_pb2 as mm
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    with grpc.insecure_channel(mesh.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).setVModel(mm.SetVModelRequest(
            vModelId="rest-vm", targetModelId="echo4", sync=True, loadNow=True), timeout=60)
    x = np.full((1, 4), 3, np.float32)
    assert (client.infer("rest-vm", [echo_input("x", x, "FP32", True)]).as_numpy("x") == 3).all()
    r = client.infer("ignored", [echo_input("x", x, "FP32", False)],
                     headers={"mm-vmodel-id": "rest-vm"})
    assert (r.as_numpy("x") == 3).all()
    assert client.is_model_ready("rest-vm")


def test_model_config_and_statistics(mesh, client):
    """Triton's configuration and statistics extensions, as tritonclient.http reads them."""
    config = client.get_model_config("echo4")
    assert config["name"] == "echo4" and config["max_batch_size"] == 0
    assert config["input"][0]["name"] == "x" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [-1, 4]  # numbers, not protobuf's int64 strings
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    client.infer("echo4", [echo_input("x", np.ones((1, 4), np.float32), "FP32", True)])
    stats = client.get_inference_statistics("echo4")["model_stats"]
    assert [s["name"] for s in stats] == ["echo4"]
    assert stats[0]["inference_count"] >= 1 and isinstance(stats[0]["inference_count"], int)
    assert stats[0]["inference_stats"]["success"]["count"] >= 1
    every = client.get_inference_statistics()["model_stats"]
    assert "echo4" in {s["name"] for s in every}
    assert request(mesh, "GET", "/v2/models/nope/config")[0] == 404
    assert request(mesh, "GET", "/v2/models/nope/stats")[0] == 404
    assert request(mesh, "POST", "/v2/models/echo4/config")[0] == 405
