"""The embedded etcd never outlives its mesh, and a data dir left behind starts again at once.

Real processes throughout: `modelmesh serve` killed with SIGKILL, etcd processes
orphaned as a mesh of an older version left them. Every process a test starts is
found by pid and stopped by pid in a ``finally``, and only after its command
line shows it is the etcd (or the sleep) the test started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelmesh.registry.embedded import EmbeddedEtcd, find_etcd_binary, free_port

pytestmark = pytest.mark.integration


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    """Running, not a zombie (an exited child not yet reaped has stopped all the same)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _member_dirs(data_dir: Path) -> set[str]:
    member = data_dir / "member-data"
    return {str(member), os.path.realpath(member)}


def _etcds_for(data_dir: Path) -> list[int]:
    """Pids of the running etcd processes whose --data-dir is ``data_dir``'s member dir."""
    members = _member_dirs(data_dir)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        argv = _cmdline(int(name))
        if argv and os.path.basename(argv[0]).startswith("etcd") and _alive(int(name)) and any(
                argv[i] == "--data-dir" and argv[i + 1] in members
                for i in range(len(argv) - 1)):
            found.append(int(name))
    return found


def _kill(pid: int, must_mention: str) -> None:
    """SIGKILL ``pid`` if it still runs what the test started (its cmdline says so)."""
    if _alive(pid) and must_mention in " ".join(_cmdline(pid)):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return json.loads(resp.read()).get("health") == "true"
    except OSError:
        return False


@pytest.fixture
def started() -> Iterator[list[tuple[int, str]]]:
    """(pid, text its cmdline must hold) of every process a test starts; killed at the end."""
    pids: list[tuple[int, str]] = []
    try:
        yield pids
    finally:
        for pid, mention in pids:
            _kill(pid, mention)


def _orphan_etcd(data_dir: Path, started: list[tuple[int, str]]) -> int:
    """An etcd for ``data_dir`` whose parent has exited, healthy (it holds its database)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    client, peer = free_port(), free_port()
    member = os.path.realpath(data_dir / "member-data")
    args = [find_etcd_binary(), "--name", "mm", "--data-dir", member,
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"mm=http://127.0.0.1:{peer}", "--log-level", "error"]
    code = ("import subprocess, sys\n"
            f"p = subprocess.Popen({args!r}, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL, start_new_session=True)\n"
            "print(p.pid)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    pid = int(out.stdout)
    started.append((pid, member))
    deadline = time.monotonic() + 20
    while not _healthy(client):
        assert time.monotonic() < deadline, "the orphan etcd did not become healthy"
        time.sleep(0.1)
    return pid


def test_etcd_dies_with_a_killed_mesh_and_a_restart_is_ready_promptly(mesh_factory, tmp_path,
                                                                      started):
    data_dir = tmp_path / "kill9"
    etcd_dir = data_dir / "etcd"  # where `modelmesh serve` keeps its embedded etcd
    try:
        first = mesh_factory(data_dir=data_dir)  # no --etcd: embedded etcd in the data dir
        assert first.proc is not None
        [etcd_pid] = _etcds_for(etcd_dir)
        started.append((etcd_pid, "member-data"))
        first.proc.kill()  # kill -9: no shutdown code runs in the mesh
        first.proc.wait(10)
        assert _wait_gone(etcd_pid, 10), "the embedded etcd outlived its mesh's SIGKILL"

        begun = time.monotonic()
        second = mesh_factory(data_dir=data_dir, start=False)
        second.start(timeout=20)
        assert time.monotonic() - begun < 20
        [second_etcd] = _etcds_for(etcd_dir)
        started.append((second_etcd, "member-data"))
        assert second.stop() == 0
        assert _wait_gone(second_etcd, 10)
    finally:
        for pid in _etcds_for(etcd_dir):  # whatever is left of this data dir's etcds
            started.append((pid, "member-data"))


def test_a_leftover_etcd_whose_mesh_is_gone_is_stopped_on_start(tmp_path, started):
    data_dir = tmp_path / "leftover"
    orphan = _orphan_etcd(data_dir, started)  # as a mesh without the fix left it: no pid file
    etcd = EmbeddedEtcd(data_dir)
    try:
        begun = time.monotonic()
        etcd.start(timeout=15)
        assert time.monotonic() - begun < 15
        assert not _alive(orphan)
        assert etcd.process is not None
        started.append((etcd.process.pid, "member-data"))
    finally:
        etcd.stop()


def test_start_never_signals_a_process_that_is_not_this_data_dirs_etcd(tmp_path, started):
    sleeper = subprocess.Popen(["sleep", "120"])
    started.append((sleeper.pid, "sleep"))
    other_etcd = _orphan_etcd(tmp_path / "other", started)  # another data dir's orphan
    data_dir = tmp_path / "mine"
    data_dir.mkdir()
    for stranger in (sleeper.pid, other_etcd):
        (data_dir / "etcd.pid").write_text(json.dumps({"pid": stranger, "parent": 1}))
        etcd = EmbeddedEtcd(data_dir)
        try:
            etcd.start(timeout=20)
        finally:
            etcd.stop()
        assert _alive(sleeper.pid) and _alive(other_etcd)
    sleeper.kill()
    sleeper.wait()


def test_a_data_dir_in_use_is_refused_at_once(tmp_path, started):
    first, second = EmbeddedEtcd(tmp_path / "shared"), EmbeddedEtcd(tmp_path / "shared")
    try:
        first.start()
        assert first.process is not None
        started.append((first.process.pid, "member-data"))
        begun = time.monotonic()
        with pytest.raises(RuntimeError, match="in use by another running mesh"):
            second.start(timeout=10)
        assert time.monotonic() - begun < 5
        assert first.process.poll() is None and _healthy(int(first.endpoint.rsplit(":")[1]))
    finally:
        if second.process is not None:
            started.append((second.process.pid, "member-data"))
        second.stop()
        first.stop()


def test_etcd_outlives_the_thread_that_started_it(tmp_path, started):
    """PDEATHSIG fires when the forking *thread* exits: a worker thread that ends (as
    ``asyncio.to_thread``'s may) must not take etcd with it."""
    etcd = EmbeddedEtcd(tmp_path / "thread")
    try:
        worker = threading.Thread(target=etcd.start)
        worker.start()
        worker.join(30)
        assert etcd.process is not None
        started.append((etcd.process.pid, "member-data"))
        time.sleep(1)
        assert etcd.process.poll() is None
        assert _healthy(int(etcd.endpoint.rsplit(":")[1]))
    finally:
        etcd.stop()
