"""The kopf peering object the operator's replicas meet in, made to exist before kopf starts.

kopf treats a named peering as mandatory: while the object is missing, the operator stays
paused and watches nothing, without a word. So before kopf starts, the operator makes sure
the object exists (creating it when it may), and otherwise stops with a message that names
the object and the fix, which a pod shows as its termination message and restarts on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from fedkube.controller.kube import Kube, KubeError

PEERING_CRDS = "charts/fedkube/crds/kopf.dev_peerings.yaml"


class PeeringError(RuntimeError):
    """The peering object is missing and cannot be created; the message says how to fix it."""


@dataclass(frozen=True)
class PeeringObject:
    """One (Cluster)KopfPeering: cluster-wide for an operator serving every namespace, else
    one per served namespace (kopf's own convention)."""

    kind: Literal["ClusterKopfPeering", "KopfPeering"]
    name: str
    namespace: str | None = None

    @property
    def plural(self) -> str:
        return f"{self.kind.lower()}s.kopf.dev"

    def describe(self) -> str:
        where = f" in namespace {self.namespace!r}" if self.namespace else ""
        return f"{self.kind} {self.name!r}{where}"

    def manifest(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name,
                                    "labels": {"app.kubernetes.io/managed-by": "fedkube"}}
        if self.namespace:
            metadata["namespace"] = self.namespace
        return {"apiVersion": "kopf.dev/v1", "kind": self.kind, "metadata": metadata}


def peering_objects(name: str, namespaces: Sequence[str]) -> list[PeeringObject]:
    """The objects an operator with this peering name and these namespaces meets its peers in."""
    if not namespaces:
        return [PeeringObject("ClusterKopfPeering", name)]
    return [PeeringObject("KopfPeering", name, namespace) for namespace in namespaces]


async def ensure_peering(kube: Kube, objects: Sequence[PeeringObject]) -> list[PeeringObject]:
    """Create whichever of ``objects`` is missing; return those created.

    Raises :class:`PeeringError` naming the object and the fix when one is missing and cannot
    be created: the peering CRDs are not installed, or the operator may not create it.
    """
    created = []
    for peering in objects:
        try:
            if await kube.get(peering.kind, peering.namespace, peering.name) is not None:
                continue
            await kube.create(peering.manifest())
        except KubeError as error:
            raise PeeringError(_explain(peering, error)) from error
        except aiohttp.ClientError as error:
            raise PeeringError(f"cannot check the peering object {peering.describe()}: the API "
                               f"server at {kube.server} is unreachable ({error})") from error
        created.append(peering)
    return created


def _explain(peering: PeeringObject, error: KubeError) -> str:
    missing = f"the peering object {peering.describe()} does not exist"
    if error.status == 404:
        return (f"{missing} and the API server does not serve {peering.plural}: install the "
                f"peering CRDs (kubectl apply -f {PEERING_CRDS}, or the fedkube chart), or run "
                f"one replica with --standalone")
    if error.status == 403:
        return (f"{missing} and the operator may not create it ({error}): grant 'create' on "
                f"{peering.plural} to its service account, create the object, or run one "
                f"replica with --standalone")
    return f"{missing} and creating it failed: {error}"
