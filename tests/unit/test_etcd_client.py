"""EtcdClient: a call whose channel is closed under it (another call switched
endpoints) is retried, not turned into a cancellation of the caller.

The etcd here is a slow stand-in (a gRPC server answering Range after a delay):
a real etcd answers too fast to close its channel mid-call.
"""

from __future__ import annotations

import asyncio

import grpc
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc

from modelmesh.registry.etcd import EtcdClient


class SlowKV(pb_grpc.KVServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()

    async def Range(self, request, context):  # noqa: N802
        self.calls += 1
        self.started.set()
        await asyncio.sleep(0.3)
        return pb.RangeResponse(kvs=[], count=0)


async def test_a_call_survives_another_call_closing_its_channel():
    kv = SlowKV()
    server = grpc.aio.server()
    pb_grpc.add_KVServicer_to_server(kv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endpoint = f"127.0.0.1:{port}"
    client = EtcdClient([endpoint, endpoint], timeout=5)
    try:
        call = asyncio.ensure_future(client.get(b"k"))
        await asyncio.wait_for(kv.started.wait(), 5)
        await client._rotate(client._channel)  # what a failing call does
        assert await asyncio.wait_for(call, 5) is None
        assert kv.calls == 2  # retried on the new channel
    finally:
        await client.close()
        await server.stop(None)
