"""Side-by-side benchmark: fedkube's torch strategies against Flower's numpy aggregation.

Run by ``make bench``. The same client updates (saved once as .npy) are aggregated by
fedkube (``.venv``) and by Flower's ``flwr.server.strategy.aggregate`` (``.venv-bench``: its
protobuf pin conflicts with ours), each measurement in a fresh single-threaded subprocess.
Printed are ratios, fedkube / Flower, of the best wall time and of the extra peak RSS that
the aggregation needs on top of the loaded inputs. Then FedAvg's whole-process peak RSS when
50 rather than 5 updates of a ~50 MB model stream through one round, and a median round whose
stack of updates is larger than ``aggregator.stackMemory``: kept in memory, or memory-mapped
from a file (time, and the process's anonymous memory once the stack is full).

This file must import without torch or fedkube: the Flower side runs it too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STRATEGIES = ("fedavg", "fedmedian", "trimmedmean", "krum")
TRIM, BYZANTINE = 0.2, 2
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _layer_shapes(parameters: int) -> list[tuple[int, ...]]:
    """A few dense layers with about ``parameters`` values in all."""
    width = int((parameters / 3) ** 0.5)
    return [(width, width), (width,), (2 * width, width), (2 * width,)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: that one survives fork and exec, so a worker would
    # report its parent's peak (the parent generates all clients' inputs).
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _load(folder: Path) -> tuple[np.ndarray, list[list[np.ndarray]], list[int]]:
    """The global model's layers, each client's layers, and its example counts."""
    shapes = [tuple(s) for s in json.loads((folder / "shapes.json").read_text())]
    rows = np.load(folder / "updates.npy")
    examples = json.loads((folder / "examples.json").read_text())

    def layers(row: np.ndarray) -> list[np.ndarray]:
        sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
        return [part.reshape(s) for part, s in zip(np.split(row, sizes), shapes, strict=True)]

    return layers(rows[0]), [layers(row) for row in rows[1:]], examples


def _flower(strategy: str, glob: list, clients: list, examples: list) -> object:
    from flwr.server.strategy import aggregate as fl

    results = list(zip(clients, examples, strict=True))
    if strategy == "fedavg":
        return fl.aggregate(results)
    if strategy == "fedmedian":
        return fl.aggregate_median(results)
    if strategy == "trimmedmean":
        return fl.aggregate_trimmed_avg(results, TRIM)
    return fl.aggregate_krum(results, BYZANTINE, to_keep=0)


def _fedkube(strategy: str, glob: list, clients: list, examples: list) -> object:
    import torch

    from fedkube.federation.strategies import build_strategy

    def state(layers: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {f"layer{i}": torch.from_numpy(a) for i, a in enumerate(layers)}

    params = {"trim_fraction": TRIM, "byzantine_clients": BYZANTINE}
    agg = build_strategy(strategy, **params).new_round(state(glob), len(clients))
    for layers, n in zip(clients, examples, strict=True):
        agg.add(state(layers), n)
    return agg.result()


def worker(impl: str, strategy: str, folder: Path, repeats: int) -> dict[str, float]:
    """Time one implementation on the saved inputs; report best time and extra peak RSS."""
    if impl == "fedkube":
        import torch

        torch.set_num_threads(1)
    run = _fedkube if impl == "fedkube" else _flower
    glob, clients, examples = _load(folder)
    run(strategy, glob, [clients[0]], examples[:1])  # imports and first-call costs
    before = _rss_mb()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(strategy, glob, clients, examples)
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "extra_rss_mb": max(_peak_rss_mb() - before, 0.0)}


def streaming_peak(clients: int, parameters: int) -> dict[str, float]:
    """Peak RSS of a process folding ``clients`` FedAvg updates that arrive one at a time."""
    import torch

    from fedkube.federation.strategies import build_strategy

    torch.set_num_threads(1)
    glob = {"w": torch.zeros(parameters)}
    agg = build_strategy("fedavg").new_round(glob, clients)
    generator = torch.Generator().manual_seed(0)
    for _ in range(clients):
        # Like a gRPC stream: one update exists at a time, then it is dropped.
        agg.add({"w": torch.randn(parameters, generator=generator)}, 10)
    agg.result()
    return {"peak_rss_mb": _peak_rss_mb()}


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def stack_round(clients: int, parameters: int, limit: int | None) -> dict[str, float]:
    """A median round of ``clients`` streamed updates with the stack limited to ``limit``."""
    import torch

    from fedkube.federation.strategies import build_strategy

    torch.set_num_threads(1)
    glob = {"w": torch.zeros(parameters)}
    update = {"w": torch.randn(parameters, generator=torch.Generator().manual_seed(0))}
    start = time.perf_counter()
    agg = build_strategy("fedmedian", stack_memory_bytes=limit).new_round(glob, clients)
    for i in range(clients):
        update["w"].add_(float(i))  # each update differs; only one exists at a time
        agg.add(update, 10)
    full = _rss_anon_mb()
    agg.result()
    return {"seconds": time.perf_counter() - start, "anon_mb": full}


def _subprocess(python: str, *args: str) -> dict[str, float]:
    env = {**os.environ, **ONE_THREAD}
    done = subprocess.run(
        [python, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{python} {' '.join(args)} failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(arguments: argparse.Namespace) -> None:
    shapes = _layer_shapes(arguments.parameters)
    total = sum(int(np.prod(s)) for s in shapes)
    print(f"model: {total / 1e6:.1f}M float32 parameters in {len(shapes)} tensors; "
          "one thread per side; ratio = fedkube / flower (below 1: fedkube is better)")
    print(f"{'strategy':<12} {'clients':>7} {'fedkube s':>10} {'flower s':>9} {'time':>6} "
          f"{'fedkube MB':>10} {'flower MB':>9} {'memory':>7}")
    rng = np.random.default_rng(0)
    for clients in arguments.clients:
        with tempfile.TemporaryDirectory(prefix="fedkube-bench-") as tmp:
            folder = Path(tmp)
            rows = rng.normal(0, 1, (clients + 1, total)).astype(np.float32)
            np.save(folder / "updates.npy", rows)
            del rows
            (folder / "shapes.json").write_text(json.dumps(shapes))
            examples = [int(n) for n in rng.integers(50, 500, clients)]
            (folder / "examples.json").write_text(json.dumps(examples))
            for strategy in STRATEGIES:
                common = (strategy, str(folder), str(arguments.repeats))
                ours = _subprocess(sys.executable, "--worker", "fedkube", *common)
                theirs = _subprocess(arguments.flower_python, "--worker", "flower", *common)
                print(
                    f"{strategy:<12} {clients:>7} {ours['seconds']:>10.3f} "
                    f"{theirs['seconds']:>9.3f} {ours['seconds'] / theirs['seconds']:>6.2f} "
                    f"{ours['extra_rss_mb']:>10.0f} {theirs['extra_rss_mb']:>9.0f} "
                    f"{ours['extra_rss_mb'] / max(theirs['extra_rss_mb'], 1.0):>7.2f}",
                    flush=True,
                )
    size = str(arguments.stream_parameters)
    few = _subprocess(sys.executable, "--stream", "5", size)["peak_rss_mb"]
    many = _subprocess(sys.executable, "--stream", "50", size)["peak_rss_mb"]
    print(f"FedAvg streaming, {arguments.stream_parameters * 4 / 2**20:.0f} MB model: peak RSS "
          f"{few:.0f} MB with 5 clients, {many:.0f} MB with 50: ratio {many / few:.3f}")
    clients, parameters = 20, arguments.stack_parameters
    limit = 256 << 20
    kept = _subprocess(sys.executable, "--stack", str(clients), str(parameters), "0")
    mapped = _subprocess(sys.executable, "--stack", str(clients), str(parameters), str(limit))
    print(f"fedmedian, {clients} clients x {parameters / 1e6:.0f}M parameters "
          f"({clients * parameters * 4 / 2**20:.0f} MB stack): in memory {kept['seconds']:.1f} s, "
          f"anonymous RSS {kept['anon_mb']:.0f} MB; mapped from a file (stackMemory "
          f"{limit >> 20} MiB) {mapped['seconds']:.1f} s, anonymous RSS "
          f"{mapped['anon_mb']:.0f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        impl, strategy, folder, repeats = sys.argv[2:6]
        print(json.dumps(worker(impl, strategy, Path(folder), int(repeats))))
    elif sys.argv[1:2] == ["--stack"]:
        clients, parameters, limit = map(int, sys.argv[2:5])
        print(json.dumps(stack_round(clients, parameters, limit or None)))
    elif sys.argv[1:2] == ["--stream"]:
        print(json.dumps(streaming_peak(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--flower-python", default=".venv-bench/bin/python")
        parser.add_argument("--clients", type=int, nargs="+", default=[10, 40])
        parser.add_argument("--parameters", type=int, default=2_000_000)
        parser.add_argument("--stream-parameters", type=int, default=12_500_000)
        parser.add_argument("--stack-parameters", type=int, default=10_000_000)
        parser.add_argument("--repeats", type=int, default=2)
        main(parser.parse_args())
