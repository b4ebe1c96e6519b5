"""Real aggregator and client processes on 127.0.0.1 for the runtime tests."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import torch

from fedkube.api import FederatedJob, FederatedJobSpec
from fedkube.api.runtime import RuntimeConfig
from fedkube.federation import protocol, transport
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.federation.security import TlsFiles, channel_credentials
from fedkube.local import CHILD_ENV, ProcessGroup, client_tls_dir, free_port, write_certificates

#: The environment fedkube gives its children, for processes a test starts itself.
ENV = os.environ | CHILD_ENV


def make_config(tmp_path: Path, *, rounds: int = 3, clients: int = 2, min_clients: int = 2,
                timeout: int = 30, task_config: dict[str, Any] | None = None,
                tls: bool = True, **spec: Any) -> Path:
    """A RuntimeConfig file for a small digits job (``ns/test``) with free ports, and its
    certificates in ``tmp_path/tls`` (as ``fedkube run`` makes them) unless not ``tls``."""
    port, metrics_port = free_port(), free_port()
    job_spec = FederatedJobSpec.model_validate({
        "task": {"entrypoint": "fedkube.tasks.digits:task",
                 "config": task_config or {"hidden": 16, "lr": 0.1}},
        "rounds": rounds,
        "strategy": {"minClients": min_clients, "roundTimeoutSeconds": timeout},
        "clients": {"replicas": clients},
        "aggregator": {"port": port, "metricsPort": metrics_port},
        **({} if tls else {"security": {"tls": {"mode": "Disabled"}}}),
        **spec,
    })
    if tls:
        write_certificates(FederatedJob(metadata={"name": "test", "namespace": "ns"},
                                        spec=job_spec), tmp_path / "tls")
    config = RuntimeConfig(
        job_name="test", namespace="ns", spec=job_spec,
        aggregator_address=f"127.0.0.1:{port}", bind_address="127.0.0.1",
        tls_dir=str(tmp_path / "tls" / "aggregator"),
        checkpoint_dir=str(tmp_path / "checkpoints"), output_dir=str(tmp_path / "output"))
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    return path


class Processes(ProcessGroup):
    """The aggregator and clients of one test; all killed at the end."""

    def aggregator(self, config: Path) -> subprocess.Popen[bytes]:
        return self.start("aggregator", "aggregator", "--config", str(config))

    def client(self, config: Path, index: int, data_dir: Path | None = None,
               tls_dir: Path | None = None) -> subprocess.Popen[bytes]:
        """Client ``index``; with the certificate of the job's site (or of its clients)
        unless ``tls_dir`` names another."""
        runtime = RuntimeConfig.from_file(config)
        if tls_dir is None and runtime.tls_dir is not None:
            slots = runtime.spec.client_slots()
            site = slots[index].site if index < len(slots) else None
            tls_dir = client_tls_dir(config.parent / "tls", site.name if site else None)
        return self.start(f"client-{index}", "client", "--config", str(config),
                          "--index", str(index),
                          *(["--data-dir", str(data_dir)] if data_dir else []),
                          *(["--tls-dir", str(tls_dir)] if tls_dir else []))

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()


@contextmanager
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.stop(grace=0)


def metrics_port(config: Path) -> int:
    return RuntimeConfig.from_file(config).spec.aggregator.metrics_port


def http_get(config: Path, path: str) -> str:
    url = f"http://127.0.0.1:{metrics_port(config)}{path}"
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


def status(config: Path) -> dict[str, Any]:
    return json.loads(http_get(config, "/status"))


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in the exposition")


WINE_FEATURES = ["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium",
                 "total_phenols", "flavanoids", "nonflavanoid_phenols", "proanthocyanins",
                 "color_intensity", "hue", "od280/od315_of_diluted_wines", "proline"]
WINE_TASK = {"label": "cultivar", "features": WINE_FEATURES, "classes": [0, 1, 2]}


def write_wine_rows(path: Path) -> None:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*WINE_FEATURES, "cultivar"])
        writer.writerows([*row, label] for row, label in zip(x, y, strict=True))


State = dict[str, torch.Tensor]


class HandmadeClient:
    """A client speaking the protocol by hand over one channel, so that it can send anything
    (``credentials`` None: plaintext)."""

    def __init__(self, config: Path, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        address = RuntimeConfig.from_file(config).aggregator_address
        self.channel = grpc.secure_channel(address, credentials, options) \
            if credentials is not None else grpc.insecure_channel(address, options)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.client_id = ""

    @classmethod
    def of_site(cls, config: Path, site: str | None,
                options: Sequence[tuple[str, Any]] = ()) -> HandmadeClient:
        """With the certificate of ``site`` (None: of the clients of a job without sites)."""
        files = TlsFiles.read(client_tls_dir(config.parent / "tls", site))
        return cls(config, channel_credentials(files), options)

    @classmethod
    def joined(cls, config: Path, index: int,
               options: Sequence[tuple[str, Any]] = ()) -> HandmadeClient:
        """Client ``index``, with its own site's certificate, joined once the aggregator is up
        (over a channel with gRPC's defaults unless ``options``)."""
        slot = RuntimeConfig.from_file(config).spec.client_slots()[index]
        client = cls.of_site(config, slot.site.name if slot.site else None, options)
        client.join(index, wait=True)
        return client

    def join(self, index: int, replica: int = 0, wait: bool = False) -> pb.JoinReply:
        reply = self.stub.Join(pb.JoinRequest(index=index, site_replica=replica),
                               wait_for_ready=wait, timeout=60 if wait else 20)
        self.client_id = reply.client_id
        return reply

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((protocol.CLIENT_ID_KEY, self.client_id),)

    def pull(self, action: int = pb.TaskHeader.TRAIN) -> tuple[int, State]:
        """The next task of this kind (TRAIN or EVALUATE): its round and the model."""
        while True:
            stream = self.stub.PullTask(pb.PullTaskRequest(wait_seconds=5),
                                        metadata=self.metadata, timeout=30)
            header = next(stream).header
            if header.action == action:
                metas = protocol.from_specs(header.tensors)
                return header.round, transport.assemble(metas, protocol.data_chunks(stream))

    def push(self, round_: int, state: State) -> pb.PushUpdateReply:
        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=pb.UpdateHeader(
                round=round_, num_examples=10,
                tensors=protocol.to_specs(transport.manifest(state))))
            for data in transport.iter_chunks(state, 1 << 14):
                yield pb.UpdateChunk(data=data)
        return self.stub.PushUpdate(messages(), metadata=self.metadata, timeout=30)
