"""A thin async Kubernetes REST client for the few calls the operator makes.

kopf brings aiohttp and the credentials (its login handlers); this reuses both instead of
adding a second client library to the operator's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from fedkube.api.constants import API_VERSION, PLURAL

logger = logging.getLogger("fedkube.operator")


@dataclass(frozen=True)
class Resource:
    """A kind the operator touches: where it lives and the verbs the operator uses on it (the
    chart's RBAC grants exactly these; a call with another verb fails here, in every test)."""

    prefix: str
    plural: str
    verbs: frozenset[str]
    status_verbs: frozenset[str] = frozenset()
    """Verbs on the ``status`` subresource."""


def _resource(prefix: str, plural: str, *verbs: str, status: tuple[str, ...] = ()) -> Resource:
    return Resource(prefix, plural, frozenset(verbs), frozenset(status))


#: Everything the operator reads or writes through :class:`Kube`, and the kinds its kopf
#: indices watch (``list``, ``watch``: the operator's view of a job's children is served from
#: those watch-fed caches; see :mod:`fedkube.controller.cache`). kopf's own watch of the jobs
#: and its peering are kopf's business.
RESOURCES: dict[str, Resource] = {
    "ClusterKopfPeering": _resource("/apis/kopf.dev/v1", "clusterkopfpeerings", "get", "create"),
    "KopfPeering": _resource("/apis/kopf.dev/v1", "kopfpeerings", "get", "create"),
    "Pod": _resource("/api/v1", "pods", "list", "watch", "create", "delete"),
    "ConfigMap": _resource("/api/v1", "configmaps", "get", "list", "watch", "create", "patch",
                           "delete"),
    "Secret": _resource("/api/v1", "secrets", "list", "watch", "create", "patch", "delete"),
    "Service": _resource("/api/v1", "services", "get", "list", "watch", "create", "delete"),
    "PersistentVolumeClaim": _resource("/api/v1", "persistentvolumeclaims",
                                       "get", "list", "watch", "create", "delete"),
    "NetworkPolicy": _resource("/apis/networking.k8s.io/v1", "networkpolicies",
                               "get", "list", "watch", "create", "delete"),
    "PodGroup": _resource("/apis/scheduling.x-k8s.io/v1alpha1", "podgroups",
                          "get", "list", "watch", "create", "delete"),
    "Certificate": _resource("/apis/cert-manager.io/v1", "certificates",
                             "get", "list", "watch", "create", "delete"),
    "FederatedJob": _resource(f"/apis/{API_VERSION}", PLURAL, "get", "patch", "delete",
                              status=("patch",)),
}


class UndeclaredAccess(RuntimeError):
    """A call the operator's RBAC would not allow: declare the verb in :data:`RESOURCES` (and
    so in the chart) or do not make the call."""


#: Answers worth another try: throttled, or the API server (or its etcd) briefly unwell.
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_ATTEMPTS = 5
RETRY_START_SECONDS, RETRY_MAX_SECONDS = 0.2, 5.0


def _retry_after(header: str | None, default: float) -> float:
    """Seconds to wait: the server's ``Retry-After`` (capped), else ``default``."""
    try:
        return min(max(float(header), 0.0), RETRY_MAX_SECONDS) if header else default
    except ValueError:
        return default


class KubeError(RuntimeError):
    def __init__(self, status: int, method: str, url: str, text: str) -> None:
        super().__init__(f"{method} {url}: HTTP {status}: {text[:500]}")
        self.status = status


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=info.ca_path, cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes)
        else info.ca_data)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    return context


@dataclass
class Kube:
    """One session to the API server; 404 and 409 are answers, not errors, where noted."""

    session: aiohttp.ClientSession
    server: str
    plain: aiohttp.ClientSession
    """Without the API credentials: for pods, which must never see the operator's token."""

    @classmethod
    def connect(cls, info: kopf.ConnectionInfo) -> Kube:
        headers = {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"} if info.token \
            else {}
        connector = aiohttp.TCPConnector(ssl=_ssl_context(info), limit=64)
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        return cls(aiohttp.ClientSession(headers=headers, connector=connector, auth=auth),
                   info.server.rstrip("/"), aiohttp.ClientSession())

    async def close(self) -> None:
        await self.session.close()
        await self.plain.close()

    def url(self, verb: str, kind: str, namespace: str | None, name: str | None = None,
            subresource: str | None = None) -> str:
        """The object's (or, without a name, the collection's) URL, for a call with ``verb``;
        a cluster-scoped kind has no namespace."""
        resource = RESOURCES[kind]
        allowed = resource.status_verbs if subresource == "status" else resource.verbs
        if verb not in allowed:
            raise UndeclaredAccess(f"{verb} on {resource.plural}"
                                   + (f"/{subresource}" if subresource else ""))
        scope = f"/namespaces/{namespace}" if namespace else ""
        url = f"{self.server}{resource.prefix}{scope}/{resource.plural}"
        return url + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    async def _request(self, method: str, url: str, ok: tuple[int, ...] = (),
                       **kwargs: Any) -> dict[str, Any] | None:
        """One call, retried while the API server is throttling (429, after its Retry-After)
        or briefly unwell (5xx, a dropped connection). Retrying is safe for every call the
        operator makes: names are deterministic (a create that did land answers 409, which
        is ``ok``), deletes answer 404 when done, merge patches are idempotent."""
        delay = RETRY_START_SECONDS
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                async with self.session.request(method, url, **kwargs) as response:
                    if response.status in ok:
                        return None
                    if response.status in RETRIED_STATUSES and attempt < RETRY_ATTEMPTS:
                        wait = _retry_after(response.headers.get("Retry-After"), delay)
                        logger.warning("%s %s: HTTP %d; retrying in %.1fs (attempt %d of %d)",
                                       method, url, response.status, wait, attempt,
                                       RETRY_ATTEMPTS)
                        await asyncio.sleep(wait)
                        delay = min(delay * 2, RETRY_MAX_SECONDS)
                        continue
                    if response.status >= 400:
                        raise KubeError(response.status, method, url, await response.text())
                    result: dict[str, Any] = await response.json(content_type=None)
                    return result
            except aiohttp.ClientConnectionError as error:
                if attempt == RETRY_ATTEMPTS:
                    raise
                logger.warning("%s %s: %s; retrying in %.1fs (attempt %d of %d)", method, url,
                               error, delay, attempt, RETRY_ATTEMPTS)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await self._request("GET", self.url("get", kind, namespace, name), ok=(404,))

    async def list(self, kind: str, namespace: str,
                   labels: dict[str, str]) -> list[dict[str, Any]]:
        """Objects with these labels. Filtered here too: selectors are only a hint to the
        server (and some test servers ignore them)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        body = await self._request("GET", self.url("list", kind, namespace),
                                   params={"labelSelector": selector})
        items = (body or {}).get("items") or []
        return [o for o in items if all(
            (o.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())]

    async def create(self, manifest: dict[str, Any]) -> bool:
        """Create; False when it already exists (409), which is as good as created."""
        return await self.create_object(manifest) is not None

    async def create_object(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create; the object as created, or None when it already existed (409)."""
        meta = manifest["metadata"]
        url = self.url("create", manifest["kind"], meta.get("namespace"))
        return await self._request("POST", url, ok=(409,), json=manifest)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (in the background); False when it was already gone (404)."""
        deleted = await self._request(
            "DELETE", self.url("delete", kind, namespace, name), ok=(404,),
            json={"kind": "DeleteOptions", "apiVersion": "v1",
                  "propagationPolicy": "Background"})
        return deleted is not None

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                          subresource: str | None = None) -> dict[str, Any] | None:
        """Merge-patch; the object as patched, or None when it does not exist (404)."""
        return await self._request(
            "PATCH", self.url("patch", kind, namespace, name, subresource), ok=(404,),
            json=patch, headers={"Content-Type": "application/merge-patch+json"})

    async def fetch_json(self, url: str, timeout: float) -> dict[str, Any] | None:
        """GET a JSON document from a pod (the aggregator's /status); None when unreachable."""
        try:
            async with self.plain.get(url,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status != 200:
                    return None
                result: dict[str, Any] = await response.json(content_type=None)
                return result
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
