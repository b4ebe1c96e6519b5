"""``fedkube render``: the children of FederatedJob files as one YAML stream."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from fedkube.api.validation import load_jobs
from fedkube.controller.builders import all_objects

#: Stands in for the random token the operator draws, so that render output is stable.
PLACEHOLDER_TOKEN = "<drawn-by-the-operator>"


def render_files(paths: Iterable[Path]) -> str:
    objects = [obj for path in paths for job in load_jobs(path)
               for obj in all_objects(job, PLACEHOLDER_TOKEN)]
    return yaml.safe_dump_all(objects, sort_keys=False)
