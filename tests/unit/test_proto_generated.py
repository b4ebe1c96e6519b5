"""The committed gRPC code is what ``hack/gen_proto.py`` generates from ``fedkube.proto``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "operator" / "fedkube" / "federation" / "proto"


def test_generated_code_is_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "hack" / "gen_proto.py")
    assert spec and spec.loader
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(tmp_path)
    fresh = tmp_path / "fedkube" / "federation" / "proto"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["fedkube_pb2.py", "fedkube_pb2.pyi", "fedkube_pb2_grpc.py"]
    for name in names:
        assert (GENERATED / name).read_text() == (fresh / name).read_text(), (
            f"{name} is stale: run `python hack/gen_proto.py`")
