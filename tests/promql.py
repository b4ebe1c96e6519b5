"""What the dashboard tests need from PromQL: the metric names an expression selects.

No maintained PromQL parser exists for Python, and the full grammar is not needed: a metric
name is an identifier that is not a function or aggregation (those are followed by ``(``), not
a keyword, and not inside a label matcher ``{...}``, a range ``[...]``, a string, or a grouping
clause (``by (...)``, ``on (...)``...). The e2e tests then run every expression through a real
Prometheus, which catches whatever this reading would miss.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>(?:[0-9]+(?:ms|s|m|h|d|w|y))+\b)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<number>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)
  | (?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
  | (?P<punct>[(){},@]|[-+*/%^]|=~|!~|[=!<>]=?)
  | (?P<space>\s+)
""", re.VERBOSE)

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan", "atan2"})
# Keywords whose parenthesised list holds label names, not expressions.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {position}: {expr[position:position + 20]!r}"
                             f" in {expr!r}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            yield kind, match.group()


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, e.g. ``{"fedkube_round"}`` for
    ``max(fedkube_round{job="$job"})``."""
    tokens = list(_tokens(expr))
    names: set[str] = set()
    braces = 0  # inside a label matcher
    label_list_depth: int | None = None  # paren depth of a `by (...)`-style list
    depth = 0
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
            if label_list_depth is not None and depth < label_list_depth:
                label_list_depth = None
        elif text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif kind == "ident" and not braces and label_list_depth is None:
            lowered = text.lower()
            if lowered in _LABEL_LISTS:
                if following == "(":
                    label_list_depth = depth + 1
            # A function or aggregation: `rate(`, `sum(`, `sum by (`.
            elif lowered not in _KEYWORDS and following.lower() not in {"(", "by", "without"}:
                names.add(text)
    return names


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    """(panel title, expression) of every query target of every panel of a dashboard file."""
    board: dict[str, Any] = json.loads(path.read_text())
    return [(panel["title"], target["expr"])
            for panel in board["panels"] for target in panel.get("targets", [])]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's template variables replaced, e.g. ``$job`` and ``$__rate_interval``."""
    # Longest names first, so that `$job` does not eat the start of `$jobs`.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    return expr
