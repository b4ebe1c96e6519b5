"""The one place where the Kubernetes API emulator (kmock) is set up for operator tests.

:class:`FedkubeEmulator` fixes what kopf needs and kmock 0.8 does not do (ARCHITECTURE.md,
"The API emulator"): it stamps ``resourceVersion``/``uid``/``creationTimestamp``/``generation``
and bumps ``resourceVersion`` (and ``generation`` on spec changes). :class:`Cluster` is what
a test uses to act as a user, a kubelet and the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import attrs
import jsonpatch
import kmock
import kopf
import yaml
from kmock import ResourceInfo
from kmock._internal import enums
from kmock._internal.apps import Server

from fedkube.api.constants import LABEL_JOB, PLURAL
from fedkube.api.crd import build_crd
from fedkube.controller.cache import CORE_KINDS
from fedkube.controller.handlers import Controller
from fedkube.controller.metrics import OperatorMetrics
from fedkube.controller.operator import OperatorOptions, serve
from fedkube.controller.settings import ControllerSettings

JOBS = f"/apis/fedkube.io/v1alpha1/namespaces/{{ns}}/{PLURAL}"
PODS = "/api/v1/namespaces/{ns}/pods"
T = TypeVar("T")
#: The request the emulator is serving in this task (see ``FedkubeEmulator.__iter__``).
_SERVING: contextvars.ContextVar[Any] = contextvars.ContextVar("serving")


@attrs.frozen
class PatchTestFailedError(kmock.KubernetesError):
    """What the API server answers when a JSON patch's ``test`` fails; kopf then retries on
    its next cycle instead of failing the request (kmock answers a 500)."""

    status: int = 422
    reason: str = "Invalid"
    message: str = "the resourceVersion test of the JSON patch failed: the object changed"


@attrs.frozen
class InjectedError(kmock.KubernetesError):
    """An answer a test asked for: throttling (429) or an unwell API server (5xx)."""

    status: int = 503
    reason: str = "ServiceUnavailable"
    message: str = "injected by the test"


@attrs.define
class Fault:
    """Answer the next ``times`` requests of ``action`` on ``plural`` with ``status``. A
    watch gets it as the API server sends an expired watch: an ERROR event in the stream
    (410 Gone: its history no longer reaches the resourceVersion asked for)."""

    action: str
    plural: str
    status: int
    times: int
    subresource: str | None = None

    def matches(self, request: Any) -> bool:
        return (self.times > 0 and request.resource is not None
                and str(request.resource.plural) == self.plural
                and request.action == getattr(enums.action, self.action)
                and request.subresource == self.subresource)


class FedkubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server does that kopf and kubectl rely on:
    stamped metadata (pitfall 1), ``generateName`` (kopf's Events), 422 on a failed patch
    test, 404 for a kind it does not serve (a CRD not installed), and the discovery and list
    documents kubectl needs (pitfall 3).
    """

    _versions = itertools.count(1)

    def inject(self, fault: Fault) -> Fault:
        """Answer matching requests with the fault's error, ``fault.times`` times."""
        self.__dict__.setdefault("_faults", []).append(fault)
        return fault

    def _fault(self, request: Any) -> Fault | None:
        for fault in self.__dict__.get("_faults", ()):
            if fault.matches(request):
                fault.times -= 1
                return fault
        return None

    def before_writes(self, hook: Callable[[Any], None] | None) -> None:
        """Call ``hook`` with every create, update and delete before it is served (a test
        kills its operator there, mid-pass); None removes it."""
        self.__dict__["_before_write"] = hook

    async def _handle(self, request: Any) -> Any:
        if request.action != enums.action.WATCH and (fault := self._fault(request)):
            raise InjectedError(status=fault.status)
        hook = self.__dict__.get("_before_write")
        if hook is not None and request.action in (
                enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
            hook(request)
        if request.action == enums.action.CREATE and request.resource is not None and \
                not any(request.resource == declared for declared in self._resources):
            raise kmock.KubernetesResourceNotFoundError()
        if request.resource is not None and isinstance(request.data, dict | list):
            if request.action == enums.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:10]
                meta.setdefault("uid", str(uuid.uuid4()))
                if request.namespace:  # as the API server does (watchers key on it)
                    meta.setdefault("namespace", request.namespace)
                meta.setdefault("creationTimestamp", datetime.now(UTC).isoformat())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE:
                version = str(next(self._versions))
                if isinstance(request.data, list):  # JSON patch (kopf's finalizers)
                    request.data.append({"op": "replace", "path": "/metadata/resourceVersion",
                                         "value": version})
                else:
                    meta = request.data.setdefault("metadata", {}) or {}
                    request.data["metadata"] = meta
                    meta["resourceVersion"] = version
                    if "spec" in request.data and request.subresource is None:
                        current = self._current(request)
                        meta["generation"] = int(
                            (current or {}).get("metadata", {}).get("generation", 1)) + 1
        token = _SERVING.set(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as error:
            raise PatchTestFailedError() from error
        finally:
            _SERVING.reset(token)

    def __iter__(self) -> Iterator[Any]:
        # kmock picks a request's reaction by looking for the request, by identity, in every
        # reaction's filtered view of the whole request log: quadratic in the requests a test
        # makes (100 jobs took minutes). While a request is served, the views need to see only
        # that request. Tests read the full log from ``_requests``.
        serving = _SERVING.get(None)
        return iter((serving,)) if serving is not None else iter(self._requests)

    async def _serve_version(self, request: Any) -> Any:
        document = await super()._serve_version(request)
        # kmock writes the core group's version as "/v1"; kubectl then finds no Pod kind.
        document["groupVersion"] = document["groupVersion"].lstrip("/")
        # and gives subresources their resource's short names, which kubectl calls ambiguous.
        for resource in document["resources"]:
            if "/" in resource["name"]:
                resource["shortNames"], resource["categories"] = [], []
        return document

    async def _serve_list(self, request: Any) -> Any:
        document = await super()._serve_list(request)
        if _wants_table(request):
            return _job_table(document["items"])
        # kubectl refuses a list without a kind ("Object 'Kind' is missing").
        info = self._resources.get(request.resource)
        group, version = request.resource.group, request.resource.version
        document["apiVersion"] = f"{group}/{version}" if group else version
        document["kind"] = f"{info.kind if info and info.kind else 'Unknown'}List"
        return document

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        fault = self._fault(request)
        if fault is not None:
            yield b""
            yield {"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": fault.status,
                "reason": "Expired", "message": "too old resource version (injected)"}}
            return
        async for event in super()._serve_watch(request):
            yield event

    async def _serve_fetch(self, request: Any) -> Any:
        document = await super()._serve_fetch(request)
        return _job_table([document]) if _wants_table(request) else document

    def _current(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self._objects and not self._objects[key].deleted:
            return dict(self._objects[key].raw)
        return None


def _wants_table(request: Any) -> bool:
    """kubectl get asks for a Table; the API server renders a CRD's printer columns."""
    return request.resource is not None and request.resource.plural == PLURAL and \
        "as=Table" in request.headers.get("Accept", "")


def _job_table(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """FederatedJobs as the API server's Table: the CRD's additionalPrinterColumns."""
    version = build_crd()["spec"]["versions"][0]
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "",
                "priority": 0}]
    columns += [{"name": c["name"], "type": c["type"], "format": "",
                 "description": c.get("description", ""), "priority": c.get("priority", 0)}
                for c in version["additionalPrinterColumns"]]

    def cell(job: dict[str, Any], column: dict[str, Any]) -> Any:
        value: Any = job
        for key in column["jsonPath"].lstrip(".").split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if column["type"] == "date" and value:
            age = datetime.now(UTC) - datetime.fromisoformat(value)
            return f"{int(age.total_seconds())}s"
        return value

    return {"apiVersion": "meta.k8s.io/v1", "kind": "Table",
            "metadata": {"resourceVersion": ""}, "columnDefinitions": columns,
            "rows": [{"cells": [job["metadata"]["name"]] + [
                          cell(job, c) for c in version["additionalPrinterColumns"]],
                      "object": {"apiVersion": "meta.k8s.io/v1",
                                 "kind": "PartialObjectMetadata",
                                 "metadata": job["metadata"]}} for job in jobs]}


def declare_resources(emulator: kmock.KubernetesEmulator, peering: bool = False) -> None:
    """The built-in kinds, fedkube's CRD, the PodGroup and cert-manager Certificate CRDs;
    kopf's peering CRDs when
    ``peering`` (as the chart installs them)."""
    emulator.resources.load_bundled()
    # Pitfall 3: kubectl picks metrics.k8s.io's pods for `kubectl get pods`.
    for resource in [r for r in emulator.resources if r.group == "metrics.k8s.io"]:
        del emulator.resources[resource]
    verbs = {"list", "watch", "get", "create", "patch", "update", "delete"}
    emulator.resources[f"fedkube.io/v1alpha1/{PLURAL}"] = ResourceInfo(
        kind="FederatedJob", namespaced=True, subresources={"status"}, verbs=verbs,
        shortnames={"fedjob", "fj"}, singular="federatedjob")
    emulator.resources["scheduling.x-k8s.io/v1alpha1/podgroups"] = ResourceInfo(
        kind="PodGroup", namespaced=True, verbs=verbs)
    emulator.resources["cert-manager.io/v1/certificates"] = ResourceInfo(
        kind="Certificate", namespaced=True, verbs=verbs, singular="certificate")
    if peering:
        emulator.resources["kopf.dev/v1/clusterkopfpeerings"] = ResourceInfo(
            kind="ClusterKopfPeering", namespaced=False, verbs=verbs)
        emulator.resources["kopf.dev/v1/kopfpeerings"] = ResourceInfo(
            kind="KopfPeering", namespaced=True, verbs=verbs)


@contextlib.asynccontextmanager
async def serve_emulator(peering: bool = False) -> AsyncIterator[tuple[FedkubeEmulator, str]]:
    """An emulator on a free 127.0.0.1 port; yields it and its URL."""
    async with FedkubeEmulator() as emulator, Server(emulator) as server:
        declare_resources(emulator, peering)
        yield emulator, str(server.url).rstrip("/")


class EmulatorThread:
    """The emulator served by a thread of its own, for tests that drive it with blocking
    clients: the real ``kubectl`` and a ``fedkube operator`` subprocess."""

    def __init__(self, peering: bool = False) -> None:
        self.peering = peering
        self.url = ""
        self.emulator: FedkubeEmulator | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        name="kmock emulator", daemon=True)
        self._error: BaseException | None = None

    async def _serve(self) -> None:
        try:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            async with serve_emulator(self.peering) as (emulator, url):
                self.emulator, self.url = emulator, url
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._ready.set()

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self.emulator is None:
            raise RuntimeError(f"the emulator did not start: {self._error!r}")
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def requests(self) -> list[Any]:
        """The requests served so far (a snapshot)."""
        assert self.emulator is not None
        return list(self.emulator._requests)

    def count(self, plural: str) -> int:
        """How many objects of this kind exist. Counted on the emulator's own loop: its
        object store is not safe to iterate from another thread while it serves."""
        emulator, loop = self.emulator, self._loop
        assert emulator is not None and loop is not None

        async def count() -> int:
            return sum(1 for (resource, _, _), obj in emulator._objects.items()
                       if resource.plural == plural and not obj.deleted)

        return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=30)

    def watching(self, since: int = 0) -> bool:
        """True once jobs and every cached child kind are watched by requests after the
        first ``since``."""
        assert self.emulator is not None
        return _watching(self.emulator, since)

    def kubeconfig(self, path: Path, namespace: str = "ml") -> Path:
        """Write a kubeconfig for this emulator (what kubectl and ``fedkube operator`` read)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }))
        return path


def operator_settings(url: str, status_url: str = "http://127.0.0.1:9/status") -> \
        ControllerSettings:
    """Settings for fast tests: a short resync, a quick status timeout."""
    return ControllerSettings(resync_seconds=0.3, status_url=status_url,
                              status_timeout_seconds=0.5, kube_server=url)


@contextlib.asynccontextmanager
async def running_operator(emulator: FedkubeEmulator, settings: ControllerSettings,
                           metrics: OperatorMetrics | None = None) -> AsyncIterator[Controller]:
    """The real kopf operator with fedkube's handlers, watching the emulator."""
    controller = Controller(settings=settings, metrics=metrics or OperatorMetrics())
    stop = threading.Event()
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.posting.enabled = True
    kopf_settings.watching.server_timeout = 60
    kopf_settings.networking.request_timeout = 10
    kopf_settings.batching.batch_window = 0.01
    kopf_settings.batching.idle_timeout = 0.5
    kopf_settings.batching.exit_timeout = 1
    kopf_settings.background.cancellation_polling = 0.1
    # The operator gets its own thread and event loop, as in production: on exit kopf stops
    # every task its loop gained after it started, which in the test's loop would include the
    # emulator's and the status server's connection handlers.
    task = asyncio.ensure_future(asyncio.to_thread(asyncio.run, serve(
        OperatorOptions(standalone=True), controller, kopf_settings=kopf_settings,
        stop_flag=stop)))
    seen = len(emulator._requests)
    try:
        await wait_until(lambda: _watching(emulator, seen) or task.done(),
                         what="the operator to watch jobs and pods")
        if task.done():
            task.result()  # raises what stopped the operator
            raise AssertionError("the operator exited at start")
        yield controller
    finally:
        stop.set()
        # A slow or failing exit is a bug (SIGTERM in production takes the same path).
        await asyncio.wait_for(task, timeout=10)


def _watching(emulator: FedkubeEmulator, seen: int) -> bool:
    """Pitfall 2: objects written before a watch subscribes are never announced.
    Only requests after the first ``seen`` count (an earlier operator's do not)."""
    watched = {str(r.resource.plural) for r in emulator._requests[seen:]
               if r.action == enums.action.WATCH and r.resource is not None}
    return {PLURAL, *(plural for _, _, plural in CORE_KINDS.values())} <= watched


async def wait_until(check: Callable[[], T | Awaitable[T]], *, what: str,
                     timeout: float = 20.0) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Cluster:
    """A test's hands on the emulator: user, kubelet and garbage collector."""

    def __init__(self, url: str, session: aiohttp.ClientSession, namespace: str = "ml") -> None:
        self.url, self.session, self.namespace = url, session, namespace

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(method, self.url + path, **kwargs) as response:
            if response.status == 404:
                return None
            assert response.status < 400, f"{method} {path}: {await response.text()}"
            return await response.json(content_type=None)

    def _path(self, template: str, name: str | None = None, sub: str | None = None) -> str:
        path = template.format(ns=self.namespace)
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create_job(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}
        result: dict[str, Any] = await self._call("POST", self._path(JOBS), json=body)
        return result

    async def job(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call("GET", self._path(JOBS, name))
        return result

    async def patch_job(self, name: str, patch: dict[str, Any]) -> None:
        await self._call("PATCH", self._path(JOBS, name), json=patch,
                         headers={"Content-Type": "application/merge-patch+json"})

    async def delete_job(self, name: str) -> None:
        await self._call("DELETE", self._path(JOBS, name))

    async def list(self, plural: str, job: str | None = None, group: str = "/api/v1") -> \
            list[dict[str, Any]]:
        """Objects of a kind, filtered by the job label here (the emulator ignores
        selectors)."""
        body = await self._call("GET", f"{group}/namespaces/{self.namespace}/{plural}")
        items: list[dict[str, Any]] = (body or {}).get("items") or []
        if job is not None:
            items = [o for o in items
                     if (o["metadata"].get("labels") or {}).get(LABEL_JOB) == job]
        return items

    async def create(self, plural: str, body: dict[str, Any], group: str = "/api/v1") -> None:
        """Create an object as another controller would (e.g. cert-manager's Secret)."""
        await self._call("POST", f"{group}/namespaces/{self.namespace}/{plural}", json=body)

    async def pods(self, job: str) -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p for p in await self.list("pods", job)}

    async def set_pod_status(self, name: str, status: dict[str, Any]) -> None:
        """Play kubelet."""
        await self._call("PATCH", self._path(PODS, name, "status"), json={"status": status},
                         headers={"Content-Type": "application/merge-patch+json"})

    async def collect_garbage(self, owner_uid: str) -> int:
        """Play the garbage collector: delete what the owner owned. Returns the count."""
        deleted = 0
        for plural, group in (("pods", "/api/v1"), ("configmaps", "/api/v1"),
                              ("secrets", "/api/v1"), ("services", "/api/v1"),
                              ("networkpolicies", "/apis/networking.k8s.io/v1")):
            for obj in await self.list(plural, group=group):
                owners = obj["metadata"].get("ownerReferences") or []
                if any(o.get("uid") == owner_uid for o in owners):
                    await self._call("DELETE", f"{group}/namespaces/{self.namespace}/"
                                               f"{plural}/{obj['metadata']['name']}")
                    deleted += 1
        return deleted


logging.getLogger("kopf").setLevel(logging.WARNING)
