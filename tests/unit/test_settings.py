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
