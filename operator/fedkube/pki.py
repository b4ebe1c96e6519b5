"""Certificates for a job's mutual TLS: one CA per job, a server certificate for the
aggregator and one client certificate per site.

Identity lives in the certificate, as a URI subject alternative name that binds it to one job
and one site: ``fedkube://<namespace>/<job>/sites/<site>`` (or ``.../clients`` for the clients
of a job without sites, and ``.../aggregator`` for the server). The aggregator trusts only its
job's CA and, because cert-manager issuers may be shared between jobs, also checks that the
URI names its own job. Keys are ECDSA P-256: fast to make (a job with 100 sites is issued in
milliseconds) and accepted by every TLS 1.3 stack.

Pure functions of their arguments (and the clock passed in); no Kubernetes, no gRPC.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SCHEME = "fedkube"
#: Identity of the clients of a job without sites: every client shares it.
CLIENTS = "clients"
#: Leeway for clocks that run a little behind the issuer's.
CLOCK_SKEW = timedelta(minutes=5)


class InvalidIdentity(ValueError):
    """A certificate that carries no fedkube identity, or a malformed one."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for: a site of a job (``site`` None: the job's clients when
    it has no sites)."""

    namespace: str
    job: str
    site: str | None = None

    @property
    def uri(self) -> str:
        who = f"sites/{self.site}" if self.site is not None else CLIENTS
        return f"{SCHEME}://{self.namespace}/{self.job}/{who}"

    @property
    def name(self) -> str:
        """The site's name, or ``clients``: for logs and metric labels."""
        return self.site if self.site is not None else CLIENTS

    @classmethod
    def parse(cls, uri: str) -> Identity:
        prefix = f"{SCHEME}://"
        parts = uri[len(prefix):].split("/") if uri.startswith(prefix) else []
        if len(parts) == 3 and parts[2] == CLIENTS and all(parts[:2]):
            return cls(parts[0], parts[1])
        if len(parts) == 4 and parts[2] == "sites" and all(parts[:2]) and parts[3]:
            return cls(parts[0], parts[1], parts[3])
        raise InvalidIdentity(f"{uri!r} is not a fedkube client identity "
                              f"({prefix}<namespace>/<job>/sites/<site> or .../{CLIENTS})")


def server_uri(namespace: str, job: str) -> str:
    return f"{SCHEME}://{namespace}/{job}/aggregator"


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert: bytes
    key: bytes

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("a fedkube CA key is an ECDSA key")
        return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkube"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          signer: ec.EllipticCurvePrivateKey, now: datetime, valid: timedelta) -> bytes:
    certificate = (builder.issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + valid)
                   .sign(signer, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


def issue_ca(namespace: str, job: str, now: datetime, valid: timedelta) -> KeyPair:
    """The job's own CA: it signs only this job's certificates."""
    key = _new_key()
    name = _name(f"fedkube CA {namespace}/{job}")
    builder = (x509.CertificateBuilder().subject_name(name)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=True, crl_sign=True,
                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    return KeyPair(_sign(builder, key, name, key, now, valid), _pem_key(key))


def _leaf(ca: KeyPair, common_name: str, names: list[x509.GeneralName],
          usage: x509.ObjectIdentifier, now: datetime, valid: timedelta) -> KeyPair:
    key, signer = _new_key(), ca.private_key()
    authority = ca.certificate()
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=False, crl_sign=False,
                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signer.public_key()), critical=False))
    return KeyPair(_sign(builder, key, authority.subject, signer, now, valid), _pem_key(key))


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """DNS and IP subject alternative names for ``hosts`` (an IP literal becomes an IP SAN)."""
    return [x509.IPAddress(ipaddress.ip_address(host)) if is_ip_address(host)
            else x509.DNSName(host) for host in hosts]


def issue_server(ca: KeyPair, namespace: str, job: str, hosts: Sequence[str], now: datetime,
                 valid: timedelta) -> KeyPair:
    """The aggregator's certificate, valid for every name and address clients dial."""
    names = [*host_names(hosts), x509.UniformResourceIdentifier(server_uri(namespace, job))]
    return _leaf(ca, hosts[0] if hosts else f"{job}-aggregator", names,
                 ExtendedKeyUsageOID.SERVER_AUTH, now, valid)


def issue_client(ca: KeyPair, identity: Identity, now: datetime, valid: timedelta) -> KeyPair:
    """A site's client certificate (every pod of the site presents it)."""
    return _leaf(ca, identity.name, [x509.UniformResourceIdentifier(identity.uri)],
                 ExtendedKeyUsageOID.CLIENT_AUTH, now, valid)


def identity_of(certificate: x509.Certificate) -> Identity:
    """The fedkube identity a (verified) client certificate carries."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise InvalidIdentity("the certificate has no subject alternative names") from None
    uris = [u for u in sans.value.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{SCHEME}://")]
    if len(uris) != 1:
        raise InvalidIdentity(f"the certificate carries {len(uris)} fedkube URIs, not one")
    return Identity.parse(uris[0])
