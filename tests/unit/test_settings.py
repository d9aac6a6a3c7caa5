"""Settings parsed from flags and ``MM_*`` variables: placement and routing options."""

from __future__ import annotations

import pytest

from modelmesh.settings import from_sources


def test_placement_setting_parses_name_and_parameters() -> None:
    s = from_sources(environ={"MM_PLACEMENT": "density:settle_s=2.5,max_fill_loads=3"})
    assert s.placement == ("density", {"settle_s": 2.5, "max_fill_loads": 3})
    assert from_sources(environ={}).placement == ("density", {})
    assert from_sources(environ={"MM_PLACEMENT": "lru"}).placement == ("lru", {})


@pytest.mark.parametrize("value, message", [
    ("nosuch", "unknown placement policy"),
    ("density:bogus=1", "has no parameter"),
    ("density:settle_s", "is not PARAM=VALUE"),
    ("density:target_utilization=0", "target_utilization"),
])
def test_bad_placement_setting_names_the_problem(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(environ={"MM_PLACEMENT": value})


def test_max_hops_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max-hops"):
        from_sources(environ={"MM_MAX_HOPS": "0"})


def test_grpc_reflection_is_on_unless_turned_off() -> None:
    import argparse

    from modelmesh.settings import add_arguments

    assert from_sources(environ={}).grpc_reflection is True
    assert from_sources(environ={"MM_GRPC_REFLECTION": "false"}).grpc_reflection is False
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    off = parser.parse_args(["--no-grpc-reflection"])
    assert from_sources(off, environ={"MM_GRPC_REFLECTION": "true"}).grpc_reflection is False
    on = parser.parse_args(["--grpc-reflection"])
    assert from_sources(on, environ={"MM_GRPC_REFLECTION": "0"}).grpc_reflection is True
    with pytest.raises(ValueError, match="MM_GRPC_REFLECTION"):
        from_sources(environ={"MM_GRPC_REFLECTION": "maybe"})


def test_readme_configuration_table_is_the_generated_one() -> None:
    from pathlib import Path

    from modelmesh.settings import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = markdown_table()
    assert table in readme, "README.md is stale: paste the output of python -m modelmesh.settings"
