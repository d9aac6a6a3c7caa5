"""The ``modelmesh`` command: serve, runtime, register, unregister, status, list, simulate."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from modelmesh import runtime_server
from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.headers import MAX_COPIES, MIN_COPIES, REPLACE
from modelmesh.settings import add_arguments, from_sources

DEFAULT_ENDPOINT = "localhost:8033"

#: Allocations of at least this many bytes come straight from mmap (see ``_bound_heap``).
MMAP_THRESHOLD = 1 << 20
#: Free bytes the heap may keep at its top before giving them back (glibc's default
#: is 128 KiB, once the mmap threshold is fixed): see ``_bound_heap``.
TRIM_THRESHOLD = 32 << 20

#: How long a thread holds the GIL while another waits for it (Python's default: 5 ms).
#: grpc.aio's poller thread must take the GIL to hand each completion to the event
#: loop, and a loading or predicting thread takes it back after every system call: with
#: a busy loop each such hand-over waited up to the whole interval. Measured in one
#: run against the default (benchmarks/run --quick --only churn, 500 models, a third
#: fitting): churn p99 31-36 ms against 86-161 ms, req/s 0.72-0.77x of everything
#: fitting against 0.37-0.58x; warm single-model req/s unchanged or higher (c1 914
#: against 870, c16 1582 against 1497).
SWITCH_INTERVAL_S = 0.0005


def _bound_heap() -> None:
    """Make freed request-sized buffers go back to the OS (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold each time an mmapped block is freed (up to 32 MiB),
    so after the first large request every later one of up to that size comes from the
    heap, and each thread's arena keeps what it once held: a server sent a few 15 MiB
    requests stayed tens of MiB above its baseline for good. A fixed threshold (which
    also turns that adjustment off) maps such buffers and unmaps them on free; smaller
    allocations, the request path's own, are served by the heap as before.

    Fixing the threshold also fixes glibc's trim threshold at 128 KiB: every load of a
    model of a few hundred KiB then gave its pages back when it freed its file's bytes,
    and faulted them in again for the next (about ten page faults a load, each costly
    in a virtual machine). The heap may keep ``TRIM_THRESHOLD`` free at its top.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, MMAP_THRESHOLD)
    mallopt(m_trim_threshold, TRIM_THRESHOLD)


def _tune_process() -> None:
    """What a server process sets for itself: the heap bound and the GIL's interval."""
    _bound_heap()
    sys.setswitchinterval(SWITCH_INTERVAL_S)


# -- serve ----------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the mesh (numpy, the model libraries) is heavy for client commands.
    from modelmesh.instance import MeshInstance
    from modelmesh.storage.config import check_source

    try:
        settings = from_sources(args)
        check_source(settings.storage_config)  # its contents, not only that it exists
    except ValueError as exc:
        print(f"modelmesh serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aetcd").setLevel(logging.WARNING)
    _tune_process()

    async def main() -> int:
        instance = MeshInstance(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await instance.start()
        except (RuntimeError, FileNotFoundError, TimeoutError, OSError) as exc:
            print(f"modelmesh serve: {exc}", file=sys.stderr)
            return 1
        print(f"modelmesh: instance {instance.instance_id} ready on port {instance.port}"
              f" (HTTP port {instance.http_port}, metrics port {instance.metrics_port})",
              flush=True)
        await stop.wait()
        # A second signal while draining stops at once.
        drain = asyncio.ensure_future(instance.drain())
        stop.clear()
        second = asyncio.ensure_future(stop.wait())
        await asyncio.wait([drain, second], return_when=asyncio.FIRST_COMPLETED)
        second.cancel()
        if not drain.done():
            drain.cancel()
        await instance.stop()
        return 0

    return asyncio.run(main())


# -- runtime --------------------------------------------------------------------------


def _runtime(args: argparse.Namespace) -> int:
    _tune_process()
    return runtime_server.main(args)


# -- client commands -------------------------------------------------------------------


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``--endpoint``: TLS with ``--ca`` (and a client certificate with
    ``--cert``/``--key``), carrying ``--token`` as a bearer token on every call."""
    if args.ca or args.cert:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
        if args.token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(args.token))
        return grpc.secure_channel(args.endpoint, creds)
    channel = grpc.insecure_channel(args.endpoint)
    if args.token:  # a token in plaintext: the mesh is reached without TLS
        return grpc.intercept_channel(channel, _BearerToken(args.token))
    return channel


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on a plaintext channel."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(client_call_details), request)


def _mesh_stub(args: argparse.Namespace):

    return mm_grpc.ModelMeshStub(_channel(args))


def _fail(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def _status_json(info) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(info, always_print_fields_with_no_presence=True)


def _register(args: argparse.Namespace) -> int:

    if args.from_file:
        return _register_bulk(args)
    if not (args.model_id and args.type and args.path):
        print("error: register needs MODEL_ID --type T --path P (or --from-file F)",
              file=sys.stderr)
        return 2
    stub = _mesh_stub(args)
    req = mm.RegisterModelRequest(
        modelId=args.model_id, modelInfo=mm.ModelInfo(type=args.type, path=args.path,
                                                      key=args.storage_key or ""),
        loadNow=args.load_now, sync=args.sync,
    )
    metadata = [(REPLACE, "true")] if args.replace else []
    if args.min_copies:
        metadata.append((MIN_COPIES, str(args.min_copies)))
    if args.max_copies:
        metadata.append((MAX_COPIES, str(args.max_copies)))
    try:
        info = stub.registerModel(req, metadata=metadata, timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail(exc)
    status = mm.ModelStatusInfo.ModelStatus.Name(info.status)
    print(f"{args.model_id}: {status}" + (f" ({'; '.join(info.errors)})" if info.errors else ""))
    return 0


def _register_bulk(args: argparse.Namespace) -> int:
    from tqdm import tqdm


    rows: list[tuple[str, str, str]] = []
    try:
        with open(args.from_file, newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "model_id"):
                    continue
                if len(row) != 3 or not all(c.strip() for c in row):
                    print(f"error: {args.from_file}:{lineno}: expected model_id,type,path",
                          file=sys.stderr)
                    return 2
                rows.append((row[0].strip(), row[1].strip(), row[2].strip()))
    except OSError as exc:
        print(f"error: cannot read {args.from_file}: {exc}", file=sys.stderr)
        return 2
    stub = ext_grpc.ModelMeshExtensionsStub(_channel(args))
    failed = 0
    batch = 500
    with tqdm(total=len(rows), unit="model", disable=args.quiet) as bar:
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            req = ext.RegisterModelsRequest(
                requests=[mm.RegisterModelRequest(
                    modelId=m, modelInfo=mm.ModelInfo(type=t, path=p), loadNow=args.load_now)
                    for m, t, p in chunk],
                replace=args.replace,
            )
            try:
                resp = stub.registerModels(req, timeout=args.timeout)
            except grpc.RpcError as exc:
                return _fail(exc)
            for res in resp.results:
                if res.code:
                    failed += 1
                    tqdm.write(f"{res.modelId}: {grpc.StatusCode(_code(res.code)).name}: "
                               f"{res.message}", file=sys.stderr)
            bar.update(len(chunk))
    print(f"registered {len(rows) - failed} of {len(rows)} models")
    return 1 if failed else 0


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


def _unregister(args: argparse.Namespace) -> int:

    try:
        _mesh_stub(args).unregisterModel(mm.UnregisterModelRequest(modelId=args.model_id),
                                         timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"{args.model_id}: unregistered")
    return 0


def _status(args: argparse.Namespace) -> int:

    try:
        info = _mesh_stub(args).getModelStatus(mm.GetStatusRequest(modelId=args.model_id),
                                               timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail(exc)
    if args.json:
        print(_status_json(info))
    else:
        print(f"{args.model_id}: {mm.ModelStatusInfo.ModelStatus.Name(info.status)}")
        for err in info.errors:
            print(f"  error: {err}")
        for c in info.modelCopyInfos:
            print(f"  copy on {c.location}: {mm.ModelStatusInfo.ModelStatus.Name(c.copyStatus)}")
    return 0 if info.status != mm.ModelStatusInfo.NOT_FOUND else 1


def _list(args: argparse.Namespace) -> int:
    from google.protobuf import json_format


    stub = ext_grpc.ModelMeshExtensionsStub(_channel(args))
    token = ""
    items = []
    try:
        while True:
            resp = stub.listModels(ext.ListModelsRequest(
                page_size=1000, page_token=token, prefix=args.prefix or "",
                include_status=args.status), timeout=args.timeout)
            items.extend(resp.models)
            token = resp.next_page_token
            if not token:
                break
    except grpc.RpcError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps([json_format.MessageToDict(m) for m in items], indent=2))
    else:
        for m in items:
            print(f"{m.modelId}\t{m.modelInfo.type}\t{m.modelInfo.path}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from simulations.cli import main as simulate_main

    extra = [flag for flag, on in (("--no-progress", args.no_progress),
                                   ("--no-plots", args.no_plots)) if on]
    return simulate_main([args.config, "--out", args.out, *extra])


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="modelmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run a mesh instance")
    add_arguments(p)
    p.set_defaults(func=_serve)


    p = sub.add_parser("runtime", help="run the built-in runtime as its own process "
                       "(mmesh.ModelRuntime + V2 inference) for serve --runtime mmesh:...")
    runtime_server.add_arguments(p)
    p.set_defaults(func=_runtime)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--endpoint", default=os.environ.get("MM_ENDPOINT", DEFAULT_ENDPOINT),
                       help="HOST:PORT of any mesh instance [MM_ENDPOINT]")
        c.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
        c.add_argument("--ca", default=os.environ.get("MM_CA"),
                       help="PEM CA to verify the mesh's certificate: use TLS [MM_CA]")
        c.add_argument("--cert", default=os.environ.get("MM_CERT"),
                       help="PEM client certificate, for mutual TLS [MM_CERT]")
        c.add_argument("--key", default=os.environ.get("MM_KEY"),
                       help="PEM key of --cert [MM_KEY]")
        c.add_argument("--token", default=os.environ.get("MM_TOKEN"),
                       help="bearer token sent with every call (--auth-file) [MM_TOKEN]")
        return c

    p = client("register", "register a model (or many with --from-file)")
    p.add_argument("model_id", nargs="?")
    p.add_argument("--type", help="sklearn, xgboost, lightgbm, onnx, torchscript, identity")
    p.add_argument("--path", help="model file, relative to the models root")
    p.add_argument("--storage-key", dest="storage_key",
                   help="storage key (ModelInfo.key): a --storage-config name or JSON")
    p.add_argument("--load-now", action="store_true", help="start loading right away")
    p.add_argument("--sync", action="store_true", help="with --load-now: wait for the load")
    p.add_argument("--replace", action="store_true",
                   help="replace an existing registration with a different definition")
    p.add_argument("--min-copies", type=int, default=0,
                   help="copies kept loaded even without traffic (default 0)")
    p.add_argument("--max-copies", type=int, default=0,
                   help="most copies scaling may create (default 0: no limit)")
    p.add_argument("--from-file", help="CSV of model_id,type,path to register in bulk")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_register)

    p = client("unregister", "unregister a model")
    p.add_argument("model_id")
    p.set_defaults(func=_unregister)

    p = client("status", "show a model's status")
    p.add_argument("model_id")
    p.add_argument("--json", action="store_true", help="ModelStatusInfo as protobuf JSON")
    p.set_defaults(func=_status)

    p = client("list", "list registered models")
    p.add_argument("--prefix", help="only ids starting with this")
    p.add_argument("--status", action="store_true", help="include each model's status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = sub.add_parser("simulate", help="run the placement simulator on a YAML config")
    p.add_argument("config")
    p.add_argument("--out", required=True, help="directory for results and plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
