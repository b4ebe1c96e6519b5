"""The operator's view of the jobs and their children, served from watch-fed caches.

kopf indices (registered in :mod:`fedkube.controller.handlers`) keep every FederatedJob and
every child labelled with ``fedkube.io/job``, fed by kopf's watch streams, so a reconcile
pass reads nothing from the API server: a steady job costs only its watch events, as
controller-runtime's informer cache does for Go operators.

A cache lags the operator's own writes by one watch event. A pass that ran in that window
would see the world as it was before the previous pass acted (a deleted pod still there, the
restart it counted not yet in the status). So the operator's writes are laid over the
indices (client-go's "mutation cache"): the object a create or patch returned, or a
tombstone for a delete, until the watch delivers a version at least as new, or for at most
:data:`WRITE_TTL_SECONDS` (a watch that never catches up must not hide the truth forever).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedkube.api import GROUP, PLURAL, VERSION

Manifest = dict[str, Any]

#: The kinds the operator caches: (group, version, plural) for kopf. Certificates and
#: PodGroups only when settings say their RBAC is granted (the chart grants those only when
#: jobs may use them); without a cache they are read by name.
CORE_KINDS: dict[str, tuple[str, str, str]] = {
    "Pod": ("", "v1", "pods"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Secret": ("", "v1", "secrets"),
    "Service": ("", "v1", "services"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
}
OPTIONAL_KINDS: dict[str, tuple[str, str, str]] = {
    "Certificate": ("cert-manager.io", "v1", "certificates"),
    "PodGroup": ("scheduling.x-k8s.io", "v1alpha1", "podgroups"),
}
JOB_KIND = "FederatedJob"
JOB_RESOURCE = (GROUP, VERSION, PLURAL)
#: The longest a write of the operator's stands in for what the watch has not delivered.
WRITE_TTL_SECONDS = 60.0


def index_id(kind: str) -> str:
    """The kopf index id (and handler kwarg) of a cached kind."""
    return f"fedkube_index_{kind.lower()}"


def slim(body: Mapping[str, Any]) -> Manifest:
    """A private copy of a watched object, without what the reconcile never reads."""
    out = copy.deepcopy(dict(body))
    out.get("metadata", {}).pop("managedFields", None)
    return out


def resource_version(obj: Mapping[str, Any] | None) -> int | None:
    """The object's resourceVersion as a number (opaque by contract, but etcd's revision in
    practice); None when unknown or not numeric."""
    version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(version) if version is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class _Write:
    body: Manifest | None
    """The object as the write returned it; None: deleted."""
    version: int | None
    """Its resourceVersion (for a delete: the version that was deleted)."""
    expires: float


@dataclass
class ObjectCache:
    """kopf's live indices by kind (keyed ``(namespace, job)``; the jobs' by ``(namespace,
    name)``), with the operator's own recent writes laid over them."""

    indices: dict[str, Mapping[Any, Iterable[Manifest]]] = field(default_factory=dict)
    writes: dict[tuple[str, str], dict[tuple[str, str], _Write]] = field(default_factory=dict)
    """Per job ``(namespace, name)``: ``(kind, name)`` -> the write."""

    def bind(self, kwargs: Mapping[str, Any]) -> None:
        """Take kopf's indices from a handler's kwargs (they are live views)."""
        if len(self.indices) < len(CORE_KINDS) + 1:
            for kind in (JOB_KIND, *CORE_KINDS, *OPTIONAL_KINDS):
                if index_id(kind) in kwargs:
                    self.indices[kind] = kwargs[index_id(kind)]

    def caches(self, kind: str) -> bool:
        return kind in self.indices

    def job(self, namespace: str, name: str) -> Manifest | None:
        """The job as last seen or written, or None when it is gone."""
        found = self._view(JOB_KIND, namespace, name, (namespace, name))
        return found[0] if found else None

    def objects(self, kind: str, namespace: str, job: str) -> list[Manifest]:
        """The job's children of this kind (labelled with it)."""
        return self._view(kind, namespace, job, None)

    def _view(self, kind: str, namespace: str, job: str,
              only: tuple[str, str] | None) -> list[Manifest]:
        store = self.indices[kind].get((namespace, job)) or ()
        current = {o["metadata"]["name"]: o for o in store}
        writes = self.writes.get((namespace, job))
        if writes:
            now = time.monotonic()
            for key, write in list(writes.items()):
                if key[0] != kind:
                    continue
                name = key[1]
                cached = current.get(name)
                seen = resource_version(cached)
                if write.body is None:  # deleted: caught up once gone or newer
                    caught_up = cached is None or seen is None or write.version is None or \
                        seen > write.version
                else:  # created or patched: caught up once as new
                    caught_up = seen is not None and write.version is not None and \
                        seen >= write.version
                if caught_up or now > write.expires:
                    del writes[key]
                elif write.body is not None:
                    current[name] = write.body
                elif kind == "Pod" and cached is not None:
                    # As the API server shows a pod being deleted, until the watch says so.
                    current[name] = {**cached, "metadata": {
                        **cached["metadata"], "deletionTimestamp": datetime.now(UTC).isoformat()}}
                else:
                    current.pop(name, None)
            if not writes:
                self.writes.pop((namespace, job), None)
        if only is not None:
            found = current.get(only[1])
            return [found] if found is not None else []
        return list(current.values())

    def wrote(self, namespace: str, job: str, kind: str, body: Manifest | None) -> None:
        """Remember what a create or patch returned (None: nothing, e.g. a 409 or 404)."""
        if body is None or kind not in self.indices:
            return
        self.writes.setdefault((namespace, job), {})[(kind, body["metadata"]["name"])] = \
            _Write(body, resource_version(body), time.monotonic() + WRITE_TTL_SECONDS)

    def deleted(self, namespace: str, job: str, kind: str, name: str) -> None:
        """Remember a delete: the object reads as gone (a pod as terminating) until the
        watch reports it gone or newer."""
        if kind not in self.indices:
            return
        view = self._view(kind, namespace, job, (namespace, name) if kind == JOB_KIND else None)
        version = next((resource_version(o) for o in view if o["metadata"]["name"] == name),
                       None)
        self.writes.setdefault((namespace, job), {})[(kind, name)] = \
            _Write(None, version, time.monotonic() + WRITE_TTL_SECONDS)

    def purge(self) -> None:
        """Drop the writes that have expired (those of jobs no pass reads any more)."""
        now = time.monotonic()
        for job, writes in list(self.writes.items()):
            for key in [k for k, w in writes.items() if now > w.expires]:
                del writes[key]
            if not writes:
                del self.writes[job]

    def forget(self, namespace: str, job: str) -> None:
        """Drop the writes of a job that is gone (its tombstone, if any, goes with them...
        except the job's own, which must outlive it until the watch says it is gone)."""
        writes = self.writes.get((namespace, job))
        if writes:
            for key in [k for k in writes if k[0] != JOB_KIND]:
                del writes[key]
            if not writes:
                self.writes.pop((namespace, job), None)
