"""The Grafana dashboard (deploy/grafana/) names only metrics a real mesh exports.

A real `modelmesh serve` (against the session's etcd) serves a few requests: a hit, a
cold load, an unknown model; then /metrics is scraped and every metric name in every
panel's PromQL (and the template variables' queries) must be a series the mesh exports:
a gauge by its name, a counter as NAME_total, a histogram as NAME_bucket / _sum / _count.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana").glob("*.json"))

#: PromQL words that look like identifiers but name no metric.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "le",
}
_SUFFIXES = {"counter": ("_total", "_created"),
             "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                      # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                     # range and subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)                    # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = m.group(0), text[m.end():].lstrip()
        if rest.startswith("("):  # a function call
            continue
        if word.lower() in _KEYWORDS or re.fullmatch(r"[0-9.e+-]+", word):
            continue
        names.add(word)
    return names


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and query variable."""
    out: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for p in items:
            for t in p.get("targets", []):
                out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
            panels(p.get("panels", []))

    panels(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            out.append((f"variable {var['name']}", inner.group(1) if inner else q))
    return out


def test_metric_name_parser() -> None:
    assert metric_names('sum by (pod, code) (rate(a_total{x="y", z=~"$pod"}[$__rate_interval]))') \
        == {"a_total"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))") \
        == {"h_bucket"}
    assert metric_names("1 - sum(rate(a_count[1m])) / clamp_min(sum(rate(b_count[1m])), 1e-9)") \
        == {"a_count", "b_count"}
    assert metric_names("used / capacity") == {"used", "capacity"}


def _exported(text: str) -> dict[str, str]:
    """Every series name the scrape offers -> its family's type (from # TYPE lines too, so
    a labelled metric without samples yet still counts)."""
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names[sample.name] = family.type
    return names


@pytest.fixture(scope="module")
def scrape(module_mesh_factory, etcd_server, demo_models) -> str:
    """/metrics of a real instance after hits, a cold load and an unknown model."""
    mesh = module_mesh_factory("--demo", "--per-model-metrics", etcd=etcd_server)
    sklearn = demo_models["sklearn"]
    done = subprocess.run(
        [sys.executable, "-m", "modelmesh", "register", "cold-iris", "--type", "sklearn",
         "--path", str(sklearn.path), "--endpoint", mesh.endpoint],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    client = grpcclient.InferenceServerClient(mesh.endpoint)
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for model in ("iris-sklearn", "cold-iris", "iris-sklearn"):  # hit, miss (a load), hit
        client.infer(model, [inp])
    with pytest.raises(InferenceServerException, match="(?i)not.?found"):
        client.infer("no-such-model", [inp])
    client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics",
                                timeout=10) as resp:
        return resp.read().decode()


def test_the_scrape_has_request_samples(scrape: str) -> None:
    """The requests above were counted (else the names check below proves little)."""
    exported = _exported(scrape)
    assert "modelmesh_api_request_milliseconds_bucket" in exported
    assert re.search(r'^modelmesh_api_request_milliseconds_count\{.*code="OK".*\} [1-9]',
                     scrape, re.M), scrape[:3000]
    assert re.search(r"^modelmesh_cache_miss_milliseconds_count [1-9]", scrape, re.M), \
        "the cold model's request did not count as a cache miss"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_names_only_exported_metrics(scrape: str, path: Path) -> None:
    dashboard = json.loads(path.read_text())
    exported = _exported(scrape)
    expressions = dashboard_expressions(dashboard)
    assert expressions, f"{path.name} has no queries"
    used: set[str] = set()
    for where, expr in expressions:
        names = metric_names(expr)
        assert names, f"{path.name} {where}: no metric in {expr!r}"
        unknown = sorted(n for n in names if n not in exported)
        assert not unknown, (
            f"{path.name} {where}: {unknown} not exported by the mesh (counters end in _total, "
            f"histograms are _bucket/_sum/_count); exported: {sorted(exported)}")
        # A counter or histogram family is queried by a series name, never bare.
        for n in names:
            assert not (exported[n] in ("counter", "histogram") and n.endswith("_created")), n
        used |= names
    # The panels the dashboard promises are there.
    for needed in ("modelmesh_api_request_milliseconds_bucket",
                   "modelmesh_cache_miss_milliseconds_count",
                   "modelmesh_loadmodel_milliseconds_count", "modelmesh_loadmodel_failure_total",
                   "modelmesh_unloadmodel_total", "modelmesh_instance_used_bytes",
                   "modelmesh_instance_capacity_bytes", "modelmesh_instance_models_total",
                   "modelmesh_copy_changes_total", "modelmesh_forwarded_requests_total"):
        assert needed in used, f"{path.name} has no panel on {needed}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
