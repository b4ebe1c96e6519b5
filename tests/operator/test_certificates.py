"""The job's certificates as the operator plans them: its own Secrets (mode Operator),
cert-manager Certificates (mode CertManager) or none (mode Disabled), and the pods, Service and
NetworkPolicy that go with them."""

from __future__ import annotations

import base64
import copy
import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from fedkube import pki
from fedkube.api import FederatedJob
from fedkube.api.constants import LABEL_JOB, LABEL_ROLE, LABEL_SITE
from fedkube.api.runtime import TLS_MOUNT_DIR, ConfigurationError, RuntimeConfig
from fedkube.controller import builders, credentials
from fedkube.controller.reconcile import (
    ANNOTATION_ACCEPTED_SPEC,
    Create,
    Decision,
    Delete,
    Event,
    Observed,
    Update,
    reconcile,
)
from tests.apiserver_schema import Schema, admit, cert_manager_certificate_schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
ISSUER = {"name": "fedkube-ca", "kind": "ClusterIssuer"}
CERT_MANAGER = {"tls": {"mode": "CertManager", "issuerRef": ISSUER}}


def site(name: str, replicas: int = 1) -> dict[str, Any]:
    return {"name": name, "replicas": replicas,
            "data": {"volume": {"hostPath": {"path": f"/srv/{name}"}}}}


def make_job(*sites: str, **spec: Any) -> FederatedJob:
    """Job ns/j with these sites (two clients in a, one in each other site)."""
    base: dict[str, Any] = {"rounds": 3, "strategy": {"minClients": 1},
                            "sites": [site(s, 2 if s == "a" else 1) for s in sites]}
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return FederatedJob.model_validate({"metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
                                        "spec": base})


def exposed_at(address: str, **service: Any) -> dict[str, Any]:
    return {"service": {"externalAddress": address, **service}}


def by_name(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests}


def cert_of(secret: dict[str, Any], key: str = "tls.crt") -> x509.Certificate:
    return x509.load_pem_x509_certificate(secret["stringData"][key].encode())


def sans_of(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def as_stored(secret: dict[str, Any]) -> dict[str, Any]:
    """A Secret as the API server returns it: stringData folded into base64 data."""
    data = {k: base64.b64encode(v.encode()).decode() for k, v in secret["stringData"].items()}
    stored = {k: v for k, v in secret.items() if k != "stringData"}
    return {**stored, "data": data,
            "metadata": {**secret["metadata"], "resourceVersion": "7",
                         "creationTimestamp": T0.isoformat()}}


_ISSUED: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}


def issued(*sites: str) -> dict[str, dict[str, Any]]:
    """The Secrets made for a fresh job with these sites (issued once per set of sites)."""
    if sites not in _ISSUED:
        _ISSUED[sites] = by_name(credentials.plan_secrets(make_job(*sites), {}, T0).create)
    return _ISSUED[sites]


# --- mode Operator: the operator's own Secrets --------------------------------------------

def test_a_fresh_job_gets_its_ca_and_one_secret_per_certificate() -> None:
    job = make_job("a", "b")
    plan = credentials.plan_secrets(job, {}, T0)
    assert [m["metadata"]["name"] for m in plan.create] == [
        "j-ca", "j-aggregator-tls", "j-site-a-tls", "j-site-b-tls"]
    assert plan.replace == [] and plan.delete == []
    secrets = by_name(plan.create)
    ca_secret = secrets["j-ca"]
    assert ca_secret["type"] == "Opaque" and set(ca_secret["stringData"]) == {"ca.crt", "ca.key"}
    ca = cert_of(ca_secret, "ca.crt")
    assert ca.not_valid_after_utc == T0 + credentials.CA_VALIDITY_FACTOR * 365 * DAY
    for name in ("j-aggregator-tls", "j-site-a-tls", "j-site-b-tls"):
        secret = secrets[name]
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["stringData"]) == {"ca.crt", "tls.crt", "tls.key"}
        assert secret["stringData"]["ca.crt"] == ca_secret["stringData"]["ca.crt"]
        assert secret["metadata"]["namespace"] == "ns"
        assert secret["metadata"]["labels"][LABEL_JOB] == "j"
        assert secret["metadata"]["ownerReferences"][0]["uid"] == "u1"
        leaf = cert_of(secret)
        leaf.verify_directly_issued_by(ca)
        assert leaf.not_valid_after_utc == T0 + 365 * DAY
        key = pki.KeyPair(b"", secret["stringData"]["tls.key"].encode()).private_key()
        assert key.public_key() == leaf.public_key()
    assert LABEL_SITE not in secrets["j-aggregator-tls"]["metadata"]["labels"]
    assert "ownerReferences" in ca_secret["metadata"]


@pytest.mark.parametrize("name", ["a", "b"])
def test_each_site_certificate_names_its_own_site(name: str) -> None:
    secrets = issued("a", "b")
    secret = secrets[f"j-site-{name}-tls"]
    assert secret["metadata"]["labels"][LABEL_SITE] == name
    leaf, ca = cert_of(secret), cert_of(secrets["j-ca"], "ca.crt")
    assert pki.identity_of(leaf) == pki.Identity("ns", "j", name)
    assert sans_of(leaf).get_values_for_type(x509.UniformResourceIdentifier) == [
        f"fedkube://ns/j/sites/{name}"]
    verified = (PolicyBuilder().store(Store([ca])).time(T0 + DAY).build_client_verifier()
                .verify(leaf, []))
    assert verified.subjects == [x509.UniformResourceIdentifier(f"fedkube://ns/j/sites/{name}")]


def test_the_aggregators_certificate_names_exactly_the_services_hosts() -> None:
    job = make_job("a", "b")
    secret = issued("a", "b")["j-aggregator-tls"]
    leaf = cert_of(secret)
    assert builders.server_hosts(job) == ["j-aggregator.ns.svc", "j-aggregator",
                                          "j-aggregator.ns", "j-aggregator.ns.svc.cluster.local"]
    assert sans_of(leaf).get_values_for_type(x509.DNSName) == builders.server_hosts(job)
    assert sans_of(leaf).get_values_for_type(x509.IPAddress) == []
    assert sans_of(leaf).get_values_for_type(x509.UniformResourceIdentifier) == [
        "fedkube://ns/j/aggregator"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert secret["metadata"]["annotations"] == {
        credentials.ANNOTATION_HOSTS: ",".join(builders.server_hosts(job))}


def test_a_job_without_sites_has_one_clients_certificate() -> None:
    plan = credentials.plan_secrets(make_job(clients={"replicas": 3}), {}, T0)
    secrets = by_name(plan.create)
    assert list(secrets) == ["j-ca", "j-aggregator-tls", "j-clients-tls"]
    assert pki.identity_of(cert_of(secrets["j-clients-tls"])) == pki.Identity("ns", "j")
    assert LABEL_SITE not in secrets["j-clients-tls"]["metadata"]["labels"]


def test_existing_secrets_plan_nothing() -> None:
    job, secrets = make_job("a", "b"), issued("a", "b")
    plan = credentials.plan_secrets(job, secrets, T0 + DAY)
    assert (plan.create, plan.replace, plan.delete) == ([], [], [])
    # As the API server returns them (base64 data, no stringData): still nothing to do.
    stored = {name: as_stored(s) for name, s in secrets.items()}
    plan = credentials.plan_secrets(job, stored, T0 + DAY)
    assert (plan.create, plan.replace, plan.delete) == ([], [], [])


def test_a_lost_ca_reissues_every_certificate() -> None:
    job, old = make_job("a", "b"), issued("a", "b")
    existing = {name: s for name, s in old.items() if name != "j-ca"}
    plan = credentials.plan_secrets(job, existing, T0 + DAY)
    assert [m["metadata"]["name"] for m in plan.create] == ["j-ca"]
    assert sorted(m["metadata"]["name"] for m in plan.replace) == [
        "j-aggregator-tls", "j-site-a-tls", "j-site-b-tls"]
    assert plan.delete == []
    new_ca = plan.create[0]["stringData"]["ca.crt"]
    assert new_ca != old["j-ca"]["stringData"]["ca.crt"]
    for secret in plan.replace:
        assert secret["stringData"]["ca.crt"] == new_ca
        cert_of(secret).verify_directly_issued_by(cert_of(plan.create[0], "ca.crt"))
        assert secret["stringData"]["tls.key"] != old[secret["metadata"]["name"]][
            "stringData"]["tls.key"]


def test_a_ca_secret_without_its_key_is_a_clear_error() -> None:
    secrets = dict(issued("a", "b"))
    secrets["j-ca"] = {**secrets["j-ca"], "stringData": {
        "ca.crt": secrets["j-ca"]["stringData"]["ca.crt"]}}
    with pytest.raises(ConfigurationError, match=r"j-ca lacks ca\.crt or ca\.key: delete it"):
        credentials.plan_secrets(make_job("a", "b"), secrets, T0)


@pytest.mark.parametrize(("address", "host", "kind"), [
    ("fl.example.org:443", "fl.example.org", x509.DNSName),
    ("203.0.113.7", "203.0.113.7", x509.IPAddress),
    ("[2001:db8::7]:8443", "2001:db8::7", x509.IPAddress),
])
def test_a_new_external_address_reissues_the_aggregators_certificate_only(
        address: str, host: str, kind: type[x509.GeneralName]) -> None:
    old = issued("a", "b")
    job = make_job("a", "b", aggregator=exposed_at(address))
    plan = credentials.plan_secrets(job, old, T0 + DAY)
    assert plan.create == [] and plan.delete == []
    (server,) = plan.replace
    assert server["metadata"]["name"] == "j-aggregator-tls"
    assert builders.server_hosts(job)[-1] == host
    value = ipaddress.ip_address(host) if kind is x509.IPAddress else host
    leaf = cert_of(server)
    assert value in sans_of(leaf).get_values_for_type(kind)
    assert sans_of(leaf).get_values_for_type(x509.DNSName)[:4] == builders.server_hosts(job)[:4]
    # Same CA: the clients' certificates and trust stay as they are.
    assert server["stringData"]["ca.crt"] == old["j-ca"]["stringData"]["ca.crt"]
    leaf.verify_directly_issued_by(cert_of(old["j-ca"], "ca.crt"))
    assert server["metadata"]["annotations"][credentials.ANNOTATION_HOSTS].endswith("," + host)
    # Once replaced, nothing more to do.
    again = credentials.plan_secrets(job, {**old, "j-aggregator-tls": server}, T0 + DAY)
    assert (again.create, again.replace, again.delete) == ([], [], [])


def test_an_external_address_equal_to_a_service_name_adds_nothing() -> None:
    job = make_job("a", aggregator=exposed_at("j-aggregator.ns.svc:50051"))
    assert builders.server_hosts(job) == builders.server_hosts(make_job("a"))
    assert credentials.plan_secrets(job, issued("a", "b"), T0).replace == []


def test_a_removed_site_loses_its_secret_and_a_new_site_gets_one() -> None:
    old = issued("a", "b")
    job = make_job("a")
    plan = credentials.plan_secrets(job, old, T0 + DAY)
    assert plan.delete == ["j-site-b-tls"]
    assert credentials.stale_site_secrets(job, old) == ["j-site-b-tls"]
    assert plan.create == [] and plan.replace == []
    grown = credentials.plan_secrets(make_job("a", "b", "c"), old, T0 + DAY)
    assert [m["metadata"]["name"] for m in grown.create] == ["j-site-c-tls"]
    assert grown.replace == [] and grown.delete == []
    leaf = cert_of(grown.create[0])
    leaf.verify_directly_issued_by(cert_of(old["j-ca"], "ca.crt"))
    assert pki.identity_of(leaf) == pki.Identity("ns", "j", "c")


def test_stale_site_secrets_in_every_mode() -> None:
    old = issued("a", "b")
    for mode in ({"tls": {"mode": "Disabled"}}, CERT_MANAGER):
        job = make_job("a", security=mode)
        assert credentials.stale_site_secrets(job, old) == ["j-site-b-tls"]
        assert credentials.plan_secrets(job, old, T0).delete == ["j-site-b-tls"]
    # Secrets without the site label (the CA, the aggregator's) are never stale.
    assert credentials.stale_site_secrets(make_job(clients={"replicas": 2}), old) == [
        "j-site-a-tls", "j-site-b-tls"]


# --- mode CertManager: Certificates, strictly valid for cert-manager v1 -------------------

@pytest.fixture(scope="module")
def certificate_schema() -> Schema:
    return cert_manager_certificate_schema()


def test_certificates_are_valid_cert_manager_v1(certificate_schema: Schema) -> None:
    job = make_job("a", "b", security=CERT_MANAGER,
                   aggregator=exposed_at("203.0.113.7:443", type="LoadBalancer"))
    certificates = builders.certificates(job)
    assert [c["metadata"]["name"] for c in certificates] == [
        "j-aggregator-tls", "j-site-a-tls", "j-site-b-tls"]
    for certificate in certificates:
        assert certificate["apiVersion"] == builders.CERTIFICATE_API_VERSION == \
            "cert-manager.io/v1"
        assert admit(certificate_schema, certificate) == []


def test_the_strict_schema_catches_misspelled_fields(certificate_schema: Schema) -> None:
    good = builders.certificates(make_job("a", security=CERT_MANAGER))[1]
    assert admit(certificate_schema, good) == []
    for path, wrong in ((("spec",), "dnsName"), (("spec", "privateKey"), "algoritm"),
                        (("spec", "issuerRef"), "namespace"), ((), "specs")):
        bad = copy.deepcopy(good)
        parent = bad
        for part in path:
            parent = parent[part]
        parent[wrong] = "x"
        errors = admit(certificate_schema, bad)
        assert errors and f"'{wrong}' was unexpected" in errors[0], (path, wrong, errors)
    # The stock schema's own checks are kept too.
    bad = copy.deepcopy(good)
    bad["spec"]["usages"] = ["client-auth"]
    assert any("is not one of" in e for e in admit(certificate_schema, bad))
    bad = copy.deepcopy(good)
    del bad["spec"]["issuerRef"]["name"]
    assert any("'name' is a required property" in e for e in admit(certificate_schema, bad))


def mounted_secret(pod: dict[str, Any]) -> str | None:
    volumes = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
    return volumes[0]["secret"]["secretName"] if volumes else None


def test_certificates_carry_identity_names_and_the_mounted_secret() -> None:
    job = make_job("a", "b", security=CERT_MANAGER,
                   aggregator=exposed_at("203.0.113.7:443", type="LoadBalancer"))
    server, cert_a, cert_b = builders.certificates(job)
    assert credentials.plan_secrets(job, {}, T0).create == []
    hosts = builders.server_hosts(job)
    assert server["spec"]["dnsNames"] == hosts[:4] == [
        "j-aggregator.ns.svc", "j-aggregator", "j-aggregator.ns",
        "j-aggregator.ns.svc.cluster.local"]
    assert server["spec"]["ipAddresses"] == ["203.0.113.7"]
    assert server["spec"]["uris"] == ["fedkube://ns/j/aggregator"]
    assert server["spec"]["usages"] == ["server auth", "digital signature"]
    assert server["spec"]["commonName"] == "j-aggregator.ns.svc"
    assert server["spec"]["secretName"] == mounted_secret(builders.aggregator_pod(job))
    for certificate, name in ((cert_a, "a"), (cert_b, "b")):
        spec = certificate["spec"]
        assert spec["uris"] == [f"fedkube://ns/j/sites/{name}"]
        assert spec["usages"] == ["client auth", "digital signature"]
        assert "dnsNames" not in spec and "ipAddresses" not in spec
        assert spec["secretName"] == f"j-site-{name}-tls"
        # cert-manager labels the Secret it writes so that revocation finds it.
        assert spec["secretTemplate"]["labels"][LABEL_SITE] == name
        assert spec["secretTemplate"]["labels"][LABEL_JOB] == "j"
    assert LABEL_SITE not in server["spec"]["secretTemplate"]["labels"]
    for pod in builders.client_pods(job):
        own = pod["metadata"]["labels"][LABEL_SITE]
        assert mounted_secret(pod) == (cert_a if own == "a" else cert_b)["spec"]["secretName"]
    for certificate in (server, cert_a, cert_b):
        spec = certificate["spec"]
        assert spec["issuerRef"] == {"name": "fedkube-ca", "kind": "ClusterIssuer",
                                     "group": "cert-manager.io"}
        assert spec["privateKey"]["algorithm"] == "ECDSA" and spec["privateKey"]["size"] == 256
        assert spec["duration"] == "8760h"
        assert certificate["metadata"]["ownerReferences"][0]["uid"] == "u1"
    kinds = [(m["kind"], m["metadata"]["name"]) for m in builders.support_objects(job)]
    assert [n for k, n in kinds if k == "Certificate"] == [
        "j-aggregator-tls", "j-site-a-tls", "j-site-b-tls"]


def test_a_job_without_sites_has_one_clients_certificate_in_cert_manager_mode() -> None:
    job = make_job(clients={"replicas": 2}, security=CERT_MANAGER)
    _, clients = builders.certificates(job)
    assert clients["spec"]["uris"] == ["fedkube://ns/j/clients"]
    assert clients["spec"]["secretName"] == "j-clients-tls"
    assert LABEL_SITE not in clients["spec"]["secretTemplate"]["labels"]
    assert {mounted_secret(p) for p in builders.client_pods(job)} == {"j-clients-tls"}


def test_operator_mode_makes_no_certificates() -> None:
    kinds = {m["kind"] for m in builders.support_objects(make_job("a"))}
    assert "Certificate" not in kinds


# --- mode Disabled ------------------------------------------------------------------------

def test_disabled_mode_is_plaintext_and_says_so() -> None:
    job = make_job("a", "b", security={"tls": {"mode": "Disabled"}})
    plan = credentials.plan_secrets(job, {}, T0)
    assert (plan.create, plan.replace, plan.delete) == ([], [], [])
    for pod in builders.pods(job):
        assert all(v["name"] != "tls" for v in pod["spec"]["volumes"])
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert all(m["mountPath"] != TLS_MOUNT_DIR for m in mounts)
    # What the pods read back from the ConfigMap says plaintext: the job's mode decides,
    # never a setting left out.
    written = builders.configmap(job)["data"]["config.yaml"]
    assert RuntimeConfig.model_validate(yaml.safe_load(written)).tls_folder is None
    decision = reconcile(job, Observed(), T0, generation=1)
    assert not [a for a in decision.actions
                if isinstance(a, Create) and a.manifest["kind"] in ("Secret", "Certificate")]
    (warning,) = [e for e in decision.events if e.reason == "PlaintextTransport"]
    assert warning.type == "Warning" and "Disabled" in warning.message


def test_tls_modes_write_the_tls_folder_and_stay_quiet() -> None:
    for security in ({}, {"security": CERT_MANAGER}):
        job = make_job("a", **security)
        config = yaml.safe_load(builders.configmap(job)["data"]["config.yaml"])
        assert config["tlsDir"] == TLS_MOUNT_DIR
        decision = reconcile(job, Observed(), T0, generation=1)
        assert "PlaintextTransport" not in [e.reason for e in decision.events]


# --- pods, Service, NetworkPolicy ---------------------------------------------------------

def tls_mounts(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "tls"]


def test_each_pod_mounts_only_its_own_key() -> None:
    job = make_job("a", "b", "c")
    aggregator = builders.aggregator_pod(job)
    assert mounted_secret(aggregator) == "j-aggregator-tls"
    clients = builders.client_pods(job)
    assert [(p["metadata"]["name"], mounted_secret(p)) for p in clients] == [
        ("j-a-0", "j-site-a-tls"), ("j-a-1", "j-site-a-tls"), ("j-b-0", "j-site-b-tls"),
        ("j-c-0", "j-site-c-tls")]
    for pod in [aggregator, *clients]:
        secrets = [v for v in pod["spec"]["volumes"] if "secret" in v]
        assert len(secrets) == 1  # never the CA's key, never another site's
        assert secrets[0]["secret"]["defaultMode"] == 0o440
        assert tls_mounts(pod) == [{"name": "tls", "mountPath": TLS_MOUNT_DIR,
                                    "readOnly": True}]
    # Every Secret a pod mounts is one the operator issues; the CA is mounted by none.
    issued_names = {m["metadata"]["name"]
                    for m in credentials.plan_secrets(job, {}, T0).create}
    assert {mounted_secret(p) for p in [aggregator, *clients]} == issued_names - {"j-ca"}


def test_clients_of_a_job_without_sites_share_the_clients_secret() -> None:
    job = make_job(clients={"replicas": 3})
    assert [mounted_secret(p) for p in builders.client_pods(job)] == ["j-clients-tls"] * 3
    assert mounted_secret(builders.aggregator_pod(job)) == "j-aggregator-tls"


def grpc_rule(job: FederatedJob) -> dict[str, Any]:
    rules = builders.network_policy(job)["spec"]["ingress"]
    return next(r for r in rules if r["ports"] == [{"protocol": "TCP", "port": 50051}])


def test_the_grpc_port_is_open_to_anyone_only_when_exposed() -> None:
    inside = make_job("a")
    assert not builders.exposed(inside)
    assert grpc_rule(inside)["from"] == [{"podSelector": {"matchLabels": {
        LABEL_JOB: "j", LABEL_ROLE: "client"}}}]
    for service in ({"type": "LoadBalancer"}, {"type": "NodePort"},
                    {"externalAddress": "fl.example.org"}):
        exposed = make_job("a", aggregator={"service": service})
        assert builders.exposed(exposed)
        assert grpc_rule(exposed) == {"ports": [{"protocol": "TCP", "port": 50051}]}
        # The metrics port stays closed to the outside.
        metrics = builders.network_policy(exposed)["spec"]["ingress"][1]
        assert metrics == builders.network_policy(inside)["spec"]["ingress"][1]
        assert metrics["from"]


def test_the_service_carries_type_and_annotations() -> None:
    annotations = {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
    job = make_job("a", aggregator=exposed_at("203.0.113.7:443", type="LoadBalancer",
                                              annotations=annotations))
    public, metrics = builders.services(job)
    assert public["spec"]["type"] == "LoadBalancer"
    assert public["metadata"]["annotations"] == annotations
    # The load balancer publishes gRPC only; /metrics and /status stay inside the cluster.
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
    assert (metrics["metadata"]["name"], metrics["spec"]["type"]) == \
        ("j-aggregator-metrics", "ClusterIP")
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]
    assert builders.metrics_service_name(job) == "j-aggregator-metrics"
    (default,) = builders.services(make_job("a"))
    assert default["spec"]["type"] == "ClusterIP" and "annotations" not in default["metadata"]
    assert [p["name"] for p in default["spec"]["ports"]] == ["grpc", "metrics"]
    assert builders.metrics_service_name(make_job("a")) == "j-aggregator"


@pytest.mark.parametrize(("address", "dialed"), [
    (None, None),
    ("fl.example.org", "fl.example.org:50051"),
    ("fl.example.org:443", "fl.example.org:443"),
    ("203.0.113.7:443", "203.0.113.7:443"),
    ("[2001:db8::7]", "[2001:db8::7]:50051"),
    ("[2001:db8::7]:8443", "[2001:db8::7]:8443"),
])
def test_the_external_address_sites_dial(address: str | None, dialed: str | None) -> None:
    aggregator = exposed_at(address) if address else {}
    assert builders.external_address(make_job("a", aggregator=aggregator)) == dialed


# --- the reconcile: revoking a removed site -----------------------------------------------

def kinds_and_names(decision: Decision, action: type) -> list[tuple[str, str]]:
    return [(a.kind, a.name) for a in decision.actions if isinstance(a, action)]


def running(job: FederatedJob) -> list[dict[str, Any]]:
    return [{**p, "metadata": {**p["metadata"], "creationTimestamp": T0.isoformat()},
             "status": {"phase": "Running"}} for p in builders.pods(job)]


def revoke_b(security: dict[str, Any], secrets: dict[str, dict[str, Any]]) -> Decision:
    """Reconcile a running job with sites a and b after b is removed from its spec."""
    old = make_job("a", "b", security=security)
    first = reconcile(old, Observed(), T0, generation=1)
    old = old.model_copy(update={"status": first.status})
    new = make_job("a", security=security).model_copy(update={"status": first.status})
    support = frozenset((m["kind"], m["metadata"]["name"])
                        for m in builders.support_objects(old))
    observed = Observed(pods=running(old), support=support,
                        config=builders.configmap(old)["data"], secrets=secrets)
    return reconcile(new, observed, T0 + DAY, generation=2,
                     annotations={ANNOTATION_ACCEPTED_SPEC: first.accepted_spec_hash})


def test_a_removed_site_is_revoked_by_the_reconcile() -> None:
    decision = revoke_b({}, {n: as_stored(s) for n, s in issued("a", "b").items()})
    deleted = kinds_and_names(decision, Delete)
    assert ("Secret", "j-site-b-tls") in deleted
    assert ("Pod", "j-b-0") in deleted
    assert not [k for k, _ in deleted if k == "Certificate"]
    assert [n for k, n in deleted if k == "Secret"] == ["j-site-b-tls"]
    (event,) = [e for e in decision.events if e.reason == "SiteRevoked"]
    assert event.type == "Normal" and "site b" in event.message and "j-site-b-tls" in \
        event.message
    (update,) = [a for a in decision.actions if isinstance(a, Update)]
    assert (update.kind, update.name) == ("ConfigMap", "j-config")
    assert update.patch == {"data": builders.configmap(make_job("a"))["data"]}
    assert "name: b" not in update.patch["data"]["config.yaml"]
    # No certificate is issued again for the sites that stay.
    assert not [a for a in decision.actions if isinstance(a, Create)]


def cert_manager_secret(certificate: dict[str, Any]) -> dict[str, Any]:
    """The Secret cert-manager writes for ``certificate`` (its secretTemplate's labels)."""
    spec = certificate["spec"]
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": spec["secretName"], "namespace": "ns",
                         "labels": dict(spec["secretTemplate"]["labels"])},
            "data": {"tls.crt": "", "tls.key": "", "ca.crt": ""}}


def test_a_removed_site_loses_its_certificate_in_cert_manager_mode() -> None:
    old = make_job("a", "b", security=CERT_MANAGER)
    secrets = by_name([cert_manager_secret(c) for c in builders.certificates(old)])
    decision = revoke_b(CERT_MANAGER, secrets)
    deleted = kinds_and_names(decision, Delete)
    assert ("Secret", "j-site-b-tls") in deleted and ("Certificate", "j-site-b-tls") in deleted
    assert [n for k, n in deleted if k in ("Secret", "Certificate")] == [
        "j-site-b-tls", "j-site-b-tls"]
    assert "SiteRevoked" in [e.reason for e in decision.events]
    assert ("ConfigMap", "j-config") in kinds_and_names(decision, Update)
    assert not [a for a in decision.actions if isinstance(a, Create)]


def test_the_reconcile_reissues_replaced_secrets_in_place() -> None:
    job = make_job("a", "b", aggregator=exposed_at("fl.example.org"))
    first = reconcile(job, Observed(), T0, generation=1)
    job = job.model_copy(update={"status": first.status})
    support = frozenset((m["kind"], m["metadata"]["name"])
                        for m in builders.support_objects(job))
    secrets = {n: as_stored(s) for n, s in issued("a", "b").items()}
    decision = reconcile(job, Observed(pods=running(job), support=support,
                                       config=builders.configmap(job)["data"], secrets=secrets),
                         T0 + DAY, generation=2)
    (update,) = [a for a in decision.actions if isinstance(a, Update)]
    assert (update.kind, update.name) == ("Secret", "j-aggregator-tls")
    assert update.patch["metadata"]["annotations"][credentials.ANNOTATION_HOSTS].endswith(
        ",fl.example.org")
    leaf = x509.load_pem_x509_certificate(update.patch["stringData"]["tls.crt"].encode())
    assert "fl.example.org" in sans_of(leaf).get_values_for_type(x509.DNSName)
    assert not [a for a in decision.actions if isinstance(a, Create | Delete)]
    assert all(not isinstance(a, Event) or a.reason != "SiteRevoked" for a in decision.actions)


# --- renewal ------------------------------------------------------------------------------

def test_certificates_are_renewed_before_they_expire() -> None:
    """A third of the validity left: re-issued by the same CA. A CA that would expire before
    a certificate issued now: renewed, and every certificate with it."""
    job = make_job("a")
    issued = {m["metadata"]["name"]: m for m in credentials.plan_secrets(job, {}, T0).create}
    year = timedelta(days=365)
    later = credentials.plan_secrets(job, issued, T0 + year * 0.6)
    assert (later.create, later.replace, later.delete) == ([], [], [])
    renewed = credentials.plan_secrets(job, issued, T0 + year * 0.7)
    assert sorted(m["metadata"]["name"] for m in renewed.replace) == \
        ["j-aggregator-tls", "j-site-a-tls"]
    assert all(m["stringData"]["ca.crt"] == issued["j-ca"]["stringData"]["ca.crt"]
               for m in renewed.replace)
    aged = credentials.plan_secrets(job, issued, T0 + year * 1.1)
    assert sorted(m["metadata"]["name"] for m in aged.replace) == \
        ["j-aggregator-tls", "j-ca", "j-site-a-tls"]
    new_ca = next(m for m in aged.replace if m["metadata"]["name"] == "j-ca")
    assert new_ca["stringData"]["ca.crt"] != issued["j-ca"]["stringData"]["ca.crt"]
