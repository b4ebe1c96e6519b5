"""Process setup shared by ``fedkube aggregator`` and ``fedkube client``: logging, threads,
and the exit code of a configuration that cannot work."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

from fedkube.api.runtime import EXIT_INVALID_CONFIGURATION, ConfigurationError, RuntimeConfig

#: Set by ``fedkube run`` so that several processes share few cores without oversubscribing.
THREADS_ENV = "FEDKUBE_TORCH_THREADS"
#: Where Kubernetes reads a container's termination message (``terminationMessagePath``'s
#: default). The kubelet mounts it, so it exists only in a pod.
TERMINATION_LOG = Path("/dev/termination-log")


def _setup(role: str) -> None:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {role} %(levelname)s %(message)s")
    import torch

    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
        torch.set_num_interop_threads(1)


def _run(role: str, main: Callable[[], int]) -> int:
    """``main()``. A configuration error becomes one log line, the pod's termination message
    and :data:`EXIT_INVALID_CONFIGURATION`, not a traceback."""
    _setup(role)
    try:
        return main()
    except ConfigurationError as error:
        logging.getLogger(f"fedkube.{role}").error("invalid configuration: %s", error)
        if TERMINATION_LOG.exists():
            TERMINATION_LOG.write_text(f"invalid configuration: {error}\n")
        return EXIT_INVALID_CONFIGURATION


def _one_malloc_arena() -> None:
    """Keep glibc's allocator to one arena. gRPC's threads allocate message buffers in arenas
    of their own, and chunks freed by the event loop then fragment them: the aggregator's peak
    RSS varied by a quarter from run to run with the interleaving of uploads (one arena is
    also faster here). A no-op on other C libraries."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, 1)


def run_aggregator(config_path: Path) -> int:
    from fedkube.federation.aggregator import serve

    _one_malloc_arena()

    return _run("aggregator", lambda: serve(RuntimeConfig.from_file(config_path), config_path))


def run_client(config_path: Path, index: int, data_dir: Path | None = None,
               tls_dir: Path | None = None) -> int:
    from fedkube.federation.client import serve

    return _run(f"client-{index}", lambda: serve(RuntimeConfig.from_file(config_path), index,
                                                 data_dir, tls_dir))


def run_bundle_client(bundle_path: Path, replica: int, data_dir: Path | None) -> int:
    """A site outside the cluster: its join bundle instead of the job's configuration."""
    from fedkube.bundle import Bundle
    from fedkube.federation.client import serve_bundle

    return _run(f"client-{replica}", lambda: serve_bundle(Bundle.read(bundle_path), replica,
                                                          data_dir))
