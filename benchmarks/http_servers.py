"""Which HTTP server for the REST transport: requests per second for a small V2 JSON infer.

Each candidate runs in its own process (one event loop, as the mesh would run it) with the
same handler: parse a small V2 infer body with orjson, turn its data into numpy, answer the
V2 JSON response. A load generator in this process keeps ``--connections`` keep-alive
connections busy, each with ``--pipeline`` requests outstanding, so the server (not the
client) is the bottleneck, and counts answers for ``--seconds`` after a warm-up.

    python benchmarks/http_servers.py [--seconds 5] [--connections 8] [--pipeline 8]

Candidates: raw ASGI on uvicorn with httptools (what ``modelmesh/rest`` uses) and with h11,
aiohttp's low-level server and aiohttp.web. granian cannot share the mesh's asyncio loop
(its workers are its own), and Starlette / FastAPI are slower layers over the same ASGI
(not installed here).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import time

import numpy as np
import orjson

BODY = orjson.dumps({"id": "1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                            "data": [5.1, 3.5, 1.4, 0.2]}]})
REQUEST = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
           b"\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
SERVERS = ("uvicorn-httptools", "uvicorn-h11", "aiohttp-lowlevel", "aiohttp-web")


def answer(body: bytes) -> bytes:
    doc = orjson.loads(body)
    x = doc["inputs"][0]
    data = np.asarray(x["data"], dtype=np.float32)
    return orjson.dumps({"model_name": "m", "id": doc.get("id", ""), "outputs": [
        {"name": "x", "datatype": "FP32", "shape": x["shape"], "data": data}]},
        option=orjson.OPT_SERIALIZE_NUMPY)


async def asgi(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    out = answer(b"".join(chunks))
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def serve(name: str, port: int) -> None:
    if name.startswith("uvicorn"):
        import uvicorn

        http = "httptools" if name.endswith("httptools") else "h11"
        uvicorn.run(asgi, host="127.0.0.1", port=port, http=http, loop="asyncio",
                    lifespan="off", access_log=False, log_level="warning")
        return
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=answer(await request.read()), content_type="application/json")

    if name == "aiohttp-web":
        app = web.Application()
        app.router.add_post("/v2/models/{m}/infer", handler)
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
        return

    async def main() -> None:
        server = web.Server(handler, access_log=None)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


_LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)


async def connection(port: int, pipeline: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buf = b""
    batch = REQUEST * pipeline
    while time.perf_counter() < stop_at:
        writer.write(batch)
        pending = pipeline
        while pending:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                buf += await reader.read(1 << 16)
                continue
            m = _LENGTH.search(buf, 0, end)
            total = end + 4 + (int(m.group(1)) if m else 0)
            while len(buf) < total:
                buf += await reader.read(1 << 16)
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(buf[:200])
            buf = buf[total:]
            pending -= 1
            counts[0] += 1
    writer.close()


async def load(port: int, seconds: float, connections: int, pipeline: int) -> float:
    warm = [0]
    await asyncio.gather(*(connection(port, pipeline, time.perf_counter() + 1.0, warm)
                           for _ in range(connections)))
    counts = [0]
    start = time.perf_counter()
    await asyncio.gather(*(connection(port, pipeline, start + seconds, counts)
                           for _ in range(connections)))
    return counts[0] / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--pipeline", type=int, default=8)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=SERVERS, default=list(SERVERS))
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    print(f"| server | req/s ({args.connections} connections x {args.pipeline} pipelined) |")
    print("|---|---|")
    for name in args.only:
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", name, "--port", str(port)])
        try:
            wait_listening(port, proc)
            rate = asyncio.run(load(port, args.seconds, args.connections, args.pipeline))
            print(f"| {name} | {rate:,.0f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
