"""Mutual TLS for the protocol: credentials from a pod's TLS folder, and who a caller is.

TLS itself (the handshake, the chain to the job's CA, validity dates) is gRPC's: a client
without a certificate, with one from another CA, expired or not yet valid, or speaking
plaintext, never reaches the aggregator's code. gRPC calls the server's certificate fetcher once
per incoming connection, which counts handshakes (and re-reads renewed certificate files);
connections that then carry a call are counted as sessions, so refused handshakes are the
difference. Everything after the handshake is :class:`Admission`'s: the identity in the
certificate (job and site), revocation, and which client indices a site may take.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509

from fedkube import pki
from fedkube.api import FederatedJobSpec
from fedkube.api.runtime import CA_FILE, CERT_FILE, KEY_FILE, ConfigurationError

#: The only TLS version the aggregator accepts (gRPC Python cannot pin it in the handshake).
TLS_VERSION = b"TLSv1.3"
#: Connections remembered to count sessions; older ones may be counted again (harmless).
REMEMBERED_CONNECTIONS = 65536


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents of a TLS folder (a mounted ``kubernetes.io/tls`` Secret)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def read(cls, folder: str | Path) -> TlsFiles:
        base = Path(folder)
        contents = []
        for name in (CA_FILE, CERT_FILE, KEY_FILE):
            try:
                contents.append((base / name).read_bytes())
            except OSError as error:
                raise ConfigurationError(
                    f"tls_dir {base}: cannot read {name} ({error.strerror}); mount the job's "
                    "TLS Secret there (the operator does), or set spec.security.tls.mode "
                    "Disabled for plaintext") from None
        return cls(*contents)

    def write(self, folder: Path) -> Path:
        """Write the three files into ``folder`` (the key readable by this user only)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in ((CA_FILE, self.ca), (CERT_FILE, self.cert), (KEY_FILE, self.key)):
            path = folder / name
            path.touch(mode=0o600)
            path.chmod(0o600)  # an existing file keeps its mode through touch
            path.write_bytes(content)
        return folder

    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert)
        except ValueError as error:
            raise ConfigurationError(f"{CERT_FILE} is not a PEM certificate: {error}") from None

    def check_valid(self, now: datetime | None = None) -> None:
        """Refuse an expired or not yet valid certificate here, with the dates, rather than
        as an anonymous handshake failure at the peer."""
        certificate = self.certificate()
        now = now or datetime.now(UTC)
        if now > certificate.not_valid_after_utc:
            raise ConfigurationError(
                f"{CERT_FILE} expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M}Z: "
                "issue a new one (the operator re-issues a deleted Secret; cert-manager renews "
                "its own)")
        if now < certificate.not_valid_before_utc:
            raise ConfigurationError(
                f"{CERT_FILE} is valid only from "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M}Z: check this machine's clock")


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """A client's credentials: trusts only the job's CA and presents its site's certificate."""
    return grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                        certificate_chain=files.cert)


def server_credentials(folder: str | Path, on_handshake: Callable[[], None],
                       ) -> grpc.ServerCredentials:
    """The aggregator's credentials: client certificates required and verified against the
    job's CA. Renewed files (cert-manager rotates them in the mounted Secret) are picked up at
    the next connection."""
    loaded = TlsFiles.read(folder)
    loaded.check_valid()
    lock = threading.Lock()

    def configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(files.key, files.cert)],
                                                         root_certificates=files.ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal loaded
        on_handshake()
        try:
            current = TlsFiles.read(folder)
        except ConfigurationError:
            return None  # mid-update by the kubelet: keep the loaded files
        with lock:
            if current == loaded:
                return None
            loaded = current
        return configuration(current)

    return grpc.dynamic_ssl_server_credentials(configuration(loaded), fetch,
                                               require_client_authentication=True)


class Refused(Exception):
    """A call the aggregator refuses; ``reason`` is its ``fedkube_refusals_total`` label."""

    def __init__(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.reason, self.code = reason, code


#: Every ``reason`` of :class:`Refused`, for the metric's labels.
REFUSAL_REASONS = ("tls_version", "no_identity", "other_job", "revoked", "wrong_index",
                   "wrong_session", "not_sampled", "duplicate")


class Admission:
    """Who a caller is (from its verified certificate) and what it may take part as.

    A site's certificate admits it to its own client indices only; the sites in force are
    those of the latest spec given to :meth:`set_spec`, so a site removed from the job is
    refused from then on. With TLS disabled there are no identities and every index is open.
    """

    def __init__(self, namespace: str, job: str, spec: FederatedJobSpec, *, tls: bool) -> None:
        self.namespace, self.job, self.tls = namespace, job, tls
        self._lock = threading.Lock()
        self._indices: dict[str | None, list[int]] = {}
        self._connections: OrderedDict[str, None] = OrderedDict()
        self.set_spec(spec)

    def set_spec(self, spec: FederatedJobSpec) -> set[str | None]:
        """Take the sites of ``spec``; returns the sites (None: the job's clients) revoked."""
        indices: dict[str | None, list[int]] = {}
        for slot in spec.client_slots():
            indices.setdefault(slot.site.name if slot.site else None, []).append(slot.index)
        with self._lock:
            revoked = set(self._indices) - set(indices)
            self._indices = indices
        return revoked

    def new_session(self, connection: str) -> bool:
        """Whether this call is the first on its connection (a TLS session that got through)."""
        with self._lock:
            if connection in self._connections:
                return False
            self._connections[connection] = None
            if len(self._connections) > REMEMBERED_CONNECTIONS:
                self._connections.popitem(last=False)
            return True

    def identify(self, auth_context: dict[str, list[bytes]]) -> pki.Identity | None:
        """The caller's identity, checked against this job and its sites in force."""
        if not self.tls:
            return None
        if auth_context.get("ssl_tls_version") != [TLS_VERSION]:
            raise Refused("tls_version", grpc.StatusCode.UNAUTHENTICATED,
                          f"only {TLS_VERSION.decode()} is accepted")
        uris = [u.decode() for u in auth_context.get("peer_uri", [])
                if u.startswith(f"{pki.SCHEME}://".encode())]
        try:
            if len(uris) != 1:
                raise pki.InvalidIdentity(f"{len(uris)} fedkube URIs in the certificate")
            identity = pki.Identity.parse(uris[0])
        except pki.InvalidIdentity as error:
            raise Refused("no_identity", grpc.StatusCode.UNAUTHENTICATED,
                          f"the client certificate names no fedkube site: {error}") from None
        if (identity.namespace, identity.job) != (self.namespace, self.job):
            raise Refused("other_job", grpc.StatusCode.PERMISSION_DENIED,
                          f"the certificate is for job {identity.namespace}/{identity.job}, "
                          f"this is {self.namespace}/{self.job}")
        with self._lock:
            if identity.site not in self._indices:
                raise Refused("revoked", grpc.StatusCode.PERMISSION_DENIED,
                              f"{identity.name} is not a site of this job (removed from the "
                              "spec?)")
        return identity

    def index_for(self, identity: pki.Identity | None, index: int, replica: int) -> int:
        """The client index a caller joins as: ``index`` if it is the caller's, or (``index``
        below 0) its site's ``replica``-th."""
        with self._lock:
            if identity is None:
                allowed = [i for indices in self._indices.values() for i in indices]
            else:
                allowed = self._indices.get(identity.site, [])
        if index < 0:
            if not 0 <= replica < len(allowed):
                raise Refused("wrong_index", grpc.StatusCode.PERMISSION_DENIED,
                              f"replica {replica} is outside the site's 0..{len(allowed) - 1}")
            return allowed[replica]
        if index not in allowed:
            who = identity.name if identity is not None else "this job"
            raise Refused("wrong_index", grpc.StatusCode.PERMISSION_DENIED,
                          f"client index {index} is not one of {who}'s")
        return index
