"""deploy/kubernetes/encloud.yaml against the Kubernetes API schemas (kubernetes-validate,
offline), and the properties docs/DEPLOY.md promises of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).parent.parent / "deploy" / "kubernetes" / "encloud.yaml"
KUBERNETES_VERSION = "1.31.0"  # the oldest version the manifests are checked against


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_every_document_validates_against_the_api_schemas(documents, version: str) -> None:
    for name, document in documents.items():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} (Kubernetes {version}): {error.message}")


def _server(documents) -> dict[str, Any]:
    return documents["DaemonSet/encloud-server"]["spec"]["template"]["spec"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_one_server_per_confidential_node_with_its_state_on_the_node(documents) -> None:
    pod = _server(documents)
    assert "DaemonSet/encloud-server" in documents  # one per node: PCR 15 is the node's
    assert pod["nodeSelector"] == {"encloud.dev/confidential-node": "true"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/encloud"
    (server,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert mounts["state"] == "/var/lib/encloud"
    # Exclusive use of the vTPM: one allocatable device unit per node.
    assert server["resources"]["limits"]["smarter-devices/tpmrm0"] == "1"


def test_probes_grace_budget_resources_and_metrics(documents) -> None:
    pod = _server(documents)
    (server,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051  # grpc.health.v1
    env = _env(server)
    drain = float(env["ENCLOUD_SHUTDOWN_NOTICE_SECONDS"]) + float(
        env["ENCLOUD_SHUTDOWN_GRACE_SECONDS"]
    )
    assert pod["terminationGracePeriodSeconds"] > drain
    assert documents["PodDisruptionBudget/encloud-server"]["spec"]["maxUnavailable"] == 1
    assert {"cpu", "memory"} <= set(server["resources"]["requests"])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}


def test_the_server_runs_locked_down(documents) -> None:
    pod = _server(documents)
    (server,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    context = server["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def test_the_load_balancer_keeps_sessions_on_their_replica(documents, tmp_path: Path) -> None:
    config = documents["ConfigMap/encloud-haproxy"]["data"]["haproxy.cfg"]
    for line in (
        "stick match req.hdr(encloud-route)",
        "stick store-response res.hdr(encloud-route)",
        "option forwardfor",
    ):
        assert line in config
    assert documents["Service/encloud"]["spec"]["type"] == "LoadBalancer"
    assert documents["Service/encloud-replicas"]["spec"]["clusterIP"] == "None"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "haproxy is not installed (./dev installs it)"
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
