"""Offline validation of FederatedJob manifests, with messages a user can act on.

Every problem names the file, the line, the field path as written in YAML
(``spec.clients.replicas``), what is wrong, and how to fix it. Unknown fields are errors,
because the API server would silently prune them.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedkube.api.constants import API_VERSION, GROUP, KIND
from fedkube.api.resource import FederatedJob

Location = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one document."""

    file: str
    """The file the problem is in."""

    line: int | None
    """1-based line of the offending field, when known."""

    path: str
    """Field path as written in YAML, e.g. ``spec.strategy.minClients``."""

    message: str
    """What is wrong."""

    hint: str = ""
    """How to fix it, when there is more to say than the message."""

    @property
    def source(self) -> str:
        """``file:line``, or just ``file`` when the line is unknown."""
        return f"{self.file}:{self.line}" if self.line else self.file

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}" + (f" ({self.hint})" if self.hint else "")


class InvalidJobError(ValueError):
    """Raised by :func:`load_jobs` when a manifest has problems; carries all of them."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def format_path(location: Location) -> str:
    """``("spec", "env", 0, "name")`` -> ``spec.env[0].name``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif "." in part or "/" in part:
            text += f"['{part}']"
        else:
            text += f".{part}" if text else part
    return text


def _field_names_at(location: Location) -> list[str]:
    """The field names (aliases) the model accepts at ``location``, for typo hints."""
    annotation: Any = FederatedJob
    for part in location:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for name, f in annotation.model_fields.items() if part in (name, f.alias)), None
            )
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or name for name, f in annotation.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _unwrap(options[0])
    return annotation


def _hint(error: Any, location: Location) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _field_names_at(location[:-1])
        close = difflib.get_close_matches(str(location[-1]), known, n=1, cutoff=0.6)
        if close:
            return f"did you mean '{close[0]}'?"
        return "known fields: " + ", ".join(known) if known else "remove it"
    if kind == "missing":
        return "add this required field"
    return ""


def _line_of(node: yaml.Node | None, location: Location) -> int | None:
    """1-based line of the deepest YAML node along ``location``."""
    line = None
    for part in location:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
            if node is None:  # an unknown key: point at the key itself
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            break
    return node.start_mark.line + 1 if node is not None else line


def validate_document(document: Any, source: str = "<input>",
                      node: yaml.Node | None = None) -> list[Problem]:
    """Every problem of one parsed manifest (empty when it is a valid FederatedJob)."""
    if not isinstance(document, dict):
        return [Problem(source, None, "", "expected a FederatedJob object (a YAML mapping)")]
    try:
        FederatedJob.model_validate(document)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location: Location = tuple(item["loc"])
            if item["type"] == "cross_field":
                extra = item.get("ctx", {}).get("field_path", "")
                path = format_path(location) + extra
            else:
                path = format_path(location)
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(
                Problem(source, _line_of(node, location), path, message, _hint(item, location))
            )
        return sorted(problems, key=lambda p: p.line or 0)
    return []


def _documents(path: Path) -> Iterator[tuple[Any, yaml.Node | None, int]]:
    text = path.read_text()
    nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    documents = list(yaml.safe_load_all(text))
    for index, (document, node) in enumerate(zip(documents, nodes, strict=True)):
        if document is not None:
            yield document, node, index


def is_federated_job(document: Any) -> bool:
    """Whether a manifest claims to be a FederatedJob (or anything in fedkube's group)."""
    if not isinstance(document, dict):
        return False
    api_version = str(document.get("apiVersion", ""))
    return document.get("kind") == KIND or api_version.split("/")[0] == GROUP


def validate_file(path: Path) -> tuple[list[Problem], int]:
    """Problems of every FederatedJob in a YAML file, and how many jobs it holds.

    Documents of other kinds are not FederatedJobs and are not checked.
    """
    try:
        documents = list(_documents(path))
    except OSError as error:
        return [Problem(str(path), None, "", f"cannot read: {error.strerror}")], 0
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else None
        message = f"not valid YAML: {getattr(error, 'problem', error)}"
        return [Problem(str(path), line, "", message)], 0
    problems: list[Problem] = []
    jobs = 0
    for document, node, _ in documents:
        if not is_federated_job(document):
            continue
        jobs += 1
        problems += validate_document(document, str(path), node)
    if not documents:
        problems.append(Problem(str(path), None, "", f"no {KIND} found ({API_VERSION})"))
    return problems, jobs


def load_jobs(path: Path) -> list[FederatedJob]:
    """The FederatedJobs in a YAML file; :class:`InvalidJobError` lists every problem."""
    problems, count = validate_file(path)
    if problems:
        raise InvalidJobError(problems)
    if count == 0:
        raise InvalidJobError([Problem(str(path), None, "", f"no {KIND} found in the file")])
    return [FederatedJob.model_validate(d) for d, _, _ in _documents(path) if is_federated_job(d)]
