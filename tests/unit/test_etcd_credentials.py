"""etcd TLS / auth settings and the client's token handling, without a real etcd.

The settings checks name the flag that is wrong; the client renews a token etcd
rejects (once, shared by concurrent calls), never sends one without ``--etcd-user``,
and opens a new channel when its credential files changed. The etcd here is a
stand-in gRPC server answering as etcd does (its messages copied from etcd 3.5).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from aetcd import rpc
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc

from modelmesh.registry.etcd import EtcdClient
from modelmesh.registry.etcd_security import EtcdSecurity, split_endpoints
from modelmesh.settings import from_sources

# -- settings -----------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("ca.crt", "tls.crt", "tls.key", "password"):
        (tmp_path / name).write_text("x\n")
        out[name] = str(tmp_path / name)
    return out


def test_etcd_security_settings_are_read_from_flags_and_variables(files) -> None:
    s = from_sources(environ={
        "MM_ETCD": "https://etcd-0:2379,https://etcd-1:2379", "MM_ETCD_CACERT": files["ca.crt"],
        "MM_ETCD_CERT": files["tls.crt"], "MM_ETCD_KEY": files["tls.key"],
        "MM_ETCD_USER": "mesh", "MM_ETCD_PASSWORD_FILE": files["password"]})
    assert EtcdSecurity.from_settings(s) == EtcdSecurity(
        Path(files["ca.crt"]), Path(files["tls.crt"]), Path(files["tls.key"]), "mesh",
        Path(files["password"]))
    assert EtcdSecurity.from_settings(from_sources(environ={})) == EtcdSecurity()


@pytest.mark.parametrize(("env", "message"), [
    ({"MM_ETCD_CERT": "tls.crt"}, "--etcd-cert needs --etcd-key"),
    ({"MM_ETCD_KEY": "tls.key"}, "--etcd-key needs --etcd-cert"),
    ({"MM_ETCD_USER": "mesh"}, "--etcd-user needs --etcd-password-file"),
    ({"MM_ETCD_PASSWORD_FILE": "password"}, "--etcd-password-file needs --etcd-user"),
    ({"MM_ETCD_CACERT": "missing.crt"}, "MM_ETCD_CACERT: .*missing.crt does not exist"),
    ({"MM_ETCD_PASSWORD_FILE": "."}, "MM_ETCD_PASSWORD_FILE: .* is not a file"),
    ({"MM_ETCD": "", "MM_ETCD_CACERT": "ca.crt"}, "--etcd-cacert applies to --etcd endpoints"),
    ({"MM_ETCD": "unix://x"}, "--etcd: endpoints are HOST:PORT"),
    ({"MM_ETCD": "http://a:1,https://b:1"}, "all with the same scheme"),
])
def test_bad_etcd_security_settings_name_the_flag(files, env: dict[str, str],
                                                  message: str) -> None:
    env = {"MM_ETCD": "etcd:2379", **{k: files.get(v, v) for k, v in env.items()}}
    with pytest.raises(ValueError, match=message):
        from_sources(environ=env)


def test_endpoints_lose_their_scheme_and_https_asks_for_tls() -> None:
    assert split_endpoints(["https://a:1/", "https://b:2"]) == (["a:1", "b:2"], True)
    assert split_endpoints(["a:1", "http://b:2"]) == (["a:1", "b:2"], False)
    with pytest.raises(ValueError, match="mix"):
        split_endpoints(["http://a:1", "https://b:2"])


# -- tokens -------------------------------------------------------------------------------

INVALID = "etcdserver: invalid auth token"


class FakeEtcd(pb_grpc.KVServicer, pb_grpc.AuthServicer, pb_grpc.WatchServicer):
    """Accepts only the newest token; ``expire()`` makes it stale, as etcd's TTL does."""

    def __init__(self) -> None:
        self.issued = 0
        self.passwords: list[str] = []
        self.seen: list[str | None] = []

    def expire(self) -> None:
        self.issued += 1000  # the current token no longer matches

    async def Authenticate(self, request, context):  # noqa: N802
        self.passwords.append(request.password)
        if request.name != "mesh" or request.password != "s3cret":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "etcdserver: authentication failed, invalid user ID or password")
        self.issued += 1
        await asyncio.sleep(0.05)  # long enough for concurrent callers to pile up
        return pb.AuthenticateResponse(token=f"tok.{self.issued}")

    async def Range(self, request, context):  # noqa: N802
        token = dict(context.invocation_metadata()).get("token")
        self.seen.append(token)
        if token is not None and token != f"tok.{self.issued}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, INVALID)
        return pb.RangeResponse(kvs=[], count=0)


    async def Watch(self, request_iterator, context):  # noqa: N802
        # As etcd 3.5 does: a watch created with a stale token is created, then canceled.
        token = dict(context.invocation_metadata()).get("token")
        async for req in request_iterator:
            if not req.HasField("create_request"):
                continue
            if token != f"tok.{self.issued}":
                yield pb.WatchResponse(created=True, canceled=True, cancel_reason=(
                    "rpc error: code = PermissionDenied desc = etcdserver: permission denied"))
                return
            rev = req.create_request.start_revision
            yield pb.WatchResponse(created=True)
            yield pb.WatchResponse(header=pb.ResponseHeader(revision=rev), events=[rpc.Event(
                kv=rpc.KeyValue(key=b"k", value=b"v", mod_revision=rev))])
            await asyncio.Event().wait()  # an open stream, until the client cancels it


@pytest.fixture
async def fake_etcd():
    etcd = FakeEtcd()
    server = grpc.aio.server()
    pb_grpc.add_KVServicer_to_server(etcd, server)
    pb_grpc.add_WatchServicer_to_server(etcd, server)
    pb_grpc.add_AuthServicer_to_server(etcd, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield etcd, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _password(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "password"
    path.write_text(text)
    return path


async def test_a_rejected_token_is_renewed_once_for_all_waiting_calls(fake_etcd,
                                                                      tmp_path: Path) -> None:
    etcd, endpoint = fake_etcd
    security = EtcdSecurity(user="mesh", password_file=_password(tmp_path, "s3cret\n"))
    client = EtcdClient([endpoint], timeout=5, security=security)
    try:
        await asyncio.gather(*(client.get(b"k") for _ in range(5)))
        assert etcd.passwords == ["s3cret"]  # trailing newline dropped; one Authenticate
        etcd.expire()
        await asyncio.gather(*(client.get(b"k") for _ in range(5)))
        assert len(etcd.passwords) == 2  # renewed once, not once per call
        assert etcd.seen[-1] == f"tok.{etcd.issued}"
    finally:
        await client.close()


async def test_a_watch_canceled_for_a_stale_token_comes_back_with_a_new_one(
        fake_etcd, tmp_path: Path) -> None:
    etcd, endpoint = fake_etcd
    security = EtcdSecurity(user="mesh", password_file=_password(tmp_path, "s3cret"))
    client = EtcdClient([endpoint], timeout=5, security=security)
    try:
        await client.get(b"k")
        etcd.expire()  # the token the watch will be created with is stale
        watch = client.watch_prefix(b"k", 7)
        batch = await asyncio.wait_for(anext(watch), 10)
        assert [e.mod_revision for e in batch] == [7]  # type: ignore[union-attr]
        assert len(etcd.passwords) == 2
        await watch.aclose()
    finally:
        await client.close()


async def test_wrong_password_is_an_error_naming_the_user_not_the_password(
        fake_etcd, tmp_path: Path) -> None:
    from modelmesh.errors import Unavailable

    etcd, endpoint = fake_etcd
    security = EtcdSecurity(user="mesh", password_file=_password(tmp_path, "guess"))
    client = EtcdClient([endpoint], timeout=5, security=security)
    try:
        with pytest.raises(Unavailable) as info:
            await client.get(b"k")
        assert str(info.value) == ("authentication failed for user 'mesh': etcdserver: "
                                   "authentication failed, invalid user ID or password")
        assert "guess" not in str(info.value)
        # A fixed password file is read again (mtime changed) on the next attempt.
        path = _password(tmp_path, "s3cret")
        os.utime(path, ns=(1, 1))
        assert await client.get(b"k") is None
    finally:
        await client.close()


async def test_no_token_is_sent_without_a_user(fake_etcd) -> None:
    etcd, endpoint = fake_etcd
    client = EtcdClient([endpoint], timeout=5)
    try:
        await client.get(b"k")
        assert etcd.seen == [None] and etcd.passwords == []
    finally:
        await client.close()


async def test_changed_credential_files_reopen_the_channel_even_with_one_endpoint(
        tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"old")
    client = EtcdClient(["https://127.0.0.1:1"], timeout=1, security=EtcdSecurity(cacert=ca))
    try:
        first = client._channel
        await client._rotate(first)
        assert client._channel is first  # nothing changed, one endpoint: keep it
        ca.write_bytes(b"new")
        os.utime(ca, ns=(1, 1))
        await client._rotate(first)
        assert client._channel is not first
        assert client._files.get(ca) == b"new"
    finally:
        await client.close()
