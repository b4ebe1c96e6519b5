"""Every object ``fedkube render crds/samples/*.yaml`` prints is valid Kubernetes, strictly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fedkube.api.runtime import CHECKPOINT_DIR, OUTPUT_DIR, STATE_DIR
from tests.apiserver_schema import admit, cert_manager_certificate_schema

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "crds" / "samples").glob("*.yaml"))
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "fedkube.cli", "render", *map(str, SAMPLES)],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return list(yaml.safe_load_all(out))


def test_every_builtin_object_validates_strictly(rendered: list[dict]) -> None:
    builtin = [o for o in rendered if o["kind"] not in ("PodGroup", "Certificate")]
    assert {o["kind"] for o in builtin} >= {"ConfigMap", "Secret", "Service", "Pod",
                                            "NetworkPolicy", "PersistentVolumeClaim"}
    for obj in builtin:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_podgroup_has_only_known_fields(rendered: list[dict]) -> None:
    # PodGroup is a CRD of scheduler-plugins that kubernetes-validate has no schema for:
    # check it against the fields of scheduling.x-k8s.io/v1alpha1 PodGroupSpec.
    groups = [o for o in rendered if o["kind"] == "PodGroup"]
    assert groups, "a sample with scheduling.gang: true should render a PodGroup"
    known = {"minMember", "minResources", "scheduleTimeoutSeconds"}
    for group in groups:
        assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
        assert set(group["spec"]) <= known
        assert group["spec"]["minMember"] >= 2


def test_unknown_field_is_caught(rendered: list[dict]) -> None:
    pod = next(o for o in rendered if o["kind"] == "Pod")
    bad = {**pod, "spec": {**pod["spec"], "restartPolcy": "Never"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _state_volume(rendered: list[dict], job: str) -> dict:
    """The volume the aggregator of ``job`` keeps checkpoints and its final model in."""
    pod = next(o for o in rendered
               if o["kind"] == "Pod" and o["metadata"]["name"] == f"{job}-aggregator")
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"]
                 if m["mountPath"] == STATE_DIR)
    assert CHECKPOINT_DIR.startswith(STATE_DIR + "/") and OUTPUT_DIR.startswith(STATE_DIR + "/")
    return next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])


def test_checkpoints_and_the_final_model_share_the_jobs_claim(rendered: list[dict]) -> None:
    claim = next(o for o in rendered if o["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "digits-robust-state"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert _state_volume(rendered, "digits-robust")["persistentVolumeClaim"] == {
        "claimName": "digits-robust-state"}
    # A claim of the user's own is mounted the same way; without a claim, an emptyDir.
    assert _state_volume(rendered, "digits-gpu")["persistentVolumeClaim"] == {
        "claimName": "digits-gpu-checkpoints"}
    assert _state_volume(rendered, "digits")["emptyDir"] == {}


def test_each_site_mounts_only_its_own_data_read_only(rendered: list[dict]) -> None:
    """crds/samples/sites.yaml: a site's volume, env and placement reach its pods alone."""
    pods = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Pod"
            and o["metadata"]["labels"].get("fedkube.io/job") == "diagnosis"}
    assert sorted(pods) == ["diagnosis-aggregator", "diagnosis-lab-0", "diagnosis-north-0",
                            "diagnosis-south-0"]
    sources = {}
    for name, pod in pods.items():
        spec = pod["spec"]
        volumes = [v for v in spec["volumes"] if v["name"] == "site-data"]
        if name == "diagnosis-aggregator":
            assert volumes == [], "the aggregator holds no site's data"
            continue
        site = pod["metadata"]["labels"]["fedkube.io/site"]
        assert name == f"diagnosis-{site}-0"
        (volume,) = volumes
        sources[site] = {k: v for k, v in volume.items() if k != "name"}
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "site-data"]
        assert mount["readOnly"] is True
        env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert env["FEDKUBE_SITE"] == site
    assert sources["north"] == {"persistentVolumeClaim": {"claimName": "north-records",
                                                          "readOnly": True}}
    assert set(sources["south"]) == {"csi"} and set(sources["lab"]) == {"hostPath"}
    assert pods["diagnosis-north-0"]["spec"]["nodeSelector"] == {
        "topology.kubernetes.io/zone": "north-1"}
    assert pods["diagnosis-south-0"]["spec"]["tolerations"][0]["value"] == "south"
    assert "nodeSelector" not in pods["diagnosis-south-0"]["spec"]
    mount_path = next(m["mountPath"] for m in pods["diagnosis-lab-0"]["spec"]["containers"][0][
        "volumeMounts"] if m["name"] == "site-data")
    assert mount_path == "/data"


def test_certificates_validate_strictly_against_cert_manager(rendered: list[dict]) -> None:
    """crds/samples/cert-manager.yaml: Certificates in place of the operator's Secrets, each
    valid cert-manager.io/v1 with unknown fields refused, filling the Secret pods mount."""
    certificates = [o for o in rendered if o["kind"] == "Certificate"]
    assert sorted(c["metadata"]["name"] for c in certificates) == [
        "digits-cert-manager-aggregator-tls", "digits-cert-manager-clients-tls"]
    schema = cert_manager_certificate_schema()
    for certificate in certificates:
        assert admit(schema, certificate) == []
    assert not [o for o in rendered if o["kind"] == "Secret"
                and o["metadata"]["labels"]["fedkube.io/job"] == "digits-cert-manager"]
    mounted = {v["secret"]["secretName"] for o in rendered if o["kind"] == "Pod"
               and o["metadata"]["labels"]["fedkube.io/job"] == "digits-cert-manager"
               for v in o["spec"]["volumes"] if "secret" in v}
    assert mounted == {c["spec"]["secretName"] for c in certificates}


def test_a_client_only_job_renders_its_sites_clients_alone(rendered: list[dict]) -> None:
    """crds/samples/client-only.yaml: one pod per replica of the one site, from the bundle."""
    mine = [o for o in rendered
            if o["metadata"].get("labels", {}).get("fedkube.io/job") == "diagnosis-lab"]
    assert [(o["kind"], o["metadata"]["name"]) for o in mine] == [("Pod", "diagnosis-lab-lab-0")]
    (volume,) = [v for v in mine[0]["spec"]["volumes"] if v["name"] == "bundle"]
    assert volume["secret"]["secretName"] == "diagnosis-lab-bundle"
