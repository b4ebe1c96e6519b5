"""Pure builders: a FederatedJob -> the Kubernetes objects that make it real.

Nothing here talks to a cluster. ``fedkube render`` prints exactly what these return, and the
reconcile compares what exists with what they return, so both stay the same by construction.
Names are deterministic (``<job>-aggregator``, ``<job>-client-<i>``, or ``<job>-<site>-<i>``
for the clients of a site): creating one twice is a 409 AlreadyExists, never a duplicate.

The job's certificates are the exception: keys are random, so the operator's Secrets are made
by :mod:`fedkube.controller.credentials`; here are their names, the pods' mounts of them, and
the cert-manager ``Certificate`` resources that stand in for them in mode CertManager.
"""

from __future__ import annotations

from typing import Any

from fedkube import __version__, pki
from fedkube.api import API_VERSION, KIND, ClientSlot, FederatedJob
from fedkube.api.constants import (
    LABEL_CLIENT_INDEX,
    LABEL_JOB,
    LABEL_ROLE,
    LABEL_SITE,
    ROLE_AGGREGATOR,
    ROLE_CLIENT,
)
from fedkube.api.runtime import (
    CONFIG_MOUNT_PATH,
    STATE_DIR,
    TLS_MOUNT_DIR,
    RuntimeConfig,
)
from fedkube.api.types import ApiModel

Manifest = dict[str, Any]

CONFIG_KEY = CONFIG_MOUNT_PATH.rsplit("/", 1)[1]
#: cert-manager's Certificate API, which the operator writes in mode CertManager.
CERTIFICATE_API_VERSION = "cert-manager.io/v1"
#: Where a client-only job's pods mount the site's join bundle (a folder of its keys).
BUNDLE_MOUNT_DIR = "/var/run/secrets/fedkube/bundle"
#: Mode of the mounted TLS files: readable by the pod's user and group (fsGroup) only.
TLS_FILE_MODE = 0o440
#: Label of the PodGroup a pod belongs to (scheduler-plugins coscheduling).
LABEL_POD_GROUP = "scheduling.x-k8s.io/pod-group"
PODGROUP_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
#: Namespaces carrying this label (e.g. Prometheus') may scrape aggregators.
LABEL_MONITORING_NAMESPACE = "fedkube.io/monitoring"
#: Environment variable naming a site's client's site.
ENV_SITE = "FEDKUBE_SITE"
#: Labels of the operator's pods, which poll the aggregator's /status.
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "fedkube",
                       "app.kubernetes.io/component": "operator"}


def configmap_name(job: str) -> str:
    return f"{job}-config"


def ca_secret_name(job: str) -> str:
    """The job's CA certificate and key (mode Operator): read by the operator only."""
    return f"{job}-ca"


def server_secret_name(job: str) -> str:
    """The aggregator's certificate and key, with the job's CA certificate."""
    return f"{job}-aggregator-tls"


def site_secret_name(job: str, site: str | None) -> str:
    """A site's client certificate and key (``site`` None: every client of a job without
    sites), with the job's CA certificate."""
    return f"{job}-site-{site}-tls" if site is not None else f"{job}-clients-tls"


def identities(job: FederatedJob) -> list[str | None]:
    """Who holds a client certificate: each site, or (None) all clients of a job without
    sites."""
    return [site.name for site in job.spec.sites] or [None]


def tls_enabled(job: FederatedJob) -> bool:
    """Whether this job's certificates are made here (not in a client-only job: its site's
    certificate comes in the bundle)."""
    return job.spec.security.tls.mode != "Disabled" and job.spec.remote is None


def exposed(job: FederatedJob) -> bool:
    """Whether sites outside the cluster reach the aggregator."""
    service_spec = job.spec.aggregator.service
    return service_spec.type != "ClusterIP" or service_spec.external_address is not None


def aggregator_name(job: str) -> str:
    """Name of the aggregator Pod, of its Service and of its NetworkPolicy."""
    return f"{job}-aggregator"


def client_name(job: str, slot: ClientSlot) -> str:
    if slot.site is None:
        return f"{job}-client-{slot.index}"
    return f"{job}-{slot.site.name}-{slot.site_index}"


def podgroup_name(job: str) -> str:
    return job


def state_claim_name(job: FederatedJob) -> str | None:
    """The PersistentVolumeClaim holding the aggregator's checkpoints and final model: the
    user's ``checkpoint.claimName``, the one the operator creates for ``checkpoint.size``
    (``<job>-state``), or None (an emptyDir)."""
    checkpoint = job.spec.aggregator.checkpoint
    if checkpoint.size is not None:
        return f"{job.name}-state"
    return checkpoint.claim_name


def labels(job: FederatedJob, role: str | None = None) -> dict[str, str]:
    """The labels every child carries; selectors, dashboards and the reconcile rely on them."""
    out = {
        "app.kubernetes.io/name": "fedkube",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": "fedkube-operator",
        "app.kubernetes.io/part-of": "fedkube",
        "app.kubernetes.io/version": __version__,
        LABEL_JOB: job.name,
    }
    if role is not None:
        out["app.kubernetes.io/component"] = role
        out[LABEL_ROLE] = role
    return out


def owner_reference(job: FederatedJob) -> Manifest | None:
    """The controller reference to the job, or None when it has no uid yet (``render``)."""
    uid = (job.metadata.model_extra or {}).get("uid")
    if not uid:
        return None
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(job: FederatedJob, name: str, role: str | None = None,
              extra_labels: dict[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name, "namespace": job.namespace,
                      "labels": {**labels(job, role), **(extra_labels or {})}}
    owner = owner_reference(job)
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return meta


def aggregator_host(job: FederatedJob) -> str:
    """DNS name of the aggregator Service, as clients and the operator reach it."""
    return f"{aggregator_name(job.name)}.{job.namespace}.svc"


def server_hosts(job: FederatedJob) -> list[str]:
    """Every name the aggregator's certificate is valid for: the Service's cluster DNS names
    and the external address that sites outside dial."""
    name = aggregator_name(job.name)
    hosts = [aggregator_host(job), name, f"{name}.{job.namespace}",
             f"{aggregator_host(job)}.cluster.local"]
    external = job.spec.aggregator.service.external_host_port(job.spec.aggregator.port)
    if external is not None and external[0] not in hosts:
        hosts.append(external[0])
    return hosts


def external_address(job: FederatedJob) -> str | None:
    """``host:port`` a site outside the cluster dials, when the job is exposed."""
    external = job.spec.aggregator.service.external_host_port(job.spec.aggregator.port)
    if external is None:
        return None
    host, port = external
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def runtime_config(job: FederatedJob) -> RuntimeConfig:
    return RuntimeConfig(
        job_name=job.name, namespace=job.namespace, spec=job.spec,
        aggregator_address=f"{aggregator_host(job)}:{job.spec.aggregator.port}",
    )


def configmap(job: FederatedJob) -> Manifest:
    """The resolved job config that every pod reads with ``--config`` (no secrets in it)."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(job, configmap_name(job.name)),
            "data": {CONFIG_KEY: runtime_config(job).to_yaml()}}


def tls_secret(job: FederatedJob, name: str, ca_cert: bytes, pair: pki.KeyPair,
               site: str | None = None) -> Manifest:
    """A ``kubernetes.io/tls`` Secret as cert-manager writes one: tls.crt, tls.key, ca.crt."""
    extra = {LABEL_SITE: site} if site is not None else {}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": _metadata(job, name, extra_labels=extra),
            "stringData": {"tls.crt": pair.cert.decode(), "tls.key": pair.key.decode(),
                           "ca.crt": ca_cert.decode()}}


def ca_secret(job: FederatedJob, ca: pki.KeyPair) -> Manifest:
    """The job's CA; no pod mounts it (the operator signs new sites' certificates with it)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(job, ca_secret_name(job.name)),
            "stringData": {"ca.crt": ca.cert.decode(), "ca.key": ca.key.decode()}}


def certificate(job: FederatedJob, site: str | None, *, server: bool = False) -> Manifest:
    """A cert-manager ``Certificate`` for the aggregator (``server``) or a site: the URI SAN
    carries the identity; the Secret it fills has the layout pods mount."""
    tls = job.spec.security.tls
    assert tls.issuer_ref is not None  # mode CertManager requires it
    name = server_secret_name(job.name) if server else site_secret_name(job.name, site)
    extra = {LABEL_SITE: site} if site is not None and not server else {}
    spec: Manifest = {
        "secretName": name,
        "secretTemplate": {"labels": {**labels(job), **extra}},
        "duration": f"{tls.validity_days * 24}h",
        "privateKey": {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8",
                       "rotationPolicy": "Always"},
        "issuerRef": _dump(tls.issuer_ref),
    }
    if server:
        hosts = server_hosts(job)
        addresses = [h for h in hosts if pki.is_ip_address(h)]
        spec |= {"commonName": hosts[0], "dnsNames": [h for h in hosts if h not in addresses],
                 "uris": [pki.server_uri(job.namespace, job.name)],
                 "usages": ["server auth", "digital signature"]}
        if addresses:
            spec["ipAddresses"] = addresses
    else:
        identity = pki.Identity(job.namespace, job.name, site)
        spec |= {"commonName": identity.name, "uris": [identity.uri],
                 "usages": ["client auth", "digital signature"]}
    return {"apiVersion": CERTIFICATE_API_VERSION, "kind": "Certificate",
            "metadata": _metadata(job, name, extra_labels=extra), "spec": spec}


def certificates(job: FederatedJob) -> list[Manifest]:
    """The Certificates of mode CertManager: the aggregator's, then each site's."""
    return [certificate(job, None, server=True),
            *(certificate(job, site) for site in identities(job))]


def metrics_service_name(job: FederatedJob) -> str:
    """The Service of the aggregator's HTTP port (``/metrics``, ``/status``)."""
    return f"{aggregator_name(job.name)}-metrics" if exposed(job) else aggregator_name(job.name)


def services(job: FederatedJob) -> list[Manifest]:
    """The aggregator's Service: gRPC and the HTTP port inside the cluster. An exposed job's
    Service (``aggregator.service``) carries gRPC alone, and the HTTP port gets a ClusterIP
    Service of its own, so that no load balancer ever publishes ``/metrics``."""
    agg = job.spec.aggregator
    grpc_port = {"name": "grpc", "port": agg.port, "targetPort": "grpc", "protocol": "TCP"}
    metrics_port = {"name": "metrics", "port": agg.metrics_port, "targetPort": "metrics",
                    "protocol": "TCP"}

    def service(name: str, type_: str, ports: list[Manifest]) -> Manifest:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": _metadata(job, name, ROLE_AGGREGATOR),
                "spec": {"type": type_,
                         "selector": {LABEL_JOB: job.name, LABEL_ROLE: ROLE_AGGREGATOR},
                         "ports": ports}}

    if not exposed(job):
        return [service(aggregator_name(job.name), "ClusterIP", [grpc_port, metrics_port])]
    public = service(aggregator_name(job.name), agg.service.type, [grpc_port])
    if agg.service.annotations:
        public["metadata"]["annotations"] = dict(agg.service.annotations)
    return [public, service(metrics_service_name(job), "ClusterIP", [metrics_port])]


def _dump(model: ApiModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True, by_alias=True)


def _volume_dir(path: str) -> str:
    return path.rsplit("/", 1)[0]


def _pod(job: FederatedJob, name: str, role: str, args: list[str],
         extra_labels: dict[str, str], slot: ClientSlot | None = None) -> Manifest:
    spec, sec, sched = job.spec, job.spec.security, job.spec.scheduling
    role_spec = spec.aggregator if role == ROLE_AGGREGATOR else spec.clients
    site = slot.site if slot is not None else None
    pod_labels = dict(extra_labels)
    if sched.gang:
        pod_labels[LABEL_POD_GROUP] = podgroup_name(job.name)
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    if spec.remote is not None:
        # A client-only job: the site's join bundle instead of the job's configuration.
        mounts.append({"name": "bundle", "mountPath": BUNDLE_MOUNT_DIR, "readOnly": True})
        volumes.append({"name": "bundle", "secret": {"secretName": spec.remote.bundle_secret,
                                                     "defaultMode": TLS_FILE_MODE}})
    else:
        mounts.insert(0, {"name": "config", "mountPath": _volume_dir(CONFIG_MOUNT_PATH),
                          "readOnly": True})
        volumes.insert(0, {"name": "config", "configMap": {"name": configmap_name(job.name)}})
    if tls_enabled(job):
        # The aggregator's key, or this site's: never another site's.
        secret = server_secret_name(job.name) if role == ROLE_AGGREGATOR else \
            site_secret_name(job.name, site.name if site is not None else None)
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": secret,
                                                  "defaultMode": TLS_FILE_MODE}})
    container: Manifest = {
        "name": role,
        "image": role_spec.image,
        "imagePullPolicy": role_spec.image_pull_policy,
        "command": ["fedkube"],
        "args": args,
        "env": [_dump(e) for e in role_spec.env],
        "resources": _dump(role_spec.resources),
        "volumeMounts": mounts,
        # A failed container's last log lines (the runtime's error) become its termination
        # message, which the operator copies into the job's events and conditions.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if role == ROLE_AGGREGATOR:
        agg = spec.aggregator
        container["ports"] = [
            {"name": "grpc", "containerPort": agg.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": agg.metrics_port, "protocol": "TCP"},
        ]
        container["readinessProbe"] = {"httpGet": {"path": "/status", "port": "metrics"},
                                       "periodSeconds": 5}
        claim = state_claim_name(job)
        volumes.append({"name": "state", **({"emptyDir": {}} if claim is None else
                                            {"persistentVolumeClaim": {"claimName": claim}})})
        mounts.append({"name": "state", "mountPath": STATE_DIR})
    if site is not None:
        # The site's own data: read-only, and only in its own clients' pods.
        volumes.append({"name": "site-data", **site.data.volume})
        mounts.append({"name": "site-data", "mountPath": site.data.mount_path,
                       "readOnly": True})
        container["env"] += [{"name": ENV_SITE, "value": site.name},
                             *(_dump(e) for e in site.data.env)]
    pod_spec: Manifest = {
        "restartPolicy": "Never",  # the operator recreates failed pods and counts restarts
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": sec.run_as_user, "runAsGroup": sec.run_as_user,
            "fsGroup": sec.fs_group, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    # A site's placement replaces the job's node selector and affinity, and adds tolerations.
    node_selector = (site.node_selector if site and site.node_selector else sched.node_selector)
    tolerations = [*sched.tolerations, *(site.tolerations if site else [])]
    affinity = site.affinity if site and site.affinity else sched.affinity
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [_dump(t) for t in tolerations]
    if affinity:
        pod_spec["affinity"] = affinity
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if sched.scheduler_name:
        pod_spec["schedulerName"] = sched.scheduler_name
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(job, name, role, pod_labels), "spec": pod_spec}


def aggregator_pod(job: FederatedJob) -> Manifest:
    return _pod(job, aggregator_name(job.name), ROLE_AGGREGATOR,
                ["aggregator", "--config", CONFIG_MOUNT_PATH], {})


def client_pod(job: FederatedJob, index: int) -> Manifest:
    """Client ``index`` (among all the job's clients): a site's client when the job has
    sites."""
    slot = job.spec.client_slots()[index]
    extra = {LABEL_CLIENT_INDEX: str(index)}
    if slot.site is not None:
        extra[LABEL_SITE] = slot.site.name
    if job.spec.remote is not None and slot.site is not None:
        # Its place at the remote aggregator: the site_index-th client of the bundle's site.
        args = ["client", "--bundle", BUNDLE_MOUNT_DIR, "--replica", str(slot.site_index),
                "--data", slot.site.data.mount_path]
    else:
        args = ["client", "--config", CONFIG_MOUNT_PATH, "--index", str(index)]
    return _pod(job, client_name(job.name, slot), ROLE_CLIENT, args, extra, slot)


def network_policy(job: FederatedJob) -> Manifest:
    """Only this job's clients reach the gRPC port (anyone, when the job is exposed to sites
    outside the cluster: mutual TLS admits them); only the operator and namespaces labelled
    ``fedkube.io/monitoring: "true"`` (Prometheus) reach the metrics port."""
    agg = job.spec.aggregator
    grpc_rule: Manifest = {"ports": [{"protocol": "TCP", "port": agg.port}]}
    if not exposed(job):
        grpc_rule["from"] = [{"podSelector": {"matchLabels": {LABEL_JOB: job.name,
                                                              LABEL_ROLE: ROLE_CLIENT}}}]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(job, aggregator_name(job.name), ROLE_AGGREGATOR),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: job.name, LABEL_ROLE: ROLE_AGGREGATOR}},
            "policyTypes": ["Ingress"],
            "ingress": [
                grpc_rule,
                {"from": [
                    {"namespaceSelector": {"matchLabels": {LABEL_MONITORING_NAMESPACE: "true"}}},
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_POD_LABELS}},
                 ],
                 "ports": [{"protocol": "TCP", "port": agg.metrics_port}]},
            ],
        },
    }


def podgroup(job: FederatedJob) -> Manifest:
    """All-or-nothing scheduling of the aggregator and ``minClients`` clients."""
    return {"apiVersion": PODGROUP_API_VERSION, "kind": "PodGroup",
            "metadata": _metadata(job, podgroup_name(job.name)),
            "spec": {"minMember": 1 + job.spec.strategy.min_clients}}


def state_claim(job: FederatedJob) -> Manifest:
    """The claim the operator creates for ``checkpoint.size``; owned by (deleted with) the job."""
    checkpoint = job.spec.aggregator.checkpoint
    name = state_claim_name(job)
    assert checkpoint.size is not None and name is not None
    spec: Manifest = {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": checkpoint.size}}}
    if checkpoint.storage_class_name is not None:
        spec["storageClassName"] = checkpoint.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(job, name, ROLE_AGGREGATOR), "spec": spec}


def client_pods(job: FederatedJob) -> list[Manifest]:
    return [client_pod(job, i) for i in range(job.spec.num_clients)]


def pods(job: FederatedJob) -> list[Manifest]:
    """Every pod the job needs: the aggregator, then the clients in index order (only the
    clients in a client-only job)."""
    if job.spec.remote is not None:
        return client_pods(job)
    return [aggregator_pod(job), *client_pods(job)]


def support_objects(job: FederatedJob) -> list[Manifest]:
    """Everything but the pods and the operator's own Secrets (see
    :mod:`fedkube.controller.credentials`), in creation order. A client-only job needs
    none: its pods mount the site's bundle Secret, which the site's admin applied."""
    if job.spec.remote is not None:
        return []
    out = [configmap(job), *services(job)]
    if job.spec.security.tls.mode == "CertManager":
        out += certificates(job)
    if job.spec.security.network_policy:
        out.append(network_policy(job))
    if job.spec.scheduling.gang:
        out.append(podgroup(job))
    if job.spec.aggregator.checkpoint.size is not None:
        out.append(state_claim(job))
    return out


def all_objects(job: FederatedJob, secrets: list[Manifest]) -> list[Manifest]:
    """What the operator creates for a fresh job (``fedkube render``), with the operator's
    ``secrets`` made for it."""
    return [*support_objects(job), *secrets, *pods(job)]
