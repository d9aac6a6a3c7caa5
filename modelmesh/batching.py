"""Running predictions: inline or in threads, and merging concurrent requests.

A small model spends most of a prediction in per-call overhead (input validation,
dispatch), not in per-row work: scikit-learn's LogisticRegression takes about as
long for 16 rows as for one. Requests for the same model that arrive close together
are stacked along the first (batch) axis, predicted in one call and split back.

How long a batch stays open adapts to the traffic: a batch waits up to
``max_delay`` for company only while waiting has been paying off (recent waiting
batches served on average at least two requests); otherwise it closes as soon as the requests
already ready in the event loop have joined it (one loop turn, served by the request
that opened it), and while even that has not been finding company a request runs at
once, so a lone client pays nothing but an occasional probe (one batch in
``PROBE_EVERY``). A model starts without that evidence: its first batches do not
wait (so a cold model's first request does not wait for company either), and its
``FIRST_PROBE``-th does, to learn early whether waiting pays. Only models that declare
row-wise outputs (``LoadedModel.batchable``) and requests without parameters are
merged; a batch whose outputs cannot be split by rows, or that the model rejects,
is run again one request at a time, so every request gets exactly the answer (or
error) it would have got alone.

Per-model state (typical compute time, batching traffic) lives while the model
is served; ``PredictionRunner.forget`` drops it once the model's last request
has finished, so models that come and go leave nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from modelmesh.runtimes.base import LoadedModel
from modelmesh.tensor import Parameters, Tensor

#: Models up to this size take their first prediction's place (inline or in a thread)
#: from the small models of their kind.
SMALL_MODEL_BYTES = 1 << 20

#: When waiting has not been paying off, one batch opening in this many waits anyway,
#: to notice that traffic has picked up.
PROBE_EVERY = 256
#: A model's first batches do not wait (a cold model's first request would pay the
#: whole delay for company that is usually not there); this one waits, to find out.
FIRST_PROBE = 16
#: Below this moving average of company, a batch that would not wait is not opened at
#: all (a lone caller's requests run at once); ``PROBE_EVERY`` still opens one.
LONE = 0.01

# Runs a prediction: (inputs, requested outputs) -> (outputs, compute ns). It is
# awaited, so the data plane decides whether that happens inline or in a thread.
Predict = Callable[[list[Tensor], Sequence[str]], Awaitable[tuple[list[Tensor], int]]]


def batch_key(inputs: Sequence[Tensor], requested: Sequence[str]) -> tuple | None:
    """What requests must share to be merged, or None when this one cannot be."""
    if not inputs:
        return None
    rows = None
    key: list[object] = []
    for t in inputs:
        if t.parameters or t.data.ndim == 0:
            return None
        n = t.data.shape[0]
        if rows is None:
            rows = n
        elif n != rows:
            return None  # inputs disagree on the batch size: leave it to the model
        key.append((t.name, t.datatype, t.data.dtype.str, t.data.shape[1:]))
    return (tuple(key), tuple(requested))


@dataclass
class _Pending:
    inputs: list[list[Tensor]] = field(default_factory=list)
    futures: list[asyncio.Future[tuple[list[Tensor], int]]] = field(default_factory=list)
    rows: int = 0
    traffic: _Traffic | None = None  # set when this batch waited for company


@dataclass
class _Traffic:
    """Per model: has waiting for company been paying off lately?"""

    #: Moving average of (requests - 1) in batches that waited; none has yet.
    company: float = 0.0
    #: The same over batches that did not wait (those that joined in one loop turn).
    ready_company: float = 1.0
    openings: int = 0


@dataclass
class BatchStats:
    batches: int = 0  # predictions that served more than one request
    merged_requests: int = 0  # requests served by those
    fallbacks: int = 0  # batches re-run one request at a time


class Batcher:
    """Per-model merging of requests that arrive in the same loop turn."""

    def __init__(self, max_rows: int = 256, max_delay: float = 0.001,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.on_batch = on_batch
        self._pending: dict[tuple, _Pending] = {}
        self._traffic: dict[str, _Traffic] = {}
        self.stats = BatchStats()

    def alone(self, model_id: str) -> bool:
        """Whether a request should run at once, without a batch: no batch is open and
        recent ones that did not wait found no company (``LONE``), so not even a loop
        turn is spent looking for it; one in ``PROBE_EVERY`` still opens a batch."""
        if self._pending:
            return False
        traffic = self._traffic.get(model_id)
        if traffic is None or traffic.ready_company >= LONE or traffic.company >= 1.0 \
                or (traffic.openings + 1) % PROBE_EVERY == 0:
            return False
        traffic.openings += 1
        return True

    def forget(self, model_id: str) -> None:
        """Drop the model's traffic history (a batch still open keeps its own reference)."""
        self._traffic.pop(model_id, None)

    async def predict(self, model_id: str, key: tuple, inputs: list[Tensor],
                      requested: Sequence[str], run: Predict) -> tuple[list[Tensor], int]:
        """This request's outputs and its share of the compute time (ns)."""
        loop = asyncio.get_running_loop()
        full_key = (model_id, key)
        pending = self._pending.get(full_key)
        rows = inputs[0].data.shape[0]
        if pending is not None and pending.rows + rows > self.max_rows:
            self._close(full_key)
            pending = None
        if pending is None:
            traffic = self._traffic.get(model_id)
            if traffic is None:
                traffic = self._traffic[model_id] = _Traffic()
            traffic.openings += 1
            probe = traffic.openings % PROBE_EVERY == 0 or traffic.openings == FIRST_PROBE
            wait = self.max_delay > 0 and (traffic.company >= 1.0 or probe)
            pending = self._pending[full_key] = _Pending()
            if not wait:
                return await self._lead(full_key, pending, inputs, rows, requested, run,
                                        traffic)
            pending.traffic = traffic
            loop.call_later(self.max_delay, self._flush, full_key, pending, requested, run)
        future: asyncio.Future[tuple[list[Tensor], int]] = loop.create_future()
        pending.inputs.append(inputs)
        pending.futures.append(future)
        pending.rows += rows
        return await future

    async def _lead(self, full_key: tuple, pending: _Pending, inputs: list[Tensor], rows: int,
                    requested: Sequence[str], run: Predict,
                    traffic: _Traffic) -> tuple[list[Tensor], int]:
        """A batch that waits for no one: the requests already ready in the event loop
        join it during one turn of the loop; then it is served. A request still alone
        (a lone caller's every request) runs itself, with no task, future or callback."""
        own: asyncio.Future[tuple[list[Tensor], int]] = asyncio.get_running_loop().create_future()
        pending.inputs.append(inputs)
        pending.futures.append(own)
        pending.rows += rows
        try:
            await asyncio.sleep(0)  # one loop turn, as a flush scheduled with call_soon
        except BaseException:
            # Cancelled: the requests that joined are served without this one.
            del pending.inputs[0], pending.futures[0]
            pending.rows -= rows
            if pending.futures:
                self._flush(full_key, pending, requested, run)
            else:
                self._close_if(full_key, pending)
            raise
        traffic.ready_company = 0.8 * traffic.ready_company + 0.2 * (len(pending.futures) - 1)
        if len(pending.futures) == 1:
            self._close_if(full_key, pending)
            return await run(inputs, requested)
        self._flush(full_key, pending, requested, run)
        return await own

    def _close_if(self, full_key: tuple, pending: _Pending) -> None:
        if self._pending.get(full_key) is pending:
            del self._pending[full_key]

    def _close(self, full_key: tuple) -> None:
        self._pending.pop(full_key, None)  # its flush is already scheduled

    def _flush(self, full_key: tuple, pending: _Pending, requested: Sequence[str],
               run: Predict) -> None:
        self._close_if(full_key, pending)
        if pending.traffic is not None:
            pending.traffic.company = (0.8 * pending.traffic.company
                                       + 0.2 * (len(pending.futures) - 1))
            if len(pending.futures) > 1:  # company again: look for it in loop turns too
                pending.traffic.ready_company = max(pending.traffic.ready_company, 1.0)
        task = asyncio.get_running_loop().create_task(self._serve(pending, requested, run))
        # The futures carry every outcome; keep a reference until the task is done.
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)

    async def _serve(self, pending: _Pending, requested: Sequence[str], run: Predict) -> None:
        futures = pending.futures
        if len(futures) == 1:
            await _settle(futures[0], run(pending.inputs[0], requested))
            return
        try:
            merged = [Tensor(t.name, t.datatype,
                             np.concatenate([req[i].data for req in pending.inputs]))
                      for i, t in enumerate(pending.inputs[0])]
            outputs, compute_ns = await run(merged, requested)
            parts = _split(outputs, [req[0].data.shape[0] for req in pending.inputs])
        except Exception:  # noqa: BLE001 - re-run alone: each request gets its own answer
            parts = None
        if parts is None:
            self.stats.fallbacks += 1
            for inputs, future in zip(pending.inputs, futures, strict=True):
                await _settle(future, run(inputs, requested))
            return
        self.stats.batches += 1
        self.stats.merged_requests += len(futures)
        if self.on_batch is not None:
            self.on_batch(len(futures))
        share = compute_ns // len(futures)
        for part, future in zip(parts, futures, strict=True):
            if not future.done():
                future.set_result((part, share))


_RUNNING: set[asyncio.Task[None]] = set()


async def _settle(future: asyncio.Future, call: Awaitable[tuple[list[Tensor], int]]) -> None:
    try:
        result = await call
    except BaseException as exc:  # noqa: BLE001 - handed to the request that made it
        if not future.done():
            future.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
        return
    if not future.done():
        future.set_result(result)


def _split(outputs: list[Tensor], rows: list[int]) -> list[list[Tensor]] | None:
    """Each request's rows of every output; None if an output is not one row per input row."""
    total = sum(rows)
    if any(t.data.ndim == 0 or t.data.shape[0] != total for t in outputs):
        return None
    bounds = np.cumsum(rows)[:-1]
    per_output = [np.split(t.data, bounds) for t in outputs]
    return [[Tensor(t.name, t.datatype, pieces[i], t.parameters)
             for t, pieces in zip(outputs, per_output, strict=True)]
            for i in range(len(rows))]


class _ModelState:
    """What the runner keeps per model while the model is served."""

    __slots__ = ("typical_ns", "in_flight", "forgotten")

    def __init__(self) -> None:
        self.typical_ns = 0  # moving average of compute ns (0: not measured yet)
        self.in_flight = 0  # predict() calls not finished (waiting in a batch or running)
        self.forgotten = False  # forget() was called: drop the state when in_flight is 0


class PredictionRunner:
    """Where a loaded model's predictions run: inline or in a thread, merged or alone.

    Shared by the mesh's data plane and the ``modelmesh runtime`` server. A model
    whose predictions usually take less than ``inline_ms`` runs on the event loop
    (a thread hop costs more than it does); others run in ``executor``. Requests
    without parameters for a row-wise model go through a :class:`Batcher`.
    """

    def __init__(self, executor: Executor, inline_ms: float = 1.0, max_batch_rows: int = 256,
                 max_batch_delay_ms: float = 1.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.executor = executor
        self.inline_ns = int(inline_ms * 1e6)
        self.batching = max_batch_rows > 1
        self.batcher = Batcher(max_batch_rows, max_batch_delay_ms / 1000, on_batch=on_batch)
        self._models: dict[str, _ModelState] = {}
        #: Recent compute ns of small models, by LoadedModel class (``_first_guess``).
        self._small_by_kind: dict[type, int] = {}

    def typical_ns(self, model_id: str) -> int:
        """Recent compute time of one prediction of the model (0: not measured yet)."""
        state = self._models.get(model_id)
        return state.typical_ns if state is not None else 0

    def tracked(self) -> int:
        """How many models the runner holds state for."""
        return len(self._models)

    def forget(self, model_id: str) -> None:
        """Drop the model's state: now if no prediction of it is running or waiting
        in a batch, else when the last one finishes (they complete normally)."""
        state = self._models.get(model_id)
        if state is None:
            self.batcher.forget(model_id)
        elif state.in_flight:
            state.forgotten = True
        else:
            self._drop(model_id, state)

    def _drop(self, model_id: str, state: _ModelState) -> None:
        if self._models.get(model_id) is state:
            del self._models[model_id]
        self.batcher.forget(model_id)

    async def predict(self, model_id: str, model: LoadedModel, inputs: list[Tensor],
                      params: Parameters, requested: Sequence[str]) -> tuple[list[Tensor], int]:
        """The model's outputs for ``inputs`` and the compute ns charged to this request."""
        state = self._models.get(model_id)
        if state is None:
            state = self._models[model_id] = _ModelState()
        state.in_flight += 1
        try:
            key = None
            if self.batching and not params and model.batchable \
                    and not self.batcher.alone(model_id):
                key = batch_key(inputs, requested)
            if key is None:
                return await self._run(state, model, inputs, params, requested)
            return await self.batcher.predict(
                model_id, key, inputs, requested,
                lambda ins, req: self._run(state, model, ins, params, req))
        finally:
            state.in_flight -= 1
            if state.forgotten and not state.in_flight:
                self._drop(model_id, state)

    async def _run(self, state: _ModelState, model: LoadedModel, inputs: list[Tensor],
                   params: Parameters, requested: Sequence[str]) -> tuple[list[Tensor], int]:
        typical = state.typical_ns or self._first_guess(model)
        if 0 < typical < self.inline_ns:
            outputs, ns = _timed(model, inputs, params, requested)
        else:
            outputs, ns = await asyncio.get_running_loop().run_in_executor(
                self.executor, _timed, model, inputs, params, requested)
        own = state.typical_ns
        state.typical_ns = ns if not own else (own * 7 + ns) // 8
        if model.size_bytes <= SMALL_MODEL_BYTES:
            kind = type(model)
            seen = self._small_by_kind.get(kind, 0)
            self._small_by_kind[kind] = ns if not seen else (seen * 15 + ns) // 16
        return outputs, ns

    def _first_guess(self, model: LoadedModel) -> int:
        """A first prediction's likely time: that of the small models of its kind lately.

        Only for a small model, so that a model just loaded for a cold request is not
        sent to a thread for its first answer when its kind answers in microseconds
        (a large one, which may be slow, is measured in a thread first).
        """
        if model.size_bytes > SMALL_MODEL_BYTES:
            return 0
        return self._small_by_kind.get(type(model), 0)


def _timed(model: LoadedModel, inputs: list[Tensor], params: Parameters,
           requested: Sequence[str]) -> tuple[list[Tensor], int]:
    start = time.perf_counter_ns()
    outputs = model.predict_outputs(inputs, params, requested)
    return outputs, time.perf_counter_ns() - start
