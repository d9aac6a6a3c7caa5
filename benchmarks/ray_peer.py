"""The Ray Serve peer: model multiplexing (``peer_servers/ray_multiplex.py``) in .venv-ray.

Ray is a process tree, not a server: the script started here runs ``ray.init``, which
starts a GCS server, a raylet, agents and one worker process per actor (the Serve
controller, the HTTP proxy, the replica). So the starter puts it in a session of its
own and the stopper ends every process of that session:

1. SIGTERM to the script, which runs ``serve.shutdown()`` and ``ray.shutdown()``;
2. after ``GRACE_S`` (Ray's own graceful shutdown can take half a minute) SIGKILL to
   every process still in the session, found by session id in /proc;
3. Ray's session files (sockets, logs, the spilled object store) live in a directory
   of the benchmark's workdir given as Ray's temp dir, removed at the end.

:func:`ray_peer` does all of that as a context manager, so it also happens when a
benchmark fails. Memory and CPU are summed over the session's processes.

What a benchmark author must know: requests go to the replica's direct-ingress port
(``RayPeer.direct_port``, Ray's throughput-optimized path, no proxy hop) unless they
ask for the proxy (``proxy_port``); either way the model is named by the header
``serve_multiplexed_model_id``; ``GET /stats`` gives the replica's counters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO, Processes, free_port
from peers import PEER_SERVERS, _peer_env, _version

RAY_VENV = REPO / ".venv-ray"
SETUP_TIMEOUT = 1800
START_TIMEOUT = 120.0
GRACE_S = 15.0
MODEL_HEADER = "serve_multiplexed_model_id"
# Ray's unix sockets live under its temp dir; a socket path may have at most 107 bytes.
MAX_TEMP_DIR_CHARS = 50


def ensure_ray_venv() -> str:
    """Make (or keep: the script is idempotent) .venv-ray; Ray's version."""
    done = subprocess.run([str(REPO / "scripts" / "setup-ray")], cwd=REPO, capture_output=True,
                          text=True, timeout=SETUP_TIMEOUT,
                          env={**os.environ, "MM_PIN_PYTHON": sys.executable})
    if done.returncode != 0:
        raise RuntimeError(f"scripts/setup-ray failed ({done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return _version(RAY_VENV, "ray")


@dataclass(frozen=True)
class RayPeer:
    """A running Ray Serve multiplexing app."""

    proc: subprocess.Popen
    proxy_port: int
    direct_port: int | None
    temp_dir: Path
    max_models: int

    @property
    def port(self) -> int:
        """Where requests go: direct ingress when Ray has it, else the proxy."""
        return self.direct_port or self.proxy_port

    def pids(self) -> list[int]:
        return session_members(self.proc.pid)

    def rss_bytes(self) -> int:
        """RSS summed over every process of Ray's session."""
        return sum(_rss(pid) for pid in self.pids())

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of Ray's session, so far."""
        return cpu_seconds(self.pids())

    def stats(self) -> dict[str, float]:
        """The replica's own counters (``GET /stats``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=30) as r:
            return json.loads(r.read())


def _stat(pid: int) -> list[int]:
    """/proc/<pid>/stat fields after the command name (state first), as integers; [] if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return [0] * 20
    fields = text.rsplit(")", 1)[1].split()
    return [0, *map(int, fields[1:])]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU used so far by the processes ``pids`` (those still alive)."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum(f[11] + f[12] for f in map(_stat, pids)) / tick


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def session_members(sid: int) -> list[int]:
    """Every live process whose session id is ``sid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields[3] == sid:
                out.append(int(entry.name))
    return out


def start_ray(procs: Processes, workdir: Path, models_root: Path, max_models: int) -> RayPeer:
    """Start the app holding at most ``max_models`` models; returns once it answers."""
    temp_dir = workdir / "ray"
    if len(str(temp_dir)) > MAX_TEMP_DIR_CHARS:
        raise RuntimeError(f"{temp_dir} is too long for Ray's socket paths")
    temp_dir.mkdir(parents=True, exist_ok=True)
    proxy_port, direct_base = free_port(), free_port()
    ready = workdir / "ray-ready.json"
    ready.unlink(missing_ok=True)
    env = {**_peer_env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(temp_dir),
           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_base),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_base + 20),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    log = workdir / "ray.log"
    proc = procs.spawn(
        [str(RAY_VENV / "bin" / "python"), str(PEER_SERVERS / "ray_multiplex.py"),
         "--models-root", str(models_root), "--max-models", str(max_models),
         "--port", str(proxy_port), "--temp-dir", str(temp_dir), "--ready-file", str(ready)],
        log=log, cwd=workdir, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            stop_ray(procs, proc, temp_dir)
            raise RuntimeError(f"Ray did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.2)
    ports = json.loads(ready.read_text())
    return RayPeer(proc, ports["proxy_port"], ports["direct_port"], temp_dir, max_models)


def stop_ray(procs: Processes, proc: subprocess.Popen, temp_dir: Path,
             grace: float = GRACE_S) -> dict[str, Any]:
    """Stop Ray's whole session (see the module doc); how it went."""
    members = set(session_members(proc.pid))
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    graceful = proc.poll() is not None
    members |= set(session_members(proc.pid))
    left = [pid for pid in members if _stat(pid)[3] == proc.pid]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(10)
    deadline = time.monotonic() + 10
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc in procs.started:
        procs.started.remove(proc)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return {"graceful": graceful, "killed": len(left), "seconds": time.monotonic() - t0}


@contextmanager
def ray_peer(procs: Processes, workdir: Path, models_root: Path,
             max_models: int) -> Iterator[RayPeer]:
    """:func:`start_ray`, and :func:`stop_ray` on the way out whatever happens."""
    peer = start_ray(procs, workdir, models_root, max_models)
    try:
        yield peer
    finally:
        stop_ray(procs, peer.proc, peer.temp_dir)
