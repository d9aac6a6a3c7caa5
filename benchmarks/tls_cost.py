"""What TLS, mutual TLS and token checks cost on the data plane, measured in one run.

One mesh instance per configuration (plaintext; TLS; mutual TLS; plaintext with an
auth file and a bearer token; mutual TLS with a token), the same sklearn model,
the unmodified ``tritonclient.grpc.aio`` client over one channel at concurrency 1
and 16. Ratios are against the plaintext row of the same run.

    .venv/bin/python benchmarks/tls_cost.py [--seconds 4]

Writes benchmarks/results/tls_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    PYTHON,
    Processes,
    drive,
    machine,
    write_bench_models,
    write_result,
)
from modelmesh.registry.embedded import free_port  # noqa: E402
from tests.support.certs import make_pki  # noqa: E402

TOKEN = "bench-token"


def _client_kwargs(pki, tls: bool, mutual: bool) -> dict:
    if not tls:
        return {}
    kw = {"ssl": True, "root_certificates": str(pki.ca.cert)}
    if mutual:
        kw.update(private_key=str(pki.client.key), certificate_chain=str(pki.client.cert))
    return kw


async def _ready(endpoint: str, kw: dict, headers: dict, timeout: float = 120) -> None:
    import tritonclient.grpc.aio as tc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = tc.InferenceServerClient(endpoint, **kw)
        try:
            if await client.is_server_ready(headers=headers):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        finally:
            await client.close()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"mesh at {endpoint} not ready")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tls-cost-"))
    pki = make_pki(work / "pki")
    auth = work / "auth.yaml"
    auth.write_text(json.dumps({"tokens": [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                                            "roles": ["infer", "read", "manage"]}]}))
    models = write_bench_models(work / "models")
    model = models["sklearn"]
    configs = {
        "plaintext": ([], False, False, False),
        "tls": (["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)],
                True, False, False),
        "mtls": (["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                  "--tls-ca", str(pki.ca.cert)], True, True, False),
        "token": (["--auth-file", str(auth)], False, False, True),
        "mtls+token": (["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                        "--tls-ca", str(pki.ca.cert), "--auth-file", str(auth)],
                       True, True, True),
    }
    rows: dict[str, dict] = {}
    with Processes() as procs:
        etcd = procs.etcd(work / "etcd")
        for name, (extra, tls, mutual, token) in configs.items():
            port = free_port()
            procs.spawn([PYTHON, "-m", "modelmesh", "serve", "--port", str(port),
                         "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "-1",
                         "--etcd", etcd.endpoint, "--mesh-name", f"tls-{name}",
                         "--data-dir", str(work / f"data-{name}"),
                         "--models-root", str(work / "models"), "--log-level", "WARNING",
                         *extra], log=work / f"mesh-{name}.log")
            endpoint = f"127.0.0.1:{port}"
            kw = _client_kwargs(pki, tls, mutual)
            headers = {"authorization": f"Bearer {TOKEN}"} if token else {}
            asyncio.run(_ready(endpoint, kw, headers))
            _register(endpoint, kw, headers, model, work / "models")
            for c in (1, 16):
                rows[f"{name} c={c}"] = asyncio.run(drive(
                    endpoint, model.name, [(model.input_name, model.input)], c, args.seconds,
                    headers=headers, client_options=kw))
                print(name, c, rows[f"{name} c={c}"], flush=True)
    lines = ["| configuration | c | req/s | vs plaintext | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        name, c = key.rsplit(" c=", 1)
        base = rows[f"plaintext c={c}"]
        rps, ratio = r["requests_per_s"], r["requests_per_s"] / base["requests_per_s"]
        lines.append(f"| {name} | {c} | {rps:.0f} | {ratio:.2f}x | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} |")
    md = "\n".join(["# The data-plane cost of TLS and token checks", "",
                    "`.venv/bin/python benchmarks/tls_cost.py`: one instance per row, sklearn "
                    "model, tritonclient.grpc.aio over one channel, client and server on the "
                    "same 2 cores.", "", *lines, ""])
    write_result("tls_cost", {"machine": machine(), "rows": rows}, md)
    print(md)
    return 0


def _register(endpoint: str, kw: dict, headers: dict, model, root: Path) -> None:
    import grpc

    from modelmesh._proto.mmesh import model_mesh_pb2 as mm
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    if kw:
        def read(key: str) -> bytes | None:
            return Path(kw[key]).read_bytes() if key in kw else None

        channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(
            read("root_certificates"), read("private_key"), read("certificate_chain")))
    else:
        channel = grpc.insecure_channel(endpoint)
    with channel:
        mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
            modelId=model.name, modelInfo=mm.ModelInfo(type=model.model_type,
                                                       path=str(model.path.relative_to(root))),
            loadNow=True, sync=True), metadata=tuple(headers.items()), timeout=120)


if __name__ == "__main__":
    raise SystemExit(main())
