"""Pooled gRPC channels to the other instances, and raw-bytes calls over them.

One channel per peer endpoint, created on first use and reused by every request
(a channel multiplexes any number of concurrent calls over one HTTP/2
connection). Calls take and return serialized messages: a forwarded request is
never parsed on the way through.

Forwarded ModelInfer calls for one model to one peer are coalesced: while
``MAX_BATCHES_IN_FLIGHT`` calls to that peer for that model are on their way,
the next requests wait for one of them to come back and then go together in
one ``mmesh.ModelMeshPeer/ForwardInferBatch`` call (``api.peer`` serves it),
each with its own metadata and deadline and answered with its own status. A
request goes at once while fewer are on their way (a lone one never waits);
under load each side pays one gRPC call for several requests. Only requests
for the same model share a call, so a slow model never delays another's
answers. A peer that does not know the method (an older version) gets single
calls from then on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from modelmesh._proto.mmesh import mesh_peer_pb2 as peer_pb
from modelmesh.errors import Code
from modelmesh.headers import INFER, INSTANCE
from modelmesh.metrics import Metrics

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]


class PeerError(Exception):
    """A peer answered a forwarded call with a non-OK status (passed on to the client)."""

    def __init__(self, code: Code, details: str, trailing: Metadata,
                 reached: bool) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = dict((k, v if isinstance(v, str) else v.decode(errors="replace"))
                             for k, v in trailing or ())
        #: False when the peer's mesh code never answered (connection refused, reset):
        #: the peer is down or unreachable, so another instance should be tried.
        self.reached = reached


#: How long a channel to a peer that left is kept for the calls still on it (seconds).
CLOSE_GRACE_S = 30.0

#: The peers' service (``api.peer`` serves it) and its one method.
PEER_SERVICE = peer_pb.DESCRIPTOR.services_by_name["ModelMeshPeer"].full_name
BATCH_METHOD = f"/{PEER_SERVICE}/ForwardInferBatch"
#: Calls to one peer for one model on their way before further requests wait to be batched.
MAX_BATCHES_IN_FLIGHT = 2
#: The most requests one batch carries (the peer accepts up to 256).
MAX_BATCH_CALLS = 64
#: Requests larger than this go on their own: their bytes, not the call, cost most.
MAX_COALESCED_BYTES = 64 * 1024


@dataclass(slots=True)
class _Queued:
    request: bytes
    metadata: Metadata
    deadline: float | None  # loop time
    answer: asyncio.Future[bytes]

    def timeout(self, now: float) -> float | None:
        """Seconds left of the caller's deadline (a little over 0 once it has passed)."""
        return None if self.deadline is None else max(self.deadline - now, 0.001)


@dataclass(slots=True)
class _Lane:
    """The requests for one model to one peer waiting for a batch, and the batches out."""

    waiting: deque[_Queued] = field(default_factory=deque)
    in_flight: int = 0


def metadata_entries(pairs: Metadata) -> list[peer_pb.PeerMetadata]:
    """Call metadata as ``PeerMetadata`` entries (text values in UTF-8)."""
    return [peer_pb.PeerMetadata(key=k, value=v.encode() if isinstance(v, str) else v)
            for k, v in pairs]


def metadata_pairs(entries: Sequence[peer_pb.PeerMetadata]) -> list[tuple[str, str | bytes]]:
    """``PeerMetadata`` entries as gRPC gives metadata: text, or bytes for ``-bin`` keys."""
    out: list[tuple[str, str | bytes]] = []
    for e in entries:
        key = e.key.lower()
        out.append((key, e.value if key.endswith("-bin")
                    else e.value.decode("utf-8", errors="replace")))
    return out


#: A status code's number (as a batch answer carries it) as the domain's code.
_CODE_BY_NUMBER = {s.value[0]: Code[s.name] for s in grpc.StatusCode}


@dataclass(frozen=True)
class PeerSecurity:
    """TLS towards peers: credentials (made per new channel, so a rotated certificate is
    used by the next one) and the name peers' certificates must carry."""

    credentials: Callable[[], grpc.ChannelCredentials]
    server_name: str


class PeerPool:
    def __init__(self, max_message_bytes: int, security: PeerSecurity | None = None,
                 metrics: Metrics | None = None) -> None:
        self.security = security
        self.metrics = metrics
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.enable_retries", 0),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable] = {}
        self._max_batch_bytes = max_message_bytes // 2
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._unbatched: set[str] = set()  # peers without ForwardInferBatch
        self._batches: set[asyncio.Task[None]] = set()

    def _call(self, endpoint: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        key = (endpoint, method)
        call = self._calls.get(key)
        if call is None:
            channel = self._channels.get(endpoint)
            if channel is None:
                sec = self.security
                if sec is None:
                    channel = grpc.aio.insecure_channel(endpoint, options=self._options)
                else:  # peers are addressed by IP: verify the mesh's own name instead
                    channel = grpc.aio.secure_channel(
                        endpoint, sec.credentials(),
                        options=[*self._options, ("grpc.ssl_target_name_override",
                                                  sec.server_name)])
                self._channels[endpoint] = channel
            call = channel.unary_unary(method, request_serializer=None,
                                       response_deserializer=None)
            self._calls[key] = call
        return call

    async def call(self, endpoint: str, method: str, request: bytes, metadata: Metadata,
                   timeout: float | None, model_id: str = "") -> bytes:
        """Send ``request`` bytes to ``method`` on the peer; returns the response bytes.

        Raises ``PeerError`` for any non-OK status, and for a call cancelled under
        this request by its channel closing (``reached`` False: try another copy).
        A ModelInfer request naming its ``model_id`` may travel in a batch with
        others for that model (see the module docstring).
        """
        if method == INFER and model_id and len(request) <= MAX_COALESCED_BYTES \
                and endpoint not in self._unbatched:
            return await self._coalesced(endpoint, model_id, request, metadata, timeout)
        return await self._single(endpoint, method, request, metadata, timeout)

    async def _single(self, endpoint: str, method: str, request: bytes, metadata: Metadata,
                      timeout: float | None) -> bytes:
        try:
            return await self._call(endpoint, method)(request, metadata=metadata,
                                                      timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            trailing = exc.trailing_metadata() or ()
            reached = any(k == INSTANCE for k, _ in trailing)
            raise PeerError(Code[exc.code().name], exc.details() or "", trailing,
                            reached) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request itself is being cancelled
            # grpc.aio raises CancelledError in the caller when the *call* was cancelled
            # locally (its channel closed): not the client's doing, so not its answer.
            raise PeerError(Code.CANCELLED, f"the channel to {endpoint} closed during the call",
                            (), reached=False) from None
        except Exception as exc:  # grpc's ExecuteBatchError has no public class
            # The call could not even be sent (metadata gRPC refuses): our mistake, and
            # another peer would refuse it too, so it is not a reason to try elsewhere.
            raise PeerError(Code.INTERNAL, f"could not send {method} to {endpoint}: "
                            f"{type(exc).__name__}: {exc}", (), reached=True) from None

    # -- batches of forwarded ModelInfer calls --------------------------------------------

    async def _coalesced(self, endpoint: str, model_id: str, request: bytes,
                         metadata: Metadata, timeout: float | None) -> bytes:
        key = (endpoint, model_id)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        deadline = None if timeout is None else loop.time() + timeout
        lane.waiting.append(_Queued(request, metadata, deadline, answer))
        if lane.in_flight < MAX_BATCHES_IN_FLIGHT:
            self._send(key, lane)
        # A request cancelled here (its client gave up) cancels its future only: the
        # batch it is in, if sent, goes on for the others.
        return await answer

    def _send(self, key: tuple[str, str], lane: _Lane) -> None:
        """Send the waiting requests of ``lane`` (as many as one batch takes) in one call."""
        batch: list[_Queued] = []
        size = 0
        while lane.waiting and len(batch) < MAX_BATCH_CALLS:
            item = lane.waiting[0]
            if batch and size + len(item.request) > self._max_batch_bytes:
                break
            lane.waiting.popleft()
            if item.answer.done():  # cancelled while waiting: nobody wants its answer
                continue
            batch.append(item)
            size += len(item.request)
        if not batch:
            if not lane.waiting and not lane.in_flight:
                self._lanes.pop(key, None)
            return
        lane.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run_batch(key, lane, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, key: tuple[str, str], lane: _Lane,
                         batch: list[_Queued]) -> None:
        endpoint = key[0]
        try:
            if len(batch) == 1:  # alone: a plain call costs the peer less than a batch
                await self._resend(endpoint, batch[0])
                return
            await self._batch_call(endpoint, batch)
        except Exception as exc:  # a bug of ours: the callers get an error, not a hang
            log.exception("forwarding a batch to %s failed", endpoint)
            for item in batch:
                _settle(item.answer, PeerError(Code.INTERNAL, f"forwarding to {endpoint} "
                                               f"failed: {type(exc).__name__}", (),
                                               reached=True))
        finally:
            for item in batch:  # cancelled (the pool closing): the callers must not hang
                _settle(item.answer, PeerError(
                    Code.CANCELLED, f"the call to {endpoint} was cancelled", (), reached=False))
            lane.in_flight -= 1
            self._send(key, lane)

    async def _batch_call(self, endpoint: str, batch: list[_Queued]) -> None:
        if self.metrics is not None:
            self.metrics.forward_batches.inc()
            self.metrics.forwarded_in_batches.inc(len(batch))
        now = asyncio.get_running_loop().time()
        timeouts = [item.timeout(now) for item in batch]
        outer = None if None in timeouts else max(t for t in timeouts if t is not None) + 1.0
        payload = peer_pb.ForwardInferBatchRequest(calls=[
            peer_pb.ForwardedCall(request=item.request,
                                  metadata=metadata_entries(item.metadata),
                                  timeout_seconds=timeout or 0.0)
            for item, timeout in zip(batch, timeouts, strict=True)
        ]).SerializeToString()
        try:
            raw = await self._single(endpoint, BATCH_METHOD, payload, (), outer)
        except PeerError as exc:
            if exc.code is Code.UNIMPLEMENTED and not exc.reached:
                # A peer of an older version: single calls to it from now on.
                log.info("peer %s does not take batched calls; sending them one by one",
                         endpoint)
                self._unbatched.add(endpoint)
                await asyncio.gather(*(self._resend(endpoint, item) for item in batch))
                return
            if exc.code is Code.RESOURCE_EXHAUSTED:
                # The answers together were larger than a message may be: one by one.
                await asyncio.gather(*(self._resend(endpoint, item) for item in batch))
                return
            for item in batch:
                _settle(item.answer, exc)
            return
        try:
            answers = peer_pb.ForwardInferBatchResponse.FromString(raw).answers
        except Exception as exc:  # noqa: BLE001 (protobuf's DecodeError, or worse)
            answers = None
            problem = f"{type(exc).__name__}: {exc}"
        else:
            problem = f"{len(answers)} answers to {len(batch)} calls"
        if answers is None or len(answers) != len(batch):
            for item in batch:
                _settle(item.answer, PeerError(
                    Code.INTERNAL, f"{endpoint} answered a batch wrongly ({problem})", (),
                    reached=True))
            return
        for item, answer in zip(batch, answers, strict=True):
            if answer.code == 0:
                _settle(item.answer, answer.response)
            else:
                trailing = metadata_pairs(answer.trailing)
                _settle(item.answer, PeerError(
                    _CODE_BY_NUMBER.get(answer.code, Code.UNKNOWN), answer.details, trailing,
                    reached=any(k == INSTANCE for k, _ in trailing)))

    async def _resend(self, endpoint: str, item: _Queued) -> None:
        """``item`` in a call of its own."""
        timeout = item.timeout(asyncio.get_running_loop().time())
        try:
            _settle(item.answer, await self._single(endpoint, INFER, item.request,
                                                    item.metadata, timeout))
        except PeerError as exc:
            _settle(item.answer, exc)

    async def forget(self, endpoint: str, grace: float | None = CLOSE_GRACE_S) -> None:
        """Close the channel to a peer that left the mesh.

        New calls get a new channel at once; the calls already on this one have
        ``grace`` seconds to finish (closing a grpc.aio channel cancels its calls,
        and a peer's record can vanish while its last answers are on the way).
        """
        channel = self._channels.pop(endpoint, None)
        for key in [k for k in self._calls if k[0] == endpoint]:
            del self._calls[key]
        self._unbatched.discard(endpoint)
        if channel is not None:
            try:
                await channel.close(grace)
            except asyncio.CancelledError:  # shutting down: do not wait for the calls
                await channel.close()
                raise

    def endpoints(self) -> list[str]:
        return list(self._channels)

    async def close(self, grace: float | None = None) -> None:
        for endpoint in list(self._channels):
            await self.forget(endpoint, grace)


def _settle(future: asyncio.Future[bytes], outcome: bytes | PeerError) -> None:
    """Give ``future`` its answer or error, unless it has one (or was cancelled)."""
    if future.done():
        return
    if isinstance(outcome, PeerError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
