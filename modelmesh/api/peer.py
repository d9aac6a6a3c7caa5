"""``mmesh.ModelMeshPeer``: forwarded ModelInfer calls from another instance, several a call.

An instance forwarding several requests for one model to this one at once sends
them together (``routing.peers``). Each forwarded call is served here exactly as
a ModelInfer call of its own: admitted with its own credentials by the ingress's
rule, given its own metadata and deadline, routed, timed and answered with its
own status and trailing metadata. One call's failure answers that call only.

The request is taken as bytes and parsed here, so a malformed one is answered
INVALID_ARGUMENT instead of failing in gRPC's deserializer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from modelmesh._proto.mmesh import mesh_peer_pb2 as peer_pb
from modelmesh.api.inference import InferenceServicer
from modelmesh.api.status import answer_error, grpc_code, status_of, trailing_metadata
from modelmesh.errors import Code, InvalidArgument, MeshError
from modelmesh.routing.peers import PEER_SERVICE, metadata_entries, metadata_pairs

#: The most calls one batch may carry (a forwarder sends far fewer).
MAX_CALLS = 256

#: The admission check of one forwarded call (raises Unauthenticated / PermissionDenied).
Admit = Callable[["ForwardedContext"], None]


class ForwardedContext:
    """What a servicer reads and writes of its call, for one call of a batch: its own
    metadata, deadline and answer; the connection's authentication is the batch's."""

    __slots__ = ("_outer", "_metadata", "_deadline", "code", "details", "trailing")

    def __init__(self, outer: grpc.aio.ServicerContext,
                 metadata: list[tuple[str, str | bytes]], timeout: float | None) -> None:
        self._outer = outer
        self._metadata = metadata
        self._deadline = time.monotonic() + timeout if timeout else None
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailing: Sequence[tuple[str, str | bytes]] = ()

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._outer.auth_context()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailing = trailing


class PeerServicer:
    """Serves ``ForwardInferBatch`` through ``inference`` (its ModelInfer handler)."""

    def __init__(self, inference: InferenceServicer, admit: Admit | None) -> None:
        self.inference = inference
        self.admit = admit

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(PEER_SERVICE, {
            "ForwardInferBatch": grpc.unary_unary_rpc_method_handler(self.forward_infer_batch),
        })

    def _error(self, code: Code, message: str) -> peer_pb.ForwardedAnswer:
        return peer_pb.ForwardedAnswer(
            code=grpc_code(code).value[0], details=message,
            trailing=metadata_entries(trailing_metadata(self.inference.node.instance_id)))

    async def forward_infer_batch(self, raw: bytes, context: grpc.aio.ServicerContext
                                  ) -> bytes | None:
        try:
            batch = peer_pb.ForwardInferBatchRequest.FromString(raw)
        except DecodeError:
            batch = None
        del raw
        if batch is None or len(batch.calls) > MAX_CALLS:
            error = InvalidArgument("not a ForwardInferBatchRequest" if batch is None else
                                    f"a batch carries at most {MAX_CALLS} calls")
            answer_error(context, *status_of(error),
                         trailing_metadata(self.inference.node.instance_id))
            return None
        # One task per call (gather), each in a copy of this context: the trust that
        # admitting one call decides stays with that call.
        answers = await asyncio.gather(*(self._one(call, context) for call in batch.calls))
        return peer_pb.ForwardInferBatchResponse(answers=answers).SerializeToString()

    async def _one(self, call: peer_pb.ForwardedCall,
                   outer: grpc.aio.ServicerContext) -> peer_pb.ForwardedAnswer:
        timeout = call.timeout_seconds
        if not math.isfinite(timeout) or timeout < 0:  # not a deadline anyone set
            return self._error(Code.INVALID_ARGUMENT, "a forwarded call's timeout must be a "
                               "number of seconds, 0 for none")
        context = ForwardedContext(outer, metadata_pairs(call.metadata), timeout or None)
        if self.admit is not None:
            try:
                self.admit(context)
            except MeshError as exc:
                return self._error(*status_of(exc))
        try:
            served = self.inference.ModelInferRaw(call.request, context)
            response = await (asyncio.wait_for(served, timeout) if timeout else served)
        except TimeoutError:
            return self._error(Code.DEADLINE_EXCEEDED,
                               "the forwarded call's deadline passed before its answer")
        if context.code is not grpc.StatusCode.OK or response is None:
            return peer_pb.ForwardedAnswer(code=context.code.value[0], details=context.details,
                                           trailing=metadata_entries(context.trailing))
        return peer_pb.ForwardedAnswer(response=response)
