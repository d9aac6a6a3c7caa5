"""Connecting to the runtime ``--runtime`` names, at start-up.

``connect_runtime`` builds the loader for the kind of server, waits for it to
be ready and returns a ``RuntimeBinding``: the loader and the limits the
runtime reported, which replace the mesh's own settings (``apply``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.runtimes.remote.model import RemoteLoader
from modelmesh.runtimes.remote.repository import RepositoryRuntimeLoader
from modelmesh.runtimes.remote.spi import ModelRuntimeLoader
from modelmesh.settings import RuntimeAddress, Settings
from modelmesh.storage import ModelFiles

log = logging.getLogger(__name__)


@dataclass
class RuntimeBinding:
    """A connected runtime: the cache's loader and the limits the runtime reported.

    A limit is None where the runtime reports none and the mesh's own setting applies.
    """

    address: RuntimeAddress
    loader: RemoteLoader
    capacity_bytes: int | None = None
    max_loading_concurrency: int | None = None
    load_timeout_s: float | None = None
    version: str = ""

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with the runtime's capacity and limits in place of the mesh's own."""
        changes: dict[str, Any] = {}
        if self.capacity_bytes:
            changes["capacity"] = self.capacity_bytes
        if self.max_loading_concurrency:
            changes["max_concurrent_loads"] = self.max_loading_concurrency
        if self.load_timeout_s:
            changes["load_timeout"] = self.load_timeout_s
        return replace(settings, **changes)

    async def close(self) -> None:
        await self.loader.close()


def runtime_credentials(settings: Settings,
                        address: RuntimeAddress) -> grpc.ChannelCredentials | None:
    """TLS towards a ``KIND:tls:HOST:PORT`` runtime: its certificate verified against
    ``--runtime-ca`` (else ``--tls-ca``, else the system roots), the mesh's own
    ``--tls-cert`` presented as the client certificate when it has one."""
    if not address.tls:
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    try:
        return grpc.ssl_channel_credentials(
            read(settings.runtime_ca or settings.tls_ca), read(settings.tls_key),
            read(settings.tls_cert))
    except OSError as exc:
        raise RuntimeError(f"--runtime {address}: cannot read the TLS files: {exc}") from None


def connect_runtime(settings: Settings, files: EmbeddedLoader | None = None, *,
                    ready_timeout: float | None = None) -> RuntimeBinding:
    """Connect to the runtime ``settings.runtime`` names and wait until it is ready (blocking).

    ``files`` gives the repository adapter the model files (default: the
    models root only). Waits at most ``ready_timeout`` seconds (default
    ``settings.load_timeout``); raises ``RuntimeError`` saying why when the
    runtime is not ready by then or the settings are incomplete.
    """
    address = RuntimeAddress.parse(settings.runtime)
    timeout = settings.load_timeout if ready_timeout is None else ready_timeout
    if address.kind == "embedded":
        raise RuntimeError("the embedded runtime needs no connection")
    credentials = runtime_credentials(settings, address)
    if address.kind == "mmesh":
        loader = ModelRuntimeLoader(address, load_timeout_s=settings.load_timeout,
                                    max_message_bytes=settings.max_message_bytes,
                                    credentials=credentials)
        try:
            status = loader.wait_ready(timeout)
        except BaseException:
            loader.channel.close()
            raise
        binding = RuntimeBinding(
            address, loader,
            capacity_bytes=int(status.capacityInBytes) or None,
            max_loading_concurrency=int(status.maxLoadingConcurrency) or None,
            load_timeout_s=status.modelLoadingTimeoutMs / 1000 or None,
            version=status.runtimeVersion,
        )
    else:
        if settings.runtime_repository is None:
            raise RuntimeError(
                f"--runtime {address} needs --runtime-repository DIR: the model repository "
                f"directory {address.kind} serves from"
            )
        repo_loader = RepositoryRuntimeLoader(
            address, Path(settings.runtime_repository),
            files or EmbeddedLoader(ModelFiles(Path(settings.models_root))),
            load_timeout_s=settings.load_timeout, max_message_bytes=settings.max_message_bytes,
            credentials=credentials)
        try:
            repo_loader.wait_ready(timeout)
        except BaseException:
            repo_loader.channel.close()
            raise
        binding = RuntimeBinding(address, repo_loader)
    log.info("runtime %s ready (capacity %s, loading concurrency %s, load timeout %s)",
             address, binding.capacity_bytes or "mesh's", binding.max_loading_concurrency
             or "mesh's", binding.load_timeout_s or "mesh's")
    return binding
