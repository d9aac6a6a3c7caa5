"""Shared fixtures: a real etcd, real `modelmesh serve` processes, demo model files.

Every process a fixture starts is stopped by the fixture, by its pid, also when
the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from modelmesh.registry.embedded import EmbeddedEtcd, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """A real etcd process on free loopback ports for the whole session."""
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root with the demo models (one per format) written into it."""
    from modelmesh.demo import write_demo_models

    root = tmp_path_factory.mktemp("models")
    write_demo_models(root)
    return root


@pytest.fixture(scope="session")
def demo_models(models_root: Path) -> dict:
    """The demo models by type (sklearn, xgboost, lightgbm, onnx, identity)."""
    from modelmesh.demo import write_demo_models

    return {m.model_type: m for m in write_demo_models(models_root)}


@dataclass
class MeshProcess:
    """A `modelmesh serve` child process and how to reach it."""

    args: list[str]
    port: int
    metrics_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    #: The REST port (``--http-port``); -1 where the test turned REST off.
    http_port: int = -1

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        """HOST:PORT of the REST transport (as tritonclient.http takes it)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0, wait: bool = True) -> MeshProcess:
        """Start the process and (unless ``wait`` is false) wait until ServerReady says true."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh", "serve", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            cwd=REPO,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.endpoint) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"modelmesh serve exited early:\n{self.log()}")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"modelmesh serve not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


@pytest.fixture
def mesh_factory(tmp_path: Path, models_root: Path) -> Iterator:
    """Start `modelmesh serve` processes; all are stopped at the end of the test."""
    yield from _launcher(tmp_path, models_root)


@pytest.fixture(scope="module")
def module_mesh_factory(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator:
    """Like mesh_factory, but the processes live for the whole test module."""
    yield from _launcher(tmp_path_factory.mktemp("mesh"), models_root)


def _launcher(tmp_path: Path, models_root: Path) -> Iterator:
    started: list[MeshProcess] = []

    def make(*extra: str, etcd: EmbeddedEtcd | None = None, capacity: str = "256MiB",
             data_dir: Path | None = None, port: int | None = None,
             env: dict[str, str] | None = None, start: bool = True) -> MeshProcess:
        port = port or free_port()
        metrics_port = free_port()
        http_port = free_port()
        data_dir = data_dir or tmp_path / f"data-{port}"
        args = [
            "--port", str(port), "--host", "127.0.0.1", "--metrics-port", str(metrics_port),
            "--http-port", str(http_port),
            "--data-dir", str(data_dir), "--capacity", capacity,
            "--models-root", str(models_root), "--instance-id", f"test-{port}",
            "--mesh-name", f"t{port}",
        ]
        if etcd is not None:
            args += ["--etcd", etcd.endpoint]
        if "--http-port" in extra:  # the test's own choice (e.g. -1: off)
            http_port = int(extra[extra.index("--http-port") + 1])
        mp = MeshProcess([*args, *extra], port, metrics_port, tmp_path / f"mesh-{port}.log",
                         env or {}, http_port=http_port)
        started.append(mp)
        return mp.start() if start else mp

    try:
        yield make
    finally:
        for mp in started:
            mp.stop()


# A real S3 server (SeaweedFS) for the storage tests: the `seaweedfs` fixture.
pytest_plugins = ["seaweedfs"]
