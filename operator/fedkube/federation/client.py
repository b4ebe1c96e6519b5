"""The client runtime: join, then pull a round, train on the local partition, push; repeat.

Connection trouble (the aggregator not up yet, restarted, briefly unreachable) is retried
with capped exponential backoff; an aggregator that forgot the client (it restarted) is
joined again. The client exits 0 when the aggregator says the job is finished, and 2 when
its certificate is refused (retrying cannot fix that).

A client in a pod reads the job's RuntimeConfig; a site outside the cluster has only a join
bundle (:mod:`fedkube.bundle`) and learns the spec, and its index, from the aggregator.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy
import torch

from fedkube import pki
from fedkube.api import FederatedJobSpec
from fedkube.api.runtime import ConfigurationError, RuntimeConfig
from fedkube.api.spec import MAX_CHUNK_BYTES
from fedkube.bundle import Bundle
from fedkube.federation import protocol, security, transport
from fedkube.federation.aggregator import select_device
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.tasks.base import ClientContext, Validator, load_task

log = logging.getLogger("fedkube.client")

POLL_SECONDS = 10.0
BACKOFF_START, BACKOFF_MAX = 0.2, 5.0
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


_REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class CredentialRefused(ConfigurationError):
    """The aggregator refused this client's certificate: a new pod would present the same."""


@dataclass(frozen=True)
class Endpoint:
    """Where a client dials, as whom, and for which job."""

    address: str
    tls: security.TlsFiles | None
    namespace: str
    job: str
    chunk_bytes: int = MAX_CHUNK_BYTES
    """The largest gRPC message expected, before the job's spec is known."""

    def check(self) -> pki.Identity | None:
        """This client's identity: its certificate is valid now and for this job."""
        if self.tls is None:
            return None
        self.tls.check_valid()
        try:
            identity = pki.identity_of(self.tls.certificate())
        except pki.InvalidIdentity as error:
            raise ConfigurationError(f"the client certificate: {error}") from None
        if (identity.namespace, identity.job) != (self.namespace, self.job):
            raise ConfigurationError(
                f"the client certificate is for job {identity.namespace}/{identity.job}, not "
                f"{self.namespace}/{self.job}: mount this job's TLS Secret, or use its bundle")
        return identity

    @classmethod
    def of_config(cls, config: RuntimeConfig, tls_dir: Path | None = None) -> Endpoint:
        folder = None if config.tls_folder is None else tls_dir or config.tls_folder
        return cls(config.aggregator_address,
                   security.TlsFiles.read(folder) if folder is not None else None,
                   config.namespace, config.job_name, config.spec.transport.largest_chunk)

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> Endpoint:
        return cls(bundle.address, bundle.files, bundle.namespace, bundle.job)


class Client:
    """One client of one job: index ``index``, or (None) the ``replica``-th of the site its
    certificate names. ``spec`` is the job's as the pod's configuration has it (None: the
    aggregator's)."""

    def __init__(self, endpoint: Endpoint, index: int | None, *, replica: int = 0,
                 spec: FederatedJobSpec | None = None, data_dir: Path | None = None) -> None:
        self.endpoint = endpoint
        self.identity = endpoint.check()
        self.index = index
        self.replica = replica
        self.local_spec = spec
        self.data_dir = data_dir
        self.device = select_device()
        credentials = security.channel_credentials(endpoint.tls) if endpoint.tls else None
        options = protocol.channel_options(endpoint.chunk_bytes)
        self.channel = grpc.secure_channel(endpoint.address, credentials, options=options) \
            if credentials is not None else grpc.insecure_channel(endpoint.address, options)
        self.stub = pb_grpc.FederationStub(self.channel)
        # The model's chunks travel without protobuf objects: received data is a view of the
        # bytes gRPC delivered, and sent data is serialized straight from the tensors.
        self._pull_task = self.channel.unary_stream(
            protocol.method("PullTask"), request_serializer=pb.PullTaskRequest.SerializeToString,
            response_deserializer=_decode_task_chunk)
        self._push_update = self.channel.stream_unary(
            protocol.method("PushUpdate"), request_serializer=protocol.serialize_chunk,
            response_deserializer=pb.PushUpdateReply.FromString)
        self.client_id = ""
        self.spec = spec
        self._model: torch.nn.Module | None = None
        self._data: object = None
        self._buffer: dict[str, torch.Tensor] | None = None

    def _join(self) -> None:
        delay = BACKOFF_START
        while True:
            try:
                reply = self.stub.Join(
                    pb.JoinRequest(index=-1 if self.index is None else self.index,
                                   site_replica=self.replica),
                    wait_for_ready=True, timeout=30)
                break
            except grpc.RpcError as error:
                if error.code() in _REFUSED:
                    raise self._refused(error) from error
                if error.code() not in _RETRYABLE:
                    raise
                log.info("aggregator at %s not reachable (%s); retrying in %.1fs",
                         self.endpoint.address, error.code().name, delay)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.client_id = reply.client_id
        self.index = reply.index
        self.spec = FederatedJobSpec.model_validate_json(reply.spec_json)
        log.info("joined as %s (index %d%s)", self.client_id, self.index,
                 f", site {self.identity.name}" if self.identity else "")

    @property
    def _spec(self) -> FederatedJobSpec:
        """The job's spec as the aggregator sent it when this client joined."""
        assert self.spec is not None, "join first"
        return self.spec

    def _setup(self) -> None:
        """Model and data, built once: the data split is the same on every round."""
        task = load_task(self._spec.task.entrypoint)
        self.task = task
        self._model = task.model(self._spec.task.config).to(self.device)
        self._data = task.client_data(self.context(), self._spec.task.config)

    def context(self) -> ClientContext:
        """Who this client is, from the spec: its site, and the site's data directory (the
        mounted volume, unless ``--data-dir`` names another)."""
        # The pod's own configuration places it: a client added by scaling up is in it, and
        # the aggregator's copy of the spec may predate the change.
        spec = self.local_spec or self.spec
        assert spec is not None and self.index is not None
        slot = spec.client_slots()[self.index]
        site = slot.site
        data_dir = self.data_dir or (Path(site.data.mount_path) if site is not None else None)
        return ClientContext(index=self.index, num_clients=spec.num_clients,
                             partitioning=self._spec.clients.data.partitioning,
                             site=site.name if site is not None else None,
                             site_index=slot.site_index,
                             site_replicas=site.replicas if site is not None else 1,
                             data_dir=data_dir)

    def _refused(self, error: grpc.RpcError) -> CredentialRefused:
        who = f"site {self.identity.name}" if self.identity else "this client"
        return CredentialRefused(f"the aggregator refused {who}: {error.details()}")

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((protocol.CLIENT_ID_KEY, self.client_id),)

    def _receive_model(self, header: pb.TaskHeader, chunks: Iterator[_TaskItem]) -> None:
        """Load the streamed global model into the local one."""
        assert self._model is not None
        self._buffer = load_stream(self._model, protocol.from_specs(header.tensors),
                                   map(protocol.expect_data, chunks), self._buffer)

    def _evaluate(self, header: pb.TaskHeader, chunks: Iterator[_TaskItem]) -> None:
        """Federated evaluation: the global model on this client's own validation data."""
        self._receive_model(header, chunks)
        assert self._model is not None
        if not isinstance(self.task, Validator):
            raise ConfigurationError(
                f"the aggregator asks for federated evaluation, but the task "
                f"{self._spec.task.entrypoint} has no validate(model, data, config, device)")
        result = self.task.validate(self._model, self._data, self._spec.task.config,
                                    device=self.device)
        self.stub.PushEvaluation(pb.EvaluationReport(
            round=header.round, num_examples=result.num_examples, loss=float(result.loss),
            accuracy=float(result.accuracy)), metadata=self._metadata())
        log.info("round %d: evaluated the global model on %d validation examples: loss %.4f, "
                 "accuracy %.4f", header.round, result.num_examples, result.loss,
                 result.accuracy)

    def _train(self, header: pb.TaskHeader, chunks: Iterator[_TaskItem]) -> None:
        assert self._model is not None
        self._receive_model(header, chunks)
        assert self.index is not None
        seed_round(self._spec.clients.data.partitioning.seed, header.round, self.index)
        result = self.task.train(self._model, self._data, self._spec.task.config,
                                 device=self.device, proximal_mu=header.proximal_mu)
        wire = transport.encode(self._model.state_dict(),
                                transport.TRANSFER_DTYPES[self._spec.transport.update_dtype])
        metas = transport.manifest(wire)
        chunk_bytes = self._spec.transport.chunk_size(sum(meta.nbytes for meta in metas))
        update_header = pb.UpdateHeader(
            round=header.round, num_examples=result.num_examples,
            metrics={k: float(v) for k, v in result.metrics.items()},
            tensors=protocol.to_specs(metas))

        def messages() -> Iterator[pb.UpdateChunk | bytes]:
            yield pb.UpdateChunk(header=update_header)
            yield from protocol.data_messages(wire, chunk_bytes)

        reply = self._push_update(messages(), metadata=self._metadata())
        status = pb.PushUpdateReply.Status.Name(reply.status).lower()
        log.info("round %d: trained on %d examples %s; update %s%s", header.round,
                 result.num_examples, result.metrics, status,
                 f" ({reply.reason})" if reply.reason else "")

    def _step(self) -> bool:
        """One poll (and maybe one round of training); False once the job is finished."""
        # The deadline covers the model's download too, which on a slow link, or queued
        # behind other clients' (the aggregator streams a few models at once), may take most
        # of a round: a fixed margin failed every download longer than it, and the retry
        # found the round's model no nearer.
        stream = self._pull_task(
            pb.PullTaskRequest(wait_seconds=POLL_SECONDS), metadata=self._metadata(),
            timeout=POLL_SECONDS + self._spec.strategy.round_timeout_seconds)
        header = next(stream)
        if not isinstance(header, pb.TaskHeader):
            raise transport.TransportError("the aggregator's answer did not start with a header")
        if header.action == pb.TaskHeader.FINISHED:
            return False
        if header.action == pb.TaskHeader.TRAIN:
            self._train(header, stream)
        elif header.action == pb.TaskHeader.EVALUATE:
            self._evaluate(header, stream)
        return True

    def run(self) -> int:
        """Take part until the job finishes; the exit code."""
        try:
            self._join()
            self._setup()
            delay = BACKOFF_START
            while True:
                try:
                    if not self._step():
                        log.info("the aggregator says the job is finished")
                        return 0
                    delay = BACKOFF_START
                except grpc.RpcError as error:
                    code = error.code()
                    if code in _REFUSED:
                        raise self._refused(error) from error
                    if code == grpc.StatusCode.NOT_FOUND:
                        log.info("the aggregator forgot this client (restarted?); joining again")
                        self._join()
                        continue
                    if code not in _RETRYABLE:
                        raise
                    log.info("lost the aggregator (%s); retrying in %.1fs", code.name, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
        finally:
            self.channel.close()


_TaskItem = pb.TaskHeader | memoryview


def load_stream(model: torch.nn.Module, metas: list[transport.TensorMeta],
                chunks: Iterable[bytes | memoryview],
                buffer: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Load a streamed state dict into ``model``; the buffer to keep for the next one.

    Where the stream matches the model's own tensors (:func:`transport.fits`: the same names,
    dtypes and shapes, on the CPU), it is written straight into them, so a round costs one
    copy of the model, not two, and the client holds no second model. Otherwise (a 16-bit
    wire dtype, a model on a GPU) it goes through ``buffer``, reused while it fits, and
    ``load_state_dict`` converts and moves it. A stream that breaks off leaves the model
    partly written; the client trains or evaluates only on a model received whole.
    """
    state = model.state_dict()
    if transport.fits(metas, state):
        transport.assemble(metas, chunks, out=state)
        return buffer
    if buffer is None or not transport.fits(metas, buffer):
        buffer = transport.allocate(metas)
    transport.assemble(metas, chunks, out=buffer)
    # A tensor the model lacks goes as it is, so that load_state_dict names it (and any
    # tensor of the model the stream lacks).
    model.load_state_dict({k: v.to(state[k].dtype) if k in state else v
                           for k, v in buffer.items()})
    return buffer


def _decode_task_chunk(raw: bytes) -> _TaskItem:
    return protocol.decode_chunk(raw, pb.TaskHeader)


def seed_round(seed: int, round_: int, index: int) -> None:
    """Seed torch's, numpy's and Python's global generators for one client's training of one
    round: a client restarted mid-job trains the round exactly as it would have, so a job
    with deterministic tasks ends with the same model however often its processes died."""
    value = ((seed * 1_000_003 + round_) * 1_000_003 + index) % (1 << 32)
    torch.manual_seed(value)
    numpy.random.seed(value)
    random.seed(value)


def serve(config: RuntimeConfig, index: int, data_dir: Path | None = None,
          tls_dir: Path | None = None) -> int:
    """Client ``index`` of the job in ``config`` (a pod, or a ``fedkube run`` process)."""
    count = config.spec.num_clients
    if not 0 <= index < count:
        what = "the sites' replicas" if config.spec.sites else "spec.clients.replicas"
        raise ConfigurationError(f"--index {index} is outside 0..{count - 1} ({what})")
    _check_data_dir(data_dir)
    return Client(Endpoint.of_config(config, tls_dir), index, spec=config.spec,
                  data_dir=data_dir).run()


def serve_bundle(bundle: Bundle, replica: int, data_dir: Path | None) -> int:
    """The ``replica``-th client of the site a join bundle is for (a site outside the
    cluster)."""
    _check_data_dir(data_dir)
    return Client(Endpoint.of_bundle(bundle), None, replica=replica, data_dir=data_dir).run()


def _check_data_dir(data_dir: Path | None) -> None:
    if data_dir is not None and not data_dir.is_dir():
        raise ConfigurationError(f"the data directory {data_dir} is not a directory")
