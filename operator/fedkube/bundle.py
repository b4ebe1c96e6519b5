"""Join bundles: everything a site outside the cluster needs to take part in one job.

A bundle is a Kubernetes Secret manifest, so that one file serves both ways a site joins:
``fedkube client --bundle FILE`` on the site's own machine, or ``kubectl apply -f FILE`` into
the site's own cluster, where a client-only FederatedJob mounts it. It holds the aggregator's
address, the job it belongs to, the site it speaks for, the job's CA certificate (to verify the
aggregator) and the site's certificate and private key: keep it as secret as the key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedkube.api import FederatedJob
from fedkube.api.constants import LABEL_SITE
from fedkube.api.runtime import CA_FILE, CERT_FILE, KEY_FILE, ConfigurationError
from fedkube.controller.builders import external_address, site_secret_name
from fedkube.federation.security import TlsFiles

ADDRESS, JOB, NAMESPACE, SITE = "address", "job", "namespace", "site"
#: Label of a bundle Secret naming the job it joins.
LABEL_BUNDLE_JOB = "fedkube.io/bundle-for"
KEYS = (ADDRESS, JOB, NAMESPACE, SITE, CA_FILE, CERT_FILE, KEY_FILE)


def secret_values(manifest: dict[str, Any], source: str) -> dict[str, str]:
    """A Secret's values as text, from its base64 ``data`` and its ``stringData``."""
    values: dict[str, str] = {}
    for key, value in (manifest.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise ConfigurationError(f"{source}: data.{key} is not base64 text") from None
    values.update({k: str(v) for k, v in (manifest.get("stringData") or {}).items()})
    return values


def bundle_secret_name(job: str, site: str) -> str:
    return f"{job}-{site}-bundle"


@dataclass(frozen=True)
class Bundle:
    """A site's ticket to one job."""

    address: str
    """``host:port`` of the aggregator, as the site dials it."""
    namespace: str
    job: str
    site: str
    files: TlsFiles

    def to_secret(self) -> dict[str, Any]:
        """The bundle as a Secret manifest (no namespace: it goes where it is applied)."""
        data = {ADDRESS: self.address, JOB: self.job, NAMESPACE: self.namespace,
                SITE: self.site, CA_FILE: self.files.ca.decode(),
                CERT_FILE: self.files.cert.decode(), KEY_FILE: self.files.key.decode()}
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": bundle_secret_name(self.job, self.site),
                             # Not the job's own labels: an operator reconciling a job of
                             # that name where the bundle is applied must leave it alone.
                             "labels": {LABEL_BUNDLE_JOB: self.job, LABEL_SITE: self.site}},
                "stringData": data}

    @classmethod
    def from_secret(cls, manifest: Any, source: str) -> Bundle:
        """Read a bundle Secret, with its values in ``stringData`` or base64 ``data``."""
        if not isinstance(manifest, dict) or manifest.get("kind") != "Secret":
            raise ConfigurationError(f"{source} is not a fedkube join bundle (a Secret made "
                                     "by `fedkube bundle JOB SITE`)")
        return cls.from_values(secret_values(manifest, source), source)

    @classmethod
    def from_values(cls, values: dict[str, str], source: str) -> Bundle:
        missing = [key for key in KEYS if not values.get(key)]
        if missing:
            raise ConfigurationError(f"{source} lacks {', '.join(missing)}: make it again with "
                                     "`fedkube bundle JOB SITE`")
        return cls(values[ADDRESS], values[NAMESPACE], values[JOB], values[SITE],
                   TlsFiles(values[CA_FILE].encode(), values[CERT_FILE].encode(),
                            values[KEY_FILE].encode()))

    @classmethod
    def of_job(cls, job: FederatedJob, site: str, secret: dict[str, Any],
               address: str | None = None) -> Bundle:
        """The bundle of ``site`` from the job and the site's TLS Secret; ``address``
        overrides the job's ``aggregator.service.externalAddress``."""
        names = [s.name for s in job.spec.sites]
        if site not in names:
            raise ConfigurationError(
                f"job {job.namespace}/{job.name} has no site {site!r}"
                + (f" (its sites: {', '.join(names)})" if names else " (it has no sites)"))
        address = address or external_address(job)
        if address is None:
            raise ConfigurationError(
                f"job {job.namespace}/{job.name} is not exposed outside the cluster: set "
                "spec.aggregator.service.externalAddress (and a Service type that reaches "
                "it), or give the address with --address")
        values = secret_values(secret, f"Secret {site_secret_name(job.name, site)}")
        missing = [key for key in (CA_FILE, CERT_FILE, KEY_FILE) if not values.get(key)]
        if missing:
            raise ConfigurationError(f"Secret {site_secret_name(job.name, site)} lacks "
                                     f"{', '.join(missing)}: is its certificate issued yet?")
        return cls(address, job.namespace, job.name, site,
                   TlsFiles(values[CA_FILE].encode(), values[CERT_FILE].encode(),
                            values[KEY_FILE].encode()))

    @classmethod
    def read(cls, path: Path) -> Bundle:
        """A bundle file, or a folder of its keys (the bundle Secret mounted in a pod)."""
        if path.is_dir():
            return cls.from_values({key: (path / key).read_text() for key in KEYS
                                    if (path / key).is_file()}, f"--bundle {path}")
        try:
            manifest = yaml.safe_load(path.read_text())
        except OSError as error:
            raise ConfigurationError(f"--bundle {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigurationError(f"--bundle {path} is not YAML: {error}") from None
        return cls.from_secret(manifest, f"--bundle {path}")
