"""The operator's peering object: created when missing, or a clear error, against the emulator."""

from __future__ import annotations

import re

import kopf
import pytest
from emulator import serve_emulator

from fedkube.controller.kube import Kube
from fedkube.controller.peering import (
    PeeringError,
    PeeringObject,
    ensure_peering,
    peering_objects,
)

pytestmark = pytest.mark.timeout(60)


def test_one_cluster_peering_or_one_per_served_namespace() -> None:
    assert peering_objects("fedkube", ()) == [PeeringObject("ClusterKopfPeering", "fedkube")]
    assert peering_objects("ops", ("a", "b")) == [PeeringObject("KopfPeering", "ops", "a"),
                                                   PeeringObject("KopfPeering", "ops", "b")]


@pytest.mark.parametrize("namespaces", [(), ("ml", "research")], ids=["cluster", "namespaced"])
async def test_missing_peering_objects_are_created_once(namespaces: tuple[str, ...]) -> None:
    async with serve_emulator(peering=True) as (_, url):
        kube = Kube.connect(kopf.ConnectionInfo(server=url, insecure=True))
        try:
            objects = peering_objects("fedkube", namespaces)
            assert await ensure_peering(kube, objects) == objects
            for peering in objects:
                found = await kube.get(peering.kind, peering.namespace, "fedkube")
                assert found is not None and found["kind"] == peering.kind
            # A second replica (or a restart) finds them and creates nothing.
            assert await ensure_peering(kube, objects) == []
        finally:
            await kube.close()


async def test_without_the_peering_crds_the_error_names_the_object_and_the_fix() -> None:
    async with serve_emulator(peering=False) as (_, url):
        kube = Kube.connect(kopf.ConnectionInfo(server=url, insecure=True))
        try:
            with pytest.raises(PeeringError) as raised:
                await ensure_peering(kube, peering_objects("fedkube", ("ml",)))
        finally:
            await kube.close()
    message = str(raised.value)
    assert "KopfPeering 'fedkube' in namespace 'ml' does not exist" in message
    assert "kopfpeerings.kopf.dev" in message and "--standalone" in message


async def test_an_unreachable_api_server_is_named() -> None:
    kube = Kube.connect(kopf.ConnectionInfo(server="http://127.0.0.1:9", insecure=True))
    try:
        unreachable = re.escape("API server at http://127.0.0.1:9 is unreachable")
        with pytest.raises(PeeringError, match=unreachable):
            await ensure_peering(kube, peering_objects("fedkube", ()))
    finally:
        await kube.close()
