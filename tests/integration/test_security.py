"""TLS, mutual TLS, roles and internal headers, with real certificates and real processes.

Certificates come from tests/support/certs.py (a CA; a server certificate that is
also the mesh's peer identity; clients; an expired one; one from another CA).
Clients are the stock ones: grpc, tritonclient.grpc / .http with TLS options, the
``modelmesh`` CLI with --ca/--cert/--key/--token.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from tests.conftest import REPO
from tests.integration.test_mesh import identity_file
from tests.support.certs import make_pki

pytestmark = pytest.mark.integration
ST = mm.ModelStatusInfo

TOKENS = {"infer": "tok-infer", "read": "tok-read", "manage": "tok-manage",
          "all": "tok-all"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def creds(pki, client=None, ca=None) -> grpc.ChannelCredentials:
    pair = getattr(pki, client) if client else None
    key, cert = (pair.key.read_bytes(), pair.cert.read_bytes()) if pair else (None, None)
    return grpc.ssl_channel_credentials((ca or pki.ca).cert.read_bytes(), key, cert)


def secure(endpoint: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(endpoint, credentials)


def wait_ready(mp, credentials: grpc.ChannelCredentials | None, metadata=(), timeout=60.0):
    """Until the TLS mesh's V2 ServerReady says true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mp.proc.poll() is not None:
            raise RuntimeError(f"mesh exited:\n{mp.log()}")
        ch = secure(mp.endpoint, credentials) if credentials else \
            grpc.insecure_channel(mp.endpoint)
        try:
            with ch:
                if pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(
                        pb.ServerReadyRequest(), metadata=metadata, timeout=2).ready:
                    return mp
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"mesh not ready:\n{mp.log()}")


def start_tls(factory, pki, *extra, mutual=True, etcd=None, files=None):
    cert, key = files or (pki.server.cert, pki.server.key)
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if mutual:
        args += ["--tls-ca", str(pki.ca.cert)]
    mp = factory(*args, *extra, etcd=etcd, start=False)
    mp.start(wait=False)
    return wait_ready(mp, creds(pki, "server" if mutual else None))


def register_identity(channel: grpc.Channel, models_root: Path, model_id: str,
                      metadata=()) -> None:
    mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
        modelId=model_id, modelInfo=mm.ModelInfo(
            type="identity", path=identity_file(models_root, model_id))),
        metadata=metadata, timeout=30)


def infer_v2(channel: grpc.Channel, model: str, metadata=(), value: float = 1.0):
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, metadata=metadata,
                                                                timeout=30)


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_mesh(module_mesh_factory, pki, models_root):
    """Server TLS only (no client certificates asked)."""
    mp = start_tls(module_mesh_factory, pki, mutual=False)
    with secure(mp.endpoint, creds(pki)) as ch:
        register_identity(ch, models_root, "tls-echo")
    return mp


def test_plaintext_to_a_tls_port_fails_and_tls_works(tls_mesh, pki):
    with grpc.insecure_channel(tls_mesh.endpoint) as ch:
        assert code_of(lambda: infer_v2(ch, "tls-echo")) == grpc.StatusCode.UNAVAILABLE
    with secure(tls_mesh.endpoint, creds(pki)) as ch:
        assert infer_v2(ch, "tls-echo").outputs[0].name == "x"
    # a server certificate from a CA the client does not trust is refused by the client
    with secure(tls_mesh.endpoint, creds(pki, ca=pki.other_ca)) as ch:
        assert code_of(lambda: infer_v2(ch, "tls-echo")) == grpc.StatusCode.UNAVAILABLE


def test_tritonclient_grpc_and_http_connect_over_tls(tls_mesh, pki):
    x = np.ones((1, 4), np.float32)
    with triton.InferenceServerClient(tls_mesh.endpoint, ssl=True,
                                      root_certificates=str(pki.ca.cert)) as client:
        inp = triton.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert (client.infer("tls-echo", [inp]).as_numpy("x") == 1).all()
    client = thttp.InferenceServerClient(
        f"127.0.0.1:{tls_mesh.http_port}", ssl=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(pki.ca.cert)))
    try:
        inp = thttp.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert (client.infer("tls-echo", [inp]).as_numpy("x") == 1).all()
    finally:
        client.close()


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def mtls_mesh(module_mesh_factory, pki, models_root):
    mp = start_tls(module_mesh_factory, pki)
    with secure(mp.endpoint, creds(pki, "client")) as ch:
        register_identity(ch, models_root, "mtls-echo")
    return mp


@pytest.mark.parametrize(("client", "ca", "ok"), [
    (None, None, False),  # TLS without a client certificate
    ("client", None, True),
    ("expired", None, False),
    ("foreign", "other_ca", False),  # signed by another CA (trusting that CA too)
])
def test_mutual_tls_needs_a_valid_client_certificate(mtls_mesh, pki, client, ca, ok):
    if ca:  # the client trusts both CAs; the server still refuses the foreign certificate
        root = pki.ca.cert.read_bytes() + getattr(pki, ca).cert.read_bytes()
        pair = getattr(pki, client)
        credentials = grpc.ssl_channel_credentials(root, pair.key.read_bytes(),
                                                   pair.cert.read_bytes())
    else:
        credentials = creds(pki, client)
    with secure(mtls_mesh.endpoint, credentials) as ch:
        if ok:
            assert infer_v2(ch, "mtls-echo").outputs
        else:
            assert code_of(lambda: infer_v2(ch, "mtls-echo")) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_clients_tritonclient_http_and_the_cli(mtls_mesh, pki):
    x = np.full((1, 4), 3, np.float32)
    with triton.InferenceServerClient(
            mtls_mesh.endpoint, ssl=True, root_certificates=str(pki.ca.cert),
            private_key=str(pki.client.key), certificate_chain=str(pki.client.cert)) as client:
        inp = triton.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert (client.infer("mtls-echo", [inp]).as_numpy("x") == 3).all()

    def context():
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        return ctx

    client = thttp.InferenceServerClient(f"127.0.0.1:{mtls_mesh.http_port}", ssl=True,
                                         ssl_context_factory=context)
    try:
        inp = thttp.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert (client.infer("mtls-echo", [inp]).as_numpy("x") == 3).all()
    finally:
        client.close()
    # REST without a client certificate: the handshake is refused
    bare = ssl.create_default_context(cafile=str(pki.ca.cert))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection(("127.0.0.1", mtls_mesh.http_port), timeout=10) as raw, \
                bare.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            if not tls.recv(1024):
                raise ConnectionError("closed")
    cli = [sys.executable, "-m", "modelmesh", "status", "mtls-echo", "--endpoint",
           mtls_mesh.endpoint, "--ca", str(pki.ca.cert), "--cert", str(pki.client.cert),
           "--key", str(pki.client.key)]
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    without = subprocess.run(cli[:-6], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert without.returncode != 0


def _served_serial(port: int, pki) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` is shown."""
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        from cryptography import x509

        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_rotated_certificates_are_used_by_new_connections_and_no_request_fails(
        mesh_factory, pki, models_root, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    mp = start_tls(mesh_factory, pki, files=(cert, key))
    with secure(mp.endpoint, creds(pki, "client")) as ch:
        register_identity(ch, models_root, "rot-echo")
        infer_v2(ch, "rot-echo")
    from cryptography import x509

    old = x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).serial_number
    assert _served_serial(mp.port, pki) == old and _served_serial(mp.http_port, pki) == old
    failures: list[str] = []
    done = threading.Event()
    served = [0]

    def traffic():
        with secure(mp.endpoint, creds(pki, "client")) as ch:  # one long-lived channel
            while not done.is_set():
                try:
                    infer_v2(ch, "rot-echo")
                    served[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        new = pki.issue("rotated", "modelmesh.test", server=True)
        # as cert-manager does: the files are replaced in place
        shutil.copy(new.key, key)
        shutil.copy(new.cert, cert)
        want = x509.load_pem_x509_certificate(new.cert.read_bytes()).serial_number
        deadline = time.monotonic() + 30
        seen = (0, 0)
        while time.monotonic() < deadline:
            seen = (_served_serial(mp.port, pki), _served_serial(mp.http_port, pki))
            if seen == (want, want):
                break
            time.sleep(0.2)
        assert seen == (want, want), "new connections still get the old certificate"
        with secure(mp.endpoint, creds(pki, "client")) as ch:  # a new connection works
            assert infer_v2(ch, "rot-echo").outputs
    finally:
        done.set()
        worker.join(30)
    assert not failures and served[0] > 0, failures[:3]


# --------------------------------------------------------------------------- peers


def test_a_three_instance_mtls_mesh_forwards_and_ignores_an_outsiders_internal_headers(
        mesh_factory, etcd_server, pki, models_root):
    meshes = [start_tls(mesh_factory, pki, "--mesh-name", "sec-peers", "--lease-ttl", "3",
                        etcd=etcd_server) for _ in range(3)]
    a, b, _ = meshes
    peer = creds(pki, "server")  # the mesh's own identity: what instances present
    with secure(a.endpoint, peer) as ch:
        register_identity(ch, models_root, "peer-echo")
        # a peer may ask an instance to load here
        mm_grpc.ModelMeshStub(ch).ensureLoaded(mm.EnsureLoadedRequest(
            modelId="peer-echo", sync=True), metadata=(("mm-load-here", "1"),), timeout=60)

    def holders(at=a) -> set[str]:
        with secure(at.endpoint, peer) as ch:
            st = mm_grpc.ModelMeshStub(ch).getModelStatus(
                mm.GetStatusRequest(modelId="peer-echo"), timeout=10)
        return {c.location for c in st.modelCopyInfos
                if ST.ModelStatus.Name(c.copyStatus) == "LOADED"}

    deadline = time.monotonic() + 20  # until every instance's view has A's copy
    while any(holders(m) != {f"test-{a.port}"} for m in meshes) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(holders(m) == {f"test-{a.port}"} for m in meshes)
    # a client (valid certificate of the CA, not the mesh's identity) at B: forwarded to A
    with secure(b.endpoint, creds(pki, "outsider")) as ch:
        assert infer_v2(ch, "peer-echo", value=5).raw_output_contents
        assert holders() == {f"test-{a.port}"}, "forwarding loaded a second copy"
        # claiming to be the last hop would make B load its own copy: ignored
        assert infer_v2(ch, "peer-echo", metadata=(("mm-hops", "99"),)).raw_output_contents
        assert holders() == {f"test-{a.port}"}, "an outsider's mm-hops was honoured"
        mm_grpc.ModelMeshStub(ch).ensureLoaded(mm.EnsureLoadedRequest(
            modelId="peer-echo", sync=True), metadata=(("mm-load-here", "1"),), timeout=60)
        # nor when sent the way instances send each other forwarded requests
        answers = _forwarded_batch(ch, (("mm-load-here", "1"),), (("mm-hops", "99"),),
                                   model="peer-echo")
        assert [a.code for a in answers] == [0, 0], [a.details for a in answers]
    assert holders() == {f"test-{a.port}"}, "an outsider's mm-load-here was honoured"
    # B forwards many at once to A's copy: batched between the instances, all answered
    with secure(b.endpoint, creds(pki, "outsider")) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        def one(value: float) -> list[float]:
            req = pb.ModelInferRequest(model_name="peer-echo", id=str(value))
            req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            req.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
            out = stub.ModelInfer(req, timeout=60)
            assert out.id == str(value)
            return np.frombuffer(out.raw_output_contents[0], np.float32).tolist()

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, [float(v) for v in range(64)]))
    assert results == [[float(v)] * 4 for v in range(64)]
    assert holders() == {f"test-{a.port}"}


# --------------------------------------------------------------------------- roles


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory, pki):
    path = tmp_path_factory.mktemp("auth") / "auth.yaml"
    roles = {"infer": ["infer"], "read": ["read"], "manage": ["manage"],
             "all": ["infer", "read", "manage"]}
    doc = {"tokens": [{"sha256": hashlib.sha256(t.encode()).hexdigest(), "roles": roles[r]}
                      for r, t in TOKENS.items()],
           "identities": [{"cn": "ops-console", "roles": ["read"]}]}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def auth_mesh(module_mesh_factory, auth_file, models_root):
    mp = module_mesh_factory("--auth-file", str(auth_file), start=False)
    mp.start(wait=False)
    wait_ready(mp, None)  # ServerReady needs no credential (a probe)
    with grpc.insecure_channel(mp.endpoint) as ch:
        register_identity(ch, models_root, "auth-echo",
                          metadata=(("authorization", f"Bearer {TOKENS['manage']}"),))
    return mp


def _calls(ch: grpc.Channel, models_root: Path):
    m, e, v2 = mm_grpc.ModelMeshStub(ch), ext_grpc.ModelMeshExtensionsStub(ch), \
        pb_grpc.GRPCInferenceServiceStub(ch)
    path = identity_file(models_root, "auth-new")
    return {
        "registerModel": ("manage", lambda md: m.registerModel(mm.RegisterModelRequest(
            modelId="auth-new", modelInfo=mm.ModelInfo(type="identity", path=path)),
            metadata=md, timeout=30)),
        "unregisterModel": ("manage", lambda md: m.unregisterModel(
            mm.UnregisterModelRequest(modelId="auth-gone"), metadata=md, timeout=30)),
        "setVModel": ("manage", lambda md: m.setVModel(mm.SetVModelRequest(
            vModelId="auth-vm", targetModelId="auth-echo", loadNow=False), metadata=md,
            timeout=30)),
        "getModelStatus": ("read", lambda md: m.getModelStatus(
            mm.GetStatusRequest(modelId="auth-echo"), metadata=md, timeout=30)),
        "getVModelStatus": ("read", lambda md: m.getVModelStatus(
            mm.GetVModelStatusRequest(vModelId="auth-vm"), metadata=md, timeout=30)),
        "listModels": ("read", lambda md: e.listModels(ext.ListModelsRequest(), metadata=md,
                                                        timeout=30)),
        "ModelMetadata": ("read", lambda md: v2.ModelMetadata(
            pb.ModelMetadataRequest(name="auth-echo"), metadata=md, timeout=30)),
        "ModelInfer": ("infer", lambda md: infer_v2(ch, "auth-echo", metadata=md)),
        "RepositoryModelLoad": ("manage", lambda md: v2.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="auth-echo"), metadata=md, timeout=60)),
        "RepositoryModelUnload": ("manage", lambda md: v2.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="auth-echo"), metadata=md, timeout=60)),
        "ensureLoaded": ("manage", lambda md: m.ensureLoaded(mm.EnsureLoadedRequest(
            modelId="auth-echo"), metadata=md, timeout=60)),
        "deleteVModel": ("manage", lambda md: m.deleteVModel(mm.DeleteVModelRequest(
            vModelId="auth-no-such-vm"), metadata=md, timeout=30)),
        "registerModels": ("manage", lambda md: e.registerModels(ext.RegisterModelsRequest(
            requests=[mm.RegisterModelRequest(modelId="auth-bulk", modelInfo=mm.ModelInfo(
                type="identity", path=path))], replace=True), metadata=md, timeout=30)),
        "clusterStatus": ("read", lambda md: e.clusterStatus(ext.ClusterStatusRequest(),
                                                              metadata=md, timeout=30)),
        "ModelReady": ("read", lambda md: v2.ModelReady(pb.ModelReadyRequest(name="auth-echo"),
                                                        metadata=md, timeout=30)),
        "ModelConfig": ("read", lambda md: v2.ModelConfig(
            pb.ModelConfigRequest(name="auth-echo"), metadata=md, timeout=30)),
        "ModelStatistics": ("read", lambda md: v2.ModelStatistics(
            pb.ModelStatisticsRequest(name="auth-echo"), metadata=md, timeout=30)),
        "RepositoryIndex": ("read", lambda md: v2.RepositoryIndex(
            pb.RepositoryIndexRequest(), metadata=md, timeout=30)),
        "ServerMetadata": ("read", lambda md: v2.ServerMetadata(
            pb.ServerMetadataRequest(), metadata=md, timeout=30)),
        "ModelStreamInfer": ("infer", lambda md: _stream_once(v2, md)),
    }


def _stream_once(v2, md):
    """One request on a ModelStreamInfer stream; the refusal is the stream's status."""
    req = pb.ModelInferRequest(model_name="auth-echo")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    answers = list(v2.ModelStreamInfer(iter([req]), metadata=md, timeout=30))
    assert answers and not answers[0].error_message, answers
    return answers


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_every_rpc_needs_its_role(auth_mesh, models_root):
    with grpc.insecure_channel(auth_mesh.endpoint) as ch:
        for name, (role, call) in _calls(ch, models_root).items():
            assert code_of(lambda c=call: c(())) == grpc.StatusCode.UNAUTHENTICATED, name
            assert code_of(lambda c=call: c(_bearer("wrong"))) == \
                grpc.StatusCode.UNAUTHENTICATED, name
            lacking = "read" if role != "read" else "infer"
            assert code_of(lambda c=call, t=TOKENS[lacking]: c(_bearer(t))) == \
                grpc.StatusCode.PERMISSION_DENIED, name
            call(_bearer(TOKENS[role]))  # the right token: no error
            call(_bearer(TOKENS["all"]))
        # probes need nothing
        assert pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(),
                                                               timeout=10).live


def test_every_rest_route_needs_its_role(auth_mesh):
    import urllib.error
    import urllib.request

    x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    routes = [("POST", "/v2/models/auth-echo/infer", x, "infer"),
              ("GET", "/v2/models/auth-echo", None, "read"),
              ("POST", "/v2/repository/index", {}, "read"),
              ("POST", "/v2/repository/models/auth-echo/load", {}, "manage"),
              ("GET", "/v2", None, "read"),
              ("GET", "/v2/models/auth-echo/ready", None, "read"),
              ("GET", "/v2/models/auth-echo/config", None, "read"),
              ("GET", "/v2/models/auth-echo/stats", None, "read"),
              ("GET", "/v1/models/auth-echo", None, "read"),
              ("POST", "/v2/repository/models/auth-echo/unload", {}, "manage"),
              ("POST", "/v2/repository/models/auth-echo/load", {}, "manage")]

    def status(method, path, doc, token):
        req = urllib.request.Request(
            f"http://127.0.0.1:{auth_mesh.http_port}{path}", method=method,
            data=json.dumps(doc).encode() if doc is not None else None,
            headers={"authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    for method, path, doc, role in routes:
        lacking = "read" if role != "read" else "infer"
        assert [status(method, path, doc, t) for t in (None, "wrong", TOKENS[lacking],
                                                      TOKENS[role])] == [401, 401, 403, 200], path
    assert status("GET", "/v2/health/ready", None, None) == 200


def test_the_cli_sends_its_token(auth_mesh):
    cli = [sys.executable, "-m", "modelmesh", "status", "auth-echo", "--endpoint",
           auth_mesh.endpoint]
    refused = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    ok = subprocess.run([*cli, "--token", TOKENS["read"]], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_client_certificate_identities_get_their_roles(module_mesh_factory, pki, auth_file,
                                                       models_root):
    mp = start_tls(module_mesh_factory, pki, "--auth-file", str(auth_file))
    with secure(mp.endpoint, creds(pki, "client")) as ch:  # cn ops-console: read only
        mm_grpc.ModelMeshStub(ch).getModelStatus(mm.GetStatusRequest(modelId="x"), timeout=10)
        assert code_of(lambda: mm_grpc.ModelMeshStub(ch).registerModel(
            mm.RegisterModelRequest(modelId="id-new", modelInfo=mm.ModelInfo(
                type="identity", path=identity_file(models_root, "id-new"))), timeout=10)) \
            == grpc.StatusCode.PERMISSION_DENIED
    with secure(mp.endpoint, creds(pki, "outsider")) as ch:  # a valid certificate, no rule
        assert code_of(lambda: mm_grpc.ModelMeshStub(ch).getModelStatus(
            mm.GetStatusRequest(modelId="x"), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        # its token still counts
        register_identity(ch, models_root, "id-new",
                          metadata=_bearer(TOKENS["manage"]))
        assert mm_grpc.ModelMeshStub(ch).getModelStatus(
            mm.GetStatusRequest(modelId="id-new"), metadata=_bearer(TOKENS["read"]),
            timeout=10).status != ST.NOT_FOUND


def _forwarded_batch(ch: grpc.Channel, *metadata: tuple[tuple[str, str], ...],
                     model: str = "auth-echo") -> list:
    """A ForwardInferBatch call (what instances send each other) of one ModelInfer call
    per entry of ``metadata``; returns the answers."""
    from modelmesh._proto.mmesh import mesh_peer_pb2 as peer_pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    batch = peer_pb.ForwardInferBatchRequest(calls=[
        peer_pb.ForwardedCall(request=req.SerializeToString(), metadata=[
            peer_pb.PeerMetadata(key=k, value=v.encode()) for k, v in md])
        for md in metadata])
    raw = ch.unary_unary("/mmesh.ModelMeshPeer/ForwardInferBatch")(
        batch.SerializeToString(), timeout=60)
    return list(peer_pb.ForwardInferBatchResponse.FromString(raw).answers)


def test_each_call_in_a_forwarded_batch_needs_its_own_token(auth_mesh):
    """The batch method itself needs no role (instances call it for their clients), so
    every call it carries is admitted as a ModelInfer call of its own."""
    with grpc.insecure_channel(auth_mesh.endpoint) as ch:
        answers = _forwarded_batch(ch, (), _bearer("wrong"), _bearer(TOKENS["read"]),
                                   _bearer(TOKENS["infer"]), _bearer(TOKENS["all"]))
    codes = [grpc.StatusCode.OK if a.code == 0 else
             next(c for c in grpc.StatusCode if c.value[0] == a.code) for a in answers]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK,
                     grpc.StatusCode.OK], [(a.code, a.details) for a in answers]
    assert pb.ModelInferResponse.FromString(answers[3].response).model_name == "auth-echo"


def test_without_tls_a_forwarded_request_carries_the_callers_token(
        mesh_factory, etcd_server, auth_file, models_root):
    """Authorized at the ingress, checked again by the peer with the same token: a
    request cannot gain rights on the way."""
    def start():
        mp = mesh_factory("--auth-file", str(auth_file), "--mesh-name", "sec-fwd",
                          etcd=etcd_server, start=False)
        mp.start(wait=False)
        return wait_ready(mp, None)

    a, b = start(), start()
    manage = _bearer(TOKENS["manage"])
    with grpc.insecure_channel(a.endpoint) as ch:
        register_identity(ch, models_root, "fwd-echo", metadata=manage)
        mm_grpc.ModelMeshStub(ch).ensureLoaded(mm.EnsureLoadedRequest(
            modelId="fwd-echo", sync=True), metadata=(*manage, ("mm-load-here", "1")),
            timeout=60)

    def b_sees_a_copy() -> bool:
        with grpc.insecure_channel(b.endpoint) as ch:
            st = mm_grpc.ModelMeshStub(ch).getModelStatus(
                mm.GetStatusRequest(modelId="fwd-echo"), metadata=_bearer(TOKENS["read"]),
                timeout=10)
        return any(c.location == f"test-{a.port}" and
                   ST.ModelStatus.Name(c.copyStatus) == "LOADED" for c in st.modelCopyInfos)

    deadline = time.monotonic() + 20
    while not b_sees_a_copy() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b_sees_a_copy()
    with grpc.insecure_channel(b.endpoint) as ch:
        out = infer_v2(ch, "fwd-echo", metadata=_bearer(TOKENS["infer"]), value=7)
        assert np.frombuffer(out.raw_output_contents[0], np.float32).tolist() == [7.0] * 4
        assert code_of(lambda: infer_v2(ch, "fwd-echo", metadata=_bearer(TOKENS["read"]))) \
            == grpc.StatusCode.PERMISSION_DENIED
        st = mm_grpc.ModelMeshStub(ch).getModelStatus(
            mm.GetStatusRequest(modelId="fwd-echo"), metadata=_bearer(TOKENS["read"]),
            timeout=10)
    # served by A's copy: B forwarded it (with the token) and loaded nothing
    assert {c.location for c in st.modelCopyInfos} == {f"test-{a.port}"}


def _listen_addresses(port: int) -> set[str]:
    """The local addresses a TCP port listens on (from /proc/net/tcp, IPv4)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


def test_the_metrics_port_binds_where_it_is_told(mesh_factory):
    import urllib.request

    mp = mesh_factory("--metrics-host", "127.0.0.1")
    assert _listen_addresses(mp.metrics_port) == {"127.0.0.1"}
    with urllib.request.urlopen(f"http://127.0.0.1:{mp.metrics_port}/live", timeout=10) as r:
        assert r.status == 200
    default = mesh_factory()
    assert _listen_addresses(default.metrics_port) == {"0.0.0.0"}
