"""One settings object for a mesh instance, from flags and ``MM_*`` environment variables.

A leaf: it imports nothing of the mesh but ``units`` (and placement's policy
names, to check ``--placement``), so every layer can take its settings.

``OPTIONS`` is the single table of every setting: the CLI builds its flags from
it and the README's configuration table is generated from it
(``python -m modelmesh.settings``). A flag wins over its environment variable,
which wins over the default.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from modelmesh.units import parse_bytes, parse_duration
from placement import get_policy


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _labels(text: str | dict[str, str]) -> dict[str, str]:
    if isinstance(text, dict):
        return text
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"label {part!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _comma_list(text: str | list[str]) -> list[str]:
    if isinstance(text, list):
        return text
    return [p.strip() for p in str(text).split(",") if p.strip()]


def _placement(text: str | tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """``NAME[:PARAM=VALUE,...]`` -> (name, params); numbers are parsed, the policy checks them."""
    if isinstance(text, tuple):
        return text
    name, _, rest = str(text).strip().partition(":")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"placement parameter {part!r} is not PARAM=VALUE")
        try:
            params[key.strip()] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            params[key.strip()] = value.strip()
    get_policy(name or "density", **params)  # raises ValueError naming what is wrong
    return name or "density", params


def _file(text: str) -> str:
    """A file that must exist ("" = not set)."""
    path = str(text).strip()
    if path and not Path(path).expanduser().is_file():
        raise ValueError(f"{path} is not a file")
    return path


def _runtime(text: str) -> str:
    """Validate a ``--runtime`` value (syntax in ``RuntimeAddress``)."""
    return str(RuntimeAddress.parse(str(text)))


def _storage_config(text: str) -> str:
    """The storage configuration source: inline JSON, or a file or directory that exists.

    A typo fails at parse time; the contents are checked where they are read
    (``modelmesh.storage.config``), before the instance starts.
    """
    source = str(text).strip()
    if not source:
        return ""
    if source.startswith("{"):
        try:
            json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"inline storage config is not JSON ({exc.msg})") from None
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"storage config {path} does not exist")
    return source


def _existing_file(text: str | Path) -> Path:
    """A path to a file that exists (credentials: a typo fails at start, not on connect)."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} is not a file" if path.exists() else f"{path} does not exist")
    return path


def _check_etcd_security(s: Settings) -> None:
    """The etcd TLS / auth flags: pairs given together, and only for --etcd endpoints."""
    if s.etcd_cert and not s.etcd_key:
        raise ValueError("--etcd-cert needs --etcd-key (the certificate's private key)")
    if s.etcd_key and not s.etcd_cert:
        raise ValueError("--etcd-key needs --etcd-cert (the client certificate)")
    if s.etcd_user and not s.etcd_password_file:
        raise ValueError("--etcd-user needs --etcd-password-file (a file holding the password)")
    if s.etcd_password_file and not s.etcd_user:
        raise ValueError("--etcd-password-file needs --etcd-user")
    schemes = {e.partition("://")[0].lower() for e in s.etcd if "://" in e}
    if schemes - {"http", "https"} or len(schemes) > 1:
        raise ValueError("--etcd: endpoints are HOST:PORT, http://HOST:PORT or "
                         "https://HOST:PORT, all with the same scheme")
    given = [flag for flag, value in (
        ("--etcd-cacert", s.etcd_cacert), ("--etcd-cert", s.etcd_cert),
        ("--etcd-user", s.etcd_user)) if value]
    if given and not s.etcd:
        raise ValueError(f"{given[0]} applies to --etcd endpoints; the embedded etcd (no "
                         "--etcd) is plaintext on loopback and has no users")


_RUNTIME_KINDS = ("mmesh", "mlserver", "triton")


@dataclass(frozen=True, slots=True)
class RuntimeAddress:
    """A parsed ``--runtime`` value: what kind of server, at which gRPC target."""

    kind: str  # "embedded" | "mmesh" | "mlserver" | "triton"
    target: str = ""  # gRPC target: "HOST:PORT" or "unix:PATH" ("" when embedded)
    tls: bool = False  # KIND:tls:HOST:PORT: TLS to the runtime (verified by --runtime-ca)

    @classmethod
    def parse(cls, text: str) -> RuntimeAddress:
        """``embedded``, ``mmesh:HOST:PORT``, ``mmesh:unix:PATH``, ``mlserver:HOST:PORT``
        or ``triton:HOST:PORT``; ``ValueError`` saying what is wrong otherwise."""
        text = text.strip()
        if text in ("", "embedded"):
            return cls("embedded")
        kind, sep, rest = text.partition(":")
        if not sep or kind not in _RUNTIME_KINDS:
            raise ValueError(
                f"runtime {text!r}: expected embedded, mmesh:HOST:PORT, mmesh:unix:PATH, "
                "mlserver:HOST:PORT or triton:HOST:PORT"
            )
        tls = rest.startswith("tls:")
        if tls:
            rest = rest[len("tls:"):]
            if rest.startswith("unix:"):
                raise ValueError(f"runtime {text!r}: a unix socket needs no TLS")
        if rest.startswith("unix:"):
            if kind != "mmesh":
                raise ValueError(f"runtime {text!r}: {kind} listens on TCP only; use HOST:PORT")
            if not rest[len("unix:"):]:
                raise ValueError(f"runtime {text!r}: unix: needs a socket path")
            return cls(kind, rest)
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"runtime {text!r}: expected {kind}:HOST:PORT with a port 1-65535")
        return cls(kind, rest, tls)

    def __str__(self) -> str:
        if self.kind == "embedded":
            return "embedded"
        return f"{self.kind}:{'tls:' if self.tls else ''}{self.target}"


@dataclass(frozen=True)
class Option:
    name: str  # attribute on Settings
    flag: str
    env: str
    parse: Callable[[Any], Any]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("port", "--port", "MM_PORT", int, "gRPC port for V2 inference and management (0 = any free port)"),
    Option("host", "--host", "MM_HOST", str, "address to listen on"),
    Option("tls_cert", "--tls-cert", "MM_TLS_CERT", _file, "PEM certificate (chain) of the serving ports (gRPC and REST): with --tls-key they use TLS; re-read when the file changes (new connections get the new one)"),
    Option("tls_key", "--tls-key", "MM_TLS_KEY", _file, "PEM private key of --tls-cert"),
    Option("tls_ca", "--tls-ca", "MM_TLS_CA", _file, "PEM CA: every client must present a certificate it signed (mutual TLS); instances present their own --tls-cert to each other and verify peers against it"),
    Option("auth_file", "--auth-file", "MM_AUTH_FILE", _file, "YAML of bearer-token digests and client-certificate identities with roles (infer, read, manage); without it the mesh is open (README: Security); re-read when it changes"),
    Option("http_port", "--http-port", "MM_HTTP_PORT", int, "HTTP port for V2 REST (with Triton's binary tensor extension) and KServe V1 inference, served in the same process and event loop as gRPC (0 = any free port, -1 = off)"),
    Option("metrics_port", "--metrics-port", "MM_METRICS_PORT", int, "HTTP port for Prometheus /metrics and the /live and /ready probes (0 = any free port, -1 = off)"),
    Option("metrics_host", "--metrics-host", "MM_METRICS_HOST", str, "address the metrics port listens on (plaintext, no credentials: bind it where the scraper and the kubelet reach it)"),
    Option("per_model_metrics", "--per-model-metrics", "MM_PER_MODEL_METRICS", _bool, "also export modelmesh_model_request_milliseconds with a modelid label (one series per model served here, dropped on unregister; off by default: tens of thousands of models would swamp Prometheus)"),
    Option("grpc_reflection", "--grpc-reflection", "MM_GRPC_REFLECTION", _bool, "serve gRPC server reflection on the gRPC port, so grpcurl can list and describe the services without .proto files (`--no-grpc-reflection` or `MM_GRPC_REFLECTION=false` turns it off)"),
    Option("data_dir", "--data-dir", "MM_DATA_DIR", Path, "instance state: embedded etcd data, logs"),
    Option("capacity", "--capacity", "MM_CAPACITY", parse_bytes, "bytes of model memory this instance may use (suffixes: KiB MiB GiB, KB MB GB); a model measured larger than this after loading is unloaded again and refused with `RESOURCE_EXHAUSTED` (its size is kept in the registry, so later requests are refused before loading)"),
    Option("models_root", "--models-root", "MM_MODELS_ROOT", Path, "directory model paths are resolved against; paths outside it are refused"),
    Option("etcd", "--etcd", "MM_ETCD", _comma_list, "etcd endpoints [https://]HOST:PORT[,...]; empty = start an embedded etcd in the data dir (plaintext, on loopback)"),
    Option("etcd_cacert", "--etcd-cacert", "MM_ETCD_CACERT", _existing_file, "CA bundle (PEM) that verifies the etcd servers' certificates; turns on TLS to --etcd (as do https:// endpoints, which without it trust the system roots)"),
    Option("etcd_cert", "--etcd-cert", "MM_ETCD_CERT", _existing_file, "client certificate (PEM) presented to etcd (etcd's --client-cert-auth); needs --etcd-key; re-read when it changes"),
    Option("etcd_key", "--etcd-key", "MM_ETCD_KEY", _existing_file, "private key (PEM) of --etcd-cert"),
    Option("etcd_user", "--etcd-user", "MM_ETCD_USER", str, "etcd user to authenticate as (etcd's `auth enable`); needs --etcd-password-file; the token is renewed when etcd expires it"),
    Option("etcd_password_file", "--etcd-password-file", "MM_ETCD_PASSWORD_FILE", _existing_file, "file holding --etcd-user's password (a trailing newline is ignored; never logged)"),
    Option("mesh_name", "--mesh-name", "MM_MESH_NAME", str, "mesh name; the etcd prefix is /modelmesh/<mesh-name>/"),
    Option("instance_id", "--instance-id", "MM_INSTANCE_ID", str, "this instance's id (default: hostname-port)"),
    Option("advertise", "--advertise", "MM_ADVERTISE", str, "HOST:PORT other instances use to reach this one (default: the listen address)"),
    Option("labels", "--labels", "MM_LABELS", _labels, "instance labels KEY=VALUE[,KEY=VALUE...] for placement constraints"),
    Option("lease_ttl", "--lease-ttl", "MM_LEASE_TTL", parse_duration, "etcd lease TTL of the instance record and its copies (seconds)"),
    Option("max_concurrent_loads", "--max-concurrent-loads", "MM_MAX_CONCURRENT_LOADS", int, "models loading at the same time"),
    Option("load_failure_ttl", "--load-failure-ttl", "MM_LOAD_FAILURE_TTL", parse_duration, "how long a failed load is remembered before it is retried"),
    Option("load_timeout", "--load-timeout", "MM_LOAD_TIMEOUT", parse_duration, "longest a request waits for its model to load (or for room to load it)"),
    Option("storage_config", "--storage-config", "MM_STORAGE_CONFIG", _storage_config, "named storage configurations (ModelMesh storage-config format): a JSON or Secret file, a directory of one file per key, or inline JSON"),
    Option("disk_cache_dir", "--disk-cache-dir", "MM_DISK_CACHE_DIR", str, "where models pulled from storage are kept (default: <data-dir>/models-cache)"),
    Option("disk_cache_capacity", "--disk-cache-capacity", "MM_DISK_CACHE_CAPACITY", parse_bytes, "bytes of local disk for pulled models, least recently used evicted first (0 = keep none)"),
    Option("max_concurrent_downloads", "--max-concurrent-downloads", "MM_MAX_CONCURRENT_DOWNLOADS", int, "files downloaded from storage at the same time"),
    Option("download_timeout", "--download-timeout", "MM_DOWNLOAD_TIMEOUT", parse_duration, "longest a storage connection or read may stall before the load fails"),
    Option("max_message_bytes", "--max-message-bytes", "MM_MAX_MESSAGE_BYTES", parse_bytes, "largest gRPC or REST request (after gzip decompression) or response accepted; a larger REST body is refused with 413"),
    Option("inference_threads", "--inference-threads", "MM_INFERENCE_THREADS", int, "threads running model code (0 = 2 x CPUs)"),
    Option("inline_infer_ms", "--inline-infer-ms", "MM_INLINE_INFER_MS", float, "a model whose predictions usually take less than this runs on the serving thread instead of an inference thread (saves a thread hop per request; 0 = always use threads)"),
    Option("max_batch_rows", "--max-batch-rows", "MM_MAX_BATCH_ROWS", int, "concurrent requests for one model that are ready together are predicted in one call, up to this many rows (row-wise models only: scikit-learn, XGBoost, LightGBM, ONNX with a dynamic batch axis; 0 = never merge)"),
    Option("max_batch_delay_ms", "--max-batch-delay-ms", "MM_MAX_BATCH_DELAY_MS", float, "longest a request waits for others to share its prediction; it waits only while waiting has been paying off for that model (0 = merge only requests that are ready together)"),
    Option("runtime", "--runtime", "MM_RUNTIME", _runtime, "where models run: embedded (in this process), mmesh:HOST:PORT or mmesh:unix:PATH (a `modelmesh runtime` or any mmesh.ModelRuntime server; its runtimeStatus sets capacity, load concurrency and load timeout), mlserver:HOST:PORT or triton:HOST:PORT (a V2 server driven through its model-repository API; needs --runtime-repository); KIND:tls:HOST:PORT uses TLS (see --runtime-ca)"),
    Option("runtime_ca", "--runtime-ca", "MM_RUNTIME_CA", _file, "with --runtime KIND:tls:HOST:PORT, the PEM CA the runtime's certificate is verified against (default: --tls-ca, else the system roots); the mesh presents its --tls-cert to the runtime when it has one"),
    Option("runtime_repository", "--runtime-repository", "MM_RUNTIME_REPOSITORY", Path, "with --runtime mlserver:/triton:, the model repository directory that server reads; the mesh writes each model there before loading it"),
    Option("accepted_model_types", "--accepted-model-types", "MM_ACCEPTED_MODEL_TYPES", _comma_list, "model types registrations may name, TYPE[,TYPE...]; others are refused with INVALID_ARGUMENT, as ModelMesh's accepted-types list does (a type matches as given, e.g. mt:onnx, or by its format, e.g. onnx; empty = every type)"),
    Option("demo", "--demo", "MM_DEMO", _bool, "write the demo models into the models root and register them at start-up"),
    Option("log_level", "--log-level", "MM_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
    Option("placement", "--placement", "MM_PLACEMENT", _placement, "placement policy NAME[:PARAM=VALUE,...] (density, modelmesh, lru, gdsf), e.g. density:settle_s=60"),
    Option("rebalance_interval", "--rebalance-interval", "MM_REBALANCE_INTERVAL", parse_duration, "seconds between copy-scaling rounds (0 = the policy's own interval)"),
    Option("max_hops", "--max-hops", "MM_MAX_HOPS", int, "how many times a request may be forwarded between instances"),
    Option("drain_timeout", "--drain-timeout", "MM_DRAIN_TIMEOUT", parse_duration, "on SIGTERM, longest wait for this instance's models to load elsewhere"),
)


@dataclass(frozen=True)
class Settings:
    port: int = 8033
    host: str = "0.0.0.0"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    auth_file: str = ""
    http_port: int = 8008
    metrics_port: int = 2112
    metrics_host: str = "0.0.0.0"
    per_model_metrics: bool = False
    grpc_reflection: bool = True
    data_dir: Path = Path("data")
    capacity: int = parse_bytes("1GiB")
    models_root: Path = Path("models")
    etcd: list[str] = field(default_factory=list)
    etcd_cacert: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    etcd_user: str = ""
    etcd_password_file: Path | None = None
    mesh_name: str = "default"
    instance_id: str = ""
    advertise: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    lease_ttl: float = 10.0
    max_concurrent_loads: int = 2
    load_failure_ttl: float = 30.0
    load_timeout: float = 120.0
    storage_config: str = ""
    disk_cache_dir: str = ""
    disk_cache_capacity: int = parse_bytes("10GiB")
    max_concurrent_downloads: int = 4
    download_timeout: float = 30.0
    max_message_bytes: int = parse_bytes("16MiB")
    inference_threads: int = 0
    inline_infer_ms: float = 1.0
    max_batch_rows: int = 256
    max_batch_delay_ms: float = 1.0
    runtime: str = "embedded"
    runtime_repository: Path | None = None
    runtime_ca: str = ""
    accepted_model_types: list[str] = field(default_factory=list)
    demo: bool = False
    log_level: str = "INFO"
    placement: tuple[str, dict[str, Any]] = ("density", {})
    rebalance_interval: float = 0.0
    max_hops: int = 2
    drain_timeout: float = 30.0

    @property
    def etcd_prefix(self) -> str:
        return f"/modelmesh/{self.mesh_name}/"

    def resolved_instance_id(self, port: int) -> str:
        return self.instance_id or f"{socket.gethostname()}-{port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option as a flag whose default is 'not given' (env and defaults apply later)."""
    for opt in OPTIONS:
        if opt.parse is _bool:  # --X sets it, --no-X clears it (for options on by default)
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{opt.help} [{opt.env}]")
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=None, help=f"{opt.help} [{opt.env}]")


def from_sources(args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from parsed flags, then MM_* variables, then defaults.

    Raises ValueError naming the flag or variable whose value is invalid.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = getattr(args, opt.name, None) if args is not None else None
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None
    settings = Settings(**values)
    if settings.capacity <= 0:
        raise ValueError("--capacity must be positive")
    if settings.max_concurrent_loads < 1:
        raise ValueError("--max-concurrent-loads must be at least 1")
    if settings.max_concurrent_downloads < 1:
        raise ValueError("--max-concurrent-downloads must be at least 1")
    if settings.max_hops < 1:
        raise ValueError("--max-hops must be at least 1")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if settings.tls_ca and not settings.tls_cert:
        raise ValueError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
    _check_etcd_security(settings)
    return settings


def markdown_table() -> str:
    """The README's configuration table."""
    defaults = {f.name: f.default for f in fields(Settings)}
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        default = defaults.get(opt.name)
        if opt.name == "capacity":
            default = "1GiB"
        elif opt.name == "max_message_bytes":
            default = "16MiB"
        elif opt.name == "disk_cache_capacity":
            default = "10GiB"
        elif opt.name == "placement":
            default = "density"
        elif not isinstance(default, int | float | str | Path) or default == "":
            default = "(empty)" if opt.name != "etcd" else "(embedded)"
        rows.append(f"| `{opt.flag}` | `{opt.env}` | `{default}` | {opt.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
