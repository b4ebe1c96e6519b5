"""The operator imports and starts its CLI without torch (its image does not ship it)."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "


def test_operator_modules_import_without_torch() -> None:
    code = BLOCK_TORCH + (
        "import fedkube.controller.handlers, fedkube.controller.operator, "
        "fedkube.controller.render, fedkube.cli; "
        "assert sys.modules['torch'] is None")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_operator_and_render_commands_run_without_torch() -> None:
    code = BLOCK_TORCH + ("from fedkube.cli import main; "
                          "main(['operator', '--help'], standalone_mode=False); "
                          "main(['render', 'crds/samples/minimal.yaml'], standalone_mode=False)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "--namespace" in out and "kind: Pod" in out
