"""PeerPool against a real in-process gRPC server: a peer leaving mid-call fails nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelmesh.errors import Code
from modelmesh.routing.peers import PeerError, PeerPool

METHOD = "/test.Slow/Echo"


async def _server(delay: float) -> tuple[grpc.aio.Server, str, asyncio.Event]:
    started = asyncio.Event()

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        await asyncio.sleep(delay)
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", started


async def test_a_call_in_flight_survives_its_peer_being_forgotten():
    # The router forgets a peer when its instance record goes; the record of an
    # instance that drains can go while its last answers are still on the way.
    server, endpoint, started = await _server(0.5)
    pool = PeerPool(1 << 20)
    try:
        call = asyncio.ensure_future(pool.call(endpoint, METHOD, b"payload", [], 10))
        await asyncio.wait_for(started.wait(), 10)
        forget = asyncio.ensure_future(pool.forget(endpoint))
        assert await asyncio.wait_for(call, 10) == b"payload"
        await asyncio.wait_for(forget, 10)
        assert pool.endpoints() == []
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_call_cut_by_a_closing_channel_is_a_peer_error_not_a_cancellation():
    server, endpoint, started = await _server(5.0)
    pool = PeerPool(1 << 20)
    try:
        call = asyncio.ensure_future(pool.call(endpoint, METHOD, b"x", [], 10))
        await asyncio.wait_for(started.wait(), 10)
        await pool.forget(endpoint, grace=None)  # close now: the call is cut
        with pytest.raises(PeerError) as info:
            await asyncio.wait_for(call, 10)
        assert info.value.code is Code.CANCELLED
        assert not info.value.reached  # so the router tries another copy
    finally:
        await pool.close()
        await server.stop(None)


async def test_metadata_grpc_cannot_send_is_a_peer_error():
    server, endpoint, _ = await _server(0.0)
    pool = PeerPool(1 << 20)
    try:
        with pytest.raises(PeerError) as info:
            await pool.call(endpoint, METHOD, b"x", [("mm-model-id", "ü\u2028")], 10)
        assert info.value.code is Code.INTERNAL
    finally:
        await pool.close()
        await server.stop(None)
