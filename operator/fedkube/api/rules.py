"""Cross-field rules, declared once and enforced twice.

Each rule holds a Python predicate (checked by the pydantic models, so ``fedkube validate``
and the operator reject bad specs) and the same rule in CEL (emitted into the CRD as
``x-kubernetes-validations``, so the API server rejects them too). A test evaluates both
on generated specs and requires them to agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """One cross-field invariant of a model.

    ``field_path`` points, relative to the model, at the field a user should change; the API
    server reports it and ``fedkube validate`` prints it.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str

    def to_crd(self) -> dict[str, str]:
        """The ``x-kubernetes-validations`` entry for this rule."""
        return {"rule": self.cel, "message": self.message, "fieldPath": self.field_path}
