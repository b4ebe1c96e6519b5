"""Fixtures of the chart tests: the scripts of hack/ (not a package) loaded as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_hack(name: str) -> ModuleType:
    """Import ``hack/<name>.py`` as module ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "hack"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "hack" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def chart() -> ModuleType:
    """hack/check_chart.py, with helm installed (from PyPI into .tools/bin) if missing."""
    module = load_hack("check_chart")
    module.helm()
    return module


@pytest.fixture(scope="session")
def gen_dashboards() -> ModuleType:
    return load_hack("gen_dashboards")
