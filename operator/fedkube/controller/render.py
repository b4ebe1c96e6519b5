"""``fedkube render``: the children of FederatedJob files as one YAML stream."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from fedkube.api import FederatedJob
from fedkube.api.validation import load_jobs
from fedkube.controller.builders import Manifest, all_objects
from fedkube.controller.credentials import plan_secrets

#: Stands in for the keys and certificates the operator issues, so that render output is stable.
PLACEHOLDER = "<issued-by-the-operator>"


def _placeholders(secret: Manifest) -> Manifest:
    return {**secret, "stringData": dict.fromkeys(secret["stringData"], PLACEHOLDER)}


def objects(job: FederatedJob) -> list[Manifest]:
    """The children of a fresh ``job``; Secrets' contents are placeholders."""
    secrets = plan_secrets(job, {}, datetime.now(UTC)).create
    return all_objects(job, [_placeholders(secret) for secret in secrets])


def render_files(paths: Iterable[Path]) -> str:
    rendered = [obj for path in paths for job in load_jobs(path) for obj in objects(job)]
    return yaml.safe_dump_all(rendered, sort_keys=False)
