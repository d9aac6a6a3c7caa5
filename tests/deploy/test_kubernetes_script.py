"""deploy/test-kubernetes without a cluster: the script loads, --help works, and the values
it installs the chart with still render (the chart's schema refuses unknown keys) into
what the end-to-end test relies on: host networking on the given ports, the external
etcd, the demo models in a writable root, no surge pod, a rollout when the annotation
changes, and API versions Kubernetes 1.20 serves.

The end-to-end run itself (it builds Kubernetes and needs root) is outside the default CI:
``.venv/bin/python deploy/test-kubernetes``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "test-kubernetes"
HELM = Path(sys.prefix) / "bin" / "helm"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("test_kubernetes_script_under_test",
                                                  str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


def render(script: ModuleType, tmp_path: Path, rollout: int) -> list[dict]:
    if not HELM.exists():
        pytest.skip("helm missing: scripts/fetch_helm.py (run by scripts/setup) fetches it")
    rel = script.Release("mesh-a", 31001, 31002, 31003)
    values = tmp_path / f"values-{rollout}.json"
    values.write_text(json.dumps(script.release_values(
        rel, "localhost/pymodelmesh:dev", 32379, rollout=rollout)))
    out = subprocess.run([str(HELM), "template", rel.name, str(script.find_chart()),
                          "-f", str(values), "--kube-version", "1.20.2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_help_runs_without_root() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--build-image" in out.stdout and "--cache-dir" in out.stdout


def test_values_render_what_the_cluster_needs(script: ModuleType, tmp_path: Path) -> None:
    docs = render(script, tmp_path, rollout=1)
    kinds = {d["kind"]: d for d in docs}
    assert "StatefulSet" not in kinds, "the bundled etcd must be off (an external etcd)"
    assert kinds["PodDisruptionBudget"]["apiVersion"] == "policy/v1beta1"  # 1.20 has no v1
    dep = kinds["Deployment"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    pod = dep["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (mesh,) = [c for c in pod["containers"] if c["name"] == "mesh"]
    assert mesh["imagePullPolicy"] == "Never"
    assert mesh["image"] == "localhost/pymodelmesh:dev"
    assert {p["name"]: p["containerPort"] for p in mesh["ports"]} == {
        "grpc": 31001, "http": 31002, "metrics": 31003}
    args = mesh["args"]
    assert "--etcd=127.0.0.1:32379" in args and "--demo" in args
    assert f"--mesh-name={script.MESH_NAME}" in args
    # The last --models-root wins: the demo models go into the writable data volume.
    roots = [a for a in args if a.startswith("--models-root=")]
    assert roots[-1] == "--models-root=/data/models"
    assert any(m["mountPath"] == "/data" and not m.get("readOnly")
               for m in mesh["volumeMounts"])
    # Probes the 1.20 kubelet can run (no gRPC probes before 1.24).
    assert "httpGet" in mesh["readinessProbe"] and "grpc" not in mesh["readinessProbe"]


def test_upgrade_values_change_the_pod_template(script: ModuleType, tmp_path: Path) -> None:
    def template(rollout: int) -> dict:
        (dep,) = [d for d in render(script, tmp_path, rollout) if d["kind"] == "Deployment"]
        return dep["spec"]["template"]

    first, second = template(1), template(2)
    assert first != second, "helm upgrade with rollout=2 must roll the pods"
    assert first["spec"] == second["spec"]
