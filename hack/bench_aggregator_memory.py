"""Aggregator peak memory (RSS) for FedAvg with 50 clients vs 5 clients, side by side.

FedAvg folds each update into one preallocated accumulator as it arrives and receives
updates one at a time into one buffer, so the aggregator's memory must not grow with the
number of clients. This runs a real aggregator process twice on a ~34 MB model, driven by
lightweight in-process gRPC clients (threads of this process that pull the global model and
push it back perturbed), and compares the aggregator's peak RSS (VmHWM). Prints the ratio;
exits 1 when 50 clients need more than 10% over 5 clients.

    python hack/bench_aggregator_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from runtime_support import ENV, make_config, status, wait_for  # noqa: E402

from fedkube.api.runtime import RuntimeConfig  # noqa: E402
from fedkube.federation import protocol, transport  # noqa: E402
from fedkube.federation.proto import fedkube_pb2 as pb  # noqa: E402
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc  # noqa: E402
from fedkube.tasks.base import EvalResult, TrainResult  # noqa: E402

ROUNDS = 3
TOLERANCE = 0.10


class WideTask:
    """A 34 MB linear model; evaluation is a cheap norm so the bench measures aggregation."""

    def model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(2048, 4096)

    def client_data(self, *args: Any) -> None:
        return None

    def train(self, *args: Any, **kwargs: Any) -> TrainResult:
        raise NotImplementedError("the bench's clients are driven in-process")

    def evaluate(self, model: torch.nn.Module, config: Mapping[str, Any], *,
                 device: torch.device) -> EvalResult:
        loss = float(sum(p.detach().float().norm() for p in model.parameters()))
        return EvalResult(loss=loss, accuracy=0.5, num_examples=1)


task = WideTask()


def drive_client(config: Path, index: int) -> None:
    """Join, then pull and push back until the aggregator says the job is finished."""
    runtime = RuntimeConfig.from_file(config)
    token = Path(runtime.token_file or "").read_text()
    chunk = runtime.spec.transport.chunk_bytes
    with grpc.insecure_channel(runtime.aggregator_address,
                               options=[*protocol.channel_options(chunk),
                                        ("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.FederationStub(channel)
        reply = stub.Join(pb.JoinRequest(token=token, index=index), wait_for_ready=True)
        metadata = protocol.auth_metadata(token, reply.client_id)
        while True:
            stream = stub.PullTask(pb.PullTaskRequest(wait_seconds=5), metadata=metadata)
            header = next(stream).header
            if header.action == pb.TaskHeader.FINISHED:
                return
            if header.action != pb.TaskHeader.TRAIN:
                continue
            metas = protocol.from_specs(header.tensors)
            state = transport.assemble(metas, protocol.data_chunks(stream))
            for tensor in state.values():
                tensor.add_(0.001 * (index + 1))

            def messages(round_: int = header.round,
                         state: dict[str, torch.Tensor] = state) -> Iterator[pb.UpdateChunk]:
                yield pb.UpdateChunk(header=pb.UpdateHeader(
                    round=round_, num_examples=10 + index,
                    tensors=protocol.to_specs(transport.manifest(state))))
                for data in transport.iter_chunks(state, chunk):
                    yield pb.UpdateChunk(data=data)

            stub.PushUpdate(messages(), metadata=metadata)
            del state


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc")


def measure(clients: int) -> int:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        config = make_config(tmp, rounds=ROUNDS, clients=clients, min_clients=clients,
                             timeout=300, task_config={})
        text = config.read_text().replace("fedkube.tasks.digits:task",
                                          "bench_aggregator_memory:task")
        config.write_text(text)
        env = ENV | {"PYTHONPATH": os.pathsep.join([str(ROOT / "hack"),
                                                    ENV.get("PYTHONPATH", "")])}
        with (tmp / "aggregator.log").open("wb") as log:
            aggregator = subprocess.Popen(
                [sys.executable, "-m", "fedkube.cli", "aggregator", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            threads = [threading.Thread(target=drive_client, args=(config, i), daemon=True)
                       for i in range(clients)]
            for thread in threads:
                thread.start()
            wait_for(lambda: status(config)["round"] >= ROUNDS, 600, f"{ROUNDS} rounds")
            peak = peak_rss(aggregator.pid)
            if aggregator.wait(120) != 0:
                raise RuntimeError((tmp / "aggregator.log").read_text()[-3000:])
            return peak
        finally:
            if aggregator.poll() is None:
                aggregator.kill()


def main() -> int:
    started = time.monotonic()
    few, many = measure(5), measure(50)
    ratio = many / few
    print(f"aggregator peak RSS, FedAvg, 34 MB model, {ROUNDS} rounds:")
    print(f"   5 clients: {few / 2**20:8.1f} MiB")
    print(f"  50 clients: {many / 2**20:8.1f} MiB")
    print(f"  ratio 50/5: {ratio:.3f} (limit {1 + TOLERANCE:.2f}); "
          f"{time.monotonic() - started:.0f}s")
    return 0 if ratio <= 1 + TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
