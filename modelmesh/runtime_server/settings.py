"""The settings of ``modelmesh runtime`` (its flags are in ``modelmesh.runtime_server``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelmesh.units import parse_bytes


@dataclass(frozen=True)
class RuntimeServerSettings:
    """The runtime server's settings (flags of ``modelmesh runtime``)."""

    listen: str = "127.0.0.1:8085"
    capacity: int = parse_bytes("1GiB")
    models_root: Path = Path("models")
    max_concurrent_loads: int = 2
    load_timeout: float = 120.0
    default_model_size: int = parse_bytes("1MiB")
    inference_threads: int = 0
    max_message_bytes: int = parse_bytes("16MiB")
    torch_device: str = ""
    log_level: str = "INFO"
    #: TLS on a TCP --listen: certificate and key (PEM); with ``tls_ca`` clients (the
    #: mesh) must present a certificate that CA signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key")
        if self.tls_cert and self.listen.startswith("unix:"):
            raise ValueError("TLS is for a TCP --listen; a unix socket is local to the pod")
        if self.capacity <= 0:
            raise ValueError("--capacity must be positive")
        if self.max_concurrent_loads < 1:
            raise ValueError("--max-concurrent-loads must be at least 1")
        if self.load_timeout <= 0:
            raise ValueError("--load-timeout must be positive")
