"""The aggregator: runs a job's rounds, evaluates, checkpoints, reports.

One asyncio event loop owns all state (the :class:`~fedkube.federation.registry.Registry`,
the round in flight, the history), so nothing needs a lock: gRPC handlers
(:mod:`fedkube.federation.servicer`, ``grpc.aio``) and the round loop are coroutines on it,
and an idle or long-polling client holds no thread. Work that takes a model's worth of CPU
(folding an update, the new global model, central evaluation, checkpoints) runs in worker
threads (torch releases the GIL) so that the loop keeps serving while it runs.

Uploads are concurrent: each update is read chunk by chunk straight into pieces of the
received bytes (no assembly), checked as it lands, and folded in one pass once complete.
Folds are serialized, network reads are not. Received bytes waiting to be folded hold at most
:data:`UPLOAD_MEMORY_MODELS` models of memory, a model of it kept for the update next in fold
order; past that, the next few uploads in fold order wait for folds to free memory while folds
keep coming, and any other upload writes its chunks to a temporary file, so memory does not
grow with the number of clients and a stalled upload holds up no other for long. The model a
round sends is serialized by each client's stream as it goes, a chunk at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

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
from fedkube.federation.registry import Registry, Session
from fedkube.federation.rounds import (
    Dispatch,
    EvaluationRound,
    EvaluationSummary,
    PendingUpdate,
    RoundRecord,
    TrainingRound,
    sample,
    sample_size,
)
from fedkube.federation.servicer import FederationServicer, add_to_server
from fedkube.federation.spill import SpillFile
from fedkube.federation.strategies import (
    UpdateIncomplete,
    UpdateRejected,
    build_strategy_from_spec,
)
from fedkube.federation.strategies.base import check_num_examples
from fedkube.tasks.base import Validator, load_task

log = logging.getLogger("fedkube.aggregator")

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
#: Models (of the wire's size) of received update bytes held in memory until folded. Beyond
#: it, arriving chunks are written to a temporary file (the page cache, read back a chunk at a
#: time when folded), and the FedAvg aggregator's tensors stay within 3.5 models (the global
#: one, the accumulator and these), whatever the number of clients: half a model under four
#: copies for gRPC's buffers and a round's passing chunks (3.7 copies at 100M parameters in
#: hack/bench_whole_round.py; 2 models of them gave 4.3). One model of it is the share of the
#: update next in fold order, which frees its memory as soon as it is complete; the others
#: share the rest (:meth:`Aggregator._memory_share`, :meth:`Aggregator._room_for`).
UPLOAD_MEMORY_MODELS = 1.5
#: An upload among the next this many in fold order after the one next to fold, whose chunk
#: finds its share of memory taken, waits for the uploads ahead of it to be folded instead of
#: writing to the spill file, for as long as a fold comes at least every
#: :data:`MEMORY_WAIT_SECONDS`. Once one waited that long, the round's uploads spill what does
#: not fit until the next fold, and so do uploads further behind. Writing a chunk to the page
#: cache and reading it back costs more CPU than receiving it (hack/bench_whole_round.py, 100M
#: parameters: 12-16% of the aggregator's CPU), while waiting costs nothing when the aggregator,
#: not the network, sets the pace; the bound keeps a stalled upload from holding up the others
#: for longer than that.
MEMORY_WAITERS = 8
MEMORY_WAIT_SECONDS = 2.0
#: A transfer that moves no chunk for this long (longer for chunks that take longer at
#: :data:`SLOWEST_TRANSFER_BYTES_PER_SECOND`) is dropped: an upload is rejected, a model's
#: download ended (its client asks again), so that a client that stalls holds up no other.
TRANSFER_IDLE_SECONDS = 10.0
SLOWEST_TRANSFER_BYTES_PER_SECOND = 1 << 20

T = TypeVar("T")


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Aggregator:
    """One job's aggregator; :meth:`run` returns the process exit code.

    Every method runs on the event loop; :meth:`report` and :meth:`history_json` are the
    thread-safe views for the HTTP server.
    """

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.spec = config.spec
        self.admission = security.Admission(config.namespace, config.job_name, self.spec,
                                            tls=config.tls_folder is not None)
        self.registry = Registry()
        self.device = select_device()
        self.task = load_task(self.spec.task.entrypoint)
        self.model = self.task.model(self.spec.task.config).to(self.device)
        self.strategy = build_strategy_from_spec(
            self.spec, device=self.device, seed=self.spec.clients.data.partitioning.seed)
        self.metrics = AggregatorMetrics(config.job_name, config.namespace)
        self.wire_dtype = transport.TRANSFER_DTYPES[self.spec.transport.update_dtype]
        # The model's own tensors: evaluation loads new globals with assign=True, so the
        # module and the global state share one copy.
        self.global_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        self.model_bytes = transport.encoded_nbytes(self.global_state, self.wire_dtype)
        """The model's bytes on the wire."""
        self.chunk_bytes = self.spec.transport.chunk_size(self.model_bytes)
        """The chunk size of the model's streams and the clients' updates."""
        self.transfer_idle_seconds = max(
            TRANSFER_IDLE_SECONDS, self.chunk_bytes / SLOWEST_TRANSFER_BYTES_PER_SECOND)
        """How long an upload or a download may move no chunk before it is dropped."""
        self.history: list[RoundRecord] = []
        self.completed = 0
        self.phase: AggregatorPhase = "Waiting"
        self.message = ""
        self.current: TrainingRound | None = None
        self.evaluating: EvaluationRound | None = None
        self.central_test_set: bool | None = None
        """Whether the task has a central test set; known after its first evaluate."""
        self.finished = False
        self.told_finished: set[str] = set()
        self._changed = asyncio.Event()
        self._held_bytes = 0
        """Received update bytes held in memory by uploads in progress."""
        self._spill = SpillFile()
        self._polls: dict[str, asyncio.Event] = {}
        """Long-polling clients, each woken when something is due for it: waking every poll
        at every change would cost a round with N clients N² wake-ups."""
        self._fold_lock = asyncio.Lock()
        self._folding: set[asyncio.Task[None]] = set()
        """Folds under way: the event loop keeps only weak references to tasks."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics.rounds_total.set(self.spec.rounds)
        federated = self.spec.evaluation.mode in ("federated", "both")
        if federated and not isinstance(self.task, Validator):
            raise ConfigurationError(
                f"spec.evaluation.mode is {self.spec.evaluation.mode}, but the task "
                f"{self.spec.task.entrypoint} has no validate(model, data, config, device) "
                "for the clients to evaluate with: use mode central, or give the task one")

    # ---- waiting and waking ----------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every coroutine waiting for a change of state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, ready: Callable[[], bool], deadline: float,
                          tick: float | None = None) -> bool:
        """Wait until ``ready()`` (re-checked at each change, and every ``tick`` seconds for
        conditions that time changes, like liveness) or ``deadline``; whether it is ready."""
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self._next_change(min(remaining, tick or remaining))
        return True

    async def _next_change(self, seconds: float) -> None:
        """Wait for the next change of state, at most ``seconds``."""
        changed = self._changed
        try:
            async with asyncio.timeout(seconds):
                await changed.wait()
        except TimeoutError:
            pass

    # ---- views for the HTTP thread ---------------------------------------------------------

    def _in_loop(self, make: Callable[[], T]) -> T:
        """``make()`` run on the event loop, from another thread."""
        assert self._loop is not None, "the aggregator is not running"

        async def call() -> T:
            return make()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def _connected(self) -> list[str]:
        training = self.current.sampled - self.current.answered if self.current else set()
        return self.registry.live(training)

    def _report(self) -> AggregatorReport:
        last = self.history[-1] if self.history else None
        return AggregatorReport(
            phase=self.phase, round=self.completed, rounds=self.spec.rounds,
            clients_connected=len(self._connected()),
            metrics=JobMetrics(loss=last.loss if last else None,
                               accuracy=last.accuracy if last else None),
            message=self.message)

    def report(self) -> AggregatorReport:
        return self._in_loop(self._report)

    def history_json(self) -> bytes:
        return self._in_loop(lambda: json.dumps([r.as_dict() for r in self.history]).encode())

    # ---- what the servicer calls -----------------------------------------------------------

    def join(self, index: int, identity: pki.Identity | None) -> Session:
        old = self.registry.of_index(index)
        session = self.registry.join(index, identity)
        for state in (self.current, self.evaluating):
            if (old is not None and state is not None and not state.closed
                    and state.hand_over(old.client_id, session.client_id)):
                log.info("client %s took the place of %s in round %d", session.client_id,
                         old.client_id, state.number)
                self._wake([session.client_id])
        self.metrics.clients_connected.set(len(self._connected()))
        self._notify()
        log.info("client %s joined (index %d%s)", session.client_id, index,
                 f", site {identity.name}" if identity is not None else "")
        return session

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
        self.registry.revoke(revoked)
        self._notify()
        log.warning("revoked %s: no longer in the job's sites",
                    ", ".join(sorted(site or pki.CLIENTS for site in revoked)))

    async def next_assignment(self, client_id: str, wait_seconds: float) -> Dispatch | None:
        """The round this client should train, or the model it should evaluate, now; None
        when finished or when nothing is due within ``wait_seconds``."""
        deadline = time.monotonic() + min(max(wait_seconds, 0.0), MAX_POLL_SECONDS)
        while not self.finished:
            for state in (self.current, self.evaluating):
                if state is not None and state.due(client_id):
                    if client_id in state.dispatched:
                        log.info("client %s asks again for round %d without having answered "
                                 "(its download or upload broke off): sending the model again",
                                 client_id, state.number)
                    state.dispatched.add(client_id)
                    return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            woken = self._polls[client_id] = asyncio.Event()
            try:
                async with asyncio.timeout(remaining):
                    await woken.wait()
            except TimeoutError:
                return None
            finally:
                if self._polls.get(client_id) is woken:
                    del self._polls[client_id]
        self.told_finished.add(client_id)
        self._notify()
        return None

    def _wake(self, client_ids: Iterable[str] | None = None) -> None:
        """Wake the long polls of ``client_ids`` (None: of every client)."""
        for client_id in list(self._polls) if client_ids is None else client_ids:
            woken = self._polls.get(client_id)
            if woken is not None:
                woken.set()

    def _unwanted(self, state: Dispatch | None, client_id: str, number: int,
                  late: Mapping[str, Any] | None = None) -> str | None:
        """Why a client's answer for round ``number`` is not taken, counted; None if it is.
        Sent twice (a replay) or unasked (not sampled) is a refusal; after the round, late."""
        if state is not None and not state.closed and number == state.number:
            if client_id in state.answered or client_id in state.receiving:
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

    async def receive_update(self, client_id: str, header: pb.UpdateHeader,
                             chunks: AsyncIterator[bytes | memoryview],
                             ) -> tuple[pb.PushUpdateReply.Status, str]:
        """Receive one client's update and fold it in its turn; the reply's status and
        reason."""
        state = self.current
        unwanted = self._unwanted(state, client_id, header.round)
        if unwanted is not None:
            return pb.PushUpdateReply.LATE, unwanted
        assert state is not None
        state.receiving.add(client_id)
        try:
            reason = await self._receive(state, client_id, header, chunks)
        except _RoundClosed:
            self.metrics.updates["late"].inc()
            return pb.PushUpdateReply.LATE, "the round is over"
        except UpdateIncomplete as broken:
            # Not an answer: the client asks for the round again and sends the whole update
            # (Dispatch.due), as after a download that broke off.
            self.metrics.updates["rejected"].inc()
            log.warning("the update from %s in round %d broke off (%s); it may come again",
                        client_id, state.number, broken.reason)
            self._wake([client_id])
            return (pb.PushUpdateReply.REJECTED,
                    f"{broken.reason}: ask for the round again and send the whole update")
        finally:
            state.receiving.discard(client_id)
        state.answered.add(client_id)
        if reason is None:
            state.record_accepted(header.num_examples, header.metrics)
        else:
            state.rejected += 1
            state.failed.add(client_id)
        self._notify()
        # Counted before the fold: a client that hangs up now still has its update folded.
        if reason is not None:
            self.metrics.updates["rejected"].inc()
            log.warning("rejected update from %s in round %d: %s",
                        client_id, state.number, reason)
        else:
            self.metrics.updates["accepted"].inc()
        await self._fold_in_order(state)
        if reason is not None:
            return pb.PushUpdateReply.REJECTED, reason
        return pb.PushUpdateReply.ACCEPTED, ""

    async def _receive(self, state: TrainingRound, client_id: str, header: pb.UpdateHeader,
                       chunks: AsyncIterator[bytes | memoryview]) -> str | None:
        """Read and check one update, and queue it for folding; the reason if rejected.
        :class:`_RoundClosed` when the round ends first."""
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
        assert state.aggregation is not None
        idle = self.transfer_idle_seconds
        try:
            check_num_examples(int(header.num_examples))
            reader = state.aggregation.reader(metas)
        except UpdateRejected as error:
            return error.reason
        queued = False
        try:
            while (chunk := await self._next_chunk(state, chunks, idle)) is not None:
                in_memory = await self._room_for(state, client_id, len(chunk))
                held = reader.held
                reader.feed(chunk, None if in_memory else self._spill)
                self._hold(reader.held - held)
                if not in_memory:
                    self.metrics.spilled_bytes.inc(len(chunk))
            update = reader.finish()
            self.metrics.update_bytes.inc(reader.received)
            if state.closed:
                update.close()
                raise _RoundClosed
            state.pending[client_id] = PendingUpdate(update, int(header.num_examples),
                                                     reader.held)
            queued = True
        except UpdateIncomplete:
            raise
        except UpdateRejected as error:
            return error.reason
        except transport.TransportError as error:
            return str(error)
        except TimeoutError:
            return f"the upload sent nothing for {idle:.0f} s"
        finally:
            if not queued:
                self._hold(-reader.held)
                reader.close()
        return None

    def _hold(self, size: int) -> None:
        """Count ``size`` more received bytes held in memory (fewer when negative)."""
        self._held_bytes += size
        self.metrics.update_bytes_in_memory.set(self._held_bytes)

    async def _fold_in_order(self, state: TrainingRound, *, closing: bool = False) -> None:
        """Fold the pending updates whose predecessors in :attr:`TrainingRound.fold_order`
        have all answered (all of them when ``closing``: no more answers come).

        The folding belongs to the round, not to the caller: a handler cancelled while it
        waits (its client hung up after the last chunk) leaves it to finish. Cancelled with
        it, a fold would go on in its worker thread while the lock let the next fold into the
        same accumulator, the update's spill regions went back to the file under it, and its
        bytes stayed counted as held for the rest of the job."""
        folding = asyncio.create_task(self._fold_ready(state, closing))
        self._folding.add(folding)
        folding.add_done_callback(self._folding.discard)
        await asyncio.shield(folding)

    async def _fold_ready(self, state: TrainingRound, closing: bool) -> None:
        """:meth:`_fold_in_order`'s work, in a task of its own."""
        assert state.aggregation is not None
        async with self._fold_lock:
            while state.folded < len(state.fold_order):
                client_id = state.fold_order[state.folded]
                if client_id not in state.answered and not closing:
                    return
                pending = state.pending.pop(client_id, None)
                if pending is not None:
                    with pending.update, self.metrics.aggregation_duration.time():
                        await asyncio.to_thread(state.aggregation.accept, pending.update,
                                                pending.num_examples)
                    self._hold(-pending.held_bytes)
                # Done with it only once its memory is free: while it folds, the upload behind
                # it still waits for it (_room_for) rather than take the whole budget as next
                # to fold and spill what the folding update still holds.
                state.folded += 1
                # Another upload is next to fold, and memory may be free: uploads waiting for
                # room look again.
                self._notify()

    def _memory_share(self, state: TrainingRound, client_id: str) -> float:
        """The most received bytes memory may hold with a chunk of ``client_id``'s upload
        among them (past it, the chunk is spilled): the whole budget for the update next in
        fold order, which is folded and frees its memory as soon as it is complete; a model
        less for the others, which wait for it."""
        budget = UPLOAD_MEMORY_MODELS * self.model_bytes
        next_to_fold = (state.folded < len(state.fold_order)
                        and state.fold_order[state.folded] == client_id)
        return budget if next_to_fold else budget - self.model_bytes

    async def _room_for(self, state: TrainingRound, client_id: str, size: int) -> bool:
        """Whether a chunk of ``size`` bytes of ``client_id``'s upload is held in memory
        (within its share, :meth:`_memory_share`) rather than spilled. An upload among the
        :data:`MEMORY_WAITERS` after the one next to fold waits for room for as long as folds
        keep coming; one that waits :data:`MEMORY_WAIT_SECONDS` for a fold stops every upload
        of the round from waiting until the next fold (:attr:`TrainingRound.spill_until_fold`):
        the one next to fold stalled or has not started, and a wait for it only delays the
        others. :class:`_RoundClosed` if the round ends while it waits."""
        def fits() -> bool:
            return self._held_bytes + size <= self._memory_share(state, client_id)

        while not fits():
            # Not the one next to fold: only its own fold could make room for it.
            behind = state.fold_order[state.folded + 1:state.folded + MEMORY_WAITERS + 1]
            if client_id not in behind or state.spill_until_fold == state.folded:
                return False

            def changed(folded: int = state.folded) -> bool:
                return (state.closed or fits() or state.folded != folded
                        or state.spill_until_fold == folded)

            self.metrics.uploads_waiting.inc()
            try:
                changed_in_time = await self._wait_until(
                    changed, time.monotonic() + MEMORY_WAIT_SECONDS)
            finally:
                self.metrics.uploads_waiting.dec()
            if not changed_in_time:
                state.spill_until_fold = state.folded
                self._notify()  # the other waiting uploads stop waiting too
                return False
            if state.closed:
                raise _RoundClosed
        return True

    @staticmethod
    async def _next_chunk(state: TrainingRound, chunks: AsyncIterator[bytes | memoryview],
                          idle: float) -> bytes | memoryview | None:
        """The next chunk; None at the stream's end. A stream silent for ``idle`` seconds
        raises TimeoutError, and one still arriving when the round ends :class:`_RoundClosed`."""
        if state.closed:
            raise _RoundClosed
        until_close = state.deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, min(idle, until_close))):
                return await anext(chunks, None)
        except TimeoutError:
            if until_close <= idle:
                raise _RoundClosed from None
            raise

    def take_evaluation(self, client_id: str, report: pb.EvaluationReport) -> bool:
        """Record a client's evaluation of the model sent to it; False when late."""
        state = self.evaluating
        if self._unwanted(state, client_id, report.round, self.metrics.evaluations):
            return False
        assert state is not None
        state.answered.add(client_id)
        state.record(report.num_examples, report.loss, report.accuracy)
        self._notify()
        self.metrics.evaluations["accepted"].inc()
        return True

    def close(self) -> None:
        """Drop the spill file."""
        self._spill.close()

    # ---- round loop ------------------------------------------------------------------------

    def _set_phase(self, phase: AggregatorPhase, message: str = "") -> None:
        self.phase, self.message = phase, message

    async def _wait_for_clients(self, needed: int, wanted: int, grace: float) -> list[str]:
        """Wait until ``needed`` clients are connected, then up to ``grace`` seconds more
        until ``wanted`` are."""
        enough_since: float | None = None
        while True:
            now = time.monotonic()
            connected = self._connected()
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
            await self._next_change(1.0)

    async def _open_round(self, number: int, connected: list[str],
                          attempt: int) -> TrainingRound:
        strategy_spec = self.spec.strategy
        count = sample_size(len(connected), strategy_spec.fraction_fit, strategy_spec.min_clients)
        sampled = sample(connected, count,
                         f"{self.spec.clients.data.partitioning.seed}/{number}/{attempt}")
        metas, wire = await asyncio.to_thread(self._encode_model)
        aggregation = await asyncio.to_thread(self.strategy.new_round, self.global_state,
                                              count)
        indices = {client_id: self.registry.index_of(client_id) for client_id in sampled}
        return TrainingRound(number, sampled, metas, wire, aggregation=aggregation,
                             fold_order=sorted(sampled, key=indices.__getitem__))

    def _encode_model(self) -> tuple[list[transport.TensorMeta], dict[str, torch.Tensor]]:
        """The global model's manifest and its tensors as they go on the wire (in a worker
        thread: a 16-bit wire dtype converts every tensor)."""
        wire = transport.encode(self.global_state, self.wire_dtype)
        return transport.manifest(wire), wire

    async def _run_round(self, number: int, attempt: int, first: bool) -> TrainingRound:
        strategy_spec = self.spec.strategy
        grace = min(JOIN_GRACE_SECONDS, strategy_spec.round_timeout_seconds) if first else 0.0
        connected = await self._wait_for_clients(strategy_spec.min_clients,
                                                 self.spec.num_clients, grace)
        state = await self._open_round(number, connected, attempt)
        deadline = state.deadline = time.monotonic() + strategy_spec.round_timeout_seconds
        self.current = state
        self.phase, self.message = "Running", f"round {number}: {len(state.sampled)} sampled"
        self.metrics.clients_sampled.set(len(state.sampled))
        self._wake(state.sampled)
        # Ticks: a sampled client that dies is noticed when its liveness runs out.
        await self._wait_until(lambda: state.complete, deadline, tick=1.0)
        async with self._fold_lock:
            state.close()
        await self._fold_in_order(state, closing=True)
        self._notify()
        return state

    def _evaluate_centrally(self) -> tuple[float, float] | None:
        """The task's central evaluation of the global model (in a worker thread); None when
        the task has no central test set (its data stays at the sites) or the job asks for
        none."""
        if self.spec.evaluation.mode == "federated" or self.central_test_set is False:
            return None
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

    async def _evaluate_federated(self, number: int) -> EvaluationSummary | None:
        """Have sampled clients evaluate the new global model on their own validation data;
        their example-weighted reports, or None when none came within roundTimeoutSeconds."""
        evaluation = self.spec.evaluation
        connected = self._connected()
        if not connected:
            return None
        count = min(len(connected), max(1, math.ceil(evaluation.fraction * len(connected))))
        metas, wire = await asyncio.to_thread(self._encode_model)
        state = EvaluationRound(
            number, sample(connected, count,
                           f"{self.spec.clients.data.partitioning.seed}/evaluate/{number}"),
            metas, wire)
        deadline = time.monotonic() + self.spec.strategy.round_timeout_seconds
        self.evaluating = state
        self.message = f"round {number}: evaluating on {count} clients"
        self._wake(state.sampled)
        await self._wait_until(lambda: state.complete, deadline, tick=1.0)
        state.close()
        self.evaluating = None
        summary = state.summary()
        if summary is None:
            log.warning("round %d: no client reported its evaluation within "
                        "roundTimeoutSeconds=%d", number, self.spec.strategy.round_timeout_seconds)
        return summary

    def _aggregate(self, state: TrainingRound) -> None:
        """The new global model (in a worker thread); the module shares its tensors."""
        assert state.aggregation is not None
        with self.metrics.aggregation_duration.time():
            self.global_state = state.aggregation.result()
            self.model.load_state_dict(self.global_state, assign=True)

    async def _complete_round(self, state: TrainingRound, started: float) -> None:
        await asyncio.to_thread(self._aggregate, state)
        state.aggregation = None
        central = await asyncio.to_thread(self._evaluate_centrally)
        federated = await self._evaluate_federated(state.number) \
            if self._federated_due(state.number) else None
        # The job's metrics: central when the task has a test set, else the sites' reports.
        loss, accuracy = central if central is not None else (
            (federated.loss, federated.accuracy) if federated is not None else (None, None))
        duration = time.monotonic() - started
        record = RoundRecord(
            round=state.number, loss=loss, accuracy=accuracy, clients=state.accepted,
            rejected=state.rejected, sampled=len(state.sampled),
            duration_seconds=round(duration, 4),
            client_metrics={k: v / max(state.examples, 1) for k, v in state.metric_sums.items()},
            federated_evaluation=federated)
        if federated is not None:
            self.metrics.federated_loss.set(federated.loss)
            self.metrics.federated_accuracy.set(federated.accuracy)
        self.history.append(record)
        every = self.spec.aggregator.checkpoint.every_rounds
        if state.number % every == 0 or state.number == self.spec.rounds:
            saved = checkpoint.Checkpoint(
                state.number, self.global_state, self.strategy.state_dict(),
                [r.as_dict() for r in self.history], self._job)
            await asyncio.to_thread(checkpoint.save, self.config.checkpoint_dir, saved)
        # Reported once saved: a round /status and the metrics count survives a restart.
        self.completed = state.number
        self.metrics.round.set(state.number)
        self.metrics.round_duration.observe(duration)
        if loss is not None and accuracy is not None:
            self.metrics.global_loss.set(loss)
            self.metrics.global_accuracy.set(accuracy)
        log.info("round %d/%d: loss %s accuracy %s (%d clients, %d rejected, %.2fs)",
                 state.number, self.spec.rounds, _format(loss), _format(accuracy),
                 state.accepted, state.rejected, duration)

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
        self.model.load_state_dict(self.global_state, assign=True)
        self.strategy.load_state_dict(saved.strategy)
        self.history = [RoundRecord.from_dict(entry) for entry in saved.history]
        self.completed = saved.round
        self.metrics.round.set(saved.round)
        log.info("resumed from the checkpoint after round %d", saved.round)

    def _write_outputs(self) -> None:
        output = Path(self.config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_save({k: v.cpu() for k, v in self.global_state.items()},
                               output / "model.pt")
        temporary = output / ".history.json.tmp"
        temporary.write_text(json.dumps([r.as_dict() for r in self.history], indent=2) + "\n")
        os.replace(temporary, output / "history.json")

    async def _finish(self) -> None:
        """Tell polling clients the job is over, for a short grace period."""
        self.finished = True
        self.current = None
        self._wake()
        await self._wait_until(lambda: not set(self._connected()) - self.told_finished,
                                time.monotonic() + FINISH_GRACE_SECONDS, tick=0.2)

    async def run(self) -> int:
        """The whole job; the exit code (0 after the final round)."""
        await asyncio.to_thread(self._restore)
        first = True
        while self.completed < self.spec.rounds:
            number = self.completed + 1
            for attempt in range(1, MAX_ROUND_ATTEMPTS + 1):
                started = time.monotonic()
                state = await self._run_round(number, attempt, first)
                first = False
                if state.accepted >= self.spec.strategy.min_clients:
                    await self._complete_round(state, started)
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
                await self._finish()
                return 1
        await asyncio.to_thread(self._write_outputs)
        self._set_phase("Succeeded", f"{self.spec.rounds} rounds completed")
        log.info("job finished: model and history in %s", self.config.output_dir)
        await self._finish()
        return 0


class _RoundClosed(Exception):
    """The round ended while an update was arriving: the update is late."""


class _HttpHandler(BaseHTTPRequestHandler):
    aggregator: Aggregator

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, kind = generate_latest(self.aggregator.metrics.registry), CONTENT_TYPE_LATEST
        elif path == "/status":
            body, kind = self.aggregator.report().model_dump_json().encode(), "application/json"
        elif path == "/history":
            body, kind = self.aggregator.history_json(), "application/json"
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


async def watch_config(aggregator: Aggregator, path: Path) -> None:
    """Take who takes part from the configuration file whenever it changes: the operator
    rewrites the job's ConfigMap in the reconcile that sees a site removed or added, and the
    kubelet updates the mounted file (``fedkube run`` writes it directly)."""
    seen = await asyncio.to_thread(path.read_bytes)
    while True:
        await asyncio.sleep(CONFIG_POLL_SECONDS)
        try:
            current = await asyncio.to_thread(path.read_bytes)
            if current == seen:
                continue
            seen = current
            aggregator.take_membership(RuntimeConfig.from_file(path).spec)
        except (OSError, ConfigurationError) as error:
            log.warning("cannot read the changed configuration %s: %s", path, error)


async def _serve(config: RuntimeConfig, config_path: Path | None) -> int:
    aggregator = Aggregator(config)
    spec = config.spec
    server = grpc.aio.server(options=protocol.channel_options(spec.transport.largest_chunk))
    add_to_server(FederationServicer(aggregator), server)
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
    aggregator._loop = asyncio.get_running_loop()
    threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
    watcher = (asyncio.create_task(watch_config(aggregator, config_path))
               if config_path is not None else None)
    await server.start()
    log.info("aggregator of %s/%s listening on %s (%s; metrics on :%d), device %s; the model "
             "is %.1f MB on the wire, streamed in %d KiB chunks", config.namespace,
             config.job_name, address, "mutual TLS" if config.tls_folder else "plaintext",
             spec.aggregator.metrics_port, aggregator.device, aggregator.model_bytes / 1e6,
             aggregator.chunk_bytes >> 10)
    try:
        return await aggregator.run()
    finally:
        if watcher is not None:
            watcher.cancel()
        await server.stop(grace=1.0)
        http.shutdown()
        aggregator.close()


def serve(config: RuntimeConfig, config_path: Path | None = None) -> int:
    """Run the aggregator of ``config`` with its gRPC and HTTP servers; the exit code.
    ``config_path``, when given, is watched for sites removed from the job."""
    return asyncio.run(_serve(config, config_path))
