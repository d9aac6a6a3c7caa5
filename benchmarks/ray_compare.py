"""The mesh against Ray Serve model multiplexing, side by side in one run.

Both load a model on its first request and evict the least recently used one when
full. Ray runs ``peer_servers/ray_multiplex.py`` (one deployment, one replica,
``@serve.multiplexed``) from .venv-ray, installed here by scripts/setup-ray; the mesh is
one ``modelmesh serve``, driven over gRPC (tritonclient, as every benchmark) and over
its REST port; Ray over HTTP (its direct-ingress port, the fastest it has; the warm
floor is also measured through Serve's proxy). Every request is one [1, 4] FP32 row,
V2 JSON for HTTP, answered with the ``predict`` output.

The models: 500 distinct random forests of 2 trees (``density.write_models``, about
110 KB each), the same files for both, under the same ids. Measured for each server:

- warm floor: one loaded model, 16 callers: req/s, p50, p99;
- cold start: the first request for each of 20 unloaded models, one after another
  (the model library already imported), minus the median warm request, over the
  same transport;
- stampede: 100 concurrent first requests for one unloaded model: loads counted by
  the server itself;
- churn: Zipf 0.9 over the 500 models (``churn.zipf_order``), 16 callers, after the
  server is full and evicting. The mesh's capacity is a third of the models' bytes
  (as churn.py); Ray holds ``max_num_models_per_replica`` = the number of models the
  mesh held at the end of its churn run (the same count, so both cache the same
  files; Ray has no notion of bytes). Reported: req/s, p50, p99, hit ratio (requests
  whose model was held on arrival), loads per miss (the mesh from its Prometheus
  metrics, Ray from the app's counters), and server CPU per load (all the server's
  CPU in the window, less its warm-floor CPU per request times the requests, over
  the loads; Ray also measures its loads' thread CPU itself);
- memory: RSS of the idle server (all Ray's processes summed) before any model, and
  RSS added per model from one model loaded to the churn run's end.

Also on the mesh: the same 500 models when everything fits (capacity 1.5x), the
baseline of ``churn_vs_fitting_throughput_500``, and the churn run with
``--placement lru``. Without peers (``suite --no-peers``) only the mesh rows run.

    .venv/bin/python benchmarks/ray_compare.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from churn import ZIPF_S, cache_counters, load_all, zipf_order  # noqa: E402
from common import (  # noqa: E402
    Processes,
    drive,
    free_port,
    machine,
    register_bulk,
    rss_bytes,
    scrape,
    start_mesh,
    write_result,
)
from density import write_models  # noqa: E402
from ray_peer import MODEL_HEADER, RayPeer, cpu_seconds, ensure_ray_venv, ray_peer  # noqa: E402

N_MODELS = 500
TREES = 2
CONCURRENCY = 16
COLD_MODELS = 20
STAMPEDE = 100
WARM_ID = "c00000"
STAMPEDE_ID = f"c{N_MODELS - COLD_MODELS - 1:05d}"
COLD_IDS = [f"c{i:05d}" for i in range(N_MODELS - COLD_MODELS, N_MODELS)]
LOADS = "modelmesh_loadmodel_milliseconds_count"
ROW = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
BODY = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                               "data": ROW.reshape(-1).tolist()}],
                   "outputs": [{"name": "predict"}]}).encode()
MB = 1e6


# ---------------------------------------------------------------- HTTP clients


def http_drive(port: int, seconds: float, model: str = WARM_ID, order_file: Path | None = None,
               ids: Sequence[str] = (), start: int = 0) -> dict[str, Any]:
    """16 keep-alive callers from ``http_load.py`` (its own process): one model, or ``ids``
    in the order of ``order_file`` from ``start``. Path and header both name the model."""
    spec: dict[str, Any] = {
        "port": port, "path": "/v2/models/{model}/infer", "concurrency": CONCURRENCY,
        "body_b64": base64.b64encode(BODY).decode(), "seconds": seconds,
        "headers": {"Content-Type": "application/json", MODEL_HEADER: "{model}"},
        "models": list(ids) or [model], "warmup_s": 0.5}
    if order_file is not None:
        spec.update(order_file=str(order_file), order_start=start)
    from http_load import run_in_process

    return run_in_process(spec)


def http_infer(port: int, model: str, conn: http.client.HTTPConnection | None = None) -> float:
    """One V2 JSON request; milliseconds to its answer (which must be a 200)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", f"/v2/models/{model}/infer", BODY,
                 {"Content-Type": "application/json", MODEL_HEADER: model})
    resp = conn.getresponse()
    body = resp.read()
    ms = (time.perf_counter() - t0) * 1000
    if own:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{model}: HTTP {resp.status} {body[:300]!r}")
    return ms


def grpc_infer(endpoint: str, model: str, client: Any) -> float:
    import tritonclient.grpc as tc

    inp = tc.InferInput("input-0", [1, 4], "FP32")
    inp.set_data_from_numpy(ROW)
    t0 = time.perf_counter()
    client.infer(model, [inp], outputs=[tc.InferRequestedOutput("predict")], client_timeout=120)
    return (time.perf_counter() - t0) * 1000


# ---------------------------------------------------------------- shared phases


def cold_and_warm(one: Any) -> dict[str, Any]:
    """``one(model_id) -> ms``: warm requests to the loaded model, then first requests."""
    warm = [one(WARM_ID) for _ in range(20)]
    cold = [one(m) for m in COLD_IDS]
    return {"warm_ms_p50": statistics.median(warm), "cold_ms_p50": statistics.median(cold),
            "cold_over_warm_ms": statistics.median(cold) - statistics.median(warm),
            "cold_ms": cold}


def churn_fields(load: dict[str, Any], loads: float, misses: float, requests: float,
                 cpu: float, warm_cpu_per_request: float) -> dict[str, Any]:
    requests = max(requests, 1.0)
    serving = warm_cpu_per_request * requests
    return {**load, "hit_ratio": 1.0 - misses / requests,
            "loads_per_miss": loads / misses if misses else float("nan"),
            "window_loads": loads, "window_misses": misses, "window_requests": requests,
            "server_cpu_s": cpu,
            "cpu_per_load_ms": (cpu - serving) / loads * 1000 if loads else float("nan")}


# ---------------------------------------------------------------- the mesh


def mesh_side(procs: Processes, workdir: Path, etcd: Any, ids: list[str], files: list[str],
              total: int, order: np.ndarray, order_file: Path, seconds: float,
              warm_s: float) -> dict[str, Any]:
    http_port = free_port()
    proc, endpoint, mport = start_mesh(
        procs, workdir, etcd, "churn", workdir / "models", capacity=str(total // 3),
        mesh_name="churn", metrics=True, extra=["--http-port", str(http_port)])
    assert mport is not None
    register_bulk(endpoint, [(i, "sklearn", f) for i, f in zip(ids, files, strict=True)])
    out: dict[str, Any] = {"fixed_rss_bytes": rss_bytes(proc.pid)}
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(endpoint)
    try:
        grpc_infer(endpoint, WARM_ID, client)  # imports scikit-learn in the server
        out["rss_one_model_bytes"] = rss_bytes(proc.pid)
        out["cold"] = cold_and_warm(lambda m: grpc_infer(endpoint, m, client))
    finally:
        client.close()
    before = scrape(mport, LOADS)
    out["stampede"] = stampede(lambda: grpc_stampede(endpoint))
    time.sleep(0.3)
    out["stampede"]["loads"] = scrape(mport, LOADS) - before

    cpu0 = cpu_seconds([proc.pid])
    out["warm_grpc"] = asyncio.run(drive(endpoint, WARM_ID, [("input-0", ROW)], CONCURRENCY,
                                         seconds, outputs=["predict"]))
    out["warm_grpc"]["server_cpu_s"] = cpu_seconds([proc.pid]) - cpu0
    cpu0 = cpu_seconds([proc.pid])
    out["warm_rest"] = http_drive(http_port, seconds)
    out["warm_rest"]["server_cpu_s"] = cpu_seconds([proc.pid]) - cpu0

    picks = itertools.cycle(order.tolist())
    fill(endpoint, mport, ids, picks, warm_s)
    out["churn_grpc"] = mesh_window(proc, endpoint, mport, ids, picks, seconds,
                                    per_request(out["warm_grpc"]))
    out["rss_full_bytes"] = rss_bytes(proc.pid)
    # REST walks another stretch of the same Zipf sequence.
    c0, cpu0 = cache_counters(mport), cpu_seconds([proc.pid])
    load = http_drive(http_port, seconds, order_file=order_file, ids=ids, start=len(order) // 2)
    time.sleep(0.3)
    c1 = cache_counters(mport)
    out["churn_rest"] = churn_fields(load, c1["loads"] - c0["loads"],
                                     c1["misses"] - c0["misses"],
                                     c1["requests"] - c0["requests"],
                                     cpu_seconds([proc.pid]) - cpu0,
                                     per_request(out["warm_rest"]))
    out["held"] = cache_counters(mport)["loaded"]
    out["rss_per_model_bytes"] = ((out["rss_full_bytes"] - out["rss_one_model_bytes"])
                                  / max(out["churn_grpc"]["loaded_at_end"] - 1, 1))
    procs.stop(proc)
    return out


def per_request(warm: dict[str, Any]) -> float:
    return warm["server_cpu_s"] / max(warm["requests"], 1)


def fill(endpoint: str, mport: int, ids: list[str], picks: Iterator[int], warm_s: float) -> None:
    """Drive until the instance evicts, then ``warm_s`` more."""
    t0 = time.perf_counter()
    while cache_counters(mport)["evictions"] == 0:
        if time.perf_counter() - t0 > 120:
            raise RuntimeError("the mesh never filled up: no eviction in 120 s")
        drive_zipf(endpoint, ids, picks, 1.0)
    drive_zipf(endpoint, ids, picks, warm_s)


def drive_zipf(endpoint: str, ids: list[str], picks: Iterator[int],
               seconds: float) -> dict[str, Any]:
    """churn.drive_zipf asking for ``predict`` only, as the HTTP requests do."""
    return asyncio.run(drive(endpoint, lambda: ids[next(picks)], [("input-0", ROW)],
                             CONCURRENCY, seconds, warmup=0, outputs=["predict"]))


def mesh_window(proc: Any, endpoint: str, mport: int, ids: list[str], picks: Iterator[int],
                seconds: float, warm_cpu: float) -> dict[str, Any]:
    """Drive for ``seconds``; the instance's counters and CPU over exactly that window."""
    c0, cpu0 = cache_counters(mport), cpu_seconds([proc.pid])
    load = drive_zipf(endpoint, ids, picks, seconds)
    cpu = cpu_seconds([proc.pid]) - cpu0
    time.sleep(0.3)  # let the last requests' metrics land
    c1 = cache_counters(mport)
    return {**churn_fields(load, c1["loads"] - c0["loads"], c1["misses"] - c0["misses"],
                           c1["requests"] - c0["requests"], cpu, warm_cpu),
            "loaded_at_end": c1["loaded"], "window_evictions": c1["evictions"] - c0["evictions"]}


def mesh_variant(procs: Processes, workdir: Path, etcd: Any, name: str, ids: list[str],
                 files: list[str], capacity: int, order: np.ndarray, seconds: float,
                 warm_s: float, warm_cpu: float, extra: Sequence[str] = ()) -> dict[str, Any]:
    """A fresh instance: 'fitting' loads everything first, others fill until evicting."""
    proc, endpoint, mport = start_mesh(procs, workdir, etcd, name, workdir / "models",
                                       capacity=str(capacity), mesh_name=name, metrics=True,
                                       extra=list(extra))
    assert mport is not None
    register_bulk(endpoint, [(i, "sklearn", f) for i, f in zip(ids, files, strict=True)])
    picks = itertools.cycle(order.tolist())
    if name == "fitting":
        load_all(endpoint, ids)
        drive_zipf(endpoint, ids, picks, warm_s)
    else:
        fill(endpoint, mport, ids, picks, warm_s)
    out = mesh_window(proc, endpoint, mport, ids, picks, seconds, warm_cpu)
    procs.stop(proc)
    return {**out, "capacity_bytes": capacity}


# ---------------------------------------------------------------- Ray


def ray_side(procs: Processes, workdir: Path, max_models: int, ids: list[str],
             order_file: Path, seconds: float, warm_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"version": ensure_ray_venv(), "max_num_models_per_replica": max_models}
    t0 = time.perf_counter()
    with ray_peer(procs, workdir, workdir / "models", max_models) as peer:
        out["startup_s"] = time.perf_counter() - t0
        out["processes"] = len(peer.pids())
        out["fixed_rss_bytes"] = peer.rss_bytes()
        conn = http.client.HTTPConnection("127.0.0.1", peer.port, timeout=120)
        http_infer(peer.port, WARM_ID, conn)
        out["rss_one_model_bytes"] = peer.rss_bytes()
        out["cold"] = cold_and_warm(lambda m: http_infer(peer.port, m, conn))
        conn.close()
        before = peer.stats()["loads"]
        out["stampede"] = stampede(lambda: http_stampede(peer.port))
        out["stampede"]["loads"] = peer.stats()["loads"] - before

        cpu0 = peer.cpu_seconds()
        out["warm"] = http_drive(peer.port, seconds)
        out["warm"]["server_cpu_s"] = peer.cpu_seconds() - cpu0
        out["warm_proxy"] = http_drive(peer.proxy_port, seconds)

        start = ray_fill(peer, ids, order_file, warm_s)
        s0, cpu0 = peer.stats(), peer.cpu_seconds()
        load = http_drive(peer.port, seconds, order_file=order_file, ids=ids, start=start)
        s1, cpu = peer.stats(), peer.cpu_seconds() - cpu0
        loads = s1["loads"] - s0["loads"]
        out["churn"] = churn_fields(load, loads, s1["misses"] - s0["misses"],
                                    s1["requests"] - s0["requests"],
                                    cpu, per_request(out["warm"]))
        out["churn"]["load_thread_cpu_ms"] = ((s1["load_cpu_s"] - s0["load_cpu_s"]) / loads
                                              * 1000 if loads else float("nan"))
        out["held"] = s1["held"]
        out["rss_full_bytes"] = peer.rss_bytes()
        out["rss_per_model_bytes"] = ((out["rss_full_bytes"] - out["rss_one_model_bytes"])
                                      / max(s1["held"] - 1, 1))
    return out


def ray_fill(peer: RayPeer, ids: list[str], order_file: Path, warm_s: float) -> int:
    """Drive until Ray has loaded more models than it holds; the next order position."""
    start, t0 = 0, time.perf_counter()
    while peer.stats()["loads"] <= peer.max_models:
        if time.perf_counter() - t0 > 120:
            raise RuntimeError("Ray never filled up in 120 s")
        start = http_drive(peer.port, 1.0, order_file=order_file, ids=ids,
                           start=start)["order_next"]
    return http_drive(peer.port, warm_s, order_file=order_file, ids=ids,
                      start=start)["order_next"]


# ---------------------------------------------------------------- stampede


def stampede(send: Any) -> dict[str, Any]:
    """``STAMPEDE`` concurrent first requests through ``send() -> list of (ok, ms)``."""
    done = send()
    ok = [ms for good, ms in done if good]
    return {"requests": STAMPEDE, "succeeded": len(ok),
            "p50_ms": statistics.median(ok) if ok else None, "max_ms": max(ok) if ok else None}


def http_stampede(port: int) -> list[tuple[bool, float]]:
    def one(_: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        try:
            http_infer(port, STAMPEDE_ID)
            return True, (time.perf_counter() - t0) * 1000
        except (OSError, RuntimeError):
            return False, (time.perf_counter() - t0) * 1000

    with concurrent.futures.ThreadPoolExecutor(STAMPEDE) as pool:
        return list(pool.map(one, range(STAMPEDE)))


def grpc_stampede(endpoint: str) -> list[tuple[bool, float]]:
    import tritonclient.grpc.aio as tc

    async def crowd() -> list[tuple[bool, float]]:
        client = tc.InferenceServerClient(endpoint)
        inp = tc.InferInput("input-0", [1, 4], "FP32")
        inp.set_data_from_numpy(ROW)

        async def one() -> tuple[bool, float]:
            t0 = time.perf_counter()
            try:
                await client.infer(STAMPEDE_ID, [inp], client_timeout=120)
                return True, (time.perf_counter() - t0) * 1000
            except Exception:  # noqa: BLE001 - counted as a failure
                return False, (time.perf_counter() - t0) * 1000

        try:
            return list(await asyncio.gather(*(one() for _ in range(STAMPEDE))))
        finally:
            await client.close()

    return asyncio.run(crowd())


# ---------------------------------------------------------------- run


def run(workdir: Path, quick: bool, peers: bool = True) -> dict[str, Any]:
    seconds, warm_s = (4.0, 1.0) if quick else (15.0, 4.0)
    paths = write_models(workdir / "models", N_MODELS, prefix="c", trees=TREES)
    files = [p.name for p in paths]
    ids = [p.stem for p in paths]
    total = sum(p.stat().st_size for p in paths)
    order = zipf_order(N_MODELS, 400_000)
    order_file = workdir / "order.json"
    order_file.write_text(json.dumps(order.tolist()))
    result: dict[str, Any] = {"quick": quick, "machine": machine(), "models": N_MODELS,
                              "zipf_s": ZIPF_S, "concurrency": CONCURRENCY, "seconds": seconds,
                              "model_bytes_total": total, "peers": peers}
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        mesh = mesh_side(procs, workdir, etcd, ids, files, total, order, order_file, seconds,
                         warm_s)
        mesh["fitting"] = mesh_variant(procs, workdir, etcd, "fitting", ids, files,
                                       int(total * 1.5), order, seconds, warm_s,
                                       per_request(mesh["warm_grpc"]))
        mesh["churn_lru"] = mesh_variant(procs, workdir, etcd, "lru", ids, files, total // 3,
                                         order, seconds, warm_s, per_request(mesh["warm_grpc"]),
                                         ["--placement", "lru"])
        # The mesh's warm floor merges its 16 callers' requests; churn cannot, so its
        # serving cost is taken from the everything-fits run (same traffic, no loads).
        serving = mesh["fitting"]["server_cpu_s"] / max(mesh["fitting"]["window_requests"], 1)
        for key in ("churn_grpc", "churn_lru"):
            row = mesh[key]
            if row["window_loads"]:
                row["cpu_per_load_ms"] = ((row["server_cpu_s"] - serving * row["window_requests"])
                                          / row["window_loads"] * 1000)
        result["mesh"] = mesh
        if peers:
            held = int(mesh["churn_grpc"]["loaded_at_end"])
            result["ray"] = ray_side(procs, workdir, held, ids, order_file, seconds, warm_s)
    result["ratios"] = ratios(result)
    result["summary"] = summary(result)
    return result


def ratios(r: dict[str, Any]) -> dict[str, float]:
    m = r["mesh"]
    out = {"churn_loads_per_miss": m["churn_grpc"]["loads_per_miss"],
           "churn_lru_loads_per_miss": m["churn_lru"]["loads_per_miss"],
           "churn_vs_fitting_throughput_500": (m["churn_grpc"]["requests_per_s"]
                                               / m["fitting"]["requests_per_s"]),
           "mesh_cold_start_over_warm_ms": m["cold"]["cold_over_warm_ms"],
           "mesh_fixed_memory_mb": m["fixed_rss_bytes"] / MB}
    ray = r.get("ray")
    if ray:
        out.update({
            "ray_churn_throughput": (m["churn_grpc"]["requests_per_s"]
                                     / ray["churn"]["requests_per_s"]),
            "ray_churn_p99": m["churn_grpc"]["p99_ms"] / ray["churn"]["p99_ms"],
            "ray_churn_loads_per_miss": ray["churn"]["loads_per_miss"],
            "ray_warm_throughput": (m["warm_grpc"]["requests_per_s"]
                                    / ray["warm"]["requests_per_s"]),
            "ray_cold_start_ms": ray["cold"]["cold_over_warm_ms"],
            "ray_fixed_memory_mb": ray["fixed_rss_bytes"] / MB,
            "ray_rest_churn_throughput": (m["churn_rest"]["requests_per_s"]
                                          / ray["churn"]["requests_per_s"]),
            "ray_rest_churn_p99": m["churn_rest"]["p99_ms"] / ray["churn"]["p99_ms"],
        })
    return {k: round(v, 3) for k, v in out.items()}


def summary(r: dict[str, Any]) -> str:
    m, ray = r["mesh"], r.get("ray")

    def load(name: str, x: dict[str, Any], churn: bool = False) -> str:
        base = (f"| {name} | {x['requests_per_s']:.0f} | {x['p50_ms']:.1f} | "
                f"{x['p99_ms']:.1f} |")
        if not churn:
            return base + " | | |"
        return base + f" {x['hit_ratio']:.3f} | {_num(x['loads_per_miss'], '.2f')} | " \
            f"{_num(x['cpu_per_load_ms'], '.1f')} |"

    rows = [load("mesh gRPC, warm (one model)", m["warm_grpc"]),
            load("mesh REST, warm (one model)", m["warm_rest"])]
    if ray:
        rows += [load("Ray HTTP direct ingress, warm (one model)", ray["warm"]),
                 load("Ray HTTP through Serve's proxy, warm (one model)", ray["warm_proxy"])]
    rows += [load("mesh gRPC, churn", m["churn_grpc"], True),
             load("mesh REST, churn", m["churn_rest"], True),
             load("mesh gRPC, churn, `--placement lru`", m["churn_lru"], True),
             load("mesh gRPC, everything fits", m["fitting"], True)]
    if ray:
        rows.append(load(f"Ray HTTP, churn (max {ray['max_num_models_per_replica']} models)",
                         ray["churn"], True))

    def side(name: str, x: dict[str, Any]) -> str:
        s = x["stampede"]
        return (f"| {name} | {x['cold']['warm_ms_p50']:.1f} | {x['cold']['cold_ms_p50']:.1f} | "
                f"{x['cold']['cold_over_warm_ms']:+.1f} | {s['loads']:.0f} ({s['succeeded']} ok) "
                f"| {x['fixed_rss_bytes'] / MB:.0f} | {x['rss_per_model_bytes'] / 1e3:.0f} |")

    sides = [side("mesh (gRPC)", m)] + ([side("Ray (HTTP)", ray)] if ray else [])
    note = f"Quick mode: {r['seconds']:.0f} s windows.\n\n" if r["quick"] else ""
    ray_note = (f"Ray {ray['version']}: one replica, throughput-optimized mode, "
                f"`max_num_models_per_replica` = {ray['max_num_models_per_replica']} (the "
                "models the mesh held at a third of the bytes: the same count), "
                f"{ray['processes']} processes, started in {ray['startup_s']:.0f} s; its loads "
                f"took {ray['churn']['load_thread_cpu_ms']:.1f} ms of thread CPU each (its own "
                "count).\n" if ray else "Ray not run (peers off).\n")
    return (
        f"### Mesh vs Ray Serve multiplexing (Zipf {r['zipf_s']} over {r['models']} models, "
        f"{r['concurrency']} callers, {r['seconds']:.0f} s windows)\n\n{note}"
        "| run | req/s | p50 ms | p99 ms | hit ratio | loads per miss | "
        "server CPU ms per load |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "| server | warm request ms | first request ms | cold start over warm ms | "
        "loads for 100 concurrent first requests | idle RSS MB | RSS per model KB |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(sides) + "\n\n" + ray_note +
        "Server CPU per load: the server's CPU in the churn window less the CPU its requests "
        "cost without loads, over the loads. The mesh's gRPC rows take that cost from the "
        "everything-fits run (same traffic, nothing loaded; its warm floor merges requests, "
        "churn cannot); its REST row and Ray (all its processes) from their one-model warm "
        "floor. RSS per model: from one model loaded to the end of the churn run.\n"
    )


def _num(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)  # NaN: nothing to divide by


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 s windows")
    ap.add_argument("--no-peers", action="store_true", help="the mesh rows only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-ray-") as tmp:
        result = run(Path(tmp), args.quick, peers=not args.no_peers)
    print(result["summary"])
    write_result("ray_compare", result, result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
