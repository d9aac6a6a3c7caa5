"""The mesh's V2 REST against a real Triton Inference Server, request by request.

Triton 2.51 (NVIDIA PyTriton 0.7.0, its own virtualenv: scripts/setup-pytriton) serves
identity models bound in ``peer_servers/pytriton_identity.py``; a mesh instance serves
the mesh's ``identity`` models under the same names with the same inputs (each echoes
its inputs and adds ``parameters``, the request parameters as JSON). The same REST
requests, good and bad, JSON and binary, go to both; status codes, the headers that
matter and response bodies are compared field by field. Error messages are worded by
each server and not compared (both must answer ``{"error": str}``).

Prints a table of the cases; ``--write`` also writes
benchmarks/results/triton_rest_compare.json (the raw answers) and the table into
benchmarks/results/triton_rest_compare.md above the notes kept there.

    .venv/bin/python benchmarks/triton_compare.py [--write]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, RESULTS, Processes, free_port, register, start_mesh

PYTRITON_VENV = REPO / ".venv-pytriton"
SERVER = REPO / "benchmarks" / "peer_servers" / "pytriton_identity.py"
NOTES_MARK = "<!-- notes: kept by triton_compare.py -->"

#: The models, by their inputs (the same specs for PyTriton and the mesh's identity files).
MODELS: dict[str, list[dict[str, Any]]] = {
    "echo": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "echo_two": [{"name": "a", "datatype": "INT32", "shape": [-1]},
                 {"name": "b", "datatype": "FP32", "shape": [-1]}],
    "echo_bytes": [{"name": "s", "datatype": "BYTES", "shape": [-1]}],
    "echo_fp16": [{"name": "h", "datatype": "FP16", "shape": [-1]}],
}


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _infer(name: str, doc: dict[str, Any], model: str = "echo") -> Case:
    return Case(name, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(),
                {"Content-Type": "application/json"})


def _binary(name: str, doc: dict[str, Any], raw: bytes, model: str = "echo") -> Case:
    header = json.dumps(doc).encode()
    return Case(name, "POST", f"/v2/models/{model}/infer", header + raw,
                {"Content-Type": "application/octet-stream",
                 "Inference-Header-Content-Length": str(len(header))})


X = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.5]}
X_RAW = np.array([1.0, 2.0, 3.0, 4.5], "<f4").tobytes()
XB = {"name": "x", "datatype": "FP32", "shape": [1, 4],
      "parameters": {"binary_data_size": len(X_RAW)}}


def _bytes_raw(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def cases() -> list[Case]:
    strings = [b"abc", b"", "h\u00e9llo".encode()]
    h = np.array([1.5, -2.0, 65504.0], "<f2").tobytes()
    return [
        Case("health live", "GET", "/v2/health/live"),
        Case("health ready", "GET", "/v2/health/ready"),
        Case("server metadata", "GET", "/v2"),
        Case("model metadata", "GET", "/v2/models/echo"),
        Case("model metadata, version 1", "GET", "/v2/models/echo/versions/1"),
        Case("model metadata, unknown model", "GET", "/v2/models/nope"),
        Case("model ready", "GET", "/v2/models/echo/ready"),
        Case("model ready, version 1", "GET", "/v2/models/echo/versions/1/ready"),
        Case("model ready, version 7", "GET", "/v2/models/echo/versions/7/ready"),
        Case("model ready, unknown model", "GET", "/v2/models/nope/ready"),
        Case("model config", "GET", "/v2/models/echo/config"),
        Case("model config, unknown model", "GET", "/v2/models/nope/config"),
        Case("GET on infer", "GET", "/v2/models/echo/infer"),
        Case("unknown endpoint", "GET", "/v2/nothing/here"),
        _infer("infer JSON", {"inputs": [X]}),
        _infer("infer JSON, id echoed", {"id": "req-42", "inputs": [X]}),
        _infer("infer JSON, parameters", {"parameters": {"s": "v", "n": 3, "b": True},
                                          "inputs": [X]}),
        _infer("infer JSON, nested data", {"inputs": [{**X, "data": [[1.0, 2.0, 3.0, 4.5]]}]}),
        _infer("infer JSON, requested output x", {"inputs": [X], "outputs": [{"name": "x"}]}),
        _infer("infer JSON, requested output binary",
               {"inputs": [X], "outputs": [{"name": "x", "parameters": {"binary_data": True}}]}),
        _infer("infer JSON, binary_data_output", {"inputs": [X],
                                                  "parameters": {"binary_data_output": True}}),
        _infer("infer JSON, unknown requested output",
               {"inputs": [X], "outputs": [{"name": "zz"}]}),
        _binary("infer binary", {"inputs": [XB]}, X_RAW),
        _binary("infer binary, binary output",
                {"inputs": [XB], "outputs": [{"name": "x", "parameters": {"binary_data": True}}]},
                X_RAW),
        _infer("infer two inputs", {"inputs": [
            {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, -2]},
            {"name": "b", "datatype": "FP32", "shape": [1], "data": [0.5]}]}, "echo_two"),
        _infer("infer BYTES JSON", {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3],
                                                "data": [s.decode() for s in strings]}]},
               "echo_bytes"),
        _binary("infer BYTES binary",
                {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3],
                             "parameters": {"binary_data_size": len(_bytes_raw(strings))}}],
                 "outputs": [{"name": "s", "parameters": {"binary_data": True}}]},
                _bytes_raw(strings), "echo_bytes"),
        _binary("infer FP16 binary",
                {"inputs": [{"name": "h", "datatype": "FP16", "shape": [3],
                             "parameters": {"binary_data_size": 6}}],
                 "outputs": [{"name": "h", "parameters": {"binary_data": True}}]}, h,
                "echo_fp16"),
        _binary("infer FP16 binary in, JSON out",
                {"inputs": [{"name": "h", "datatype": "FP16", "shape": [3],
                             "parameters": {"binary_data_size": 6}}]}, h, "echo_fp16"),
        _infer("FP16 as JSON", {"inputs": [{"name": "h", "datatype": "FP16", "shape": [1],
                                            "data": [1.5]}]}, "echo_fp16"),
        _infer("unknown model", {"inputs": [X]}, "nope"),
        _infer("unknown datatype", {"inputs": [{**X, "datatype": "FP99"}]}),
        _infer("datatype not the model's", {"inputs": [{**X, "datatype": "INT32",
                                                        "data": [1, 2, 3, 4]}]}),
        _infer("shape/data mismatch", {"inputs": [{**X, "data": [1.0, 2.0, 3.0]}]}),
        _infer("shape not the model's", {"inputs": [{**X, "shape": [1, 3],
                                                     "data": [1.0, 2.0, 3.0]}]}),
        _infer("strings for FP32", {"inputs": [{**X, "data": ["a", "b", "c", "d"]}]}),
        _infer("missing input", {"inputs": [
            {"name": "a", "datatype": "INT32", "shape": [1], "data": [1]}]}, "echo_two"),
        _infer("unexpected input", {"inputs": [X, {**X, "name": "y"}]}),
        _infer("no inputs key", {}),
        _infer("empty inputs", {"inputs": []}),
        Case("not JSON", "POST", "/v2/models/echo/infer", b"{nope",
             {"Content-Type": "application/json"}),
        _binary("binary_data_size not the shape's",
                {"inputs": [{**XB, "parameters": {"binary_data_size": 8}}]}, X_RAW[:8]),
        _binary("binary shorter than binary_data_size", {"inputs": [XB]}, X_RAW[:8]),
        _binary("binary longer than binary_data_size", {"inputs": [XB]}, X_RAW + b"\0" * 4),
        Case("header length past the body", "POST", "/v2/models/echo/infer",
             json.dumps({"inputs": [XB]}).encode() + X_RAW,
             {"Inference-Header-Content-Length": "100000"}),
    ]


# ------------------------------------------------------------------ talking to servers


def send(port: int, case: Case) -> dict[str, Any]:
    """One request on a fresh connection: status, the headers compared, the body parsed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(case.method, case.path, body=case.body, headers=case.headers)
        resp = conn.getresponse()
        raw = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    out: dict[str, Any] = {"status": resp.status,
                           "content-type": headers.get("content-type", "")}
    n = headers.get("inference-header-content-length")
    json_part, binary = (raw[:int(n)], raw[int(n):]) if n is not None else (raw, b"")
    if n is not None:
        out["binary"] = binary.hex()
    try:
        out["body"] = json.loads(json_part) if json_part else None
    except ValueError:
        out["body"] = {"<not JSON>": json_part[:200].decode("latin-1")}
    return out


def differences(triton: Any, mesh: Any, path: str = "") -> list[str]:
    """Field-by-field differences; error texts are each server's own and not compared."""
    if isinstance(triton, dict) and isinstance(mesh, dict):
        out = []
        for key in sorted(set(triton) | set(mesh), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key == "error" and isinstance(triton.get(key), str) and isinstance(
                    mesh.get(key), str):
                continue
            if key not in mesh:
                out.append(f"{where}: mesh lacks it (triton {_short(triton[key])})")
            elif key not in triton:
                out.append(f"{where}: triton lacks it (mesh {_short(mesh[key])})")
            else:
                out += differences(triton[key], mesh[key], where)
        return out
    if isinstance(triton, list) and isinstance(mesh, list) and len(triton) == len(mesh):
        out = []
        for i, (a, b) in enumerate(zip(triton, mesh, strict=True)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    if triton != mesh:
        return [f"{path}: triton {_short(triton)}, mesh {_short(mesh)}"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "..."


# ------------------------------------------------------------------ servers


def ensure_pytriton() -> Path:
    done = subprocess.run([str(REPO / "scripts" / "setup-pytriton")], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/setup-pytriton failed:\n{done.stderr[-3000:]}")
    return PYTRITON_VENV / "bin" / "python"


def start_triton(procs: Processes, workdir: Path) -> tuple[Any, int]:
    python = ensure_pytriton()
    base = subprocess.run([str(python), "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [f"{base}/lib",
                                                    env.get("LD_LIBRARY_PATH")]))
    log = workdir / "triton.log"
    proc = procs.spawn([str(python), str(SERVER), str(port), str(free_port()),
                        str(free_port()), json.dumps(MODELS)], log=log, cwd=workdir, env=env)
    wait_ready(port, proc, log)
    return proc, port


def wait_ready(port: int, proc: Any, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if all(send(port, Case("", "GET", f"/v2/models/{m}/ready"))["status"] == 200
                   for m in MODELS):
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise TimeoutError(f"models not ready on port {port} after {timeout} s")


def start_mesh_rest(procs: Processes, workdir: Path) -> int:
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    etcd = procs.etcd(workdir / "etcd")
    port = free_port()
    proc, endpoint, _ = start_mesh(procs, workdir, etcd, "compare", models,
                                   extra=["--http-port", str(port)])
    for name, inputs in MODELS.items():
        (models / f"{name}.json").write_text(json.dumps({"inputs": inputs}))
        register(endpoint, name, "identity", f"{name}.json", load_now=True)
    wait_ready(port, proc, workdir / "mesh-compare.log")
    return port


# ------------------------------------------------------------------ the comparison


def compare() -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="mm-triton-compare-") as tmp, Processes() as procs:
        workdir = Path(tmp)
        mesh_port = start_mesh_rest(procs, workdir)
        triton_proc, triton_port = start_triton(procs, workdir)
        try:
            for case in cases():
                t, m = send(triton_port, case), send(mesh_port, case)
                diffs = differences(t, m)
                rows.append({"case": case.name, "request": f"{case.method} {case.path}",
                             "triton": t, "mesh": m, "differences": diffs})
        finally:
            triton_proc.send_signal(signal.SIGINT)  # Triton's own shutdown; SIGTERM hangs
            try:
                triton_proc.wait(60)
            except subprocess.TimeoutExpired:
                triton_proc.kill()
                triton_proc.wait()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    same = sum(1 for r in rows if not r["differences"])
    lines = [f"{same} of {len(rows)} cases answered identically (status, content type, "
             "every body field; error texts not compared).", "",
             "| case | request | Triton | mesh | differences |", "|---|---|---|---|---|"]
    for r in rows:
        diffs = "; ".join(r["differences"]).replace("|", "\\|") or "same"
        lines.append(f"| {r['case']} | `{r['request']}` | {r['triton']['status']} | "
                     f"{r['mesh']['status']} | {diffs} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/...")
    args = ap.parse_args()
    rows = compare()
    text = table(rows)
    print(text)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "triton_rest_compare.json").write_text(json.dumps(rows, indent=1) + "\n")
        md = RESULTS / "triton_rest_compare.md"
        notes = md.read_text().split(NOTES_MARK, 1)[1] if md.exists() and NOTES_MARK in \
            md.read_text() else "\n"
        md.write_text("# V2 REST: the mesh against Triton 2.51\n\n"
                      f"`{Path(sys.argv[0]).name} --write` (Triton through PyTriton 0.7.0, "
                      f"CPU, Python {sysconfig.get_python_version()}).\n\n"
                      f"{text}\n\n{NOTES_MARK}{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
