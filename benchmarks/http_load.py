"""A closed-loop HTTP/1.1 keep-alive load generator, light enough not to be the bottleneck.

Raw asyncio protocols (no HTTP library): each of ``concurrency`` connections sends one
prebuilt request, waits for the whole answer (``Content-Length`` framed, as every server
measured answers), records the latency and sends the next. Run in its own process (the
servers' CPU is not shared with it beyond the machine's) by ``benchmarks/dataplane.py``;
prints one JSON object: ``requests_per_s``, ``p50_ms``, ``p99_ms``, ``requests``,
``errors`` (non-200 answers, counted, never hidden) and ``client_cpu`` (the CPU seconds
this process used per second of the run: 1.0 is one core).

Many models (``benchmarks/ray_compare.py``'s churn): with ``models`` (a list of ids) and
``order_file`` (a JSON list of indices into it), ``{model}`` in ``path`` and in header
values is replaced by each request's model, the models taken in that order by all
connections together from ``order_start`` on; the answer adds ``order_next``, where the
next run carries on.

    python http_load.py '{"port": 8008, "path": "/v2/models/m/infer", "body_b64": "...",
                          "headers": {...}, "concurrency": 16, "seconds": 3}'
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import latency_summary


def run_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of this load generator on ``spec``, in a process of its own; its answer."""
    done = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(spec)],
                          capture_output=True, text=True, timeout=spec["seconds"] + 120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"http_load failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.need = -1  # bytes of the answer (head + body) once the head is in
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.run.next_request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                self.status = int(head[9:12])
                at = head.find(b"content-length:")
                length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0
                                   else None]) if at >= 0 else 0
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            del self.buffer[:self.need]
            self.need = -1
            self.run.done(self, time.perf_counter() - self.sent_at, self.status == 200)

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.run.stop_at:  # the server hung up on us: an error
            self.run.errors += 1
            self.run.closed_early += 1
        self.run.lost(self)


class _Run:
    def __init__(self, stop_at: float, record_after: float, requests: list[bytes],
                 order: list[int], cursor: int) -> None:
        self.stop_at, self.record_after = stop_at, record_after
        self.requests, self.order, self.cursor = requests, order, cursor
        self.latencies: list[float] = []
        self.errors = 0
        self.closed_early = 0  # connections the server closed before the end
        self.first_error = 0  # the first non-200 status seen
        self.open = 0
        self.finished = asyncio.get_running_loop().create_future()

    def next_request(self) -> bytes:
        if not self.order:
            return self.requests[0]
        index = self.order[self.cursor % len(self.order)]
        self.cursor += 1
        return self.requests[index]

    def done(self, conn: _Connection, latency: float, ok: bool) -> None:
        now = time.perf_counter()
        if now >= self.record_after:
            if ok:
                self.latencies.append(latency)
            else:
                self.errors += 1
        if not ok and not self.first_error:
            self.first_error = conn.status
        if now < self.stop_at:
            conn.send()
        else:
            assert conn.transport is not None
            conn.transport.close()

    def lost(self, conn: _Connection) -> None:
        self.open -= 1
        if self.open == 0 and not self.finished.done():
            self.finished.set_result(None)


async def load(spec: dict[str, Any]) -> dict[str, float]:
    body = base64.b64decode(spec.get("body_b64", ""))

    def request(model: str) -> bytes:
        headers = "".join(f"{k}: {v.replace('{model}', model)}\r\n"
                          for k, v in spec.get("headers", {}).items())
        path = spec["path"].replace("{model}", model)
        return (f"{spec.get('method', 'POST')} {path} HTTP/1.1\r\nHost: bench\r\n"
                f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body

    models = spec.get("models") or [""]
    order = json.loads(Path(spec["order_file"]).read_text()) if spec.get("order_file") else []
    warmup = float(spec.get("warmup_s", 0.5))
    seconds = float(spec["seconds"])
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    run = _Run(start + warmup + seconds, start + warmup, [request(m) for m in models], order,
               int(spec.get("order_start", 0)))
    for _ in range(int(spec["concurrency"])):
        run.open += 1
        await loop.create_connection(lambda: _Connection(run), "127.0.0.1",
                                     int(spec["port"]))
    # The client's own full collections (35 ms here) would count as every server's tail.
    gc.collect()
    gc.freeze()
    cpu0 = time.process_time()
    await asyncio.sleep(warmup)
    t0 = time.perf_counter()
    await run.finished
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {**latency_summary(run.latencies, elapsed), "errors": run.errors,
            "closed_early": run.closed_early, "first_error_status": run.first_error,
            "client_cpu": round(cpu / (elapsed + warmup), 3), "order_next": run.cursor}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(load(json.loads(sys.argv[1])))))
