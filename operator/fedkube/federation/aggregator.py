"""The aggregator: serves the protocol, runs the rounds, evaluates, checkpoints, reports.

Threads: gRPC handlers (one per in-flight call; clients long-poll ``PullTask``), the HTTP
server for ``/metrics``, ``/status`` and ``/healthz``, and the round loop in the caller's
thread. Shared state lives behind one condition variable; receiving and folding updates is
serialized by a second lock so that one model-sized receive buffer serves every client and
memory does not grow with the number of clients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import grpc
import torch
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fedkube import pki
from fedkube.api import FederatedJobSpec, JobMetrics
from fedkube.api.runtime import (
    AggregatorPhase,
    AggregatorReport,
    ConfigurationError,
    RuntimeConfig,
)
from fedkube.federation import checkpoint, protocol, security, transport
from fedkube.federation.metrics import AggregatorMetrics
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.federation.strategies import UpdateRejected, build_strategy_from_spec
from fedkube.tasks.base import Validator, load_task

log = logging.getLogger("fedkube.aggregator")

#: A client that has not called for this long (and is not training) counts as gone.
LIVENESS_SECONDS = 30.0
#: Longest a PullTask long-poll is held before answering WAIT.
MAX_POLL_SECONDS = 10.0
#: Consecutive failed attempts at one round before the job fails.
MAX_ROUND_ATTEMPTS = 3
#: How long a finished aggregator keeps answering FINISHED so that clients exit cleanly.
FINISH_GRACE_SECONDS = 10.0
#: Longest the first round waits for the rest of ``clients.replicas`` once ``minClients``
#: have joined (bounded by ``roundTimeoutSeconds`` too): client pods start seconds apart, and a
#: round sampled from the first few to join would leave the others idle for a whole round.
JOIN_GRACE_SECONDS = 30.0
#: How often the aggregator looks for a changed configuration file (a site removed: revoked).
CONFIG_POLL_SECONDS = 2.0
#: Models streamed to clients at once: every stream buffers chunks in gRPC, so memory would
#: otherwise grow with the number of sampled clients.
MAX_CONCURRENT_SENDS = 4


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code``: grpc's abort raises, which its types do not say."""
    context.abort(code, details)
    raise AssertionError("unreachable: grpc's abort raises")


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample_size(connected: int, fraction_fit: float, min_clients: int) -> int:
    """Clients to sample: ``fractionFit`` of those connected, at least ``minClients``."""
    return min(connected, max(min_clients, math.ceil(fraction_fit * connected)))


@dataclass
class ClientInfo:
    index: int
    last_seen: float
    identity: pki.Identity | None
    """The certificate's identity that joined (None with TLS disabled)."""


@dataclass
class Dispatch:
    """A global model sent to sampled clients, to train or to evaluate, and who answered."""

    number: int
    """The round (being trained, or whose model is evaluated)."""
    sampled: set[str]
    metas: list[transport.TensorMeta]
    wire: dict[str, torch.Tensor]
    dispatched: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    examples: int = 0
    closed: bool = False


@dataclass
class RoundState(Dispatch):
    """One attempt at one round."""

    aggregation: Any = None
    accepted: int = 0
    rejected: int = 0
    client_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvaluationRound(Dispatch):
    """Federated evaluation of one round's global model by sampled clients."""

    loss_sum: float = 0.0
    accuracy_sum: float = 0.0

    def result(self) -> dict[str, float | int] | None:
        """Example-weighted loss and accuracy over the reports; None without any."""
        if self.examples == 0:
            return None
        return {"loss": self.loss_sum / self.examples,
                "accuracy": self.accuracy_sum / self.examples,
                "examples": self.examples, "clients": len(self.answered)}


class Aggregator(pb_grpc.FederationServicer):  # type: ignore[misc]  # untyped generated base
    """One job's aggregator; :meth:`run` returns the process exit code."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.spec = config.spec
        self.admission = security.Admission(config.namespace, config.job_name, self.spec,
                                            tls=config.tls_folder is not None)
        self.device = select_device()
        self.task = load_task(self.spec.task.entrypoint)
        self.model = self.task.model(self.spec.task.config).to(self.device)
        self.strategy = build_strategy_from_spec(
            self.spec, device=self.device, seed=self.spec.clients.data.partitioning.seed)
        self.metrics = AggregatorMetrics(config.job_name, config.namespace)
        self.wire_dtype = transport.TRANSFER_DTYPES[self.spec.transport.update_dtype]
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.history: list[dict[str, Any]] = []
        self.completed = 0
        self.phase: AggregatorPhase = "Waiting"
        self.message = ""
        self.clients: dict[str, ClientInfo] = {}
        self.current: RoundState | None = None
        self.evaluating: EvaluationRound | None = None
        self.central_test_set: bool | None = None
        """Whether the task has a central test set; known after its first evaluate."""
        self.finished = False
        self.told_finished: set[str] = set()
        self._cond = threading.Condition()
        self._fold_lock = threading.Lock()
        self._buffer: dict[str, torch.Tensor] | None = None
        self._send_slots = threading.BoundedSemaphore(MAX_CONCURRENT_SENDS)
        self.metrics.rounds_total.set(self.spec.rounds)
        federated = self.spec.evaluation.mode in ("federated", "both")
        if federated and not isinstance(self.task, Validator):
            raise ConfigurationError(
                f"spec.evaluation.mode is {self.spec.evaluation.mode}, but the task "
                f"{self.spec.task.entrypoint} has no validate(model, data, config, device) "
                "for the clients to evaluate with: use mode central, or give the task one")

    # ---- state -----------------------------------------------------------------------------

    def _connected(self, now: float) -> list[str]:
        training = self.current.sampled - self.current.answered if self.current else set()
        return [cid for cid, info in self.clients.items()
                if now - info.last_seen < LIVENESS_SECONDS or cid in training]

    def report(self) -> AggregatorReport:
        with self._cond:
            last = self.history[-1] if self.history else {}
            return AggregatorReport(
                phase=self.phase, round=self.completed, rounds=self.spec.rounds,
                clients_connected=len(self._connected(time.monotonic())),
                metrics=JobMetrics(loss=last.get("loss"), accuracy=last.get("accuracy")),
                message=self.message)

    # ---- gRPC ------------------------------------------------------------------------------

    def _refuse(self, context: grpc.ServicerContext, refused: security.Refused) -> NoReturn:
        self.metrics.refusals[refused.reason].inc()
        log.warning("refused a call from %s (%s): %s", context.peer(), refused.reason, refused)
        _abort(context, refused.code, str(refused))

    def _identify(self, context: grpc.ServicerContext) -> pki.Identity | None:
        """The caller's identity from its verified certificate (refused if it has none here)."""
        if self.admission.new_session(context.peer()):
            self.metrics.tls_sessions.inc()
        try:
            return self.admission.identify(context.auth_context())
        except security.Refused as refused:
            self._refuse(context, refused)

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        """The caller's client id, which must belong to the certificate that joined with it."""
        identity = self._identify(context)
        client_id = str(dict(context.invocation_metadata()).get(protocol.CLIENT_ID_KEY, ""))
        with self._cond:
            info = self.clients.get(client_id)
            if info is None:
                _abort(context, grpc.StatusCode.NOT_FOUND,
                       f"unknown client id {client_id!r}: join again")
            if info.identity != identity:
                self._refuse(context, security.Refused(
                    "wrong_session", grpc.StatusCode.PERMISSION_DENIED,
                    f"client id {client_id} belongs to another site"))
            info.last_seen = time.monotonic()
        return client_id

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        identity = self._identify(context)
        try:
            index = self.admission.index_for(identity, request.index, request.site_replica)
        except security.Refused as refused:
            self._refuse(context, refused)
        client_id = f"client-{index}-{uuid.uuid4().hex[:8]}"
        with self._cond:
            # A restarted client takes its index back (only its own site can hold that index);
            # its old session is gone.
            for old in [c for c, i in self.clients.items() if i.index == index]:
                del self.clients[old]
            self.clients[client_id] = ClientInfo(index, time.monotonic(), identity)
            self.metrics.clients_connected.set(len(self._connected(time.monotonic())))
            self._cond.notify_all()
        log.info("client %s joined (index %d%s)", client_id, index,
                 f", site {identity.name}" if identity is not None else "")
        return pb.JoinReply(client_id=client_id, index=index,
                            spec_json=self.spec.model_dump_json(by_alias=True))

    def take_membership(self, spec: FederatedJobSpec) -> None:
        """Take who takes part from a changed spec (its sites, ``clients.replicas`` and
        ``strategy.minClients``; the operator rejects changes to anything else): sessions of
        sites no longer in it end now, and their certificates are refused from now on."""
        self.spec = self.spec.model_copy(update={
            "sites": spec.sites,
            "clients": self.spec.clients.model_copy(update={"replicas": spec.clients.replicas}),
            "strategy": self.spec.strategy.model_copy(
                update={"min_clients": spec.strategy.min_clients})})
        revoked = self.admission.set_spec(spec)
        if not revoked:
            return
        with self._cond:
            for client_id in [c for c, i in self.clients.items()
                              if i.identity is not None and i.identity.site in revoked]:
                del self.clients[client_id]
            self._cond.notify_all()
        log.warning("revoked %s: no longer in the job's sites",
                    ", ".join(sorted(site or pki.CLIENTS for site in revoked)))

    def _next_assignment(self, client_id: str, deadline: float, context: grpc.ServicerContext,
                         ) -> Dispatch | None:
        """The round this client should train, or the model it should evaluate, now; None
        when finished or nothing is due yet."""
        with self._cond:
            while True:
                if self.finished:
                    self.told_finished.add(client_id)
                    self._cond.notify_all()
                    return None
                for state in (self.current, self.evaluating):
                    if (state is not None and not state.closed and client_id in state.sampled
                            and client_id not in state.dispatched):
                        state.dispatched.add(client_id)
                        return state
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return None
                self._cond.wait(remaining)

    def PullTask(self, request: pb.PullTaskRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.TaskChunk]:
        client_id = self._authenticate(context)
        deadline = time.monotonic() + min(max(request.wait_seconds, 0.0), MAX_POLL_SECONDS)
        state = self._next_assignment(client_id, deadline, context)
        if state is None:
            action = pb.TaskHeader.FINISHED if self.finished else pb.TaskHeader.WAIT
            yield pb.TaskChunk(header=pb.TaskHeader(action=action))
            return
        if isinstance(state, EvaluationRound):
            header = pb.TaskHeader(action=pb.TaskHeader.EVALUATE, round=state.number,
                                   tensors=protocol.to_specs(state.metas))
        else:
            header = pb.TaskHeader(action=pb.TaskHeader.TRAIN, round=state.number,
                                   proximal_mu=self.strategy.proximal_mu,
                                   tensors=protocol.to_specs(state.metas))
        yield pb.TaskChunk(header=header)
        with self._send_slots:
            for data in transport.iter_chunks(state.wire, self.spec.transport.chunk_bytes):
                self.metrics.model_bytes.inc(len(data))
                yield pb.TaskChunk(data=data)

    def PushUpdate(self, request_iterator: Iterator[pb.UpdateChunk],
                   context: grpc.ServicerContext) -> pb.PushUpdateReply:
        client_id = self._authenticate(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            self.metrics.updates["rejected"].inc()
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "an update starts with its header")
        header = first.header
        with self._fold_lock:
            state = self.current
            unwanted = self._unwanted(state, client_id, header.round)
            if unwanted is not None:
                return pb.PushUpdateReply(status=pb.PushUpdateReply.LATE, reason=unwanted)
            assert isinstance(state, RoundState)
            reason = self._receive_and_fold(state, header, request_iterator)
            with self._cond:
                state.answered.add(client_id)
                if reason is None:
                    state.accepted += 1
                    state.examples += header.num_examples
                    for name, value in header.metrics.items():
                        state.client_metrics[name] = (state.client_metrics.get(name, 0.0)
                                                      + value * header.num_examples)
                else:
                    state.rejected += 1
                self._cond.notify_all()
        if reason is not None:
            self.metrics.updates["rejected"].inc()
            log.warning("rejected update from %s in round %d: %s",
                        client_id, state.number, reason)
            return pb.PushUpdateReply(status=pb.PushUpdateReply.REJECTED, reason=reason)
        self.metrics.updates["accepted"].inc()
        return pb.PushUpdateReply(status=pb.PushUpdateReply.ACCEPTED)

    def PushEvaluation(self, request: pb.EvaluationReport,
                       context: grpc.ServicerContext) -> pb.PushEvaluationReply:
        client_id = self._authenticate(context)
        valid = (request.num_examples >= 0 and math.isfinite(request.loss)
                 and math.isfinite(request.accuracy) and 0.0 <= request.accuracy <= 1.0)
        if not valid:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   "an evaluation has a finite loss, an accuracy in [0, 1] and an example "
                   "count of at least 0")
        with self._cond:
            state = self.evaluating
            if self._unwanted(state, client_id, request.round, self.metrics.evaluations):
                return pb.PushEvaluationReply(status=pb.PushEvaluationReply.LATE)
            assert state is not None
            state.answered.add(client_id)
            state.examples += request.num_examples
            state.loss_sum += request.loss * request.num_examples
            state.accuracy_sum += request.accuracy * request.num_examples
            self._cond.notify_all()
        self.metrics.evaluations["accepted"].inc()
        return pb.PushEvaluationReply(status=pb.PushEvaluationReply.ACCEPTED)

    def _unwanted(self, state: Dispatch | None, client_id: str, number: int,
                  late: dict[str, Any] | None = None) -> str | None:
        """Why a client's answer for round ``number`` is not taken, counted; None if it is.
        Sent twice (a replay) or unasked (not sampled) is a refusal; after the round, late."""
        if state is not None and not state.closed and number == state.number:
            if client_id in state.answered:
                reason, why = "duplicate", "this round already has your answer"
            elif client_id not in state.dispatched:
                reason, why = "not_sampled", "you were not sampled into this round"
            else:
                return None
            self.metrics.refusals[reason].inc()
            log.warning("refused an answer from %s for round %d: %s", client_id, number, why)
            return why
        (late or self.metrics.updates)["late"].inc()
        log.info("late answer from %s for round %d ignored", client_id, number)
        return "the round is over"

    def _receive_and_fold(self, state: RoundState, header: pb.UpdateHeader,
                          chunks: Iterator[pb.UpdateChunk]) -> str | None:
        """Receive one update into the shared buffer and fold it; the reason if rejected."""
        unusable = [name for name, value in header.metrics.items() if not math.isfinite(value)]
        if unusable:
            return f"training metrics must be finite: {', '.join(sorted(unusable)[:5])}"
        metas = protocol.from_specs(header.tensors)
        if metas != state.metas:
            expected = {m.name: m for m in state.metas}
            wrong = [f"{m.name}: {m.dtype}{list(m.shape)}" for m in metas
                     if expected.get(m.name) != m] or sorted(expected.keys() - {
                         m.name for m in metas})
            return ("tensors do not match the global model (expected the manifest it was sent): "
                    + ", ".join(wrong[:5]))
        if self._buffer is None:
            self._buffer = transport.allocate(state.metas)
        started = time.perf_counter()
        try:
            update = transport.assemble(metas, protocol.data_chunks(chunks), out=self._buffer)
        except transport.TransportError as error:
            return str(error)
        self.metrics.update_bytes.inc(sum(m.nbytes for m in metas))
        try:
            state.aggregation.add(
                {k: v.to(self.device, dtype=self.global_state[k].dtype) for k, v in update.items()},
                int(header.num_examples))
        except UpdateRejected as error:
            return str(error)
        finally:
            self.metrics.aggregation_duration.observe(time.perf_counter() - started)
        return None

    # ---- round loop ------------------------------------------------------------------------

    def _set_phase(self, phase: AggregatorPhase, message: str = "") -> None:
        with self._cond:
            self.phase, self.message = phase, message

    def _wait_for_clients(self, needed: int, wanted: int, grace: float) -> list[str]:
        """Wait until ``needed`` clients are connected, then up to ``grace`` seconds more
        until ``wanted`` are."""
        enough_since: float | None = None
        with self._cond:
            while True:
                now = time.monotonic()
                connected = self._connected(now)
                self.metrics.clients_connected.set(len(connected))
                if len(connected) >= needed:
                    enough_since = now if enough_since is None else enough_since
                    if len(connected) >= wanted or now - enough_since >= grace:
                        return connected
                else:
                    enough_since = None
                self.phase = "Waiting"
                target = needed if enough_since is None else wanted
                self.message = f"waiting for clients: {len(connected)} of {target} connected"
                self._cond.wait(1.0)

    def _open_round(self, number: int, connected: list[str], attempt: int) -> RoundState:
        strategy_spec = self.spec.strategy
        rng = random.Random(f"{self.spec.clients.data.partitioning.seed}/{number}/{attempt}")
        count = sample_size(len(connected), strategy_spec.fraction_fit, strategy_spec.min_clients)
        sampled = set(rng.sample(sorted(connected), count))
        wire = transport.encode(self.global_state, self.wire_dtype)
        metas = transport.manifest(wire)
        if self._buffer is not None and transport.manifest(self._buffer) != metas:
            self._buffer = None
        return RoundState(number, sampled, metas, wire, aggregation=self.strategy.new_round(
            self.global_state, max_updates=count))

    def _run_round(self, number: int, attempt: int, first: bool) -> RoundState:
        strategy_spec = self.spec.strategy
        grace = min(JOIN_GRACE_SECONDS, strategy_spec.round_timeout_seconds) if first else 0.0
        connected = self._wait_for_clients(strategy_spec.min_clients,
                                           self.spec.num_clients, grace)
        state = self._open_round(number, connected, attempt)
        deadline = time.monotonic() + strategy_spec.round_timeout_seconds
        with self._cond:
            self.current = state
            self.phase, self.message = "Running", f"round {number}: {len(state.sampled)} sampled"
            self.metrics.clients_sampled.set(len(state.sampled))
            self._cond.notify_all()
            while state.answered != state.sampled and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
        with self._fold_lock, self._cond:
            state.closed = True
        return state

    def _evaluate_centrally(self) -> tuple[float, float] | None:
        """The task's central evaluation of the global model; None when the task has no
        central test set (its data stays at the sites) or the job asks for none."""
        if self.spec.evaluation.mode == "federated" or self.central_test_set is False:
            return None
        self.model.load_state_dict(self.global_state)
        result = self.task.evaluate(self.model, self.spec.task.config, device=self.device)
        self.central_test_set = result is not None
        if result is None:
            if self.spec.evaluation.mode in ("central", "both"):
                raise ConfigurationError(
                    f"spec.evaluation.mode is {self.spec.evaluation.mode}, but the task "
                    f"{self.spec.task.entrypoint} has no central test set: use mode federated")
            return None
        return float(result.loss), float(result.accuracy)

    def _federated_due(self, number: int) -> bool:
        evaluation = self.spec.evaluation
        wanted = evaluation.mode in ("federated", "both") or (
            evaluation.mode == "auto" and self.central_test_set is False
            and isinstance(self.task, Validator))
        return wanted and (number % evaluation.every_rounds == 0 or number == self.spec.rounds)

    def _evaluate_federated(self, number: int) -> dict[str, float | int] | None:
        """Have sampled clients evaluate the new global model on their own validation data;
        their example-weighted reports, or None when none came within roundTimeoutSeconds."""
        evaluation = self.spec.evaluation
        with self._cond:
            connected = sorted(self._connected(time.monotonic()))
        if not connected:
            return None
        rng = random.Random(f"{self.spec.clients.data.partitioning.seed}/evaluate/{number}")
        count = min(len(connected), max(1, math.ceil(evaluation.fraction * len(connected))))
        wire = transport.encode(self.global_state, self.wire_dtype)
        state = EvaluationRound(number, set(rng.sample(connected, count)),
                                transport.manifest(wire), wire)
        deadline = time.monotonic() + self.spec.strategy.round_timeout_seconds
        with self._cond:
            self.evaluating = state
            self.message = f"round {number}: evaluating on {count} clients"
            self._cond.notify_all()
            while state.answered != state.sampled and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
            state.closed = True
            self.evaluating = None
        result = state.result()
        if result is None:
            log.warning("round %d: no client reported its evaluation within "
                        "roundTimeoutSeconds=%d", number, self.spec.strategy.round_timeout_seconds)
        return result

    def _complete_round(self, state: RoundState, started: float) -> None:
        with self.metrics.aggregation_duration.time():
            self.global_state = state.aggregation.result()
        central = self._evaluate_centrally()
        federated = self._evaluate_federated(state.number) \
            if self._federated_due(state.number) else None
        # The job's metrics: central when the task has a test set, else the sites' reports.
        loss, accuracy = central if central is not None else (
            (float(federated["loss"]), float(federated["accuracy"])) if federated is not None
            else (None, None))
        duration = time.monotonic() - started
        entry = {
            "round": state.number, "loss": loss, "accuracy": accuracy,
            "clients": state.accepted, "rejected": state.rejected,
            "sampled": len(state.sampled), "duration_seconds": round(duration, 4),
            "client_metrics": {k: v / max(state.examples, 1)
                               for k, v in state.client_metrics.items()},
            "federated_evaluation": federated,
        }
        if federated is not None:
            self.metrics.federated_loss.set(federated["loss"])
            self.metrics.federated_accuracy.set(federated["accuracy"])
        with self._cond:
            self.history.append(entry)
            self.completed = state.number
        self.metrics.round.set(state.number)
        self.metrics.round_duration.observe(duration)
        if loss is not None and accuracy is not None:
            self.metrics.global_loss.set(loss)
            self.metrics.global_accuracy.set(accuracy)
        log.info("round %d/%d: loss %s accuracy %s (%d clients, %d rejected, %.2fs)",
                 state.number, self.spec.rounds, _format(loss), _format(accuracy),
                 state.accepted, state.rejected, duration)
        every = self.spec.aggregator.checkpoint.every_rounds
        if state.number % every == 0 or state.number == self.spec.rounds:
            checkpoint.save(self.config.checkpoint_dir, checkpoint.Checkpoint(
                state.number, self.global_state, self.strategy.state_dict(), self.history,
                self._job))

    @property
    def _job(self) -> str:
        return f"{self.config.namespace}/{self.config.job_name}"

    def _restore(self) -> None:
        directory = self.config.checkpoint_dir
        saved = checkpoint.load(directory)
        if saved is None:
            return
        fix = ("delete it, or give this job a volume of its own "
               "(spec.aggregator.checkpoint.size or claimName)")
        if saved.job not in ("", self._job):
            raise ConfigurationError(
                f"the checkpoint in {directory} belongs to job {saved.job}, not {self._job}: "
                + fix)
        problem = checkpoint.model_mismatch(saved.model, self.global_state)
        if problem is not None:
            raise ConfigurationError(
                f"the checkpoint in {directory} does not fit this job's model ({problem}): "
                + fix)
        self.global_state = {k: v.to(self.device) for k, v in saved.model.items()}
        self.strategy.load_state_dict(saved.strategy)
        self.history = list(saved.history)
        self.completed = saved.round
        self.metrics.round.set(saved.round)
        log.info("resumed from the checkpoint after round %d", saved.round)

    def _write_outputs(self) -> None:
        output = Path(self.config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_save({k: v.cpu() for k, v in self.global_state.items()},
                               output / "model.pt")
        temporary = output / ".history.json.tmp"
        temporary.write_text(json.dumps(self.history, indent=2) + "\n")
        os.replace(temporary, output / "history.json")

    def _finish(self) -> None:
        """Tell polling clients the job is over, for a short grace period."""
        deadline = time.monotonic() + FINISH_GRACE_SECONDS
        with self._cond:
            self.finished = True
            self.current = None
            self._cond.notify_all()
            while time.monotonic() < deadline:
                waiting = set(self._connected(time.monotonic())) - self.told_finished
                if not waiting:
                    break
                self._cond.wait(0.2)

    def run(self) -> int:
        """The whole job; the exit code (0 after the final round)."""
        self._restore()
        first = True
        while self.completed < self.spec.rounds:
            number = self.completed + 1
            for attempt in range(1, MAX_ROUND_ATTEMPTS + 1):
                started = time.monotonic()
                state = self._run_round(number, attempt, first)
                first = False
                if state.accepted >= self.spec.strategy.min_clients:
                    self._complete_round(state, started)
                    break
                self.metrics.round_failures.inc()
                log.error(
                    "round %d attempt %d/%d: only %d of the %d sampled clients sent an accepted "
                    "update within roundTimeoutSeconds=%d (%d rejected), minClients is %d; "
                    "retrying", number, attempt, MAX_ROUND_ATTEMPTS, state.accepted,
                    len(state.sampled), self.spec.strategy.round_timeout_seconds,
                    state.rejected, self.spec.strategy.min_clients)
            else:
                message = (f"round {number} failed {MAX_ROUND_ATTEMPTS} times: fewer than "
                           f"minClients={self.spec.strategy.min_clients} accepted updates; "
                           "raise strategy.roundTimeoutSeconds or lower strategy.minClients")
                log.error(message)
                self._set_phase("Failed", message)
                self._finish()
                return 1
        self._write_outputs()
        self._set_phase("Succeeded", f"{self.spec.rounds} rounds completed")
        log.info("job finished: model and history in %s", self.config.output_dir)
        self._finish()
        return 0


class _HttpHandler(BaseHTTPRequestHandler):
    aggregator: Aggregator

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, kind = generate_latest(self.aggregator.metrics.registry), CONTENT_TYPE_LATEST
        elif path == "/status":
            body, kind = self.aggregator.report().model_dump_json().encode(), "application/json"
        elif path == "/history":
            with self.aggregator._cond:
                body = json.dumps(self.aggregator.history).encode()
            kind = "application/json"
        elif path == "/healthz":
            body, kind = b"ok\n", "text/plain"
        else:
            self.send_error(404, "try /metrics, /status, /history or /healthz")
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the log."""


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def watch_config(aggregator: Aggregator, path: Path, stop: threading.Event) -> None:
    """Take who takes part from the configuration file whenever it changes: the operator
    rewrites the job's ConfigMap in the reconcile that sees a site removed or added, and the
    kubelet updates the mounted file (``fedkube run`` writes it directly)."""
    seen = path.read_bytes()
    while not stop.wait(CONFIG_POLL_SECONDS):
        try:
            current = path.read_bytes()
            if current == seen:
                continue
            seen = current
            aggregator.take_membership(RuntimeConfig.from_file(path).spec)
        except (OSError, ConfigurationError) as error:
            log.warning("cannot read the changed configuration %s: %s", path, error)


def serve(config: RuntimeConfig, config_path: Path | None = None) -> int:
    """Run the aggregator of ``config`` with its gRPC and HTTP servers; the exit code.
    ``config_path``, when given, is watched for sites removed from the job."""
    aggregator = Aggregator(config)
    spec = config.spec
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * spec.num_clients + 16),
        options=protocol.channel_options(spec.transport.chunk_bytes))
    pb_grpc.add_FederationServicer_to_server(aggregator, server)
    address = f"{config.bind_address}:{spec.aggregator.port}"
    if config.tls_folder is None:
        log.warning("plaintext gRPC and no client identities (spec.security.tls.mode "
                    "Disabled): anyone who reaches %s can join", address)
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, security.server_credentials(
            config.tls_folder, aggregator.metrics.tls_handshakes.inc))
    handler = type("Handler", (_HttpHandler,), {"aggregator": aggregator})
    http = ThreadingHTTPServer((config.bind_address, spec.aggregator.metrics_port), handler)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
    stop = threading.Event()
    if config_path is not None:
        threading.Thread(target=watch_config, args=(aggregator, config_path, stop),
                         name="config", daemon=True).start()
    server.start()
    log.info("aggregator of %s/%s listening on %s (%s; metrics on :%d), device %s",
             config.namespace, config.job_name, address,
             "mutual TLS" if config.tls_folder else "plaintext", spec.aggregator.metrics_port,
             aggregator.device)
    try:
        return aggregator.run()
    finally:
        stop.set()
        server.stop(grace=1.0).wait()
        http.shutdown()
