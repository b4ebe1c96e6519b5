"""What the Kubernetes API server does with a CRD's schema, reproduced for tests.

The API server (1) refuses non-structural schemas, (2) applies ``default``s, (3) validates
against the OpenAPI v3.0 schema and (4) evaluates ``x-kubernetes-validations`` CEL rules with
each value typed by its schema (``number`` is always a double). No API server runs on these
machines, so tests use this module, built on jsonschema (Draft 4 shares OpenAPI 3.0's boolean
``exclusiveMinimum``) and cel-python.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

Schema = dict[str, Any]

#: Keywords a structural schema may use (apiextensions.k8s.io/v1 JSONSchemaProps, minus the
#: ones that make a schema non-structural in the places we use them).
ALLOWED_KEYWORDS = frozenset({
    "type", "description", "properties", "items", "additionalProperties", "required",
    "enum", "default", "format", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
    "minProperties", "maxProperties", "nullable", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
})


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (``.spec.clients.replicas``, ``[]`` for items)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")
    for branch in schema.get("anyOf", []):
        yield from walk(branch, f"{path}|")


def structural_problems(schema: Schema) -> list[str]:
    """Why the API server would refuse this schema as non-structural; empty when it is fine."""
    problems = []
    for path, node in walk(schema):
        where = path or "<root>"
        if path.endswith("|"):
            if set(node) - {"type"}:
                problems.append(f"{where}: anyOf branches may hold only a type")
            continue
        unknown = set(node) - ALLOWED_KEYWORDS
        if unknown:
            problems.append(f"{where}: keywords the API server refuses: {sorted(unknown)}")
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        if "type" not in node and not int_or_string:
            problems.append(f"{where}: no type")
        if "anyOf" in node and not int_or_string:
            problems.append(f"{where}: anyOf outside x-kubernetes-int-or-string")
        if node.get("additionalProperties") is False:
            problems.append(f"{where}: additionalProperties: false is forbidden")
        if "additionalProperties" in node and "properties" in node:
            problems.append(f"{where}: properties and additionalProperties are exclusive")
        for rule in node.get("x-kubernetes-validations", []):
            try:
                celpy.Environment().compile(rule["rule"])
            except celpy.CELParseError as error:
                problems.append(f"{where}: CEL rule does not parse: {rule['rule']!r}: {error}")
            if not rule.get("message"):
                problems.append(f"{where}: CEL rule without a message")
    return problems


def apply_defaults(schema: Schema, value: Any) -> Any:
    """The object after the API server's defaulting (defaults apply top-down)."""
    if isinstance(value, dict):
        value = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            value = {k: apply_defaults(extra, v) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def schema_errors(schema: Schema, value: Any) -> list[str]:
    """OpenAPI validation errors as ``path: message`` (what ``kubectl apply`` shows)."""
    validator = jsonschema.Draft4Validator(schema)
    return sorted(
        ".".join(str(p) for p in error.absolute_path) + ": " + error.message
        for error in validator.iter_errors(value)
    )


def _typed(schema: Schema, value: Any) -> Any:
    """Give values the CEL type the API server gives them: ``number`` fields are doubles."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: _typed(properties.get(k, extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_typed(schema.get("items", {}), v) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class RuleFailure:
    path: str
    message: str
    field_path: str


def _sum(values: Any) -> Any:
    """Kubernetes' CEL list library ``sum()``, which cel-python lacks."""
    return celpy.celtypes.IntType(sum(int(value) for value in values))


#: Kubernetes' CEL extensions that the CRD's rules use.
KUBERNETES_CEL_FUNCTIONS = {"sum": _sum}


def cel_failures(schema: Schema, value: Any, path: str = "") -> list[RuleFailure]:
    """Every ``x-kubernetes-validations`` rule that ``value`` (already defaulted) breaks."""
    failures = []
    environment = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = environment.program(environment.compile(rule["rule"]),
                                      functions=KUBERNETES_CEL_FUNCTIONS)
        result = program.evaluate({"self": celpy.json_to_cel(_typed(schema, value))})
        if isinstance(result, Exception):
            raise result
        if not bool(result):
            failures.append(RuleFailure(path, rule["message"], rule.get("fieldPath", "")))
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                failures += cel_failures(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{index}]")
    return failures


def admit(schema: Schema, obj: Any) -> list[str]:
    """Everything the API server would say about creating ``obj``; empty when admitted."""
    defaulted = apply_defaults(schema, obj)
    errors = schema_errors(schema, defaulted)
    if errors:  # the API server runs CEL only on schema-valid objects
        return errors
    return [f"{f.path}{f.field_path}: {f.message}" for f in cel_failures(schema, defaulted)]


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields (as
    ``kubectl apply --validate=strict`` refuses them)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) if key in ("properties", "items", "additionalProperties",
                                          "anyOf", "allOf", "oneOf", "not") else value
           for key, value in schema.items()}
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


#: cert-manager's Certificate CRD (cert-manager 1.19, vendored with its source and license).
CERTIFICATE_CRD = Path(__file__).resolve().parent / "fixtures" / "cert-manager" / \
    "certificates.cert-manager.io.yaml"


def cert_manager_certificate_schema() -> Schema:
    """cert-manager.io/v1 Certificate's schema, made strict (see :func:`strict`)."""
    (crd,) = [d for d in yaml.safe_load_all(CERTIFICATE_CRD.read_text()) if d]
    assert crd["metadata"]["name"] == "certificates.cert-manager.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []
    return strict(schema)
