"""The certificates the operator issues itself (``security.tls.mode: Operator``).

Each job gets its own CA, kept in ``<job>-ca`` (no pod mounts it), a server certificate for
the aggregator and one client certificate per site, each in its own Secret so that a site's
pods mount only their own key. The plan is a function of the job and the Secrets that exist
(plus fresh random keys): missing Secrets are issued, Secrets signed by another CA (the CA
Secret was deleted) or for other host names (``externalAddress`` changed) are re-issued, and
the Secret of a site removed from the job is deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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


def _current(secret: Manifest | None, ca: pki.KeyPair, hosts: list[str] | None) -> bool:
    if secret is None:
        return False
    values = secret_values(secret, secret["metadata"]["name"])
    if values.get("ca.crt", "").encode() != ca.cert:
        return False
    annotations = secret["metadata"].get("annotations") or {}
    return hosts is None or annotations.get(ANNOTATION_HOSTS) == ",".join(hosts)


def plan_secrets(job: FederatedJob, secrets: Mapping[str, Manifest],
                 now: datetime) -> SecretPlan:
    """What to create, re-issue and delete among the job's Secrets (name -> Secret)."""
    plan = SecretPlan(delete=stale_site_secrets(job, secrets))
    if job.spec.security.tls.mode != "Operator":
        return plan
    valid = timedelta(days=job.spec.security.tls.validity_days)
    ca = _ca(job, secrets)
    if ca is None:
        ca = pki.issue_ca(job.namespace, job.name, now, valid * CA_VALIDITY_FACTOR)
        plan.create.append(builders.ca_secret(job, ca))

    def place(manifest: Manifest) -> None:
        exists = manifest["metadata"]["name"] in secrets
        (plan.replace if exists else plan.create).append(manifest)

    hosts = builders.server_hosts(job)
    server = builders.server_secret_name(job.name)
    if not _current(secrets.get(server), ca, hosts):
        pair = pki.issue_server(ca, job.namespace, job.name, hosts, now, valid)
        manifest = builders.tls_secret(job, server, ca.cert, pair)
        manifest["metadata"]["annotations"] = {ANNOTATION_HOSTS: ",".join(hosts)}
        place(manifest)
    for site in builders.identities(job):
        name = builders.site_secret_name(job.name, site)
        if not _current(secrets.get(name), ca, None):
            pair = pki.issue_client(ca, pki.Identity(job.namespace, job.name, site), now, valid)
            place(builders.tls_secret(job, name, ca.cert, pair, site))
    return plan
