"""A thin async Kubernetes REST client for the few calls the operator makes.

kopf brings aiohttp and the credentials (its login handlers); this reuses both instead of
adding a second client library to the operator's event loop.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from fedkube.api.constants import API_VERSION, PLURAL

#: kind -> (API path prefix, plural) of everything the operator reads or writes.
RESOURCES: dict[str, tuple[str, str]] = {
    "ClusterKopfPeering": ("/apis/kopf.dev/v1", "clusterkopfpeerings"),
    "KopfPeering": ("/apis/kopf.dev/v1", "kopfpeerings"),
    "Pod": ("/api/v1", "pods"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "PodGroup": ("/apis/scheduling.x-k8s.io/v1alpha1", "podgroups"),
    "FederatedJob": (f"/apis/{API_VERSION}", PLURAL),
}


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

    def url(self, kind: str, namespace: str | None, name: str | None = None,
            subresource: str | None = None) -> str:
        """The object's (or, without a name, the collection's) URL; a cluster-scoped kind has
        no namespace."""
        prefix, plural = RESOURCES[kind]
        scope = f"/namespaces/{namespace}" if namespace else ""
        url = f"{self.server}{prefix}{scope}/{plural}"
        return url + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    async def _request(self, method: str, url: str, ok: tuple[int, ...] = (),
                       **kwargs: Any) -> dict[str, Any] | None:
        async with self.session.request(method, url, **kwargs) as response:
            if response.status in ok:
                return None
            if response.status >= 400:
                raise KubeError(response.status, method, url, await response.text())
            result: dict[str, Any] = await response.json(content_type=None)
            return result

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await self._request("GET", self.url(kind, namespace, name), ok=(404,))

    async def list(self, kind: str, namespace: str,
                   labels: dict[str, str]) -> list[dict[str, Any]]:
        """Objects with these labels. Filtered here too: selectors are only a hint to the
        server (and some test servers ignore them)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        body = await self._request("GET", self.url(kind, namespace),
                                   params={"labelSelector": selector})
        items = (body or {}).get("items") or []
        return [o for o in items if all(
            (o.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())]

    async def create(self, manifest: dict[str, Any]) -> bool:
        """Create; False when it already exists (409), which is as good as created."""
        meta = manifest["metadata"]
        created = await self._request("POST", self.url(manifest["kind"], meta.get("namespace")),
                                      ok=(409,), json=manifest)
        return created is not None

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (in the background); False when it was already gone (404)."""
        deleted = await self._request(
            "DELETE", self.url(kind, namespace, name), ok=(404,),
            json={"kind": "DeleteOptions", "apiVersion": "v1",
                  "propagationPolicy": "Background"})
        return deleted is not None

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                          subresource: str | None = None) -> None:
        await self._request("PATCH", self.url(kind, namespace, name, subresource), ok=(404,),
                            json=patch,
                            headers={"Content-Type": "application/merge-patch+json"})

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
