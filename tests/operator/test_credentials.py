"""Where the operator's own API calls go: the same login chain kopf uses."""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest
import yaml

from fedkube.controller.handlers import credentials
from fedkube.controller.settings import ControllerSettings

KUBECONFIG = {
    "apiVersion": "v1", "kind": "Config", "current-context": "dev",
    "clusters": [{"name": "dev", "cluster": {"server": "https://10.0.0.1:6443",
                                             "insecure-skip-tls-verify": True}}],
    "users": [{"name": "me", "user": {"token": "s3cret"}}],
    "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "me",
                                             "namespace": "ml"}}],
}


def test_a_configured_server_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(KUBECONFIG))
    monkeypatch.setenv("KUBECONFIG", str(path))
    info = credentials(ControllerSettings(kube_server="http://127.0.0.1:8001"),
                       kopf.OperatorSettings())
    assert info.server == "http://127.0.0.1:8001"


def test_outside_a_cluster_the_kubeconfig_is_used(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(KUBECONFIG))
    monkeypatch.setenv("KUBECONFIG", str(path))
    info = credentials(ControllerSettings(), kopf.OperatorSettings())
    assert (info.server, info.token, info.default_namespace) == \
        ("https://10.0.0.1:6443", "s3cret", "ml")


def test_no_credentials_at_all_is_a_clear_error(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    with pytest.raises(kopf.LoginError, match="no in-cluster service account"):
        credentials(ControllerSettings(), kopf.OperatorSettings())
