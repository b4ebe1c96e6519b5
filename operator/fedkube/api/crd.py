"""Generate the FederatedJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema (draft 2020-12, with ``$ref``); the API server wants an
OpenAPI v3.0 *structural* schema: every node typed, everything inlined, no ``const``,
``additionalProperties: false`` or nullable unions. This module does that translation and
nothing else, so the models stay the single source of truth.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from fedkube.api.constants import (
    CATEGORIES,
    CRD_NAME,
    GROUP,
    KIND,
    LIST_KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from fedkube.api.resource import FederatedJob

Schema = dict[str, Any]

#: JSON Schema keywords that carry no meaning for the API server, or that it refuses.
_DROPPED_KEYS = frozenset({"title", "$defs", "const", "discriminator"})

PRINTER_COLUMNS: list[dict[str, str]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Pending, Running, Succeeded, Failed or Suspended"},
    {"name": "Round", "type": "integer", "jsonPath": ".status.round",
     "description": "Rounds completed"},
    {"name": "Clients", "type": "integer", "jsonPath": ".status.clients.ready",
     "description": "Client pods ready"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.metrics.accuracy",
     "description": "Accuracy of the global model after the latest round"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _plain_description(text: str) -> str:
    """Docstring markup (``code``) reads badly in ``kubectl explain``; keep plain quotes."""
    return re.sub(r"``([^`]+)``", r"'\1'", " ".join(text.split()))


class _Translator:
    def __init__(self, definitions: dict[str, Schema]) -> None:
        self._definitions = definitions

    def node(self, schema: Schema, *, with_defaults: bool) -> Schema:
        schema = self._resolve(schema)
        out: Schema = {}
        for key, value in schema.items():
            if key in _DROPPED_KEYS:
                continue
            if key == "description":
                out[key] = _plain_description(value)
            elif key == "properties":
                out[key] = {
                    name: self.node(sub, with_defaults=with_defaults) for name, sub in value.items()
                }
            elif key in ("items", "additionalProperties"):
                if value is False:
                    continue  # pruning drops unknown fields; "false" itself is forbidden
                out[key] = self.node(value, with_defaults=with_defaults)
            elif key == "anyOf":
                out[key] = [self.node(branch, with_defaults=with_defaults) for branch in value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                # JSON Schema 2020 gives the bound; OpenAPI 3.0 wants the bound plus a flag.
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            elif key == "default":
                if with_defaults and value is not None:
                    out[key] = value
            else:
                out[key] = value
        if "const" in schema:
            out["enum"] = [schema["const"]]
        if with_defaults and "properties" in out:
            required = set(out.get("required", ()))
            for name, prop in out["properties"].items():
                # An empty object default lets the API server fill in nested defaults.
                if (name not in required and prop.get("type") == "object"
                        and "properties" in prop and not prop.get("required")
                        and "default" not in prop):
                    prop["default"] = {}
        return out

    def _resolve(self, schema: Schema) -> Schema:
        """Inline ``$ref`` and single-branch ``allOf``; turn ``X | None`` into ``X``."""
        schema = dict(schema)
        if "$ref" in schema:
            target = self._definitions[schema.pop("$ref").rsplit("/", 1)[-1]]
            schema = {**copy.deepcopy(target), **schema}
            return self._resolve(schema)
        if "allOf" in schema and len(schema["allOf"]) == 1:
            (only,) = schema.pop("allOf")
            return self._resolve({**only, **schema})
        if "anyOf" in schema:
            branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
            if len(branches) != len(schema["anyOf"]):
                del schema["anyOf"]
                if len(branches) == 1:
                    return self._resolve({**branches[0], **schema})
                schema["anyOf"] = branches
        return schema


def openapi_schema() -> Schema:
    """The structural ``openAPIV3Schema`` of FederatedJob."""
    source = FederatedJob.model_json_schema(by_alias=True, mode="validation")
    translator = _Translator(source.get("$defs", {}))
    properties = source["properties"]
    return {
        "type": "object",
        "description": _plain_description(source["description"]),
        "properties": {
            "apiVersion": {"type": "string", "description": "fedkube.io/v1alpha1"},
            "kind": {"type": "string", "description": "FederatedJob"},
            "metadata": {"type": "object"},
            "spec": {**translator.node(properties["spec"], with_defaults=True), "default": {}},
            "status": translator.node(properties["status"], with_defaults=False),
        },
        "x-kubernetes-validations": source["x-kubernetes-validations"],
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "fedkube", "app.kubernetes.io/part-of": "fedkube"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": LIST_KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML committed under ``crds/``."""
    header = "# Generated by `fedkube crd` from fedkube.api; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
