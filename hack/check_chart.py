#!/usr/bin/env python3
"""Lint the Helm chart, render it, and validate every rendered object (``make chart``).

Renders ``charts/fedkube`` twice, with its defaults and with ``ci/all-features-values.yaml``
(every optional object on), and validates each object in strict mode: built-in kinds with the
``kubernetes-validate`` package (unknown fields are errors), kinds of CRDs the chart ships
(kopf's peerings) against those CRDs' own schemas, and prometheus-operator's ServiceMonitor and
PodMonitor against :data:`MONITORING_SCHEMAS`, a strict subset of their CRDs (only the fields
this chart sets may appear; prometheus-operator's CRDs are not vendored here).

``tests/chart`` imports these functions; this script is the same checks for a human.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedkube"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
sys.path.insert(0, str(ROOT / "hack"))
from install_tools import install  # noqa: E402  (hack/ is not a package)

KUBERNETES_VERSION = kubernetes_validate.latest_version()

_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {"type": "object", "additionalProperties": False,
             "properties": {"matchLabels": _LABELS}, "required": ["matchLabels"]}
_NAMESPACE_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"any": {"type": "boolean"},
                   "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_ENDPOINT = {
    "type": "object", "additionalProperties": False, "required": ["port"],
    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                   "interval": _DURATION, "scrapeTimeout": _DURATION,
                   "honorLabels": {"type": "boolean"}},
}
_METADATA = {
    "type": "object", "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _LABELS, "annotations": _LABELS},
}


def _monitor_schema(endpoints_key: str) -> dict[str, Any]:
    return {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {"selector": _SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                               endpoints_key: {"type": "array", "minItems": 1,
                                               "items": _ENDPOINT}},
            },
        },
    }


#: The fields of prometheus-operator's monitoring.coreos.com/v1 ServiceMonitor and PodMonitor
#: that this chart uses, with their types as the CRDs declare them.
MONITORING_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("endpoints"),
    "PodMonitor": _monitor_schema("podMetricsEndpoints"),
}


def helm() -> str:
    """The helm binary, installed into .tools/bin when missing."""
    return str(install(("helm",))["helm"])


def lint(values_files: Iterable[Path] = ()) -> subprocess.CompletedProcess[str]:
    args = [helm(), "lint", "--strict", str(CHART)]
    for path in values_files:
        args += ["--values", str(path)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def render(values_files: Iterable[Path] = (), set_values: Iterable[str] = (),
           namespace: str = "fedkube-system") -> subprocess.CompletedProcess[str]:
    """``helm template`` the chart (CRDs included); the caller checks ``returncode``."""
    args = [helm(), "template", "fedkube", str(CHART), "--namespace", namespace, "--include-crds"]
    for path in values_files:
        args += ["--values", str(path)]
    for assignment in set_values:
        args += ["--set", assignment]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def objects(manifest: str) -> list[dict[str, Any]]:
    """The objects of a rendered manifest stream, empty documents dropped."""
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def _crd_schemas(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of each CRD version among ``docs``."""
    schemas = {}
    for doc in docs:
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate(docs: list[dict[str, Any]]) -> list[str]:
    """Every problem of every object, as ``Kind/name: message``; empty when all are valid."""
    crds = _crd_schemas(docs)
    problems = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        schema = crds.get(key)
        if schema is None and key[0] == "monitoring.coreos.com/v1":
            schema = MONITORING_SCHEMAS.get(key[1])
        try:
            if schema is not None:
                jsonschema.validate(doc, schema)
            else:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            problems.append(f"{where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{where}: no schema for {key[0]} {key[1]}")
    return problems


def main() -> int:
    failed = False
    for label, values in (("defaults", []), ("all features", [ALL_FEATURES])):
        linted = lint(values)
        print(f"helm lint --strict ({label}): {'ok' if linted.returncode == 0 else 'FAILED'}")
        if linted.returncode:
            print(linted.stdout + linted.stderr)
            failed = True
        rendered = render(values)
        if rendered.returncode:
            print(f"helm template ({label}) FAILED:\n{rendered.stderr}")
            failed = True
            continue
        docs = objects(rendered.stdout)
        problems = validate(docs)
        kinds = sorted({d["kind"] for d in docs})
        print(f"rendered ({label}): {len(docs)} objects ({', '.join(kinds)}); "
              f"{len(problems)} problems")
        for problem in problems:
            print(f"  {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
