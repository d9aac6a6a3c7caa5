"""Ray Serve model multiplexing over scikit-learn files: the Ray peer of the benchmarks.

Run by ``.venv-ray/bin/python`` (scripts/setup-ray), never imported by the mesh's
environment: Ray needs protobuf 7. ``benchmarks/ray_peer.py`` starts and stops it.

    ray_multiplex.py --models-root DIR --max-models N --port 8000 --temp-dir DIR \
        --ready-file FILE

One deployment with one replica. Its ``@serve.multiplexed`` loader turns a model id
into the file ``<models-root>/<id>.pkl`` (a scikit-learn model, read with
``joblib.load`` as the mesh's scikit-learn runtime reads it) and Ray
keeps at most ``--max-models`` of them, evicting the least recently used: Ray's own
load-on-first-request cache, the thing compared with the mesh's.

HTTP, on 127.0.0.1, route prefix ``/``, on two ports: Serve's proxy (``--port``) and,
in throughput-optimized mode, the replica's own "direct ingress" port (Ray picks it
from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` up), which skips the proxy hop. Once
the app answers, ``--ready-file`` gets ``{"proxy_port": ..., "direct_port": ...}``
(``direct_port`` null when there is none).
- ``POST /v2/models/<id>/infer`` with the header ``serve_multiplexed_model_id: <id>``
  and a KServe V2 JSON body (one FP32 input): answers the ``predict`` output (INT64 [N]).
  Ray routes by the header, so the header is what names the model (the path is
  accepted as any V2 client would send it);
- ``GET /stats``: the replica's own counters as JSON: ``requests``, ``misses``
  (requests whose model was not held when they arrived), ``loads`` (calls of the
  loader), ``load_cpu_s`` (thread CPU time spent in them), ``held`` (models held now).

Configuration, Ray's fastest for this rather than its defaults: throughput-optimized
mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, set by the starter), ``max_ongoing_requests``
256 (room for every caller of the benchmarks), access log off and Serve's logs at
WARNING, no dashboard, usage stats off. The load runs in a worker thread so requests
for held models are served while a load is in progress (Ray itself runs one load at
a time per replica and lets concurrent first requests wait for the same load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

MAX_ONGOING = 256


class HeldModel:
    """A loaded model; Ray calls ``__del__`` when it evicts one, which we count."""

    def __init__(self, model_id: str, estimator: Any, held: dict[str, HeldModel]) -> None:
        self.model_id, self.estimator, self._held = model_id, estimator, held
        held[model_id] = self

    def __del__(self) -> None:
        # Ray calls this on eviction and the garbage collector again later: only the
        # first call, and only for the copy still registered under this id, counts.
        if self._held.get(self.model_id) is self:
            del self._held[self.model_id]


def build_app(models_root: str, max_models: int) -> Any:
    """The Serve application: one multiplexed deployment, one replica."""

    @serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING,
                      ray_actor_options={"num_cpus": 0},
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class MultiplexedSklearn:
        def __init__(self) -> None:
            self.root = Path(models_root).resolve()
            self.held: dict[str, HeldModel] = {}
            self.requests = self.misses = self.loads = 0
            self.load_cpu_s = 0.0
            self.lock = threading.Lock()

        def _read(self, model_id: str) -> tuple[Any, float]:
            t0 = time.thread_time()
            path = (self.root / f"{model_id}.pkl").resolve()
            if path.parent != self.root:
                raise ValueError(f"model id {model_id!r} names no file under the models root")
            estimator = joblib.load(path)
            return estimator, time.thread_time() - t0

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> HeldModel:
            estimator, cpu = await asyncio.to_thread(self._read, model_id)
            self.loads += 1
            self.load_cpu_s += cpu
            return HeldModel(model_id, estimator, self.held)

        async def __call__(self, request: Request) -> Response:
            if request.url.path.rstrip("/") == "/stats":
                return _json({"requests": self.requests, "misses": self.misses,
                              "loads": self.loads, "load_cpu_s": self.load_cpu_s,
                              "held": len(self.held)})
            model_id = serve.get_multiplexed_model_id()
            if not model_id:
                return _json({"error": "no serve_multiplexed_model_id header"}, 400)
            body = json.loads(await request.body())
            tensor = body["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            self.requests += 1
            if model_id not in self.held:
                self.misses += 1
            model = await self.get_model(model_id)
            labels = np.asarray(model.estimator.predict(x)).astype(np.int64).reshape(-1)
            return _json({"model_name": model_id, "outputs": [
                {"name": "predict", "datatype": "INT64", "shape": [len(labels)],
                 "data": labels.tolist()}]})

    return MultiplexedSklearn.bind()


def _json(doc: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(doc).encode(), status_code=status,
                    media_type="application/json")


def direct_ingress_port() -> int | None:
    """The port the replica serves HTTP on itself, found by asking the candidates."""
    import urllib.request

    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
        return None
    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    high = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for port in range(low, min(high, low + 20)):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
                    if "loads" in json.loads(r.read()):
                        return port
            except (OSError, ValueError):
                continue
        time.sleep(0.2)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-root", required=True)
    ap.add_argument("--max-models", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--temp-dir", required=True, help="Ray's session files go here")
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--object-store-mb", type=int, default=80)
    args = ap.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=args.temp_dir,
             object_store_memory=args.object_store_mb << 20, log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    serve.run(build_app(args.models_root, args.max_models), name="multiplex",
              route_prefix="/", blocking=False)
    # After ray.init, which installs handlers of its own that end the process at once.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ports = {"proxy_port": args.port, "direct_port": direct_ingress_port()}
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(json.dumps(ports))
    tmp.rename(args.ready_file)
    print(f"ray-multiplex ready: {ports} (pid {os.getpid()})", flush=True)
    stop.wait()
    # The starter bounds this: Ray's graceful shutdown can take tens of seconds, after
    # which it kills this process group.
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
