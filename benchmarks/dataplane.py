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
    ("forward_vs_local_throughput", lambda v: v >= 0.5, "forwarded >= 0.5x local req/s"),
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="skip MLServer and KServe")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-bench-dp-") as tmp:
        result = run(Path(tmp), args.quick, peers=not args.no_peers)
    print(result["summary"])
    write_result("dataplane", result, "# Data plane\n\n" + result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
