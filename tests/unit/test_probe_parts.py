"""Probes without a mesh: readiness and liveness rules, the metrics port's HTTP app
over a real HTTP server, a really wedged event loop, and the gRPC health service
on a real in-process grpc.aio server with the stock stub."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelmesh.api.health import HealthService
from modelmesh.metrics import Metrics
from modelmesh.node import LIVENESS_STALE_S, Node, heartbeat

H = health_pb2.HealthCheckResponse


def get(port: int, path: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_readiness_is_true_only_between_start_and_drain() -> None:
    node = Node()
    assert node.readiness() == (False, "starting")
    node.ready = True
    assert node.readiness() == (True, "")
    node.draining = True
    assert node.readiness() == (False, "draining")
    node.stopping = True
    assert node.readiness() == (False, "stopping")


def test_liveness_fails_once_the_heartbeat_is_stale() -> None:
    node = Node()
    assert node.liveness(1000.0) == (True, "")  # not beating yet: starting up
    node.heartbeat = 1000.0
    assert node.liveness(1000.0 + LIVENESS_STALE_S - 0.1) == (True, "")
    alive, reason = node.liveness(1000.0 + LIVENESS_STALE_S + 2)
    assert not alive and "stalled" in reason


@pytest.fixture
def served():
    """A Metrics HTTP server whose probes answer from ``state``."""
    state = {"live": (True, ""), "ready": (False, "starting")}
    metrics = Metrics()
    metrics.capacity_bytes.set(1234)
    port = metrics.serve(0, "127.0.0.1", live=lambda: state["live"],
                         ready=lambda: state["ready"])
    yield port, state
    metrics.stop()


def test_live_and_ready_answer_json_with_200_or_503(served) -> None:
    port, state = served
    assert get(port, "/live")[0::2] == (200, b'{"live": true}\n')
    code, headers, body = get(port, "/ready")
    assert code == 503 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"ready": False, "reason": "starting"}
    state["ready"] = (True, "")
    assert json.loads(get(port, "/ready")[2]) == {"ready": True}
    state["ready"] = (False, "draining")
    assert get(port, "/ready")[0] == 503
    state["live"] = (False, "event loop stalled for 12.0s")
    code, _, body = get(port, "/live")
    assert code == 503 and json.loads(body) == {"live": False,
                                                "reason": "event loop stalled for 12.0s"}


def test_head_answers_the_status_and_length_without_a_body(served) -> None:
    port, state = served
    code, headers, body = get(port, "/ready", "HEAD")
    assert (code, body) == (503, b"")
    assert int(headers["Content-Length"]) == len(get(port, "/ready")[2])
    code, headers, body = get(port, "/metrics", "HEAD")
    assert (code, body) == (200, b"")
    assert headers["Content-Type"].startswith("text/plain")
    assert int(headers["Content-Length"]) > 0


def test_metrics_keep_prometheus_negotiation_and_other_paths_are_404(served) -> None:
    port, _ = served
    code, headers, body = get(port, "/metrics")
    assert code == 200 and "modelmesh_instance_capacity_bytes 1234.0" in body.decode()
    code, headers, zipped = get(port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert code == 200 and headers["Content-Encoding"] == "gzip"
    assert b"modelmesh_instance_capacity_bytes 1234.0" in gzip.decompress(zipped)
    code, headers, _ = get(port, "/metrics",
                           headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert code == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    for path in ("/", "/metricsx", "/live/", "/favicon.ico"):
        assert get(port, path)[0] == 404, path
    assert get(port, "/ready", "POST")[0] == 405


async def test_live_fails_while_the_event_loop_is_wedged() -> None:
    node = Node()
    beating = asyncio.get_running_loop().create_task(heartbeat(node, 0.05))
    metrics = Metrics()
    port = metrics.serve(0, "127.0.0.1", live=lambda: node.liveness(time.monotonic(), 0.5))

    async def until_live() -> None:
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(get, port, "/live"))[0] != 200:
            assert time.monotonic() < deadline, "never live"
            await asyncio.sleep(0.05)

    def wedged_until_not_live() -> tuple[int, bytes]:
        # Runs on the loop itself: nothing else on it runs until this returns.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            code, _, body = get(port, "/live")
            if code == 503:
                return code, body
            time.sleep(0.05)
        return 0, b""

    try:
        await until_live()
        code, body = wedged_until_not_live()
        assert code == 503 and "event loop stalled" in json.loads(body)["reason"]
        await until_live()  # beats again once the loop is free
    finally:
        beating.cancel()
        metrics.stop()


async def test_health_service_checks_and_streams_changes() -> None:
    service = HealthService(["mmesh.ModelMesh"])
    await service.set_serving(False)
    server = grpc.aio.server()
    service.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ("", "mmesh.ModelMesh"):
                got = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert got.status == H.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            watch = stub.Watch(health_pb2.HealthCheckRequest(service="mmesh.ModelMesh"),
                               timeout=10)
            assert (await watch.read()).status == H.NOT_SERVING
            await service.set_serving(True)
            assert (await watch.read()).status == H.SERVING
            await service.set_serving(False)
            assert (await watch.read()).status == H.NOT_SERVING
            watch.cancel()
            unknown_watch = stub.Watch(health_pb2.HealthCheckRequest(service="no.Such"),
                                       timeout=10)
            assert (await unknown_watch.read()).status == H.SERVICE_UNKNOWN
            unknown_watch.cancel()
    finally:
        await server.stop(0)


async def test_a_watcher_keeps_hearing_after_another_watcher_of_its_service_leaves() -> None:
    service = HealthService(["mmesh.ModelMesh"])
    await service.set_serving(True)
    server = grpc.aio.server()
    service.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service="mmesh.ModelMesh")
            leaving, staying = stub.Watch(request, timeout=10), stub.Watch(request, timeout=10)
            assert (await leaving.read()).status == H.SERVING
            assert (await staying.read()).status == H.SERVING
            leaving.cancel()
            # The server has seen the cancellation once a new Check round-trips after it.
            await stub.Check(request, timeout=5)
            await service.set_serving(False)
            got = await asyncio.wait_for(staying.read(), 5)
            assert got.status == H.NOT_SERVING
            staying.cancel()
    finally:
        await server.stop(0)
