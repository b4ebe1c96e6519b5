"""The gRPC face of the aggregator (``grpc.aio``): authenticates calls, counts refusals and
turns messages into calls on :class:`~fedkube.federation.aggregator.Aggregator`.

Every handler is a coroutine on the aggregator's event loop: a long-polling client costs a
suspended coroutine, not a thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from fedkube import pki
from fedkube.federation import protocol, security, transport
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.federation.registry import Session
from fedkube.federation.rounds import EvaluationRound

if TYPE_CHECKING:
    import torch

    from fedkube.federation.aggregator import Aggregator

log = logging.getLogger("fedkube.aggregator")

#: Models streamed to clients at once. Each stream holds a chunk or so (the one it serializes
#: and gRPC's copy): memory would grow with the sampled clients.
MAX_CONCURRENT_SENDS = 8


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                 details: str) -> NoReturn:
    """End the call with ``code``: grpc's abort raises, which its types do not say."""
    await context.abort(code, details)
    raise AssertionError("unreachable: grpc's abort raises")


_Chunk: TypeAlias = "pb.UpdateHeader | memoryview | DecodeError"


def _decode_update_chunk(raw: bytes) -> _Chunk:
    """An ``UpdateChunk`` as gRPC received it: its data a view of ``raw``, no copy. A malformed
    message comes back as its error so that the handler can reject the update with it."""
    try:
        chunk: pb.UpdateHeader | memoryview = protocol.decode_chunk(raw, pb.UpdateHeader)
    except DecodeError as error:
        return error
    return chunk


async def _data_chunks(messages: AsyncIterator[_Chunk]) -> AsyncIterator[memoryview]:
    """The data payloads that follow a header; a second header is a protocol error."""
    async for message in messages:
        if isinstance(message, DecodeError):
            raise transport.TransportError(f"a malformed chunk: {message}")
        yield protocol.expect_data(message)


def add_to_server(servicer: FederationServicer, server: grpc.aio.Server) -> None:
    """Serve ``servicer``: the generated registration, but with data chunks encoded and
    decoded by :mod:`fedkube.federation.protocol` instead of protobuf objects."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join, request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString),
        "PullTask": grpc.unary_stream_rpc_method_handler(
            servicer.PullTask, request_deserializer=pb.PullTaskRequest.FromString,
            response_serializer=protocol.serialize_chunk),
        "PushUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.PushUpdate, request_deserializer=_decode_update_chunk,
            response_serializer=pb.PushUpdateReply.SerializeToString),
        "PushEvaluation": grpc.unary_unary_rpc_method_handler(
            servicer.PushEvaluation, request_deserializer=pb.EvaluationReport.FromString,
            response_serializer=pb.PushEvaluationReply.SerializeToString),
    }
    service = pb.DESCRIPTOR.services_by_name["Federation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


class FederationServicer(pb_grpc.FederationServicer):  # type: ignore[misc]  # untyped base
    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.metrics = aggregator.metrics
        self._send_slots = asyncio.Semaphore(MAX_CONCURRENT_SENDS)

    async def _refuse(self, context: grpc.aio.ServicerContext,
                      refused: security.Refused) -> NoReturn:
        self.metrics.refusals[refused.reason].inc()
        log.warning("refused a call from %s (%s): %s", context.peer(), refused.reason, refused)
        await _abort(context, refused.code, str(refused))

    async def _identify(self, context: grpc.aio.ServicerContext) -> pki.Identity | None:
        """The caller's identity from its verified certificate (refused if it has none here)."""
        admission = self.aggregator.admission
        if admission.new_session(context.peer()):
            self.metrics.tls_sessions.inc()
        try:
            return admission.identify(context.auth_context())
        except security.Refused as refused:
            await self._refuse(context, refused)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> Session:
        """The caller's session, which must belong to the certificate that joined with it."""
        identity = await self._identify(context)
        client_id = str(dict(context.invocation_metadata() or ()).get(
            protocol.CLIENT_ID_KEY, ""))
        registry = self.aggregator.registry
        session = registry.get(client_id)
        if session is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"unknown client id {client_id!r}: join again")
        if session.identity != identity:
            await self._refuse(context, security.Refused(
                "wrong_session", grpc.StatusCode.PERMISSION_DENIED,
                f"client id {client_id} belongs to another site"))
        registry.touch(session)
        return session

    async def Join(self, request: pb.JoinRequest,
                   context: grpc.aio.ServicerContext) -> pb.JoinReply:
        identity = await self._identify(context)
        try:
            index = self.aggregator.admission.index_for(identity, request.index,
                                                        request.site_replica)
        except security.Refused as refused:
            await self._refuse(context, refused)
        session = self.aggregator.join(index, identity)
        return pb.JoinReply(client_id=session.client_id, index=index,
                            spec_json=self.aggregator.spec.model_dump_json(by_alias=True))

    async def PullTask(self, request: pb.PullTaskRequest,
                       context: grpc.aio.ServicerContext) -> None:
        session = await self._authenticate(context)
        aggregator = self.aggregator
        state = await aggregator.next_assignment(session.client_id, request.wait_seconds)
        # Taken before the first write: a dispatch lets go of its model once it closes.
        wire = state.wire if state is not None else None
        if state is None or wire is None:
            action = pb.TaskHeader.FINISHED if aggregator.finished else pb.TaskHeader.WAIT
            await context.write(pb.TaskChunk(header=pb.TaskHeader(action=action)))
            return
        if isinstance(state, EvaluationRound):
            header = pb.TaskHeader(action=pb.TaskHeader.EVALUATE, round=state.number,
                                   tensors=protocol.to_specs(state.metas))
        else:
            header = pb.TaskHeader(action=pb.TaskHeader.TRAIN, round=state.number,
                                   proximal_mu=aggregator.strategy.proximal_mu,
                                   tensors=protocol.to_specs(state.metas))
        await context.write(pb.TaskChunk(header=header))
        async with self._send_slots:
            stalled = await self._send_model(context, wire)
        if stalled:
            # Ended once the slot is free: ending a call sends its status behind the data
            # its client does not take.
            log.warning("dropped the download of round %d to %s: it took nothing for %.0f s",
                        state.number, session.client_id, aggregator.transfer_idle_seconds)
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"the download took nothing for "
                         f"{aggregator.transfer_idle_seconds:.0f} s: ask again")

    async def _send_model(self, context: grpc.aio.ServicerContext,
                          wire: Mapping[str, torch.Tensor]) -> bool:
        """Stream the model's chunks; True if the client stopped taking them. A client that
        stops reading would otherwise hold its send slot, and with a few of them every other
        download would wait, for as long as their connections live."""
        aggregator = self.aggregator
        for message in protocol.data_messages(wire, aggregator.chunk_bytes):
            try:
                async with asyncio.timeout(aggregator.transfer_idle_seconds):
                    await context.write(message)
            except TimeoutError:
                return True
            self.metrics.model_bytes.inc(len(message))
        return False

    async def PushUpdate(self, request_iterator: AsyncIterator[_Chunk],
                         context: grpc.aio.ServicerContext) -> pb.PushUpdateReply:
        session = await self._authenticate(context)
        first = await anext(request_iterator, None)
        if not isinstance(first, pb.UpdateHeader):
            self.metrics.updates["rejected"].inc()
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "an update starts with its header")
        status, reason = await self.aggregator.receive_update(
            session.client_id, first, _data_chunks(request_iterator))
        return pb.PushUpdateReply(status=status, reason=reason)

    async def PushEvaluation(self, request: pb.EvaluationReport,
                             context: grpc.aio.ServicerContext) -> pb.PushEvaluationReply:
        session = await self._authenticate(context)
        valid = (request.num_examples >= 0 and math.isfinite(request.loss)
                 and math.isfinite(request.accuracy) and 0.0 <= request.accuracy <= 1.0)
        if not valid:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "an evaluation has a finite loss, an accuracy in [0, 1] and an example "
                         "count of at least 0")
        accepted = self.aggregator.take_evaluation(session.client_id, request)
        return pb.PushEvaluationReply(status=pb.PushEvaluationReply.ACCEPTED if accepted
                                      else pb.PushEvaluationReply.LATE)
