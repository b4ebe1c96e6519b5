"""Aggregator peak memory (RSS) for FedAvg with 50 clients vs 5 clients, side by side.

FedAvg folds each update into one accumulator, and holds at most one and a half models of
received bytes in memory (the uploads behind wait for folds, or spill to a temporary file),
so the aggregator's memory must not grow with the number of clients. This runs a real
aggregator process twice on a ~34 MB model, driven by lightweight in-process gRPC clients
(threads of this process that pull the global model and push it back perturbed), and
compares the aggregator's peak RSS and CPU time, both read from the kernel when the process
is reaped (``wait4``). Prints the ratios and the CPU time per GB of model traffic; exits 1
when 50 clients need more than 10% memory over 5 clients.

    python hack/bench_aggregator_memory.py [--chunk-bytes N] [--plaintext]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from runtime_support import ENV, make_config  # noqa: E402

from fedkube.api import TransportSpec  # noqa: E402
from fedkube.api.runtime import RuntimeConfig  # noqa: E402
from fedkube.federation import protocol, transport  # noqa: E402
from fedkube.federation.proto import fedkube_pb2 as pb  # noqa: E402
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc  # noqa: E402
from fedkube.federation.security import TlsFiles, channel_credentials  # noqa: E402
from fedkube.local import client_tls_dir  # noqa: E402
from fedkube.tasks.base import EvalResult, TrainResult  # noqa: E402

ROUNDS = 3
TOLERANCE = 0.10


class LinearTask:
    """One linear layer of a given size whose clients the benches drive themselves;
    evaluation is a cheap norm, so a bench measures the aggregator, not learning."""

    def __init__(self, inputs: int, outputs: int) -> None:
        self.inputs, self.outputs = inputs, outputs

    def model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(self.inputs, self.outputs)

    def client_data(self, *args: Any) -> None:
        return None

    def train(self, *args: Any, **kwargs: Any) -> TrainResult:
        raise NotImplementedError("the bench's clients are driven by the bench itself")

    def evaluate(self, model: torch.nn.Module, config: Mapping[str, Any], *,
                 device: torch.device) -> EvalResult:
        loss = float(sum(p.detach().float().norm() for p in model.parameters()))
        return EvalResult(loss=loss, accuracy=0.5, num_examples=1)


task = LinearTask(2048, 4096)  # 34 MB


def _channel(runtime: RuntimeConfig, config: Path) -> grpc.Channel:
    """A channel of its own (one TCP connection per client), over mutual TLS with the job's
    client certificate as every client connects, or in plaintext where the job has no TLS."""
    options = [*protocol.channel_options(runtime.spec.transport.largest_chunk),
               ("grpc.use_local_subchannel_pool", 1)]
    if runtime.tls_folder is None:
        return grpc.insecure_channel(runtime.aggregator_address, options=options)
    credentials = channel_credentials(TlsFiles.read(client_tls_dir(config.parent / "tls",
                                                                   None)))
    return grpc.secure_channel(runtime.aggregator_address, credentials, options=options)


def drive_client(config: Path, index: int) -> None:
    """Join, then pull and push back until the aggregator says the job is finished."""
    runtime = RuntimeConfig.from_file(config)
    with _channel(runtime, config) as channel:
        stub = pb_grpc.FederationStub(channel)
        reply = stub.Join(pb.JoinRequest(index=index), wait_for_ready=True)
        metadata = ((protocol.CLIENT_ID_KEY, reply.client_id),)
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
                chunk_bytes = runtime.spec.transport.chunk_size(transport.encoded_nbytes(state))
                for data in transport.iter_chunks(state, chunk_bytes):
                    yield pb.UpdateChunk(data=data)

            stub.PushUpdate(messages(), metadata=metadata)
            del state


class Usage(NamedTuple):
    """What the kernel accounted to the aggregator process over its whole life."""

    peak_rss: int
    cpu_seconds: float
    wall_seconds: float


def reap(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, Usage]:
    """Wait for ``process`` to exit; its exit code and resource usage.

    ``wait4`` reports the peak RSS after exit, so a job that finishes between two polls
    of ``/proc`` is still measured.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(wait_status)
            return process.returncode, Usage(usage.ru_maxrss * 1024,
                                             usage.ru_utime + usage.ru_stime,
                                             time.monotonic() - started)
        time.sleep(0.05)
    raise TimeoutError(f"the aggregator did not finish {ROUNDS} rounds in {timeout:.0f}s")


def measure(clients: int, chunk_bytes: int | None, tls: bool) -> Usage:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        config = make_config(tmp, rounds=ROUNDS, clients=clients, min_clients=clients,
                             timeout=300, task_config={}, tls=tls,
                             transport={"chunkBytes": chunk_bytes})
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
            for index in range(clients):
                threading.Thread(target=drive_client, args=(config, index), daemon=True).start()
            code, usage = reap(aggregator, 600)
            if code != 0:
                raise RuntimeError((tmp / "aggregator.log").read_text()[-3000:])
            return usage
        finally:
            if aggregator.returncode is None:
                aggregator.kill()
                aggregator.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-bytes", type=int,
                        help="spec.transport.chunkBytes (default: unset, a size chosen from "
                             "the model's)")
    parser.add_argument("--plaintext", action="store_true",
                        help="run the job without TLS (security.tls.mode Disabled), to tell "
                             "TLS's share of the CPU time from the rest")
    arguments = parser.parse_args()
    chunk_bytes, tls = arguments.chunk_bytes, not arguments.plaintext
    few, many = measure(5, chunk_bytes, tls), measure(50, chunk_bytes, tls)
    ratio = many.peak_rss / few.peak_rss
    model_bytes = transport.encoded_nbytes(task.model({}).state_dict())
    chunks = TransportSpec(chunk_bytes=chunk_bytes).chunk_size(model_bytes)
    print(f"aggregator, FedAvg, 34 MB model, {ROUNDS} rounds, {chunks >> 10} KiB chunks, "
          f"{'mutual TLS' if tls else 'plaintext'}:")
    for clients, usage in ((5, few), (50, many)):
        # Every client pulls the model and pushes it back once a round.
        traffic = ROUNDS * clients * 2 * model_bytes / 1e9
        print(f"  {clients:3d} clients: peak RSS {usage.peak_rss / 2**20:7.1f} MiB, "
              f"CPU {usage.cpu_seconds:5.1f} s ({usage.cpu_seconds / traffic:.2f} s per GB of "
              f"model traffic), wall {usage.wall_seconds:5.1f} s")
    print(f"  peak RSS ratio 50/5: {ratio:.3f} (limit {1 + TOLERANCE:.2f})")
    return 0 if ratio <= 1 + TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
