"""The cost of folding one update, side by side: fedkube from the wire and in memory, a plain
fused torch loop, and Flower's ``aggregate``, on the same data, one thread each.

Run by ``make bench``. Per model size (10M and 100M float32 parameters by default, in four
tensors), with the updates already in memory:

- ``torch loop``: ``acc.add_(x, alpha=w)`` per update, the bound a FedAvg fold can reach (12
  bytes moved per parameter: read the update, read and write the accumulator);
- ``in memory``: fedkube's ``Round.add`` of a state dict (checks the update for NaN, then
  folds: 16 bytes per parameter);
- ``from bytes``: what the aggregator does with a received update: every chunk as gRPC hands
  it over (a serialized ``UpdateChunk``, as large as the job's default cuts them) decoded to
  tensor views without a copy, checked, then folded (16 bytes per parameter plus the
  decoding);
- ``flower``: ``flwr.server.strategy.aggregate.aggregate`` over all clients' numpy arrays,
  divided by the number of clients (in the bench virtualenv), at the sizes where the inputs
  fit in memory.

Each figure is the best of a few repetitions, in seconds per update; ratios are printed
against the torch loop and against Flower. The torch loop's and fedkube's accumulators are
allocated before the clock starts (a round opens once, not per update); Flower's
``aggregate`` allocates its own, which its every caller pays. The received chunks are
allocated before the clock starts and freed after it stops: both are gRPC's part (freeing a
10M-parameter update's chunks costs about 1 ms, which the aggregator pays too).

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

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
#: Flower's aggregate keeps every client's arrays plus its own copies: beyond this many
#: parameters times clients it is not run.
FLOWER_LIMIT = 400_000_000
#: Parameters times clients held at once (the updates, and their serialized chunks): fewer
#: clients at the larger sizes.
MEMORY_PARAMETERS = 500_000_000


def _shapes(parameters: int) -> list[tuple[int, ...]]:
    width = int((parameters / 3) ** 0.5)
    return [(width, width), (width,), (2 * width, width), (2 * width,)]


def _inputs(folder: Path) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[int]]:
    shapes = [tuple(s) for s in json.loads((folder / "shapes.json").read_text())]
    rows = np.load(folder / "rows.npy", mmap_mode="r")
    sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]

    def layers(row: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(part).reshape(s)
                for part, s in zip(np.split(row, sizes), shapes, strict=True)]

    examples = json.loads((folder / "examples.json").read_text())
    return layers(rows[0]), [layers(row) for row in rows[1:]], examples


def _best(repeats: int, run: object) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def fedkube_worker(folder: Path, repeats: int) -> dict[str, float]:
    import torch

    from fedkube.api import TransportSpec
    from fedkube.federation import protocol, transport
    from fedkube.federation.proto import fedkube_pb2 as pb
    from fedkube.federation.strategies import build_strategy

    torch.set_num_threads(1)
    glob_layers, client_layers, examples = _inputs(folder)

    def state(layers: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {f"layer{i}": torch.from_numpy(a) for i, a in enumerate(layers)}

    glob = state(glob_layers)
    updates = [state(layers) for layers in client_layers]
    clients = len(updates)
    chunk_bytes = TransportSpec().chunk_size(transport.encoded_nbytes(glob))
    messages = [[protocol.data_message(view)
                 for view in transport.chunk_views(update, chunk_bytes)] for update in updates]
    metas = transport.manifest(glob)
    strategy = build_strategy("fedavg")

    # Each side's accumulator is allocated before its clock starts (a round opens once):
    # timed with the loop, allocating and faulting in its 40 MB added ~40% to the loop's
    # figure per 10M update, and made fedkube look that much closer to it.
    def torch_loop() -> float:
        accumulator = torch.zeros(sum(t.numel() for t in glob.values()))
        start = time.perf_counter()
        for update, weight in zip(updates, examples, strict=True):
            offset = 0
            for tensor in update.values():
                accumulator[offset:offset + tensor.numel()].add_(tensor.reshape(-1),
                                                                 alpha=weight)
                offset += tensor.numel()
        return time.perf_counter() - start

    def in_memory() -> float:
        aggregation = strategy.new_round(glob, clients)
        start = time.perf_counter()
        for update, weight in zip(updates, examples, strict=True):
            aggregation.add(update, weight)
        return time.perf_counter() - start

    def from_bytes() -> float:
        """Seconds spent on the update, not on gRPC's part: each chunk is copied first, as
        gRPC's receive makes a fresh bytes object that the aggregator then reads hot, and the
        chunks are freed after the clock stops, as their allocation was before it."""
        aggregation = strategy.new_round(glob, clients)
        spent = 0.0
        for chunks, weight in zip(messages, examples, strict=True):
            reader = aggregation.reader(metas)
            for raw in chunks:
                received = bytes(bytearray(raw))
                start = time.perf_counter()
                data = protocol.decode_chunk(received, pb.UpdateHeader)
                assert isinstance(data, memoryview)
                reader.feed(data)
                spent += time.perf_counter() - start
            del received, data
            start = time.perf_counter()
            with reader.finish() as update:
                aggregation.accept(update, weight)
            spent += time.perf_counter() - start
            del update, reader
        return spent

    return {name: min(run() for _ in range(repeats)) / clients for name, run in (
        ("torch loop", torch_loop), ("in memory", in_memory), ("from bytes", from_bytes))}


def flower_worker(folder: Path, repeats: int) -> dict[str, float]:
    from flwr.server.strategy.aggregate import aggregate

    _, client_layers, examples = _inputs(folder)
    results = list(zip(client_layers, examples, strict=True))
    return {"flower": _best(repeats, lambda: aggregate(results)) / len(results)}


def _run(python: str, role: str, folder: Path, repeats: int) -> dict[str, float]:
    done = subprocess.run([python, __file__, "--worker", role, str(folder), str(repeats)],
                          env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{role} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(arguments: argparse.Namespace) -> int:
    print("FedAvg fold, seconds per update, one thread per side; from bytes: in the chunks the "
          "aggregator receives (a 64th of the model)")
    print(f"{'parameters':>10} {'clients':>7} {'torch loop':>10} {'in memory':>10} "
          f"{'from bytes':>10} {'flower':>9} {'bytes/loop':>10} {'flower/bytes':>12}")
    worst = 0.0
    rng = np.random.default_rng(0)
    for parameters in arguments.parameters:
        shapes = _shapes(parameters)
        total = sum(int(np.prod(s)) for s in shapes)
        clients = min(arguments.clients, max(2, MEMORY_PARAMETERS // total))
        with tempfile.TemporaryDirectory(prefix="fedkube-fold-") as tmp:
            folder = Path(tmp)
            rows = np.lib.format.open_memmap(folder / "rows.npy", mode="w+", dtype=np.float32,
                                             shape=(clients + 1, total))
            for row in rows:
                row[:] = rng.standard_normal(total, dtype=np.float32)
            rows.flush()
            del rows
            (folder / "shapes.json").write_text(json.dumps(shapes))
            examples = [int(n) for n in rng.integers(50, 500, clients)]
            (folder / "examples.json").write_text(json.dumps(examples))
            ours = _run(sys.executable, "fedkube", folder, arguments.repeats)
            theirs = (_run(arguments.flower_python, "flower", folder, arguments.repeats)
                      if arguments.flower_python and total * clients <= FLOWER_LIMIT else {})
        loop, memory, wire = ours["torch loop"], ours["in memory"], ours["from bytes"]
        flower = theirs.get("flower")
        ratio = wire / loop
        worst = max(worst, ratio)
        flower_text = f"{flower:.4f}" if flower else "-"
        versus = f"{flower / wire:.2f}" if flower else "-"
        print(f"{total / 1e6:>9.0f}M {clients:>7} {loop:>10.4f} {memory:>10.4f} {wire:>10.4f} "
              f"{flower_text:>9} {ratio:>10.2f} {versus:>12}", flush=True)
    print(f"worst from bytes / torch loop: {worst:.2f} (target 1.3)")
    return 0 if worst <= arguments.limit else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        role, folder, repeats = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        worker = fedkube_worker if role == "fedkube" else flower_worker
        print(json.dumps(worker(folder, repeats)))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--flower-python", default=".venv-bench/bin/python",
                            help="the bench virtualenv's python; '' to measure fedkube alone")
        parser.add_argument("--parameters", type=int, nargs="+",
                            default=[10_000_000, 100_000_000])
        parser.add_argument("--clients", type=int, default=20)
        parser.add_argument("--repeats", type=int, default=2)
        parser.add_argument("--limit", type=float, default=1.3,
                            help="exit 1 when from bytes / torch loop exceeds this")
        sys.exit(main(parser.parse_args()))
