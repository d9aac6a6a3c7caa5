"""``modelmesh runtime``: the built-in runtime as its own server process.

It speaks the runtime SPI a mesh instance drives (``mmesh.ModelRuntime``:
loadModel, unloadModel, predictModelSize, modelSize, runtimeStatus) and V2
inference (``inference.GRPCInferenceService``: ModelInfer, ModelMetadata,
ModelReady, server liveness) for the data, on one gRPC server listening on a
unix socket (``--listen unix:/path``) or TCP (``--listen HOST:PORT``). A mesh
uses it with ``--runtime mmesh:unix:/path`` or ``--runtime mmesh:HOST:PORT``;
any KServe ModelMesh can use it too, since the protocols are wire compatible.

The model formats are the embedded runtime's (``modelmesh.runtimes``); model
paths resolve against ``--models-root`` as in the mesh, under the same rules
(``modelmesh.storage.paths``): every file opened resolves inside the root and
is a regular file no larger than ``--capacity``; a path the filesystem cannot
take (a NUL byte, a name too long) is INVALID_ARGUMENT, a file refused is
FAILED_PRECONDITION.

What the runtime decides and what it leaves to the mesh:
- the mesh decides which models are loaded: the runtime never evicts, and
  reports its ``--capacity`` so the mesh keeps within it;
- a model loads at most once however many loadModel calls arrive for it;
  at most ``--max-concurrent-loads`` load at a time;
- a loadModel that the mesh gives up on is followed by unloadModel; a model
  still loading then is dropped when its load finishes, never served;
- sizes are measured by each format's runtime (see its module) and reported
  in loadModel's ``sizeInBytes``;
- runtimeStatus unloads everything before answering READY (the SPI's rule:
  a mesh that (re)starts begins with an empty runtime);
- a request names its model in the ``mm-model-id`` header (as ModelMesh sends
  it) or else in ``model_name``; a model that is not loaded is ``NOT_FOUND``.

This module holds the command's flags and stays light to import (the CLI
builds its parser from it); the settings are in ``settings``, the runtime's
table of models in ``models``, the servicers and the gRPC server in ``server``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from modelmesh.runtime_server.settings import RuntimeServerSettings
from modelmesh.units import parse_bytes, parse_duration

__all__ = ["RuntimeServerSettings", "add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``modelmesh runtime`` (defaults: ``RuntimeServerSettings``)."""
    d = RuntimeServerSettings()
    parser.add_argument("--listen", default=d.listen,
                        help="unix:/path/to/socket or HOST:PORT (port 0: any free port)")
    parser.add_argument("--capacity", default="1GiB", type=parse_bytes,
                        help="model memory reported to the mesh (suffixes KiB MiB GiB)")
    parser.add_argument("--models-root", default=d.models_root, type=Path,
                        help="directory model paths are resolved against")
    parser.add_argument("--max-concurrent-loads", default=d.max_concurrent_loads, type=int,
                        help="models loading at the same time (reported to the mesh)")
    parser.add_argument("--load-timeout", default=d.load_timeout, type=parse_duration,
                        help="deadline for one load, seconds (reported to the mesh)")
    parser.add_argument("--default-model-size", default="1MiB", type=parse_bytes,
                        help="size the mesh assumes for a model not yet measured")
    parser.add_argument("--inference-threads", default=d.inference_threads, type=int,
                        help="threads running model code (0 = 2 x CPUs)")
    parser.add_argument("--max-message-bytes", default="16MiB", type=parse_bytes,
                        help="largest gRPC request or response accepted")
    parser.add_argument("--torch-device", default=d.torch_device,
                        help="device for TorchScript models: cpu, cuda, cuda:N "
                             "(default: MM_TORCH_DEVICE, else cuda when available)")
    parser.add_argument("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--tls-cert", default=d.tls_cert,
                        help="PEM certificate: TLS on a TCP --listen (re-read when it changes)")
    parser.add_argument("--tls-key", default=d.tls_key, help="PEM key of --tls-cert")
    parser.add_argument("--tls-ca", default=d.tls_ca,
                        help="PEM CA: the mesh must present a certificate it signed")


def main(args: argparse.Namespace) -> int:
    """``modelmesh runtime``: serve until SIGTERM or SIGINT, then stop cleanly."""
    try:
        settings = RuntimeServerSettings(
            listen=args.listen, capacity=args.capacity, models_root=args.models_root,
            max_concurrent_loads=args.max_concurrent_loads, load_timeout=args.load_timeout,
            default_model_size=args.default_model_size,
            inference_threads=args.inference_threads, max_message_bytes=args.max_message_bytes,
            torch_device=args.torch_device, log_level=args.log_level,
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        )
    except ValueError as exc:
        print(f"modelmesh runtime: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> int:
        # Here, not at the top: the CLI imports this module to build its parser.
        from modelmesh.runtime_server.server import RuntimeServer

        server = RuntimeServer(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            print(f"modelmesh runtime: {exc}", file=sys.stderr)
            await server.stop()
            return 1
        print(f"modelmesh runtime: ready on {server.address}", flush=True)
        await stop.wait()
        await server.stop()
        return 0

    return asyncio.run(serve())
