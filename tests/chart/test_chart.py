"""The Helm chart, rendered by the real helm and validated strictly."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fedkube"


def _render(chart: ModuleType, *set_values: str, values: tuple[Path, ...] = ()) -> list[dict]:
    rendered = chart.render(values, set_values)
    assert rendered.returncode == 0, rendered.stderr
    return chart.objects(rendered.stdout)


def _one(docs: list[dict], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def _container(docs: list[dict]) -> dict[str, Any]:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("values", [(), ("all-features-values.yaml",)], ids=["defaults", "all"])
def test_lint_strict_passes(chart: ModuleType, values: tuple[str, ...]) -> None:
    result = chart.lint(CHART / "ci" / v for v in values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [(), ("all-features-values.yaml",)], ids=["defaults", "all"])
def test_every_rendered_object_validates_strictly(chart: ModuleType,
                                                  values: tuple[str, ...]) -> None:
    docs = _render(chart, values=tuple(CHART / "ci" / v for v in values))
    assert chart.validate(docs) == []


def test_all_features_renders_every_optional_object(chart: ModuleType) -> None:
    docs = _render(chart, values=(chart.ALL_FEATURES,))
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PodMonitor", "Role", "RoleBinding", "KopfPeering"} <= kinds


def test_validation_rejects_unknown_and_mistyped_fields(chart: ModuleType) -> None:
    """The strict check can fail: a typo in any kind of object is reported by name."""
    docs = _render(chart, values=(chart.ALL_FEATURES,))
    broken = copy.deepcopy(docs)
    for doc in broken:
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
        elif doc["kind"] == "PodMonitor":
            doc["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
        elif doc["kind"] == "KopfPeering":
            doc["status"] = "not an object"
        elif doc["kind"] == "Service":
            doc["spec"]["ports"][0]["port"] = "9090"
    problems = "\n".join(chart.validate(broken))
    assert "imagePullPolicyy" in problems
    assert "intervall" in problems
    assert "KopfPeering/fedkube" in problems
    assert "Service/" in problems


def test_chart_crd_is_the_generated_one() -> None:
    """`make crds` writes both files; a hand edit of either one fails here."""
    ours = (CHART / "crds" / "fedkube.io_federatedjobs.yaml").read_text()
    assert ours == (ROOT / "crds" / "fedkube.io_federatedjobs.yaml").read_text(), \
        "charts/fedkube/crds differs from crds/: run `make crds`"


def test_chart_ships_kopf_peering_crds(chart: ModuleType) -> None:
    docs = _render(chart)
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"federatedjobs.fedkube.io", "clusterkopfpeerings.kopf.dev",
                    "kopfpeerings.kopf.dev"}


@pytest.mark.parametrize(("assignment", "message"), [
    ("replicaCount=two", "at '/replicaCount': got string, want integer"),
    ("metrics.port=70000", "at '/metrics/port': maximum: got 70,000, want 65,535"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
    ("metrics.servicemonitor.enabled=true",
     "at '/metrics': additional properties 'servicemonitor' not allowed"),
    ("watchNamespaces[0]=Not_A_Namespace", "at '/watchNamespaces/0': 'Not_A_Namespace'"),
])
def test_wrong_value_fails_with_the_schema_message(chart: ModuleType, assignment: str,
                                                   message: str) -> None:
    result = chart.render((), (assignment,))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_secure_defaults(chart: ModuleType) -> None:
    docs = _render(chart)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_image_tag_defaults_to_app_version(chart: ModuleType) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    import fedkube

    assert app_version == fedkube.__version__
    assert _container(_render(chart))["image"] == f"ghcr.io/fedkube/fedkube-operator:{app_version}"
    assert _container(_render(chart, "image.tag=dev"))["image"].endswith(":dev")


def test_operator_args_are_options_of_fedkube_operator(chart: ModuleType) -> None:
    """The Deployment runs `fedkube operator` with flags that command really has."""
    from fedkube.cli import main

    command = main.commands["operator"]
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    container = _container(_render(chart, values=(chart.ALL_FEATURES,)))
    assert container["command"] == ["fedkube", "operator"]
    flags = {arg.split("=", 1)[0] for arg in container["args"]}
    assert flags <= options, f"unknown flags {sorted(flags - options)}"


@pytest.mark.parametrize(("value", "setting", "resource"), [
    ("rbac.certManager", "watch_certificates", "certificates"),
    ("rbac.gangScheduling", "watch_podgroups", "podgroups")])
def test_optional_children_are_watched_when_rbac_allows_it(chart: ModuleType, value: str,
                                                           setting: str, resource: str) -> None:
    """With the rights to list and watch a kind, the operator is told to cache it from a
    watch (it would read each job's object on every pass otherwise); without them, it must
    not watch (a watch it has no rights for fails forever)."""
    from fedkube.controller.settings import ControllerSettings

    def settings(*set_values: str) -> tuple[ControllerSettings, set[tuple[str, str, str]]]:
        docs = _render(chart, *set_values)
        env = {e["name"]: e["value"] for e in _container(docs)["env"] if "value" in e}
        with pytest.MonkeyPatch.context() as patch:
            for name, val in env.items():
                patch.setenv(name, val)
            return ControllerSettings.from_env(), _rules(_one(docs, "ClusterRole"))

    on, rules = settings(f"{value}=true")
    assert getattr(on, setting)
    assert {"list", "watch"} <= {verb for _, name, verb in rules if name == resource}
    off, _ = settings(f"{value}=false")
    assert not getattr(off, setting)


def test_operator_pods_carry_the_labels_job_network_policies_admit(chart: ModuleType) -> None:
    """Each job's NetworkPolicy lets the operator poll /status by these pod labels."""
    from fedkube.controller.builders import OPERATOR_POD_LABELS

    labels = _one(_render(chart), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert OPERATOR_POD_LABELS.items() <= labels.items()


def _rules(doc: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in doc["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_cluster_wide_rbac(chart: ModuleType) -> None:
    docs = _render(chart)
    rules = _rules(_one(docs, "ClusterRole"))
    assert ("", "namespaces", "watch") in rules
    assert ("fedkube.io", "federatedjobs/status", "patch") in rules
    # The operator creates its peering object at start when it is missing.
    assert {("kopf.dev", "clusterkopfpeerings", verb) for verb in ("patch", "create")} <= rules
    assert not any(resource == "podgroups" for _, resource, _ in rules)
    # Least privilege: nothing cluster-wide beyond what kopf and the reconcile use.
    assert not any("*" in part for rule in rules for part in rule)
    assert {verb for _, _, verb in rules} <= {"get", "list", "watch", "create", "patch", "delete"}
    assert {"Role", "RoleBinding"}.isdisjoint(d["kind"] for d in docs)


def test_watch_namespaces_makes_namespaced_roles(chart: ModuleType) -> None:
    docs = _render(chart, "watchNamespaces={a,b}", "rbac.gangScheduling=true",
                   "rbac.certManager=true")
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    assert ("scheduling.x-k8s.io", "podgroups", "create") in _rules(roles[0])
    assert {("kopf.dev", "kopfpeerings", verb) for verb in ("patch", "create")} <= \
        _rules(roles[0])
    cluster_rules = _rules(_one(docs, "ClusterRole"))
    assert cluster_rules == {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                             ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
    args = _container(docs)["args"]
    assert "--namespace=a" in args and "--namespace=b" in args
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["a", "b"]


def test_dashboards_are_configmaps_for_the_grafana_sidecar(chart: ModuleType) -> None:
    docs = _render(chart, "dashboards.label=my_dashboards", "dashboards.labelValue=yes")
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert sorted(m["metadata"]["name"] for m in maps) == [
        "fedkube-dashboard-federated-job", "fedkube-dashboard-operator"]
    for config_map in maps:
        assert config_map["metadata"]["labels"]["my_dashboards"] == "yes"
        ((name, text),) = config_map["data"].items()
        assert text.rstrip("\n") == (CHART / "dashboards" / name).read_text().rstrip("\n")
    assert not [d for d in _render(chart, "dashboards.enabled=false") if d["kind"] == "ConfigMap"]


def test_monitors_select_what_the_operator_and_aggregators_expose(chart: ModuleType) -> None:
    docs = _render(chart, values=(chart.ALL_FEATURES,))
    service = _one(docs, "Service")
    monitor = _one(docs, "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"].items()
    assert selected <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod_monitor = _one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"fedkube.io/role": "aggregator"}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True


def test_helm_install_rejects_a_mistyped_value_and_notes_say_what_next(
        chart: ModuleType) -> None:
    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([chart.helm(), "install", "fedkube", str(CHART),
                               "--dry-run=client", *args],
                              capture_output=True, text=True, check=False)

    failed = install("--set", "dashboards.enabled=yes")
    assert failed.returncode != 0
    assert "at '/dashboards/enabled': got string, want boolean" in failed.stderr
    installed = install()
    assert installed.returncode == 0, installed.stderr
    notes = installed.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f crds/samples/digits.yaml" in notes
    assert "kubectl get fedjobs" in notes
    assert "get configmaps -l grafana_dashboard=1" in notes


def test_rbac_grants_what_the_operator_client_touches_and_no_more(chart: ModuleType) -> None:
    """Every verb the operator's Kubernetes client uses on a kind is granted (the client
    refuses any other), and no kind beyond those, kopf's own needs (CRDs, namespaces,
    peerings) and Events."""
    kube = pytest.importorskip("fedkube.controller.kube",
                               reason="the operator's Kubernetes client is not there yet")
    used = set()
    for resource in kube.RESOURCES.values():
        group = "" if resource.prefix.startswith("/api/") else resource.prefix.split("/")[2]
        used |= {(group, resource.plural, verb) for verb in resource.verbs}
        used |= {(group, f"{resource.plural}/status", verb) for verb in resource.status_verbs}
    # Cluster-wide, the operator meets its peers in a ClusterKopfPeering (it creates that
    # one when missing); the namespaced KopfPeerings are granted by the Roles of
    # test_watch_namespaces_makes_namespaced_roles.
    used = {rule for rule in used if rule[1] != "kopfpeerings"}
    docs = _render(chart, "rbac.gangScheduling=true", "rbac.certManager=true")
    granted = _rules(_one(docs, "ClusterRole"))
    assert granted >= used, f"not granted: {sorted(used - granted)}"
    kopf_needs = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces"),
                  ("kopf.dev", "clusterkopfpeerings"), ("", "events")}
    resources = {(group, resource) for group, resource, _ in granted}
    assert resources - kopf_needs == {(group, resource) for group, resource, _ in used} - kopf_needs
