"""Join bundles: one Secret manifest, read back as a file, as a mounted folder, or from the
API server's base64 form; and clear errors when one cannot be made or read."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from fedkube import pki
from fedkube.api import FederatedJob
from fedkube.api.runtime import ConfigurationError
from fedkube.bundle import Bundle
from fedkube.controller import credentials
from fedkube.federation.security import TlsFiles

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def job(**service: str) -> FederatedJob:
    return FederatedJob.model_validate({
        "metadata": {"name": "fl", "namespace": "hospitals"},
        "spec": {"aggregator": {"service": service},
                 "sites": [{"name": name, "data": {"volume": {"hostPath": {"path": "/d"}}}}
                           for name in ("north", "lab")]}})


def lab_secret(exposed: FederatedJob) -> dict[str, object]:
    plan = credentials.plan_secrets(exposed, {}, NOW)
    return next(m for m in plan.create if m["metadata"]["name"] == "fl-site-lab-tls")


def test_a_bundle_carries_the_external_address_and_the_sites_identity() -> None:
    exposed = job(externalAddress="fl.example.org")
    bundle = Bundle.of_job(exposed, "lab", lab_secret(exposed))
    assert bundle.address == "fl.example.org:50051"
    assert pki.identity_of(bundle.files.certificate()) == pki.Identity("hospitals", "fl", "lab")
    secret = bundle.to_secret()
    assert secret["metadata"]["name"] == "fl-lab-bundle"
    assert "fedkube.io/job" not in secret["metadata"]["labels"]


def test_every_form_of_a_bundle_reads_the_same(tmp_path: Path) -> None:
    exposed = job(externalAddress="[2001:db8::1]:443")
    bundle = Bundle.of_job(exposed, "lab", lab_secret(exposed))
    assert bundle.address == "[2001:db8::1]:443"
    secret = bundle.to_secret()
    file = tmp_path / "lab.yaml"
    file.write_text(yaml.safe_dump(secret))
    folder = tmp_path / "mounted"  # as the kubelet mounts a Secret: one file per key
    folder.mkdir()
    for key, value in secret["stringData"].items():
        (folder / key).write_text(value)
    stored = {**secret, "stringData": None,
              "data": {k: base64.b64encode(v.encode()).decode()
                       for k, v in secret["stringData"].items()}}
    assert Bundle.read(file) == Bundle.read(folder) == \
        Bundle.from_secret(stored, "the API server") == bundle


@pytest.mark.parametrize(("service", "site", "problem"), [
    ({}, "lab", "job hospitals/fl is not exposed outside the cluster: set "
                "spec.aggregator.service.externalAddress"),
    ({"externalAddress": "fl.example.org"}, "south",
     "job hospitals/fl has no site 'south' (its sites: north, lab)"),
])
def test_a_bundle_that_cannot_work_is_refused(service: dict[str, str], site: str,
                                               problem: str) -> None:
    exposed = job(**service)
    with pytest.raises(ConfigurationError, match=re.escape(problem)):
        Bundle.of_job(exposed, site, lab_secret(job(externalAddress="x.example")))


def test_a_broken_bundle_names_what_is_missing(tmp_path: Path) -> None:
    now, valid = NOW, timedelta(days=1)
    ca = pki.issue_ca("hospitals", "fl", now, valid)
    pair = pki.issue_client(ca, pki.Identity("hospitals", "fl", "lab"), now, valid)
    secret = Bundle("fl.example.org:1", "hospitals", "fl", "lab",
                    TlsFiles(ca.cert, pair.cert, pair.key)).to_secret()
    del secret["stringData"]["tls.key"]
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(secret))
    with pytest.raises(ConfigurationError, match=r"lacks tls\.key: make it again"):
        Bundle.read(path)
    path.write_text("kind: ConfigMap\n")
    with pytest.raises(ConfigurationError, match="is not a fedkube join bundle"):
        Bundle.read(path)
