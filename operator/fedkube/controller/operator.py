"""``fedkube operator``: the kopf operator process (namespaces, peering, probes, metrics)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import kopf
from prometheus_client import start_http_server

from fedkube.controller.handlers import Controller, register
from fedkube.controller.metrics import OperatorMetrics
from fedkube.controller.settings import ControllerSettings


def configure_logging(json_logs: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler()
    if json_logs:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def run_operator(namespaces: Sequence[str], standalone: bool, peering_name: str,
                 liveness: str | None, metrics_port: int | None, json_logs: bool,
                 verbose: bool) -> None:
    """Run until SIGTERM/SIGINT; kopf stops handlers gracefully on either."""
    configure_logging(json_logs, verbose)
    settings = ControllerSettings.from_env()
    metrics = OperatorMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, registry=metrics.registry)
    registry = kopf.OperatorRegistry()
    register(registry, Controller(settings=settings, metrics=metrics))
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.peering.name = peering_name
    kopf_settings.peering.mandatory = not standalone
    asyncio.run(kopf.operator(
        registry=registry, settings=kopf_settings, standalone=standalone,
        clusterwide=not namespaces, namespaces=list(namespaces),
        liveness_endpoint=liveness, peering_name=peering_name))
