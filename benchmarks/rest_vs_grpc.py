"""REST vs gRPC through one mesh instance: the same model, the same tensor, concurrency 1 and 16.

Starts ``modelmesh serve --demo`` (embedded etcd) and drives it with tritonclient's asyncio
clients (``tritonclient.grpc.aio``, ``tritonclient.http.aio`` with binary tensors) for
``--seconds`` per row after a warm-up; prints requests per second and median / p99 latency.

    python benchmarks/rest_vs_grpc.py [--seconds 5] [--model iris-sklearn]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time

import numpy as np

from modelmesh.registry.embedded import free_port


async def run(kind: str, endpoint: str, model: str, concurrency: int, seconds: float) -> tuple[
        float, float, float]:
    if kind == "grpc":
        import tritonclient.grpc.aio as mod
    else:
        import tritonclient.http.aio as mod  # type: ignore[no-redef]
    client = mod.InferenceServerClient(endpoint)
    x = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
    inp = mod.InferInput("input__0", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    latencies: list[float] = []

    async def worker(stop_at: float, record: bool) -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await client.infer(model, [inp])
            if record:
                latencies.append(time.perf_counter() - t)

    try:
        await asyncio.gather(*(worker(time.perf_counter() + 1.0, False)
                               for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    ms = np.array(latencies) * 1000
    return len(latencies) / elapsed, float(np.median(ms)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--model", default="iris-sklearn")
    args = parser.parse_args()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh", "serve", "--demo", "--port", str(port),
             "--http-port", str(http_port), "--metrics-port", "-1", "--data-dir", f"{tmp}/d",
             "--models-root", f"{tmp}/m", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # bounded by the process: it prints once it is ready
                if "ready on port" in line:
                    break
            print("| protocol | concurrency | req/s | p50 ms | p99 ms |")
            print("|---|---|---|---|---|")
            for concurrency in (1, 16):
                for kind, endpoint in (("grpc", f"127.0.0.1:{port}"),
                                       ("rest", f"127.0.0.1:{http_port}")):
                    rate, p50, p99 = asyncio.run(run(kind, endpoint, args.model, concurrency,
                                                     args.seconds))
                    print(f"| {kind} | {concurrency} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |",
                          flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
