"""The certificates the operator issues itself (``security.tls.mode: Operator``).

Each job gets its own CA, kept in ``<job>-ca`` (no pod mounts it), a server certificate for
the aggregator and one client certificate per site, each in its own Secret so that a site's
pods mount only their own key. The plan is a function of the job and the Secrets that exist
(plus fresh random keys): missing Secrets are issued; certificates signed by another CA (the
CA Secret was deleted or renewed), for other host names (``externalAddress`` changed) or with
less than a third of their validity left are re-issued; the CA is renewed before it would
expire ahead of a certificate issued now; the Secret of a site removed from the job is
deleted. Pods pick up renewed files as the kubelet updates their mounted Secret: the
aggregator at its next handshake, a client when it restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509

from fedkube import pki
from fedkube.api import FederatedJob
from fedkube.api.constants import LABEL_SITE
from fedkube.api.runtime import ConfigurationError
from fedkube.bundle import secret_values
from fedkube.controller import builders
from fedkube.controller.builders import Manifest

#: Annotation on the aggregator's Secret: the host names its certificate is valid for.
ANNOTATION_HOSTS = "fedkube.io/hosts"
#: The CA outlives its certificates: sites added late are still signed by it.
CA_VALIDITY_FACTOR = 2
#: A certificate with less than this part of its validity left is re-issued.
RENEW_WITHIN = 1 / 3


@dataclass
class SecretPlan:
    create: list[Manifest] = field(default_factory=list)
    replace: list[Manifest] = field(default_factory=list)
    """Existing Secrets whose certificate is re-issued."""
    delete: list[str] = field(default_factory=list)
    """Secrets of sites no longer in the job (their certificates are revoked)."""


def stale_site_secrets(job: FederatedJob, secrets: Mapping[str, Manifest]) -> list[str]:
    """The job's site Secrets for sites it no longer has (any mode)."""
    wanted = {builders.site_secret_name(job.name, site) for site in builders.identities(job)}
    return sorted(name for name, secret in secrets.items()
                  if LABEL_SITE in ((secret.get("metadata") or {}).get("labels") or {})
                  and name not in wanted)


def _ca(job: FederatedJob, secrets: Mapping[str, Manifest]) -> pki.KeyPair | None:
    secret = secrets.get(builders.ca_secret_name(job.name))
    if secret is None:
        return None
    values = secret_values(secret, f"Secret {builders.ca_secret_name(job.name)}")
    if not values.get("ca.crt") or not values.get("ca.key"):
        raise ConfigurationError(f"Secret {builders.ca_secret_name(job.name)} lacks ca.crt or "
                                 "ca.key: delete it and the operator issues a new CA")
    return pki.KeyPair(values["ca.crt"].encode(), values["ca.key"].encode())


def _expires(pem: str | bytes) -> datetime | None:
    try:
        certificate = x509.load_pem_x509_certificate(pem if isinstance(pem, bytes)
                                                     else pem.encode())
    except ValueError:
        return None
    return certificate.not_valid_after_utc


def _current(secret: Manifest | None, ca: pki.KeyPair, hosts: list[str] | None,
             renew_after: datetime) -> bool:
    if secret is None:
        return False
    values = secret_values(secret, secret["metadata"]["name"])
    if values.get("ca.crt", "").encode() != ca.cert:
        return False
    expires = _expires(values.get("tls.crt", ""))
    if expires is None or expires <= renew_after:
        return False
    annotations = secret["metadata"].get("annotations") or {}
    return hosts is None or annotations.get(ANNOTATION_HOSTS) == ",".join(hosts)


def plan_secrets(job: FederatedJob, secrets: Mapping[str, Manifest],
                 now: datetime) -> SecretPlan:
    """What to create, re-issue and delete among the job's Secrets (name -> Secret)."""
    plan = SecretPlan(delete=stale_site_secrets(job, secrets))
    if job.spec.security.tls.mode != "Operator" or job.spec.remote is not None:
        return plan
    valid = timedelta(days=job.spec.security.tls.validity_days)

    def place(manifest: Manifest) -> None:
        exists = manifest["metadata"]["name"] in secrets
        (plan.replace if exists else plan.create).append(manifest)

    ca = _ca(job, secrets)
    ca_expires = _expires(ca.cert) if ca is not None else None
    if ca is None or ca_expires is None or ca_expires <= now + valid:
        ca = pki.issue_ca(job.namespace, job.name, now, valid * CA_VALIDITY_FACTOR)
        place(builders.ca_secret(job, ca))
    renew_after = now + valid * RENEW_WITHIN

    hosts = builders.server_hosts(job)
    server = builders.server_secret_name(job.name)
    if not _current(secrets.get(server), ca, hosts, renew_after):
        pair = pki.issue_server(ca, job.namespace, job.name, hosts, now, valid)
        manifest = builders.tls_secret(job, server, ca.cert, pair)
        manifest["metadata"]["annotations"] = {ANNOTATION_HOSTS: ",".join(hosts)}
        place(manifest)
    for site in builders.identities(job):
        name = builders.site_secret_name(job.name, site)
        if not _current(secrets.get(name), ca, None, renew_after):
            pair = pki.issue_client(ca, pki.Identity(job.namespace, job.name, site), now, valid)
            place(builders.tls_secret(job, name, ca.cert, pair, site))
    return plan
