"""Process setup shared by ``fedkube aggregator`` and ``fedkube client``: logging, threads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

#: Set by ``fedkube run`` so that several processes share few cores without oversubscribing.
THREADS_ENV = "FEDKUBE_TORCH_THREADS"


def _setup(role: str) -> None:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {role} %(levelname)s %(message)s")
    import torch

    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
        torch.set_num_interop_threads(1)


def run_aggregator(config_path: Path) -> int:
    from fedkube.api.runtime import RuntimeConfig

    _setup("aggregator")
    from fedkube.federation.aggregator import serve

    return serve(RuntimeConfig.from_file(config_path))


def run_client(config_path: Path, index: int) -> int:
    from fedkube.api.runtime import RuntimeConfig

    _setup(f"client-{index}")
    from fedkube.federation.client import serve

    return serve(RuntimeConfig.from_file(config_path), index)
