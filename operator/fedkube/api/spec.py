"""The desired state of a FederatedJob (``spec``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from fedkube import __version__
from fedkube.api.rules import Rule
from fedkube.api.types import (
    ApiModel,
    EnvVar,
    FreeForm,
    Quantity,
    ResourceRequirements,
    Toleration,
)

DEFAULT_IMAGE = f"ghcr.io/fedkube/fedkube-runtime:{__version__}"

StrategyName = Literal[
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "fedmedian", "trimmedmean", "krum", "multikrum",
]
#: Largest ``transport.chunkBytes``: one gRPC message.
MAX_CHUNK_BYTES = 1 << 26
#: Without ``transport.chunkBytes``, a model streams in about this many chunks, each within
#: :data:`AUTO_CHUNK_BYTES` and a multiple of :data:`CHUNK_GRANULE` bytes.
AUTO_CHUNKS_PER_MODEL = 64
AUTO_CHUNK_BYTES = (1 << 18, 1 << 23)
CHUNK_GRANULE = 1 << 16
#: Strategies that need every update of a round at once (no streaming fold).
ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "trimmedmean", "krum", "multikrum")


class TaskSpec(ApiModel):
    """What to train: a Python entrypoint providing model, data, train and evaluate."""

    entrypoint: str = Field(
        default="fedkube.tasks.digits:task",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        max_length=256,
    )
    """``module:attribute`` of the task, importable in the runtime image."""

    config: FreeForm = Field(default_factory=dict)
    """Task-specific settings passed to the task unchanged (e.g. ``{hidden: 64, lr: 0.1}``)."""


class StrategyParams(ApiModel):
    """Strategy hyper-parameters; each applies only to the strategies named in its doc."""

    proximal_mu: float = Field(default=0.01, ge=0.0, le=100.0)
    """FedProx: weight of the proximal term that keeps clients near the global model."""

    server_learning_rate: float | None = Field(default=None, gt=0.0, le=100.0)
    """FedAvgM, FedAdam, FedYogi, FedAdagrad: server step size (default 1.0 for FedAvgM,
    0.1 for the adaptive strategies)."""

    server_momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """FedAvgM: momentum of the server update."""

    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """FedAdam, FedYogi: decay of the first moment."""

    beta2: float = Field(default=0.99, ge=0.0, lt=1.0)
    """FedAdam, FedYogi: decay of the second moment."""

    tau: float = Field(default=1e-3, gt=0.0, le=1.0)
    """FedAdam, FedYogi, FedAdagrad: adaptivity (epsilon) added to the root second moment."""

    trim_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    """Trimmed mean: fraction of updates cut at each end, per coordinate (below 0.5)."""

    byzantine_clients: int = Field(default=0, ge=0, le=1000)
    """Krum, Multi-Krum: number of malicious clients to tolerate (f)."""

    krum_select: int | None = Field(default=None, ge=1, le=10000)
    """Multi-Krum: number of best-scored updates to average (m); default n - f."""


class StrategySpec(ApiModel):
    """How the aggregator combines client updates, and how rounds are run."""

    name: StrategyName = "fedavg"
    """Aggregation strategy."""

    fraction_fit: float = Field(default=1.0, gt=0.0, le=1.0)
    """Fraction of connected clients sampled for each round (at least ``minClients``)."""

    min_clients: int = Field(default=2, ge=1, le=10000)
    """Clients that must answer for a round to complete. A round starts once this many are
    connected; the first round waits up to 30 s more (at most ``roundTimeoutSeconds``) for
    all ``clients.replicas``."""

    round_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    """Time a round waits for sampled clients; stragglers are dropped after it."""

    params: StrategyParams = Field(default_factory=StrategyParams)
    """Strategy hyper-parameters."""

    rules = (
        Rule(
            cel=(
                "!(self.name in ['krum', 'multikrum']) || "
                "2 * self.params.byzantineClients + 2 < self.minClients"
            ),
            message=(
                "Krum tolerates f byzantine clients only when 2f + 2 < minClients: "
                "raise strategy.minClients or lower params.byzantineClients"
            ),
            check=lambda s: s.name not in ("krum", "multikrum")
            or 2 * s.params.byzantine_clients + 2 < s.min_clients,
            field_path=".params.byzantineClients",
        ),
        Rule(
            cel=(
                "!has(self.params.krumSelect) || "
                "self.params.krumSelect <= self.minClients - self.params.byzantineClients"
            ),
            message="Multi-Krum selects at most minClients - byzantineClients updates",
            check=lambda s: s.params.krum_select is None
            or s.params.krum_select <= s.min_clients - s.params.byzantine_clients,
            field_path=".params.krumSelect",
        ),
    )


class EvaluationSpec(ApiModel):
    """How the global model is evaluated after a round: centrally on the aggregator (a task's
    test set), or federated, by the sites on their own validation data."""

    mode: Literal["auto", "central", "federated", "both"] = "auto"
    """``central``: the task's test set, on the aggregator. ``federated``: sampled clients
    evaluate the new global model on their own validation data and the aggregator combines
    their reports, weighted by examples (the data never leaves the sites). ``both``: the two,
    the job's metrics being the central ones. ``auto``: central when the task has a central
    test set, else federated."""

    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Fraction of connected clients sampled to evaluate (at least one)."""

    every_rounds: int = Field(default=1, ge=1, le=10000)
    """Evaluate federated after every N rounds; the last round is always evaluated."""


class CheckpointSpec(ApiModel):
    """Where the aggregator keeps its per-round checkpoint (model, strategy state, history) and
    the final model."""

    every_rounds: int = Field(default=1, ge=1, le=10000)
    """Checkpoint after every N completed rounds (the last round is always saved)."""

    claim_name: str | None = Field(default=None, min_length=1, max_length=253)
    """A PersistentVolumeClaim of your own for checkpoints (in ``checkpoints/``) and the
    final model (in ``output/``), so that a recreated aggregator pod (after a failure, on
    resume after suspend, after node loss) continues after the last completed round and the
    model outlives the pod. Without a claim (this or ``size``) both live in the pod's
    emptyDir: a recreated aggregator starts over at round 1. Give each job its own claim: a
    checkpoint of another job is refused."""

    size: Quantity | None = None
    """Have the operator create a claim of this size for the job instead (``<job>-state``,
    ReadWriteOnce, deleted with the job)."""

    storage_class_name: str | None = Field(default=None, min_length=1, max_length=253)
    """StorageClass of the claim the operator creates (default: the cluster's default)."""

    rules = (
        Rule(
            cel="!has(self.claimName) || !has(self.size)",
            message=(
                "set checkpoint.claimName (a claim of your own) or checkpoint.size (a claim "
                "the operator creates), not both"
            ),
            check=lambda c: c.claim_name is None or c.size is None,
            field_path=".size",
        ),
        Rule(
            cel="!has(self.storageClassName) || has(self.size)",
            message=(
                "checkpoint.storageClassName applies to the claim the operator creates: "
                "set checkpoint.size too"
            ),
            check=lambda c: c.storage_class_name is None or c.size is not None,
            field_path=".storageClassName",
        ),
    )


class RoleSpec(ApiModel):
    """Container settings shared by the aggregator and the clients."""

    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    """Runtime image (fedkube with torch and the task's code)."""

    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image."""

    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU, memory and GPU limits and requests."""

    env: list[EnvVar] = Field(default_factory=list, max_length=128)
    """Extra environment variables."""


#: A DNS name or an IPv4/IPv6 literal, optionally with a port: what a site outside dials.
EXTERNAL_ADDRESS_PATTERN = (r"^(?P<host>\[[0-9a-fA-F:.]+\]|[0-9A-Za-z]([-0-9A-Za-z.]*[0-9A-Za-z])?)"
                            r"(:(?P<port>[0-9]{1,5}))?$")


class ServiceSpec(ApiModel):
    """The aggregator's Service. Sites outside the cluster reach it through ``type``
    LoadBalancer or NodePort (or an ingress of yours) at ``externalAddress``; gRPC is TLS
    end to end, the aggregator's certificate names that address."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """The Service type."""

    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations of the Service, e.g. a cloud load balancer's settings."""

    external_address: str | None = Field(default=None, max_length=253,
                                         pattern=EXTERNAL_ADDRESS_PATTERN)
    """``host`` or ``host:port`` that sites outside the cluster dial (default port:
    ``aggregator.port``). The host goes into the server certificate, and into join bundles."""

    def external_host_port(self, default_port: int) -> tuple[str, int] | None:
        """``externalAddress`` split into host and port; None when it is not set."""
        if self.external_address is None:
            return None
        match = re.fullmatch(EXTERNAL_ADDRESS_PATTERN, self.external_address)
        assert match is not None  # the field's pattern
        port = match.group("port")
        return match.group("host").strip("[]"), int(port) if port else default_port


class AggregatorSpec(RoleSpec):
    """The aggregator pod: runs the rounds and serves the model to clients."""

    port: int = Field(default=50051, ge=1024, le=65535)
    """gRPC port the clients connect to."""

    metrics_port: int = Field(default=9090, ge=1024, le=65535)
    """HTTP port serving ``/metrics`` (Prometheus) and ``/status`` (polled by the operator)."""

    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpointing, so that a restarted aggregator resumes from its last round."""

    service: ServiceSpec = Field(default_factory=ServiceSpec)
    """How the aggregator's Service is exposed: inside the cluster, or to sites outside it."""

    stack_memory: Quantity = "2Gi"
    """Memory the robust strategies (fedmedian, trimmedmean, krum, multikrum) may take for a
    round's updates, which they need all at once: sampled clients x parameters x 4 bytes. A
    larger stack is kept in a memory-mapped file in the pod's ``/tmp`` instead, which the
    kernel writes out under memory pressure rather than have the pod killed. Size the
    aggregator's memory limit above this plus a few copies of the model."""


class PartitioningSpec(ApiModel):
    """How a built-in task splits its dataset among clients (for simulation and benchmarks)."""

    scheme: Literal["iid", "dirichlet"] = "iid"
    """``iid``: uniform random split; ``dirichlet``: label skew drawn from Dirichlet(alpha)."""

    alpha: float = Field(default=0.5, gt=0.0, le=1000.0)
    """Dirichlet concentration: small values make clients' label mixes very different."""

    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed of the split; the same seed gives every client the same partition on every run."""


class DataSpec(ApiModel):
    """Client data settings."""

    partitioning: PartitioningSpec = Field(default_factory=PartitioningSpec)
    """Partitioning of the task's dataset among clients."""


class ClientsSpec(RoleSpec):
    """The client pods: each trains on its own data and sends updates."""

    replicas: int = Field(default=2, ge=1, le=1000)
    """Number of client pods."""

    data: DataSpec = Field(default_factory=DataSpec)
    """Client data settings."""


#: A DNS-1035 label, as Kubernetes names and label values need.
SITE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: Where a site's data volume is mounted in its client pods unless ``data.mountPath`` says.
SITE_DATA_MOUNT_PATH = "/var/lib/fedkube/site-data"


class SiteDataSpec(ApiModel):
    """A site's own data: a volume mounted read-only into the site's client pods, never
    copied anywhere else."""

    volume: FreeForm
    """A Kubernetes volume source, e.g. ``{persistentVolumeClaim: {claimName: ward-a}}``,
    ``{hostPath: {path: /srv/data}}`` or a CSI volume. ``fedkube run`` reads a hostPath's
    path directly; other sources need ``fedkube run --data SITE=DIR``."""

    mount_path: str = Field(default=SITE_DATA_MOUNT_PATH, pattern=r"^/.*", max_length=256)
    """Where the volume appears in the client pods: the task's ``data_dir``."""

    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables of the site's clients (e.g. a file pattern or a region)."""

    rules = (
        Rule(
            cel="self.volume.size() == 1 && !('name' in self.volume)",
            message=(
                "data.volume is one Kubernetes volume source without a name, e.g. "
                "{persistentVolumeClaim: {claimName: records}} or {hostPath: {path: /srv/data}}"
            ),
            check=lambda d: len(d.volume) == 1 and "name" not in d.volume,
            field_path=".volume",
        ),
    )


class SiteSpec(ApiModel):
    """A member of the federation: its identity, its own data and its own placement."""

    name: str = Field(min_length=1, max_length=40, pattern=SITE_NAME_PATTERN)
    """The site's name: its identity, a label on its pods (``fedkube.io/site``) and part of
    their names."""

    replicas: int = Field(default=1, ge=1, le=100)
    """Client pods of this site; they share the site's data (each task decides how)."""

    data: SiteDataSpec
    """The site's data volume and environment."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the site's pods must match (e.g. the site's own node pool); replaces
    ``scheduling.nodeSelector`` for this site."""

    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Taints the site's pods tolerate, added to ``scheduling.tolerations``."""

    affinity: FreeForm | None = None
    """A Kubernetes ``Affinity`` for the site's pods; replaces ``scheduling.affinity``."""


class PrivacySpec(ApiModel):
    """Central differential privacy applied by the aggregator to each update."""

    clip_norm: float | None = Field(default=None, gt=0.0)
    """Clip each client update (difference to the global model) to this L2 norm."""

    noise_multiplier: float = Field(default=0.0, ge=0.0, le=100.0)
    """Gaussian noise standard deviation, as a multiple of ``clipNorm``, added to the sum."""


class TransportSpec(ApiModel):
    """How tensors travel between aggregator and clients."""

    update_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of floating-point tensors on the wire; 16-bit halves the bytes sent."""

    chunk_bytes: int | None = Field(default=None, ge=1 << 14, le=MAX_CHUNK_BYTES)
    """Size of the chunks that tensors are streamed in. Unset: a 64th of the model's bytes on
    the wire, within 256 KiB and 8 MiB. gRPC's cost per message is large beside its cost
    per byte, so large models stream faster in large chunks (a 100M-parameter round of 4
    clients took 4.4 s in 8 MiB chunks against 8.3-8.8 s in 256 KiB ones); each stream in
    flight holds about a chunk in the aggregator's gRPC buffers, so a chunk in proportion
    to the model keeps that memory a fixed share of a model per stream. Set it to bound
    the memory per stream when thousands of clients of a large model upload at once."""

    def chunk_size(self, stream_bytes: int) -> int:
        """The chunk size of a model or update stream of ``stream_bytes`` bytes."""
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        smallest, largest = AUTO_CHUNK_BYTES
        granules = -(-stream_bytes // (AUTO_CHUNKS_PER_MODEL * CHUNK_GRANULE))
        return min(largest, max(smallest, granules * CHUNK_GRANULE))

    @property
    def largest_chunk(self) -> int:
        """The largest chunk any stream of this job is sent in: what gRPC must accept."""
        return self.chunk_bytes if self.chunk_bytes is not None else AUTO_CHUNK_BYTES[1]


class RunPolicy(ApiModel):
    """Lifecycle of the job: retries, deadlines, cleanup and suspension."""

    backoff_limit: int = Field(default=3, ge=0, le=1000)
    """Pod failures (aggregator or client) tolerated, each recreated, before the job fails."""

    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job with reason DeadlineExceeded if it runs longer than this."""

    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the job this long after it succeeded or failed; kept forever when unset."""

    clean_pod_policy: Literal["All", "Running", "None"] = "Running"
    """Pods deleted when the job finishes: all of them, only those still running, or none."""

    suspend: bool = False
    """Suspend the job: its pods are deleted; unsuspending resumes from the checkpoint."""

    stuck_pod_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    """Fail the job when a pod stays unschedulable, cannot pull its image or crash-loops
    for this long, instead of waiting forever."""


class SchedulingSpec(ApiModel):
    """Where and how the job's pods are scheduled."""

    gang: bool = False
    """All-or-nothing scheduling of the aggregator and ``minClients`` clients via a
    scheduler-plugins PodGroup (needs the coscheduling plugin)."""

    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of the pods."""

    scheduler_name: str | None = Field(default=None, max_length=253)
    """Scheduler of the pods (e.g. ``scheduler-plugins-scheduler`` for gang scheduling)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match (e.g. a GPU node pool)."""

    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Taints the pods tolerate (e.g. ``nvidia.com/gpu``)."""

    affinity: FreeForm | None = None
    """A Kubernetes ``Affinity`` object, passed to the pods as is."""


class IssuerReference(ApiModel):
    """A cert-manager issuer, named as cert-manager's ``Certificate.spec.issuerRef`` does."""

    name: str = Field(min_length=1, max_length=253)
    """The issuer's name."""

    kind: str = Field(default="Issuer", min_length=1, max_length=63)
    """``Issuer`` (in the job's namespace), ``ClusterIssuer``, or an external issuer's kind."""

    group: str = Field(default="cert-manager.io", min_length=1, max_length=253)
    """The issuer's API group."""


class TlsSpec(ApiModel):
    """Where the job's certificates come from. Every client presents a certificate that names
    its job and site; the aggregator accepts a client only as that site."""

    mode: Literal["Operator", "CertManager", "Disabled"] = "Operator"
    """``Operator``: the operator makes a CA for this job and issues the aggregator's and each
    site's certificate into Secrets. ``CertManager``: cert-manager issues them from
    ``issuerRef`` (the operator creates the ``Certificate`` resources). ``Disabled``:
    plaintext gRPC and no client identity, for trusted test networks only (a Warning event
    says so)."""

    issuer_ref: IssuerReference | None = None
    """The cert-manager issuer, with mode CertManager. Its certificates must carry ``ca.crt``
    (a CA or Vault issuer does)."""

    validity_days: int = Field(default=365, ge=1, le=3650)
    """How long the certificates are valid (mode Operator; cert-manager renews its own)."""

    rules = (
        Rule(
            cel="(self.mode == 'CertManager') == has(self.issuerRef)",
            message=(
                "tls.issuerRef names the cert-manager issuer of mode CertManager: set both, "
                "or neither"
            ),
            check=lambda t: (t.mode == "CertManager") == (t.issuer_ref is not None),
            field_path=".issuerRef",
        ),
    )


class SecuritySpec(ApiModel):
    """Pod security and network isolation of the job."""

    run_as_user: int = Field(default=1000, ge=1, le=2**31 - 1)
    """Non-root user id the containers run as."""

    fs_group: int = Field(default=1000, ge=1, le=2**31 - 1)
    """Group owning mounted volumes (checkpoints)."""

    network_policy: bool = True
    """Create a NetworkPolicy so that only this job's clients (and Prometheus) reach the
    aggregator (and anyone reaches its gRPC port, over mutual TLS, when it is exposed with
    ``aggregator.service``)."""

    tls: TlsSpec = Field(default_factory=TlsSpec)
    """Mutual TLS between the aggregator and the clients, and where the certificates come
    from."""


class RemoteSpec(ApiModel):
    """Where a client-only job's aggregator is, and who this cluster's site is there."""

    bundle_secret: str = Field(min_length=1, max_length=253,
                               pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """The Secret holding the site's join bundle (``fedkube bundle JOB SITE``, applied here
    with ``kubectl apply -f``): the aggregator's address, the job's CA, the site's key."""


@dataclass(frozen=True)
class ClientSlot:
    """One client of a job: its index among all clients, its site, its index there."""

    index: int
    site: SiteSpec | None
    site_index: int


class FederatedJobSpec(ApiModel):
    """A federated training job: what to train, how to aggregate, where to run."""

    task: TaskSpec = Field(default_factory=TaskSpec)
    """The training task."""

    rounds: int = Field(default=10, ge=1, le=100000)
    """Number of federated rounds."""

    strategy: StrategySpec = Field(default_factory=StrategySpec)
    """Aggregation strategy and round settings."""

    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Central and federated evaluation of the global model."""

    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec)
    """The aggregator pod."""

    clients: ClientsSpec = Field(default_factory=ClientsSpec)
    """The client pods: image, resources and env of every client; ``replicas`` counts them
    in a job without sites (a simulation that splits one dataset)."""

    sites: list[SiteSpec] = Field(default_factory=list, max_length=100)
    """The members of a real federation, each with its own data and placement. When given,
    each site runs ``replicas`` clients and ``clients.replicas`` is not used."""

    remote: RemoteSpec | None = None
    """A client-only job: this cluster runs one site's clients for an aggregator elsewhere
    (named by the site's join bundle); no aggregator here. ``sites`` holds that one site."""

    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    """Central differential privacy."""

    transport: TransportSpec = Field(default_factory=TransportSpec)
    """Tensor transport settings."""

    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadlines, cleanup and suspension."""

    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Placement of the pods."""

    security: SecuritySpec = Field(default_factory=SecuritySpec)
    """Pod security and network isolation."""

    @property
    def num_clients(self) -> int:
        """Clients of the job: every site's replicas, or ``clients.replicas`` without sites."""
        return sum(site.replicas for site in self.sites) if self.sites else self.clients.replicas

    def client_slots(self) -> list[ClientSlot]:
        """Every client of the job in index order: its site (if any) and its place there."""
        if not self.sites:
            return [ClientSlot(index, None, index) for index in range(self.clients.replicas)]
        slots: list[ClientSlot] = []
        for site in self.sites:
            slots += [ClientSlot(len(slots) + i, site, i) for i in range(site.replicas)]
        return slots

    rules = (
        Rule(
            cel=(
                "(has(self.sites) && self.sites.size() > 0) || "
                "self.strategy.minClients <= self.clients.replicas"
            ),
            message=(
                "strategy.minClients exceeds clients.replicas, so no round could complete: "
                "lower strategy.minClients or raise clients.replicas"
            ),
            check=lambda s: bool(s.sites) or s.strategy.min_clients <= s.clients.replicas,
            field_path=".strategy.minClients",
        ),
        Rule(
            cel=(
                "!has(self.sites) || self.sites.size() == 0 || has(self.remote) || "
                "self.strategy.minClients <= self.sites.map(s, s.replicas).sum()"
            ),
            message=(
                "strategy.minClients exceeds the clients of all sites together, so no round "
                "could complete: lower strategy.minClients or raise sites[].replicas"
            ),
            check=lambda s: not s.sites or s.remote is not None
            or s.strategy.min_clients <= s.num_clients,
            field_path=".strategy.minClients",
        ),
        Rule(
            cel="!has(self.sites) || self.sites.all(a, self.sites.exists_one(b, b.name == a.name))",
            message="two sites have the same name: each site's name is its identity",
            check=lambda s: len({site.name for site in s.sites}) == len(s.sites),
            field_path=".sites",
        ),
        Rule(
            cel="!has(self.remote) || (has(self.sites) && self.sites.size() == 1)",
            message=(
                "a client-only job (remote) runs one site's clients: give exactly one entry "
                "in sites, the site its join bundle is for"
            ),
            check=lambda s: s.remote is None or len(s.sites) == 1,
            field_path=".sites",
        ),
        Rule(
            cel="self.privacy.noiseMultiplier == 0.0 || has(self.privacy.clipNorm)",
            message=(
                "noise is scaled by the clipping norm: set privacy.clipNorm when "
                "privacy.noiseMultiplier is above 0"
            ),
            check=lambda s: s.privacy.noise_multiplier == 0.0 or s.privacy.clip_norm is not None,
            field_path=".privacy.clipNorm",
        ),
        Rule(
            cel="self.aggregator.port != self.aggregator.metricsPort",
            message="aggregator.port and aggregator.metricsPort must differ",
            check=lambda s: s.aggregator.port != s.aggregator.metrics_port,
            field_path=".aggregator.metricsPort",
        ),
    )
