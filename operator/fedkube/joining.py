"""``fedkube bundle``: a site's join bundle, read from the cluster with the user's own
kubeconfig (the operator plays no part: whoever may read the site's Secret may hand it out)."""

from __future__ import annotations

import json
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import ValidationError

from fedkube.api import GROUP, PLURAL, VERSION, FederatedJob
from fedkube.api.runtime import ConfigurationError
from fedkube.bundle import Bundle
from fedkube.controller.builders import site_secret_name


def _connect(namespace: str | None) -> tuple[client.ApiClient, str]:
    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
        _, context = config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
        default = (context.get("context") or {}).get("namespace") or "default"
    except ConfigException:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except ConfigException:
            raise ConfigurationError("no kubeconfig (KUBECONFIG or ~/.kube/config) and not in "
                                     "a pod: log in to the job's cluster first") from None
        default = "default"
    return client.ApiClient(), namespace or default


def _read(what: str, call: Any) -> dict[str, Any]:
    try:
        response = call(_preload_content=False)
    except ApiException as error:
        if error.status == 404:
            raise ConfigurationError(f"{what} not found") from None
        raise ConfigurationError(f"cannot read {what}: HTTP {error.status} {error.reason}"
                                 ) from None
    body: dict[str, Any] = json.loads(response.data)
    return body


def fetch_bundle(job_name: str, site: str, namespace: str | None, address: str | None) -> str:
    """The bundle of ``site`` in job ``job_name`` as YAML."""
    api, namespace = _connect(namespace)
    with api:
        body = _read(f"FederatedJob {namespace}/{job_name}", lambda **kw: client.CustomObjectsApi(
            api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job_name, **kw))
        try:
            job = FederatedJob.model_validate(body)
        except ValidationError as error:
            raise ConfigurationError(f"FederatedJob {namespace}/{job_name} is not valid: "
                                     f"{error.errors()[0]['msg']}") from None
        if job.spec.security.tls.mode == "Disabled":
            raise ConfigurationError(f"job {namespace}/{job_name} has spec.security.tls.mode "
                                     "Disabled: there is no certificate to join with")
        name = site_secret_name(job_name, site)
        if site not in {s.name for s in job.spec.sites}:
            secret: dict[str, Any] = {}  # Bundle.of_job names the sites the job has
        else:
            secret = _read(f"Secret {namespace}/{name} (the site's certificate, issued by the "
                           "operator or cert-manager)", lambda **kw: client.CoreV1Api(
                               api).read_namespaced_secret(name, namespace, **kw))
    bundle = Bundle.of_job(job, site, secret, address)
    return yaml.safe_dump(bundle.to_secret(), sort_keys=False)
