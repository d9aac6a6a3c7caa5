"""Registry: registering 100,000 models through the gRPC API into a real etcd.

Targets (issue "Benchmarks against the peers and the physical limit"): 100,000
registrations in under 60 s, and under 300 MB RSS for an instance whose mirror
holds them.

Measured, each against its own mesh name on one real etcd, so one figure never
pays for another's keys:

1. bulk: N models through the ``registerModels`` extension, 500 per call, one call
   at a time (what ``modelmesh register --from-file`` does);
2. one RPC per model: ``registerModel`` with 64 calls in flight from a grpc.aio
   client, the way a controller registering models one by one would;
3. memory: RSS of the instance that wrote the N bulk registrations, before and
   after, and of a second instance started afterwards, whose mirror holds N
   registrations it never wrote (the steady state of every other instance);
4. listing: paging through all N with ``listModels`` (page size 5000).

Quick mode registers 10,000 models each way and extrapolates to 100,000 (it says so).

    .venv/bin/python benchmarks/registry.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Processes,
    extensions_stub,
    machine,
    rss_bytes,
    start_mesh,
    write_result,
)

TARGET_MODELS = 100_000
TARGET_SECONDS = 60.0
TARGET_RSS = 300 * 1000**2
BATCH = 500
IN_FLIGHT = 64
PAGE = 5000
MODEL_PATH = "model.joblib"  # registration only checks the path stays in the models root


def bulk_register(endpoint: str, n: int, prefix: str) -> float:
    """Register ``n`` models with registerModels, BATCH per call; returns seconds."""
    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    ch, stub = extensions_stub(endpoint)
    with ch:
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            reqs = [mm.RegisterModelRequest(modelId=f"{prefix}{i:07d}",
                                            modelInfo=mm.ModelInfo(type="sklearn",
                                                                   path=MODEL_PATH))
                    for i in range(start, min(start + BATCH, n))]
            res = stub.registerModels(ext.RegisterModelsRequest(requests=reqs), timeout=300)
            bad = [r for r in res.results if r.code != 0]
            if bad:
                raise RuntimeError(f"registerModels refused {len(bad)}: {bad[0]}")
        return time.perf_counter() - t0


async def single_register(endpoint: str, n: int, prefix: str, in_flight: int) -> float:
    """Register ``n`` models one registerModel RPC each, ``in_flight`` at a time; seconds."""
    import grpc

    from modelmesh._proto.mmesh import model_mesh_pb2 as mm
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = mm_grpc.ModelMeshStub(ch)
        ids = iter(range(n))
        info = mm.ModelInfo(type="sklearn", path=MODEL_PATH)

        async def caller() -> None:
            for i in ids:  # a shared iterator: each id is taken by exactly one caller
                await stub.registerModel(mm.RegisterModelRequest(
                    modelId=f"{prefix}{i:07d}", modelInfo=info), timeout=300)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return time.perf_counter() - t0


def list_all(endpoint: str) -> tuple[float, int, int]:
    """Page through every registered model; returns (seconds, models listed, pages)."""
    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext

    ch, stub = extensions_stub(endpoint)
    with ch:
        t0 = time.perf_counter()
        token, listed, pages = "", 0, 0
        while True:
            page = stub.listModels(ext.ListModelsRequest(page_size=PAGE, page_token=token),
                                   timeout=120)
            listed += len(page.models)
            pages += 1
            token = page.next_page_token
            if not token:
                return time.perf_counter() - t0, listed, pages


def mirrored(endpoint: str) -> int:
    """How many registered models the instance at ``endpoint`` has in its mirror."""
    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext

    ch, stub = extensions_stub(endpoint)
    with ch:
        return int(stub.clusterStatus(ext.ClusterStatusRequest(), timeout=60).models)


def wait_mirrored(endpoint: str, n: int, timeout: float = 120) -> float:
    """Wait until the instance mirrors ``n`` models; returns the seconds waited."""
    t0 = time.perf_counter()
    while (have := mirrored(endpoint)) < n:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{endpoint} mirrors {have} of {n} models after {timeout} s")
        time.sleep(0.2)
    return time.perf_counter() - t0


def settled_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS after a short pause, so a just-finished burst's transient buffers are not counted."""
    time.sleep(seconds)
    return rss_bytes(pid)


def measure_bulk_and_memory(procs: Processes, workdir: Path, etcd: Any, models_root: Path,
                            n: int) -> dict[str, Any]:
    """Bulk registration time, the writer's and a reader's RSS, and the listing time."""
    writer, ep_w, _ = start_mesh(procs, workdir, etcd, "writer", models_root, mesh_name="bulk")
    rss_before = settled_rss(writer.pid)
    bulk_s = bulk_register(ep_w, n, "bulk-")
    mirror_writer = mirrored(ep_w)
    rss_writer = settled_rss(writer.pid)
    list_s, listed, pages = list_all(ep_w)
    rss_writer_listed = settled_rss(writer.pid, 0.5)
    t0 = time.perf_counter()
    reader, ep_r, _ = start_mesh(procs, workdir, etcd, "reader", models_root, mesh_name="bulk")
    wait_mirrored(ep_r, n)
    reader_ready_s = time.perf_counter() - t0
    rss_reader = settled_rss(reader.pid)
    procs.stop(reader)
    procs.stop(writer)
    return {
        "models": n, "bulk_seconds": bulk_s, "bulk_per_s": n / bulk_s,
        "writer_mirrored": mirror_writer,
        "rss_before_bytes": rss_before, "rss_writer_bytes": rss_writer,
        "rss_writer_after_list_bytes": rss_writer_listed,
        "rss_reader_bytes": rss_reader, "reader_start_to_mirrored_seconds": reader_ready_s,
        "writer_bytes_per_registration": (rss_writer - rss_before) / n,
        "reader_bytes_per_registration": (rss_reader - rss_before) / n,
        "list_seconds": list_s, "listed": listed, "list_pages": pages,
    }


def measure_single(procs: Processes, workdir: Path, etcd: Any, models_root: Path,
                   n: int) -> dict[str, Any]:
    """One registerModel RPC per model with IN_FLIGHT in flight, on a fresh instance."""
    proc, endpoint, _ = start_mesh(procs, workdir, etcd, "single", models_root,
                                   mesh_name="single")
    seconds = asyncio.run(single_register(endpoint, n, "one-", IN_FLIGHT))
    have = mirrored(endpoint)
    procs.stop(proc)
    return {"models": n, "in_flight": IN_FLIGHT, "seconds": seconds, "per_s": n / seconds,
            "mirrored": have}


def run(workdir: Path, quick: bool) -> dict:
    n = 10_000 if quick else TARGET_MODELS
    models_root = workdir / "models"
    models_root.mkdir(parents=True, exist_ok=True)
    (models_root / MODEL_PATH).write_bytes(b"")  # never loaded here
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        bulk = measure_bulk_and_memory(procs, workdir, etcd, models_root, n)
        single = measure_single(procs, workdir, etcd, models_root, n)
    result: dict[str, Any] = {
        "quick": quick, "machine": machine(), "bulk": bulk, "single": single,
        "extrapolated_to": TARGET_MODELS,
        "bulk_seconds_100k": bulk["bulk_seconds"] * TARGET_MODELS / n,
        "single_seconds_100k": single["seconds"] * TARGET_MODELS / n,
        "reader_rss_100k_bytes": (bulk["rss_before_bytes"]
                                  + bulk["reader_bytes_per_registration"] * TARGET_MODELS),
        "writer_rss_100k_bytes": (bulk["rss_before_bytes"]
                                  + bulk["writer_bytes_per_registration"] * TARGET_MODELS),
    }
    result["targets"] = {
        "bulk_under_60s": result["bulk_seconds_100k"] < TARGET_SECONDS,
        "single_under_60s": result["single_seconds_100k"] < TARGET_SECONDS,
        "mirror_rss_under_300MB": max(result["reader_rss_100k_bytes"],
                                      result["writer_rss_100k_bytes"]) < TARGET_RSS,
    }
    result["ratios"] = {
        "registry_100k_seconds": result["bulk_seconds_100k"],
        "registry_100k_single_rpc_seconds": result["single_seconds_100k"],
        "registry_mirror_rss_mb": max(result["reader_rss_100k_bytes"],
                                      result["writer_rss_100k_bytes"]) / 1000**2,
    }
    result["summary"] = summary(result)
    return result


def summary(r: dict[str, Any]) -> str:
    b, s = r["bulk"], r["single"]
    mb = 1000**2
    note = (f"Quick mode: {b['models']:,} models each way; the 100k figures are linear "
            "extrapolations (the RSS ones overstate: fixed costs spread over fewer "
            "registrations).\n\n" if r["quick"] else "")
    ok = {True: "met", False: "MISSED"}
    t = r["targets"]
    return (
        f"### Registry ({b['models']:,} models, real etcd)\n\n{note}"
        "| measure | figure | 100k | target |\n|---|---|---|---|\n"
        f"| registerModels, {BATCH} per call | {b['bulk_seconds']:.1f} s "
        f"({b['bulk_per_s']:,.0f}/s) | {r['bulk_seconds_100k']:.1f} s | < 60 s: "
        f"{ok[t['bulk_under_60s']]} |\n"
        f"| registerModel, one RPC each, {s['in_flight']} in flight | {s['seconds']:.1f} s "
        f"({s['per_s']:,.0f}/s) | {r['single_seconds_100k']:.1f} s | < 60 s: "
        f"{ok[t['single_under_60s']]} |\n"
        f"| RSS before registering | {b['rss_before_bytes'] / mb:.0f} MB | | |\n"
        f"| RSS of the writer, mirror full | {b['rss_writer_bytes'] / mb:.0f} MB "
        f"({b['writer_bytes_per_registration']:.0f} B/registration) | "
        f"{r['writer_rss_100k_bytes'] / mb:.0f} MB | < 300 MB: "
        f"{ok[t['mirror_rss_under_300MB']]} |\n"
        f"| RSS of a second instance (mirrors, never wrote) | {b['rss_reader_bytes'] / mb:.0f}"
        f" MB ({b['reader_bytes_per_registration']:.0f} B/registration) | "
        f"{r['reader_rss_100k_bytes'] / mb:.0f} MB | |\n"
        f"| second instance: start to mirror full | "
        f"{b['reader_start_to_mirrored_seconds']:.1f} s | | |\n"
        f"| listModels, pages of {PAGE} | {b['list_seconds']:.2f} s, {b['listed']:,} listed "
        f"in {b['list_pages']} pages | | |\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 models, extrapolated")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-registry-") as tmp:
        result = run(Path(tmp), args.quick)
    print(result["summary"])
    write_result("registry", result, result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
