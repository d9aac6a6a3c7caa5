"""Data-plane throughput and latency: the mesh against the bare floor and the peers.

For each model (a light scikit-learn LogisticRegression and an ONNX model) and each
concurrency, the unmodified tritonclient (asyncio) drives, in turn:

- ``bare``: a grpc.aio V2 server that decodes the request, calls the model and
  encodes the answer, nothing else: the floor for any Python server on this machine;
- ``local``: a mesh instance that holds the model;
- ``local-unmerged``: the same with request merging off (``--max-batch-rows 0``), to
  show the serving path's own cost apart from what merging saves;
- ``forwarded``: another mesh instance, which forwards the request bytes to the first;
- ``mlserver``: MLServer 1.7.1 (own virtualenv, ``parallel_workers: 0``);
- ``kserve``: KServe's Python ModelServer (own virtualenv).

Every server gets the same requests (one [1, 4] FP32 row, the model's first output
requested, as a client that wants the label would). Runs are interleaved (one run of
every server, then the next round) so drift on this shared machine hits all alike;
figures are medians over the rounds.

    .venv/bin/python benchmarks/dataplane.py [--quick] [--no-peers]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    BenchModel,
    Processes,
    drive,
    free_port,
    load_here,
    machine,
    median_of,
    register,
    start_mesh,
    wait_v2_ready,
    write_bench_models,
    write_result,
)

# The floor: the least a Python V2 server must do per request. It uses the same
# codec and model object as the mesh, so the difference is the mesh's serving path.
BARE_SERVER = r'''
import asyncio, sys
from pathlib import Path
import grpc
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc
from modelmesh import codec
from modelmesh.runtimes import get_runtime

model = get_runtime(sys.argv[2]).load(Path(sys.argv[3]), "bare")

class Bare(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        requested = [o.name for o in request.outputs]
        outputs = model.predict_outputs(codec.decode_inputs(request), {}, requested)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        codec.encode_outputs(outputs, requested, response)
        return response

async def main():
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
'''

OUTPUT = {"sklearn": "predict", "onnx": "label"}


def start_bare(procs: Processes, workdir: Path, model: BenchModel) -> str:
    port = free_port()
    log = workdir / f"bare-{model.name}.log"
    proc = procs.spawn([PYTHON, "-c", BARE_SERVER, str(port), model.model_type, str(model.path)],
                       log=log)
    endpoint = f"127.0.0.1:{port}"
    wait_v2_ready(endpoint, proc, log=log)
    return endpoint


async def drive_one(endpoint: str, model: BenchModel, concurrency: int, seconds: float,
                    headers: dict[str, str] | None = None) -> dict[str, float]:
    """One closed-loop run asking for the model's first output only."""
    return await drive(endpoint, model.name, [(model.input_name, model.input)], concurrency,
                       seconds, outputs=[OUTPUT[model.model_type]], headers=headers)


def run(workdir: Path, quick: bool, peers: bool = True) -> dict[str, Any]:
    """All servers x models x concurrencies; returns figures and ratios."""
    models_all = write_bench_models(workdir / "models")
    kinds = ["sklearn"] if quick else ["sklearn", "onnx"]
    concurrencies = [1, 16] if quick else [1, 16, 64]
    seconds = 1.5 if quick else 3.0
    rounds = 1 if quick else 3
    result: dict[str, Any] = {"machine": machine(), "seconds_per_run": seconds,
                              "rounds": rounds, "models": {}}
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        # Copy scaling off: a second copy on the forwarding instance would turn the
        # forwarded path into a local one halfway through the run.
        no_scaling = ["--rebalance-interval", "86400"]
        _, serving, _ = start_mesh(procs, workdir, etcd, "serving", workdir / "models",
                                   extra=no_scaling)
        _, ingress, _ = start_mesh(procs, workdir, etcd, "ingress", workdir / "models",
                                   extra=no_scaling)
        # The same serving path with request merging off, in a mesh of its own: what
        # the mesh costs per request, apart from what merging saves.
        _, unmerged, _ = start_mesh(procs, workdir, etcd, "unmerged", workdir / "models",
                                    mesh_name="bench-unmerged",
                                    extra=[*no_scaling, "--max-batch-rows", "0"])
        endpoints: dict[str, dict[str, str]] = {}
        for kind in kinds:
            model = models_all[kind]
            register(serving, model.name, model.model_type,
                     str(model.path.relative_to(workdir / "models")))
            load_here(serving, model.name)
            register(unmerged, model.name, model.model_type,
                     str(model.path.relative_to(workdir / "models")), load_now=True)
            endpoints[kind] = {"bare": start_bare(procs, workdir, model),
                               "local": serving, "local-unmerged": unmerged,
                               "forwarded": ingress}
            if peers:
                from peers import start_kserve, start_mlserver

                endpoints[kind]["mlserver"] = start_mlserver(procs, workdir, model)
                endpoints[kind]["kserve"] = start_kserve(procs, workdir, model)
        for kind in kinds:
            model = models_all[kind]
            per_c: dict[str, Any] = {}
            for c in concurrencies:
                runs: dict[str, list[dict[str, float]]] = {s: [] for s in endpoints[kind]}
                for _ in range(rounds):
                    for server, endpoint in endpoints[kind].items():
                        runs[server].append(asyncio.run(drive_one(endpoint, model, c, seconds)))
                per_c[str(c)] = {s: median_of(r) for s, r in runs.items()}
            result["models"][kind] = per_c
    result["ratios"] = ratios(result)
    result["summary"] = markdown(result)
    return result


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Same-run ratios per model and concurrency, plus headline ones (sklearn, c=16)."""
    out: dict[str, float] = {}
    for kind, per_c in result["models"].items():
        for c, servers in per_c.items():
            local = servers["local"]
            for name, other in servers.items():
                if name == "local":
                    continue
                key = f"{kind}_c{c}"
                if name == "bare":
                    out[f"local_vs_bare_throughput_{key}"] = _ratio(local, other, "requests_per_s")
                    out[f"local_vs_bare_p50_{key}"] = _ratio(local, other, "p50_ms")
                elif name == "local-unmerged":
                    out[f"unmerged_vs_bare_throughput_{key}"] = _ratio(other, servers["bare"],
                                                                       "requests_per_s")
                    out[f"unmerged_vs_bare_p50_{key}"] = _ratio(other, servers["bare"], "p50_ms")
                elif name == "forwarded":
                    out[f"forward_vs_local_throughput_{key}"] = _ratio(other, local,
                                                                       "requests_per_s")
                else:
                    out[f"local_vs_{name}_throughput_{key}"] = _ratio(local, other,
                                                                      "requests_per_s")
                    out[f"local_vs_{name}_p99_{key}"] = _ratio(local, other, "p99_ms")
    return out


def _ratio(a: dict[str, float], b: dict[str, float], field: str) -> float:
    return round(a[field] / b[field], 3) if b[field] else float("nan")


CELL_TARGETS = (  # (ratio prefix, test, wording), checked in every model x concurrency cell
    ("local_vs_bare_throughput", lambda v: v >= 0.9, "local >= 0.9x bare req/s"),
    ("local_vs_bare_p50", lambda v: v <= 1.1, "local p50 <= 1.1x bare"),
    ("local_vs_mlserver_throughput", lambda v: v >= 1.5, "local >= 1.5x MLServer req/s"),
    ("local_vs_mlserver_p99", lambda v: v < 1.0, "local p99 < MLServer's"),
    ("forward_vs_local_throughput", lambda v: v >= 0.6, "forwarded >= 0.6x local req/s"),
)


def missed_cells(ratios_: dict[str, float]) -> list[str]:
    """Every model x concurrency cell where a target is missed, in words."""
    out = []
    for prefix, ok, text in CELL_TARGETS:
        for key, value in sorted(ratios_.items()):
            if key.startswith(prefix + "_") and not ok(value):
                out.append(f"{text}: {value:g} at {key[len(prefix) + 1:]}")
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Medians of {result['rounds']} interleaved runs of {result['seconds_per_run']} s "
             "each; ratios against the mesh's local path in the same round.", "",
             "| model | concurrency | server | req/s | p50 ms | p99 ms | errors | "
             "req/s vs local |", "|---|---|---|---|---|---|---|---|"]
    for kind, per_c in result["models"].items():
        for c, servers in per_c.items():
            local = servers["local"]["requests_per_s"]
            for name, r in servers.items():
                lines.append(f"| {kind} | {c} | {name} | {r['requests_per_s']:.0f} | "
                             f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} | "
                             f"{r['requests_per_s'] / local:.2f}x |")
    misses = missed_cells(result.get("ratios") or ratios(result))
    lines += ["", "Targets checked in every cell (the headline table uses sklearn at "
              "concurrency 16): " + ("all met." if not misses else "missed in "
                                     + "; ".join(misses) + ".")]
    return "\n".join(lines)


# ---------------------------------------------------------------- REST rows

REST_SERVERS = ("mesh-rest", "bare-rest", "mlserver-rest", "kserve-rest")
REST_MODES = ("binary", "json")


def rest_bodies(model: BenchModel) -> dict[str, tuple[bytes, dict[str, str]]]:
    """mode -> (body, headers) of one V2 REST request: the [1, 4] row, the label asked for."""
    x = model.input
    output = OUTPUT[model.model_type]
    doc = {"inputs": [{"name": model.input_name, "datatype": "FP32", "shape": list(x.shape),
                       "data": x.reshape(-1).tolist()}],
           "outputs": [{"name": output}]}
    raw = x.astype("<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()
    return {"json": (json.dumps(doc).encode(), {"Content-Type": "application/json"}),
            "binary": (header + raw, {"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))})}


def http_load(port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int,
              seconds: float) -> dict[str, float]:
    """One closed-loop run of ``http_load.py`` in its own process."""
    from http_load import run_in_process

    return run_in_process({"port": port, "path": path, "concurrency": concurrency,
                           "body_b64": base64.b64encode(body).decode(), "headers": headers,
                           "seconds": seconds})


def start_bare_rest(procs: Processes, workdir: Path, model: BenchModel) -> int:
    port = free_port()
    log = workdir / f"bare-rest-{model.name}.log"
    proc = procs.spawn([PYTHON, str(Path(__file__).with_name("peer_servers") / "bare_rest.py"),
                        str(port), model.model_type, str(model.path)], log=log)
    wait_http(port, proc, log)
    return port


def wait_http(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until something answers HTTP on ``port`` (any status)."""
    import http.client
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing answers HTTP on {port} after {timeout} s")


def run_rest(workdir: Path, quick: bool, peers: bool = True) -> dict[str, Any]:
    """The REST rows: the mesh's REST path against the bare REST floor, MLServer's and
    KServe's REST, and the mesh's own gRPC path; sklearn, binary and JSON bodies."""
    model = write_bench_models(workdir / "models")["sklearn"]
    concurrencies = [1, 16] if quick else [1, 16, 64]
    seconds = 1.5 if quick else 3.0
    rounds = 1
    result: dict[str, Any] = {"machine": machine(), "seconds_per_run": seconds,
                              "rounds": rounds, "model": model.name, "cells": {}}
    path = f"/v2/models/{model.name}/infer"
    bodies = rest_bodies(model)
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        mesh_http = free_port()
        _, mesh_grpc, _ = start_mesh(procs, workdir, etcd, "rest", workdir / "models",
                                     extra=["--rebalance-interval", "86400",
                                            "--http-port", str(mesh_http)])
        register(mesh_grpc, model.name, model.model_type,
                 str(model.path.relative_to(workdir / "models")))
        load_here(mesh_grpc, model.name)
        ports = {"mesh-rest": mesh_http, "bare-rest": start_bare_rest(procs, workdir, model)}
        if peers:
            from peers import start_kserve_both, start_mlserver_both

            ports["mlserver-rest"] = start_mlserver_both(procs, workdir, model)[1]
            ports["kserve-rest"] = start_kserve_both(procs, workdir, model)[1]
        for _ in range(rounds):
            for c in concurrencies:
                cell = result["cells"].setdefault(str(c), {})
                for mode in REST_MODES:
                    body, headers = bodies[mode]
                    for server, port in ports.items():
                        cell.setdefault(f"{server} {mode}", []).append(
                            http_load(port, path, body, headers, c, seconds))
                cell.setdefault("mesh-grpc", []).append(_grpc_with_cpu(mesh_grpc, model, c,
                                                                       seconds))
    for cell in result["cells"].values():
        for key, runs in cell.items():
            cell[key] = median_of(runs)
    result["ratios"] = rest_ratios(result)
    result["summary"] = rest_markdown(result)
    return result


def _grpc_with_cpu(endpoint: str, model: BenchModel, c: int, seconds: float) -> dict[str, float]:
    import time

    cpu0, t0 = time.process_time(), time.perf_counter()
    out = asyncio.run(drive_one(endpoint, model, c, seconds))
    return {**out, "client_cpu": round((time.process_time() - cpu0)
                                       / (time.perf_counter() - t0), 3)}


def rest_ratios(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c, cell in result["cells"].items():
        for mode in REST_MODES:
            mesh = cell[f"mesh-rest {mode}"]
            key = f"{mode}_c{c}"
            out[f"rest_vs_bare_throughput_{key}"] = _ratio(mesh, cell[f"bare-rest {mode}"],
                                                           "requests_per_s")
            out[f"rest_vs_grpc_p50_{key}"] = _ratio(mesh, cell["mesh-grpc"], "p50_ms")
            for peer in ("mlserver", "kserve"):
                other = cell.get(f"{peer}-rest {mode}")
                if other is None or other["errors"] or not other["requests_per_s"]:
                    continue  # the peer does not serve this mode: no ratio
                out[f"rest_vs_{peer}_throughput_{key}"] = _ratio(mesh, other, "requests_per_s")
                out[f"rest_vs_{peer}_p99_{key}"] = _ratio(mesh, other, "p99_ms")
    return out


REST_TARGETS = (  # (ratio prefix, cells, test, wording)
    ("rest_vs_mlserver_throughput", ("c16",), lambda v: v >= 2.0,
     "mesh REST >= 2x MLServer REST req/s"),
    ("rest_vs_mlserver_p99", ("c16",), lambda v: v < 1.0, "mesh REST p99 < MLServer REST's"),
    ("rest_vs_bare_throughput", ("c1", "c16", "c64"), lambda v: v >= 0.85,
     "mesh REST >= 0.85x bare REST req/s"),
    ("rest_vs_grpc_p50", ("c1", "c16", "c64"), lambda v: v <= 1.3,
     "mesh REST p50 <= 1.3x mesh gRPC p50"),
)


def rest_misses(ratios_: dict[str, float]) -> tuple[list[str], list[str]]:
    """(met, missed) targets, in words, one per cell."""
    met, missed = [], []
    for prefix, cells, ok, text in REST_TARGETS:
        for key, value in sorted(ratios_.items()):
            if key.startswith(prefix + "_") and key.rsplit("_", 1)[1] in cells:
                (met if ok(value) else missed).append(
                    f"{text}: {value:g} at {key[len(prefix) + 1:]}")
    return met, missed


def rest_markdown(result: dict[str, Any]) -> str:
    lines = [f"sklearn `{result['model']}`, one [1, 4] FP32 row, `predict` asked for; "
             f"{result['seconds_per_run']} s per run, {result['rounds']} round(s). REST "
             "load from `benchmarks/http_load.py` (raw asyncio HTTP/1.1 keep-alive, one "
             "connection per caller, its own process); gRPC from tritonclient.grpc.aio in "
             "the benchmark process. Client CPU: cores the load generator used.", "",
             "| concurrency | server | req/s | p50 ms | p99 ms | errors | client CPU |",
             "|---|---|---|---|---|---|---|"]
    for c, cell in result["cells"].items():
        for name, r in cell.items():
            lines.append(f"| {c} | {name} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['errors']:.0f} | {r['client_cpu']:.2f} |")
    met, missed = rest_misses(result["ratios"])
    lines += ["", "Targets met: " + ("; ".join(met) or "none") + ".",
              "", "Targets missed: " + ("; ".join(missed) or "none") + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="skip MLServer and KServe")
    ap.add_argument("--rest", action="store_true",
                    help="only the REST rows (written to results/dataplane-rest.*)")
    args = ap.parse_args()
    if args.rest:
        with tempfile.TemporaryDirectory(prefix="mm-bench-rest-") as tmp:
            result = run_rest(Path(tmp), args.quick, peers=not args.no_peers)
        print(result["summary"])
        write_result("dataplane-rest", result, "# Data plane: REST\n\n" + result["summary"])
        return 0
    with tempfile.TemporaryDirectory(prefix="mm-bench-dp-") as tmp:
        result = run(Path(tmp), args.quick, peers=not args.no_peers)
    print(result["summary"])
    write_result("dataplane", result, "# Data plane\n\n" + result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
