"""kopf handlers: thin glue that observes, calls the pure reconcile, and performs its actions.

Every trigger (job event, pod event, periodic resync) funnels into
:meth:`Controller.trigger`, which coalesces bursts (a hundred pod events make one or two
passes, not a hundred) and runs at most one pass per job at a time, so two triggers never
race to create the same pod.

The resync is one loop over the jobs the operator knows, not a kopf daemon per job: a
thousand daemons cost a thousand tasks, and stopping them made shutdown take seconds per
hundred jobs, past a pod's termination grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from fedkube.api import GROUP, KIND, PLURAL, VERSION, FederatedJob
from fedkube.api.constants import LABEL_JOB
from fedkube.api.runtime import AggregatorReport
from fedkube.controller import builders
from fedkube.controller.cache import (
    CORE_KINDS,
    JOB_KIND,
    JOB_RESOURCE,
    OPTIONAL_KINDS,
    ObjectCache,
    index_id,
    slim,
)
from fedkube.controller.kube import Kube
from fedkube.controller.metrics import OperatorMetrics
from fedkube.controller.reconcile import (
    ANNOTATION_ACCEPTED_SPEC,
    Create,
    Decision,
    Delete,
    DeleteJob,
    Event,
    Observed,
    Update,
    reconcile,
)
from fedkube.controller.settings import ControllerSettings

logger = logging.getLogger("fedkube.operator")


@dataclass
class _JobState:
    passes: asyncio.Task[None] | None = None
    """The task running this job's passes, while one runs."""
    dirty: bool = False
    """Something changed since the running pass began: run once more."""


@dataclass
class Controller:
    """The operator's state: its API session, metrics and per-job serialisation.

    Handlers never wait for a pass: :meth:`trigger` starts or re-arms the job's pass task and
    returns, so kopf's workers stay free and :meth:`stop` ends every pass at once. Cutting a
    pass short loses nothing: the reconcile is level-based and the next operator redoes it.
    """

    settings: ControllerSettings
    metrics: OperatorMetrics
    kube: Kube | None = None
    jobs: dict[tuple[str, str], _JobState] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """The resync loop and every running pass, for :meth:`stop` to cancel."""
    resyncing: bool = False
    cache: ObjectCache = field(default_factory=ObjectCache)
    """The jobs and their children, from kopf's watch-fed indices: a pass reads no API."""

    def start_resync(self) -> None:
        """Start the resync loop unless it runs. Called from a resource handler: the loop
        inherits the context that kopf gives those, without which kopf cannot post Events."""
        if not self.resyncing and self.kube is not None:
            self.resyncing = True
            self._spawn(self.resync_forever(), "fedkube resync")

    async def stop(self) -> None:
        """Cancel the resync loop and every pass, then close the API session."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        kube, self.kube = self.kube, None
        if kube is not None:
            await kube.close()

    async def resync_forever(self) -> None:
        """Every ``resync_seconds``, reconcile each known job once more: deadlines, TTLs, stuck
        pods and the aggregator's progress change without any watch event."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.cache.purge()
            for namespace, name in list(self.jobs):
                self.trigger(namespace, name)

    def trigger(self, namespace: str, name: str) -> None:
        """Reconcile the job soon: start its pass, or make the running one go once more."""
        state = self.jobs.setdefault((namespace, name), _JobState())
        state.dirty = True
        if state.passes is None:
            state.passes = self._spawn(self._run_passes(namespace, name, state),
                                       f"reconcile {namespace}/{name}")

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run_passes(self, namespace: str, name: str, state: _JobState) -> None:
        try:
            while state.dirty and self.kube is not None:
                state.dirty = False
                started = time.perf_counter()
                try:
                    await self.reconcile_once(namespace, name)
                except Exception:
                    if self.kube is None:
                        return  # the operator is exiting: the pass was cut off, not failed
                    self.metrics.reconcile_total.labels(result="error").inc()
                    logger.exception("reconcile of %s/%s failed; retried on the next event "
                                     "or resync", namespace, name)
                else:
                    self.metrics.reconcile_total.labels(result="ok").inc()
                finally:
                    self.metrics.reconcile_duration.observe(time.perf_counter() - started)
        finally:
            state.passes = None

    def forget(self, namespace: str, name: str) -> None:
        self.jobs.pop((namespace, name), None)
        self.cache.forget(namespace, name)
        self.metrics.set_phase(namespace, name, None)

    async def reconcile_once(self, namespace: str, name: str) -> None:
        kube = self.kube
        if kube is None:
            return  # the operator is exiting
        body = self.cache.job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        try:
            job = parse_job(body)
        except ValidationError as error:
            kopf.warn(_as_body(body), reason="InvalidSpec",
                      message=f"the operator cannot use this spec: {error}")
            return
        observed = await self.observe(kube, job)
        decision = reconcile(job, observed, datetime.now(UTC),
                             generation=int(body["metadata"].get("generation") or 0),
                             annotations=body["metadata"].get("annotations") or {})
        await self.perform(kube, body, job, decision)

    async def observe(self, kube: Kube, job: FederatedJob) -> Observed:
        cache = self.cache
        pods = cache.objects("Pod", job.namespace, job.name)
        secrets = cache.objects("Secret", job.namespace, job.name)
        wanted = [(m["kind"], m["metadata"]["name"]) for m in builders.support_objects(job)]
        cached = {(kind, o["metadata"]["name"]): o
                  for kind in {kind for kind, _ in wanted if cache.caches(kind)}
                  for o in cache.objects(kind, job.namespace, job.name)}
        # Kinds without a cache (Certificates, PodGroups whose RBAC may not allow a watch)
        # are read by name, as before.
        read = [key for key in wanted if not cache.caches(key[0])]
        found = await asyncio.gather(*(kube.get(kind, job.namespace, n) for kind, n in read))
        bodies = {key: cached.get(key) for key in wanted} | dict(zip(read, found, strict=True))
        support = frozenset(key for key, obj in bodies.items() if obj)
        config_map = bodies.get(("ConfigMap", builders.configmap_name(job.name)))
        config = (config_map.get("data") or {}) if config_map else None
        report = None
        aggregator = builders.aggregator_name(job.name)
        if any(p["metadata"]["name"] == aggregator and
               (p.get("status") or {}).get("phase") == "Running" for p in pods):
            url = self.settings.aggregator_status_url(builders.metrics_service_name(job),
                                                      job.namespace,
                                                      job.spec.aggregator.metrics_port)
            raw = await kube.fetch_json(url, self.settings.status_timeout_seconds)
            if raw is not None:
                try:
                    report = AggregatorReport.model_validate(raw)
                except ValidationError:
                    logger.warning("ignoring a malformed report from %s", url)
        return Observed(pods=pods, support=support, report=report, config=config,
                        secrets={s["metadata"]["name"]: s for s in secrets})

    async def perform(self, kube: Kube, body: dict[str, Any], job: FederatedJob,
                      decision: Decision) -> None:
        limit = asyncio.Semaphore(self.settings.create_concurrency)

        async def create(manifest: dict[str, Any]) -> None:
            async with limit:
                try:
                    self.cache.wrote(job.namespace, job.name, manifest["kind"],
                                     await kube.create_object(manifest))
                except Exception as error:
                    kopf.warn(_as_body(body), reason="CreateFailed",
                              message=f"cannot create {manifest['kind']} "
                                      f"{manifest['metadata']['name']}: {error}")
                    raise

        creates = [a.manifest for a in decision.actions if isinstance(a, Create)]
        # ConfigMap and Secret first: pods mount them.
        support = [m for m in creates if m["kind"] != "Pod"]
        results = await asyncio.gather(*(create(m) for m in support), return_exceptions=True)
        await asyncio.gather(*(create(m) for m in creates if m["kind"] == "Pod"))
        # The status before anything is deleted: a pass cut short after it (the operator
        # killed) is redone by the next without counting a restart twice, and one cut short
        # before it has deleted nothing yet.
        await self.write_status(kube, body, job, decision)
        for action in decision.actions:
            if isinstance(action, Update):
                self.cache.wrote(job.namespace, job.name, action.kind, await kube.merge_patch(
                    action.kind, job.namespace, action.name, action.patch))
            elif isinstance(action, Delete):
                await kube.delete(action.kind, job.namespace, action.name)
                self.cache.deleted(job.namespace, job.name, action.kind, action.name)
            elif isinstance(action, Event):
                kopf.event(_as_body(body), type=action.type, reason=action.reason,
                           message=action.message)
                (logger.warning if action.type == "Warning" else logger.info)(
                    "%s/%s: %s: %s", job.namespace, job.name, action.reason, action.message)
        self.record_metrics(job, decision)
        if any(isinstance(a, DeleteJob) for a in decision.actions):
            await kube.delete(KIND, job.namespace, job.name)
            self.cache.deleted(job.namespace, job.name, JOB_KIND, job.name)
            self.forget(job.namespace, job.name)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def record_metrics(self, job: FederatedJob, decision: Decision) -> None:
        if decision.created:
            self.metrics.jobs_created.inc()
        if decision.completed is not None:
            self.metrics.jobs_completed.labels(result=decision.completed.value).inc()
        for role in decision.restarted_roles:
            self.metrics.pod_restarts.labels(role=role).inc()
        self.metrics.set_phase(job.namespace, job.name, decision.status.phase)

    async def write_status(self, kube: Kube, body: dict[str, Any], job: FederatedJob,
                           decision: Decision) -> None:
        status = decision.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        if status != _own_status(body):
            self.cache.wrote(job.namespace, job.name, JOB_KIND, await kube.merge_patch(
                KIND, job.namespace, job.name, {"status": status}, subresource="status"))
        annotations = body["metadata"].get("annotations") or {}
        if annotations.get(ANNOTATION_ACCEPTED_SPEC) != decision.accepted_spec_hash:
            self.cache.wrote(job.namespace, job.name, JOB_KIND, await kube.merge_patch(
                KIND, job.namespace, job.name, {"metadata": {"annotations": {
                    ANNOTATION_ACCEPTED_SPEC: decision.accepted_spec_hash}}}))


def _own_status(body: dict[str, Any]) -> dict[str, Any]:
    """The status fields fedkube writes (kopf may keep its own bookkeeping beside them)."""
    return {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}


def _as_body(body: dict[str, Any]) -> kopf.Body:
    """An object read from the API server, as kopf's event posting takes it."""
    return kopf.Body(cast(kopf.RawBody, body))


def parse_job(body: dict[str, Any]) -> FederatedJob:
    """The FederatedJob model of an object read from the API server."""
    status = _own_status(body)
    return FederatedJob.model_validate({
        "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": KIND, "metadata": body["metadata"], "spec": body.get("spec") or {},
        "status": status or None,
    })


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Register the operator's handlers on ``registry``, bound to ``controller``."""
    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        return credentials(controller.settings, settings)

    @kopf.on.startup(registry=registry)
    async def connect(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf keeps its progress in annotations: the CRD's status schema has no room for it.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.posting.level = logging.INFO
        # Startup handlers finish before any resource handler runs: one session serves the
        # operator's whole life.
        controller.kube = Kube.connect(credentials(controller.settings, settings))

    @kopf.on.cleanup(registry=registry)
    async def disconnect(**_: Any) -> None:
        await controller.stop()
        # kopf 1.45 does not close a stopped watch-stream's generator, whose "pause-waiter"
        # task then holds the exit for kopf's fixed 5 s hung-task timeout. Cleanup handlers
        # run after every watcher has stopped, so nothing is waiting on these any more.
        for task in asyncio.all_tasks():
            if task.get_name().startswith("pause-waiter for "):
                task.cancel()

    # The watch-fed caches a pass reads (see fedkube.controller.cache). kopf runs no
    # handler before every index has its first listing, so a pass never sees an empty cache
    # for a kind that has objects.
    @kopf.index(*JOB_RESOURCE, id=index_id(JOB_KIND), registry=registry)
    def index_job(namespace: str | None, name: str, body: kopf.Body,
                  **_: Any) -> dict[tuple[str | None, str], dict[str, Any]]:
        return {(namespace, name): slim(body)}

    def index_children(kind: str, group: str, version: str, plural: str) -> None:
        def index_child(namespace: str | None, labels: Mapping[str, str], body: kopf.Body,
                        **_: Any) -> dict[tuple[str | None, str], dict[str, Any]]:
            return {(namespace, labels[LABEL_JOB]): slim(body)}

        kopf.index(group, version, plural, id=index_id(kind), labels={LABEL_JOB: kopf.PRESENT},
                   registry=registry)(index_child)

    optional = {"Certificate": controller.settings.watch_certificates,
                "PodGroup": controller.settings.watch_podgroups}
    for kind, (group, version, plural) in {
            **CORE_KINDS, **{k: v for k, v in OPTIONAL_KINDS.items() if optional[k]}}.items():
        index_children(kind, group, version, plural)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(type: str, name: str, namespace: str | None, **kwargs: Any) -> None:
        assert namespace is not None, "FederatedJobs are namespaced"
        controller.cache.bind(kwargs)
        if type == "DELETED":
            controller.forget(namespace, name)
            return
        controller.start_resync()
        controller.trigger(namespace, name)

    @kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def pod_event(labels: Mapping[str, str], namespace: str | None,
                        **kwargs: Any) -> None:
        assert namespace is not None, "pods are namespaced"
        controller.cache.bind(kwargs)
        controller.trigger(namespace, labels[LABEL_JOB])


def credentials(settings: ControllerSettings,
                kopf_settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """Where kopf and the operator's own calls go: the configured server, else in-cluster
    service account, else kubeconfig."""
    if settings.kube_server:
        return kopf.ConnectionInfo(server=settings.kube_server, insecure=True,
                                   default_namespace="default")
    info = (kopf.login_with_service_account(settings=kopf_settings)
            or kopf.login_with_kubeconfig(settings=kopf_settings))
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found")
    return info


__all__ = ["Controller", "credentials", "parse_job", "register"]
