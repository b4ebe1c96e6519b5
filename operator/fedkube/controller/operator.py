"""``fedkube operator``: the kopf operator process (namespaces, peering, probes, metrics).

:func:`serve` is the one way the operator runs, for the command and for the in-process test
harness alike, so that what the tests start is what ships.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import start_http_server

from fedkube.controller.handlers import Controller, credentials, register
from fedkube.controller.kube import Kube
from fedkube.controller.metrics import OperatorMetrics
from fedkube.controller.peering import PeeringError, ensure_peering, peering_objects
from fedkube.controller.settings import ControllerSettings

logger = logging.getLogger("fedkube.operator")


@dataclass(frozen=True)
class OperatorOptions:
    """What the command line chooses."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to serve; every namespace when empty."""
    standalone: bool = False
    """No peering at all: this process reconciles at once, whatever else runs."""
    peering_name: str = "fedkube"
    """The (Cluster)KopfPeering the replicas meet in, when not standalone."""
    peering_lifetime: int = 15
    """Seconds a replica's peering record lives without a refresh: how long the others wait
    before taking over from one that died without a goodbye (SIGKILL, node loss)."""
    priority: int = field(default_factory=lambda: -time.time_ns() // 1000)
    """kopf's peering priority: the replica that started first has the highest, so that one
    replica reconciles and the others stand by (kopf pauses every replica when two share a
    priority), and a rollout's new replicas take over only when the old ones are gone."""
    liveness: str | None = None
    """kopf's liveness endpoint URL, e.g. ``http://0.0.0.0:8080/healthz``."""


def configure_logging(json_logs: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler()
    if json_logs:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


async def serve(options: OperatorOptions, controller: Controller, *,
                kopf_settings: kopf.OperatorSettings | None = None,
                stop_flag: threading.Event | None = None) -> None:
    """Run the operator until SIGTERM/SIGINT (or ``stop_flag``).

    Raises :class:`PeeringError` before kopf starts when peering is on and its object is
    missing and cannot be created: kopf would otherwise stay paused, watching nothing.
    """
    asyncio.get_running_loop().set_exception_handler(_quiet_kopf_stream_close)
    settings = kopf_settings or kopf.OperatorSettings()
    if not options.standalone:
        settings.peering.priority = options.priority
        settings.peering.lifetime = options.peering_lifetime
        kube = Kube.connect(credentials(controller.settings, settings))
        try:
            objects = peering_objects(options.peering_name, options.namespaces)
            for created in await ensure_peering(kube, objects):
                logger.info("created the peering object %s", created.describe())
        finally:
            await kube.close()
    registry = kopf.OperatorRegistry()
    register(registry, controller)
    # kopf makes peering mandatory whenever it is given a peering name, standalone or not.
    await kopf.operator(
        registry=registry, settings=settings, standalone=options.standalone,
        clusterwide=not options.namespaces, namespaces=list(options.namespaces),
        liveness_endpoint=options.liveness, stop_flag=stop_flag,
        peering_name=None if options.standalone else options.peering_name)


def _quiet_kopf_stream_close(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """kopf 1.45 leaves its stopped watch-stream generators open; the event loop closes them
    as it exits and, for one that was between two streams, logs an ERROR traceback
    ("generator didn't stop after athrow()"). The operator has stopped by then and nothing
    is lost, so that one is logged at debug level; every other loop error as usual."""
    generator = context.get("asyncgen")
    if getattr(generator, "__name__", None) == "infinite_watch":
        logger.debug("kopf's watch stream closed at exit: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


def run_operator(options: OperatorOptions, metrics_port: int | None, json_logs: bool,
                 verbose: bool) -> int:
    """The ``fedkube operator`` process; returns its exit code (2: peering cannot work)."""
    configure_logging(json_logs, verbose)
    metrics = OperatorMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
    controller = Controller(settings=ControllerSettings.from_env(), metrics=metrics)
    try:
        asyncio.run(serve(options, controller))
    except PeeringError as error:
        logger.error("%s", error)
        return 2
    return 0
