"""Per-job certificates (:mod:`fedkube.pki`) and what the aggregator makes of them after the
handshake (:mod:`fedkube.federation.security`)."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from fedkube import pki
from fedkube.api import FederatedJobSpec
from fedkube.api.runtime import CA_FILE, CERT_FILE, KEY_FILE, ConfigurationError
from fedkube.federation import security
from fedkube.federation.security import REFUSAL_REASONS, Admission, Refused, TlsFiles

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=365)


@pytest.fixture(scope="module")
def ca() -> pki.KeyPair:
    return pki.issue_ca("ns", "j", T0, 2 * YEAR)


@pytest.fixture(scope="module")
def other_ca() -> pki.KeyPair:
    """Another job's CA (same namespace): it must not vouch for job j's clients."""
    return pki.issue_ca("ns", "k", T0, 2 * YEAR)


@pytest.fixture(scope="module")
def client_a(ca: pki.KeyPair) -> pki.KeyPair:
    return pki.issue_client(ca, pki.Identity("ns", "j", "a"), T0, YEAR)


def verifier(ca: pki.KeyPair, at: datetime = T0 + DAY) -> PolicyBuilder:
    return PolicyBuilder().store(Store([ca.certificate()])).time(at)


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    return cert.extensions.get_extension_for_class(kind)


# --- identities ---------------------------------------------------------------------------

@pytest.mark.parametrize(("identity", "uri"), [
    (pki.Identity("ns", "j", "a"), "fedkube://ns/j/sites/a"),
    (pki.Identity("team-x", "mnist-run", "ward-7"), "fedkube://team-x/mnist-run/sites/ward-7"),
    (pki.Identity("ns", "j"), "fedkube://ns/j/clients"),
])
def test_identity_uri_round_trip(identity: pki.Identity, uri: str) -> None:
    assert identity.uri == uri
    assert pki.Identity.parse(uri) == identity
    assert identity.name == (identity.site or "clients")


@pytest.mark.parametrize("uri", [
    "spiffe://ns/j/sites/a",           # wrong scheme
    "fedkube:/ns/j/sites/a",           # not an authority
    "https://ns/j/sites/a",
    "fedkube://ns/j/sites",            # no site
    "fedkube://ns/j/sites/",           # empty site
    "fedkube://ns/j",                  # neither sites nor clients
    "fedkube://ns",
    "fedkube://",
    "",
    "fedkube:///j/sites/a",            # empty namespace
    "fedkube://ns//sites/a",           # empty job
    "fedkube:///j/clients",
    "fedkube://ns//clients",
    "fedkube://ns/j/sites/a/b",        # extra path parts
    "fedkube://ns/j/sites/a/",
    "fedkube://ns/j/clients/a",
    "fedkube://ns/j/clients/",
    "fedkube://ns/j/aggregator",       # the server's identity is no client's
    "fedkube://ns/j/site/a",           # misspelled
    "fedkube://ns/j/client",
])
def test_parse_refuses_malformed_identities(uri: str) -> None:
    with pytest.raises(pki.InvalidIdentity, match="not a fedkube client identity"):
        pki.Identity.parse(uri)


def test_server_uri_and_ip_literals() -> None:
    assert pki.server_uri("ns", "j") == "fedkube://ns/j/aggregator"
    assert pki.is_ip_address("203.0.113.7") and pki.is_ip_address("2001:db8::7")
    assert not pki.is_ip_address("aggregator.example.org")
    assert not pki.is_ip_address("[2001:db8::7]")  # brackets belong to host:port, not the IP
    assert pki.host_names(["a.example", "10.0.0.1", "::1"]) == [
        x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1"))]


# --- certificates -------------------------------------------------------------------------

def test_ca_is_a_ca_for_leaves_only(ca: pki.KeyPair) -> None:
    cert = ca.certificate()
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = extension(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "fedkube CA ns/j"
    assert cert.not_valid_before_utc == T0 - pki.CLOCK_SKEW
    assert cert.not_valid_after_utc == T0 + 2 * YEAR
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)  # self-signed
    assert ca.private_key().public_key() == cert.public_key()


def test_client_certificate_verifies_against_its_ca_only(
        ca: pki.KeyPair, other_ca: pki.KeyPair, client_a: pki.KeyPair) -> None:
    cert = client_a.certificate()
    verified = verifier(ca).build_client_verifier().verify(cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("fedkube://ns/j/sites/a")]
    assert verified.chain[-1] == ca.certificate()
    cert.verify_directly_issued_by(ca.certificate())
    with pytest.raises(VerificationError):
        verifier(other_ca).build_client_verifier().verify(cert, [])
    with pytest.raises(ValueError):  # signature by another key
        cert.verify_directly_issued_by(other_ca.certificate())
    # Not before the clock skew allowance nor after the validity.
    with pytest.raises(VerificationError):
        verifier(ca, T0 + YEAR + timedelta(seconds=1)).build_client_verifier().verify(cert, [])
    verifier(ca, T0 - pki.CLOCK_SKEW).build_client_verifier().verify(cert, [])
    with pytest.raises(VerificationError):
        verifier(ca, T0 - pki.CLOCK_SKEW - timedelta(seconds=1)).build_client_verifier() \
            .verify(cert, [])


def test_client_certificate_carries_exactly_its_identity(client_a: pki.KeyPair) -> None:
    cert = client_a.certificate()
    sans = extension(cert, x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier("fedkube://ns/j/sites/a")]
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = extension(cert, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert pki.identity_of(cert) == pki.Identity("ns", "j", "a")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    assert client_a.private_key().public_key() == cert.public_key()


def test_clients_identity_of_a_job_without_sites(ca: pki.KeyPair) -> None:
    cert = pki.issue_client(ca, pki.Identity("ns", "j"), T0, YEAR).certificate()
    assert list(extension(cert, x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier("fedkube://ns/j/clients")]
    assert pki.identity_of(cert) == pki.Identity("ns", "j", None)


def test_each_certificate_has_its_own_key(ca: pki.KeyPair) -> None:
    one = pki.issue_client(ca, pki.Identity("ns", "j", "a"), T0, YEAR)
    two = pki.issue_client(ca, pki.Identity("ns", "j", "a"), T0, YEAR)
    assert one.key != two.key
    assert one.certificate().serial_number != two.certificate().serial_number


def test_validity_window_allows_for_clock_skew(ca: pki.KeyPair) -> None:
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    cert = pki.issue_client(ca, pki.Identity("ns", "j", "a"), now, timedelta(days=30)) \
        .certificate()
    assert cert.not_valid_before_utc == now - pki.CLOCK_SKEW == now - timedelta(minutes=5)
    assert cert.not_valid_after_utc == now + timedelta(days=30)


HOSTS = ["j-aggregator.ns.svc", "j-aggregator", "203.0.113.7", "2001:db8::7"]


def test_server_certificate_names_every_host(ca: pki.KeyPair) -> None:
    cert = pki.issue_server(ca, "ns", "j", HOSTS, T0, YEAR).certificate()
    sans = extension(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["j-aggregator.ns.svc", "j-aggregator"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8::7")]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "fedkube://ns/j/aggregator"]
    assert len(list(sans)) == 5
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOSTS[0]
    cert.verify_directly_issued_by(ca.certificate())
    # A TLS client dialing any of the names or addresses accepts it...
    for subject in (DNSName("j-aggregator.ns.svc"), DNSName("j-aggregator"),
                    IPAddress(ipaddress.ip_address("203.0.113.7")),
                    IPAddress(ipaddress.ip_address("2001:db8::7"))):
        verifier(ca).build_server_verifier(subject).verify(cert, [])
    # ...and no other name; nor may it pass for a client (no clientAuth).
    with pytest.raises(VerificationError):
        verifier(ca).build_server_verifier(DNSName("evil.example")).verify(cert, [])
    with pytest.raises(VerificationError):
        verifier(ca).build_client_verifier().verify(cert, [])
    # The aggregator's URI is no client identity.
    with pytest.raises(pki.InvalidIdentity):
        pki.identity_of(cert)


def test_client_certificate_cannot_pass_for_the_server(ca: pki.KeyPair,
                                                       client_a: pki.KeyPair) -> None:
    with pytest.raises(VerificationError):
        verifier(ca).build_server_verifier(DNSName("a")).verify(client_a.certificate(), [])


def handmade(sans: list[x509.GeneralName] | None) -> x509.Certificate:
    """A self-signed certificate with exactly these subject alternative names (None: none)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handmade")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(T0).not_valid_after(T0 + DAY))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_identity_of_refuses_certificates_without_exactly_one_fedkube_uri() -> None:
    with pytest.raises(pki.InvalidIdentity, match="no subject alternative names"):
        pki.identity_of(handmade(None))
    with pytest.raises(pki.InvalidIdentity, match="0 fedkube URIs"):
        pki.identity_of(handmade([x509.DNSName("a.example"),
                                  x509.UniformResourceIdentifier("spiffe://ns/j/sites/a")]))
    with pytest.raises(pki.InvalidIdentity, match="2 fedkube URIs"):
        pki.identity_of(handmade([x509.UniformResourceIdentifier("fedkube://ns/j/sites/a"),
                                  x509.UniformResourceIdentifier("fedkube://ns/j/sites/b")]))
    with pytest.raises(pki.InvalidIdentity, match="not a fedkube client identity"):
        pki.identity_of(handmade([x509.UniformResourceIdentifier("fedkube://ns/j/sites/")]))
    # Other URIs beside the one fedkube URI are ignored.
    assert pki.identity_of(handmade([
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/ns/sa/default"),
        x509.UniformResourceIdentifier("fedkube://ns/j/sites/b")])) == \
        pki.Identity("ns", "j", "b")


def test_a_non_ecdsa_ca_key_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(ValueError, match="ECDSA"):
        pki.KeyPair(b"", key).private_key()


# --- admission ----------------------------------------------------------------------------

def site(name: str, replicas: int = 1) -> dict[str, Any]:
    return {"name": name, "replicas": replicas,
            "data": {"volume": {"hostPath": {"path": f"/srv/{name}"}}}}


def make_spec(*sites: dict[str, Any], **extra: Any) -> FederatedJobSpec:
    return FederatedJobSpec.model_validate(
        {"strategy": {"minClients": 1}, "sites": list(sites), **extra})


def context(*uris: str, version: bytes = b"TLSv1.3") -> dict[str, list[bytes]]:
    """An auth_context as gRPC gives it for a TLS connection with a client certificate."""
    out = {"transport_security_type": [b"ssl"], "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"],
           "ssl_session_reused": [b"false"], "x509_common_name": [b"a"],
           "x509_subject_alternative_name": [u.encode() for u in uris],
           "peer_uri": [u.encode() for u in uris]}
    if version:
        out["ssl_tls_version"] = [version]
    return out


def refusal(call: Any, *args: Any) -> Refused:
    with pytest.raises(Refused) as caught:
        call(*args)
    assert caught.value.reason in REFUSAL_REASONS
    return caught.value


@pytest.fixture
def admission() -> Admission:
    """Job ns/j with site a (clients 0 and 1) and site b (client 2)."""
    return Admission("ns", "j", make_spec(site("a", 2), site("b")), tls=True)


def test_identify_admits_a_site_of_this_job(admission: Admission) -> None:
    assert admission.identify(context("fedkube://ns/j/sites/a")) == pki.Identity("ns", "j", "a")
    assert admission.identify(context("fedkube://ns/j/sites/b")) == pki.Identity("ns", "j", "b")
    # Other URIs in the certificate do not get in the way.
    assert admission.identify(context("spiffe://x/y", "fedkube://ns/j/sites/b")) == \
        pki.Identity("ns", "j", "b")


@pytest.mark.parametrize("version", [b"TLSv1.2", b"TLSv1.1", b""])
def test_identify_refuses_anything_but_tls13(admission: Admission, version: bytes) -> None:
    refused = refusal(admission.identify, context("fedkube://ns/j/sites/a", version=version))
    assert refused.reason == "tls_version" and refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert "TLSv1.3" in str(refused)


@pytest.mark.parametrize("uris", [
    (), ("spiffe://ns/j/sites/a",), ("fedkube://ns/j/aggregator",), ("fedkube://ns/j/sites/",),
    ("fedkube://ns/j/sites/a", "fedkube://ns/j/sites/b"),
])
def test_identify_refuses_certificates_naming_no_site(admission: Admission,
                                                      uris: tuple[str, ...]) -> None:
    refused = refusal(admission.identify, context(*uris))
    assert refused.reason == "no_identity" and refused.code is grpc.StatusCode.UNAUTHENTICATED


def test_identify_refuses_a_context_without_peer_uri(admission: Admission) -> None:
    assert refusal(admission.identify, {"ssl_tls_version": [b"TLSv1.3"]}).reason == "no_identity"


@pytest.mark.parametrize("uri", ["fedkube://ns/k/sites/a", "fedkube://other/j/sites/a",
                                 "fedkube://ns/k/clients"])
def test_identify_refuses_other_jobs(admission: Admission, uri: str) -> None:
    refused = refusal(admission.identify, context(uri))
    assert refused.reason == "other_job" and refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert "this is ns/j" in str(refused)


@pytest.mark.parametrize("uri", ["fedkube://ns/j/sites/z", "fedkube://ns/j/clients"])
def test_identify_refuses_sites_not_in_the_spec(admission: Admission, uri: str) -> None:
    refused = refusal(admission.identify, context(uri))
    assert refused.reason == "revoked" and refused.code is grpc.StatusCode.PERMISSION_DENIED


def test_a_site_removed_from_the_spec_is_revoked(admission: Admission) -> None:
    assert admission.set_spec(make_spec(site("a", 2), site("b"))) == set()
    assert admission.set_spec(make_spec(site("a", 2))) == {"b"}
    assert refusal(admission.identify, context("fedkube://ns/j/sites/b")).reason == "revoked"
    assert admission.identify(context("fedkube://ns/j/sites/a")) == pki.Identity("ns", "j", "a")
    # Back in the spec: admitted again.
    assert admission.set_spec(make_spec(site("a", 2), site("b"))) == set()
    assert admission.identify(context("fedkube://ns/j/sites/b")) == pki.Identity("ns", "j", "b")
    # A job that drops its sites revokes them all; its clients then share one identity.
    assert admission.set_spec(make_spec(clients={"replicas": 2})) == {"a", "b"}
    assert admission.identify(context("fedkube://ns/j/clients")) == pki.Identity("ns", "j")
    assert admission.set_spec(make_spec(site("c"))) == {None}


def test_a_site_takes_only_its_own_indices(admission: Admission) -> None:
    a, b = pki.Identity("ns", "j", "a"), pki.Identity("ns", "j", "b")
    assert [admission.index_for(a, i, 0) for i in (0, 1)] == [0, 1]
    assert admission.index_for(b, 2, 0) == 2
    for identity, index in ((a, 2), (b, 0), (b, 1), (a, 3), (b, 99)):
        refused = refusal(admission.index_for, identity, index, 0)
        assert refused.reason == "wrong_index"
        assert refused.code is grpc.StatusCode.PERMISSION_DENIED
        assert identity.name in str(refused)


def test_a_replica_takes_its_sites_replica_th_index(admission: Admission) -> None:
    a, b = pki.Identity("ns", "j", "a"), pki.Identity("ns", "j", "b")
    assert admission.index_for(a, -1, 0) == 0
    assert admission.index_for(a, -1, 1) == 1
    assert admission.index_for(b, -1, 0) == 2
    for identity, replica in ((a, 2), (b, 1), (a, -1)):
        assert refusal(admission.index_for, identity, -1, replica).reason == "wrong_index"
    # A site removed meanwhile has no index left.
    admission.set_spec(make_spec(site("a", 2)))
    assert refusal(admission.index_for, b, -1, 0).reason == "wrong_index"
    assert refusal(admission.index_for, b, 2, 0).reason == "wrong_index"


def test_without_tls_there_are_no_identities_and_every_index_is_open() -> None:
    open_door = Admission("ns", "j", make_spec(site("a", 2), site("b")), tls=False)
    assert open_door.identify({}) is None
    assert open_door.identify(context("fedkube://ns/k/sites/z", version=b"TLSv1.2")) is None
    assert [open_door.index_for(None, i, 0) for i in range(3)] == [0, 1, 2]
    assert [open_door.index_for(None, -1, r) for r in range(3)] == [0, 1, 2]
    assert refusal(open_door.index_for, None, 3, 0).reason == "wrong_index"
    assert refusal(open_door.index_for, None, -1, 3).reason == "wrong_index"


def test_a_session_is_new_once_per_connection(admission: Admission) -> None:
    assert admission.new_session("ipv4:10.0.0.1:40000")
    assert not admission.new_session("ipv4:10.0.0.1:40000")
    assert admission.new_session("ipv4:10.0.0.1:40001")
    assert not admission.new_session("ipv4:10.0.0.1:40001")
    assert not admission.new_session("ipv4:10.0.0.1:40000")


def test_refusal_reasons_are_distinct() -> None:
    assert len(set(REFUSAL_REASONS)) == len(REFUSAL_REASONS)
    assert {"tls_version", "no_identity", "other_job", "revoked", "wrong_index"} <= \
        set(REFUSAL_REASONS)


# --- TLS files ----------------------------------------------------------------------------

def test_tls_files_write_then_read(tmp_path: Path, ca: pki.KeyPair,
                                   client_a: pki.KeyPair) -> None:
    files = TlsFiles(ca.cert, client_a.cert, client_a.key)
    folder = files.write(tmp_path / "tls" / "a")
    assert folder == tmp_path / "tls" / "a"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CA_FILE, CERT_FILE, KEY_FILE])
    assert (folder / KEY_FILE).read_bytes() == client_a.key
    assert stat.S_IMODE((folder / KEY_FILE).stat().st_mode) == 0o600
    assert TlsFiles.read(folder) == files
    assert TlsFiles.read(str(folder)) == files
    assert files.certificate() == client_a.certificate()


def test_reading_a_folder_without_the_files_names_the_file(tmp_path: Path) -> None:
    (tmp_path / CA_FILE).write_bytes(b"ca")
    with pytest.raises(ConfigurationError, match=rf"cannot read {CERT_FILE}.*Disabled"):
        TlsFiles.read(tmp_path)
    with pytest.raises(ConfigurationError, match="not a PEM certificate"):
        TlsFiles(b"ca", b"garbage", b"key").certificate()


def test_check_valid_names_the_dates(ca: pki.KeyPair) -> None:
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    pair = pki.issue_client(ca, pki.Identity("ns", "j", "a"), now, DAY)
    files = TlsFiles(ca.cert, pair.cert, pair.key)
    files.check_valid(now)
    files.check_valid(now - pki.CLOCK_SKEW)
    files.check_valid(now + DAY)
    with pytest.raises(ConfigurationError, match=r"expired at 2026-06-02 12:00Z"):
        files.check_valid(now + DAY + timedelta(seconds=1))
    with pytest.raises(ConfigurationError, match=r"valid only from 2026-06-01 11:55Z.*clock"):
        files.check_valid(now - pki.CLOCK_SKEW - timedelta(seconds=1))


# --- a real handshake ---------------------------------------------------------------------

IDENTIFY = "/fedkube.test.Probe/Identify"


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory, ca: pki.KeyPair) -> Path:
    pair = pki.issue_server(ca, "ns", "j", ["localhost", "127.0.0.1"], datetime.now(UTC), DAY)
    return TlsFiles(ca.cert, pair.cert, pair.key).write(tmp_path_factory.mktemp("server"))


@pytest.fixture
def probe(server_dir: Path) -> Iterator[tuple[int, list[dict[str, list[bytes]]], list[int]]]:
    """A gRPC server with the aggregator's credentials that answers with its caller's
    auth_context; yields its port, the contexts seen and the handshakes counted."""
    seen: list[dict[str, list[bytes]]] = []
    handshakes: list[int] = []

    def identify(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.auth_context()))
        return b"ok"

    handler = grpc.method_handlers_generic_handler("fedkube.test.Probe", {
        "Identify": grpc.unary_unary_rpc_method_handler(identify)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("localhost:0", security.server_credentials(
        server_dir, lambda: handshakes.append(1)))
    server.start()
    try:
        yield port, seen, handshakes
    finally:
        server.stop(None)


def call(port: int, files: TlsFiles) -> bytes:
    with grpc.secure_channel(f"localhost:{port}", security.channel_credentials(files)) as channel:
        return channel.unary_unary(IDENTIFY)(b"", timeout=5)


def test_a_real_handshake_gives_admission_what_it_reads(
        probe: tuple[int, list[dict[str, list[bytes]]], list[int]], ca: pki.KeyPair,
        other_ca: pki.KeyPair) -> None:
    port, seen, handshakes = probe
    now = datetime.now(UTC)
    mine = pki.issue_client(ca, pki.Identity("ns", "j", "b"), now, DAY)
    assert call(port, TlsFiles(ca.cert, mine.cert, mine.key)) == b"ok"
    (auth,) = seen
    assert auth["ssl_tls_version"] == [b"TLSv1.3"]
    assert auth["peer_uri"] == [b"fedkube://ns/j/sites/b"]
    admission = Admission("ns", "j", make_spec(site("a", 2), site("b")), tls=True)
    assert admission.identify(auth) == pki.Identity("ns", "j", "b")
    assert handshakes
    # A certificate of another job's CA never reaches the server's code.
    theirs = pki.issue_client(other_ca, pki.Identity("ns", "j", "b"), now, DAY)
    with pytest.raises(grpc.RpcError) as failed:
        call(port, TlsFiles(ca.cert, theirs.cert, theirs.key))
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert len(seen) == 1
