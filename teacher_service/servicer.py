"""The gRPC servicer: proto in, domain objects to the engine, proto out. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from hyperdistill.common.codec import WIRE_DTYPES
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc
from hyperdistill.teacher_service import metrics
from hyperdistill.teacher_service.engine import TeacherEngine
from hyperdistill.teacher_service.scoring import Admission, Limits, Malformed, RequestError, StreamScorer


def add_to_server(servicer: TeacherServicer, server: grpc.aio.Server) -> None:
    """The generated registration, but parsing requests cannot fail: bytes that are not a valid
    message arrive as `Malformed` and are refused with INVALID_ARGUMENT (gRPC itself would answer
    UNKNOWN, or end a Score stream with OK and the request silently dropped)."""
    handlers = {
        "Score": grpc.stream_stream_rpc_method_handler(
            servicer.Score,
            request_deserializer=_lenient(pb.ScoreRequest),
            response_serializer=pb.ScoreChunk.SerializeToString,
        ),
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo,
            request_deserializer=_lenient(pb.GetInfoRequest),
            response_serializer=pb.TeacherInfo.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _lenient(message: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message.FromString(data)
        except DecodeError as e:
            return Malformed(f"request is not a valid {message.DESCRIPTOR.full_name} message ({e}, {len(data)} bytes)")

    return parse


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """Registered before the model loads (so health answers at once); UNAVAILABLE until ``ready``."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._engine: TeacherEngine | None = None
        self._limits: Limits | None = None
        self._info: pb.TeacherInfo | None = None

    def ready(self, engine: TeacherEngine, limits: Limits, tokenizer_fingerprint: str) -> None:
        self._engine, self._limits = engine, limits
        self._info = pb.TeacherInfo(
            engine=engine.info.name,
            model=engine.info.model,
            vocab_size=limits.vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint,
            max_model_len=limits.max_model_len,
            max_top_k=limits.max_top_k,
            dtype=WIRE_DTYPES[limits.logprob_dtype][0],
            max_request_bytes=limits.max_request_bytes,
        )

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.TeacherInfo:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if self._info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "teacher is loading its model")
        return self._info

    async def Score(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreChunk]:
        if self._engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "teacher is loading its model")
        # While draining, the stream's first request is refused with UNAVAILABLE by admission
        # (after it has been read: aborting before reading races the client's write).
        metrics.ACTIVE_STREAMS.inc()
        try:
            async for chunk in StreamScorer(self._engine, self._admission, self._limits).run(request_iterator):
                yield chunk
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.status], str(e))
        finally:
            metrics.ACTIVE_STREAMS.dec()
