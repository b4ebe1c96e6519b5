"""Regenerate the gRPC code of ``fedkube.federation.proto`` from ``fedkube.proto``.

Run from anywhere: ``python hack/gen_proto.py [OUT_DIR]``. The include root is ``operator/``
so that the generated modules import each other as ``fedkube.federation.proto...``.
``OUT_DIR`` (default: ``operator/``) receives ``fedkube/federation/proto/*_pb2*.py[i]``; the
freshness test generates into a temporary directory and compares with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOT = ROOT / "operator"
PROTO = "fedkube/federation/proto/fedkube.proto"


def generate(out_dir: Path) -> None:
    """Write ``fedkube_pb2.py``, ``fedkube_pb2.pyi`` and ``fedkube_pb2_grpc.py`` under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grpc_include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main([
        "grpc_tools.protoc",
        f"-I{SOURCE_ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(SOURCE_ROOT / PROTO),
    ])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_ROOT)
