"""Forwarded ModelInfer calls batched per peer and model (``routing.peers``), served by
the real ``api.peer.PeerServicer`` on a real in-process grpc.aio server.

The peer's inference servicer is a stand-in (``GatedPeer``): it answers a request
with its bytes reversed plus the call's ``x-tag`` metadata, and holds every answer
until its gate opens, so a test decides exactly which requests are waiting when.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from modelmesh.api.peer import ForwardedContext, PeerServicer
from modelmesh.api.status import answer_error, trailing_metadata
from modelmesh.errors import Code
from modelmesh.headers import INFER
from modelmesh.node import Node
from modelmesh.routing.peers import (
    MAX_BATCHES_IN_FLIGHT,
    MAX_COALESCED_BYTES,
    PeerError,
    PeerPool,
)


class GatedPeer:
    """Stands in for the peer's InferenceServicer (the part PeerServicer uses)."""

    def __init__(self) -> None:
        self.node = Node(instance_id="peer")
        self.gate = asyncio.Event()
        self.singles = 0
        self.batches: list[list[str]] = []  # the x-tag of each call, per batch
        self.remaining: dict[str, float | None] = {}

    async def ModelInferRaw(self, raw: bytes, context) -> bytes | None:  # noqa: N802
        md = dict(context.invocation_metadata())
        tag = md.get("x-tag", "")
        self.remaining[tag] = context.time_remaining()
        if not isinstance(context, ForwardedContext):
            self.singles += 1
        await self.gate.wait()
        if raw == b"bad":
            answer_error(context, Code.INVALID_ARGUMENT, f"bad request {tag}",
                         trailing_metadata("peer"))
            return None
        return raw[::-1] + tag.encode()


class CountingPeerServicer(PeerServicer):
    async def forward_infer_batch(self, raw, context):
        from modelmesh._proto.mmesh import mesh_peer_pb2 as peer_pb

        calls = peer_pb.ForwardInferBatchRequest.FromString(raw).calls
        self.inference.batches.append([dict((m.key, m.value.decode()) for m in c.metadata)
                                       .get("x-tag", "") for c in calls])
        return await super().forward_infer_batch(raw, context)


async def _serve(peer: GatedPeer, batches: bool = True) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()

    async def single(raw: bytes, context) -> bytes | None:
        return await peer.ModelInferRaw(raw, context)

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(single)}),))
    if batches:
        servicer = CountingPeerServicer(peer, None)  # type: ignore[arg-type]
        server.add_generic_rpc_handlers((servicer.generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def _calls(pool: PeerPool, endpoint: str, model: str, tags: list[str],
           timeout: float | None = None, body: Callable[[str], bytes] = str.encode):
    return [asyncio.ensure_future(pool.call(endpoint, INFER, body(t), [("x-tag", t)], timeout,
                                            model)) for t in tags]


def _waiting(pool: PeerPool, endpoint: str, model: str) -> int:
    lane = pool._lanes.get((endpoint, model))
    return len(lane.waiting) if lane is not None else 0


async def test_requests_waiting_for_a_peer_go_together_and_each_gets_its_own_answer():
    peer = GatedPeer()
    server, endpoint = await _serve(peer)
    pool = PeerPool(1 << 20)
    try:
        tags = [f"r{i}" for i in range(10)]
        calls = _calls(pool, endpoint, "m", tags, timeout=30.0)
        # The first ones go at once, alone; the rest wait for one of them to return.
        await _until(lambda: peer.singles == MAX_BATCHES_IN_FLIGHT)
        await _until(lambda: _waiting(pool, endpoint, "m") == 10 - MAX_BATCHES_IN_FLIGHT)
        peer.gate.set()
        answers = await asyncio.gather(*calls)
        assert answers == [t.encode()[::-1] + t.encode() for t in tags]
        assert peer.batches == [tags[MAX_BATCHES_IN_FLIGHT:]]
        # Each batched call kept its own deadline (some of the 30 s had passed).
        assert all(0 < peer.remaining[t] <= 30.0 for t in tags[MAX_BATCHES_IN_FLIGHT:])
        assert not pool._lanes  # idle lanes are forgotten
    finally:
        await pool.close()
        await server.stop(None)


async def test_an_error_in_a_batch_answers_that_call_only():
    peer = GatedPeer()
    server, endpoint = await _serve(peer)
    pool = PeerPool(1 << 20)
    try:
        tags = [f"e{i}" for i in range(6)]
        calls = _calls(pool, endpoint, "m", tags,
                       body=lambda t: b"bad" if t == "e4" else t.encode())
        await _until(lambda: _waiting(pool, endpoint, "m") == 6 - MAX_BATCHES_IN_FLIGHT)
        peer.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        error = results[4]
        assert isinstance(error, PeerError)
        assert (error.code, error.details, error.reached) == (
            Code.INVALID_ARGUMENT, "bad request e4", True)
        assert [r for i, r in enumerate(results) if i != 4] == \
            [t.encode()[::-1] + t.encode() for t in tags if t != "e4"]
        assert peer.batches == [tags[MAX_BATCHES_IN_FLIGHT:]]
        assert peer.remaining["e4"] is None  # no deadline sent, none made up
    finally:
        await pool.close()
        await server.stop(None)


async def test_only_requests_for_the_same_model_share_a_call():
    peer = GatedPeer()
    server, endpoint = await _serve(peer)
    pool = PeerPool(1 << 20)
    try:
        a = _calls(pool, endpoint, "a", [f"a{i}" for i in range(5)])
        b = _calls(pool, endpoint, "b", [f"b{i}" for i in range(5)])
        await _until(lambda: _waiting(pool, endpoint, "a") == 5 - MAX_BATCHES_IN_FLIGHT
                     and _waiting(pool, endpoint, "b") == 5 - MAX_BATCHES_IN_FLIGHT)
        peer.gate.set()
        await asyncio.gather(*a, *b)
        assert sorted(peer.batches) == [["a2", "a3", "a4"], ["b2", "b3", "b4"]]
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_caller_that_gives_up_while_waiting_leaves_the_others_their_answers():
    peer = GatedPeer()
    server, endpoint = await _serve(peer)
    pool = PeerPool(1 << 20)
    try:
        tags = [f"c{i}" for i in range(6)]
        calls = _calls(pool, endpoint, "m", tags)
        await _until(lambda: _waiting(pool, endpoint, "m") == 6 - MAX_BATCHES_IN_FLIGHT)
        calls[3].cancel()
        peer.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 3] == \
            [t.encode()[::-1] + t.encode() for t in tags if t != "c3"]
        assert peer.batches == [["c2", "c4", "c5"]]
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_peer_without_the_batch_method_gets_single_calls():
    """An instance of an older version answers UNIMPLEMENTED: nothing is lost, and
    that peer is sent single calls from then on."""
    peer = GatedPeer()
    server, endpoint = await _serve(peer, batches=False)
    pool = PeerPool(1 << 20)
    try:
        tags = [f"o{i}" for i in range(6)]
        calls = _calls(pool, endpoint, "m", tags)
        await _until(lambda: _waiting(pool, endpoint, "m") == 6 - MAX_BATCHES_IN_FLIGHT)
        peer.gate.set()
        assert await asyncio.gather(*calls) == [t.encode()[::-1] + t.encode() for t in tags]
        assert peer.singles == 6
        assert endpoint in pool._unbatched
        assert await pool.call(endpoint, INFER, b"x", [("x-tag", "later")], None, "m") == \
            b"xlater"
        assert not pool._lanes
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_peer_that_goes_away_fails_every_waiting_call_as_unreachable():
    peer = GatedPeer()
    server, endpoint = await _serve(peer)
    pool = PeerPool(1 << 20)
    try:
        calls = _calls(pool, endpoint, "m", [f"g{i}" for i in range(6)])
        await _until(lambda: _waiting(pool, endpoint, "m") == 6 - MAX_BATCHES_IN_FLIGHT)
        await server.stop(None)  # cancels the calls in flight; the rest find no server
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        assert all(isinstance(r, PeerError) and not r.reached for r in results), results
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_large_request_goes_on_its_own():
    size = MAX_COALESCED_BYTES + 1
    peer = GatedPeer()
    server, endpoint = await _serve(peer)
    pool = PeerPool(1 << 20)
    try:
        peer.gate.set()
        calls = [asyncio.ensure_future(pool.call(endpoint, INFER, b"z" * size,
                                                 [("x-tag", str(i))], None, "m"))
                 for i in range(4)]
        await asyncio.gather(*calls)
        assert peer.singles == 4 and peer.batches == []
    finally:
        await pool.close()
        await server.stop(None)
