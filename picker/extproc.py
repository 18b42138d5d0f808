"""Envoy's ext_proc protocol, in both request-body modes gateways configure.

- BUFFERED (our own Envoy): the headers are answered at once, the whole body
  arrives in one message, and its answer carries the destination.
- FULL_DUPLEX_STREAMED (Envoy AI Gateway's default for an InferencePool): the
  body arrives in chunks without waiting for answers; the headers answer (with
  the destination) is held until the body is complete, and the body is then
  streamed back, since what the picker does not send back the model server
  never gets. Response bodies in this mode are echoed chunk by chunk.
The mode is read from the stream's first message (`protocol_config`).

The gateway may narrow the candidates (`envoy.lb.subset_hint`) and reports the
endpoint that served the request (`envoy.lb`, `...-served`), both per the
upstream endpoint-picker protocol.

This is the edge: it speaks the protocol and hands the request to the director
(`picker/director.py`), which runs its sequence. GatewayErrors become
OpenAI-shaped immediate responses here and nowhere else, and it is the one
guard around the request path: any other exception is logged with its traceback
and answered with an OpenAI-shaped 500, so no input can break the stream and
send the request past the picker. Envoy keeps the stream open until the HTTP
exchange ends, so the stream's end is the request's end: the director finishes
it then.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from gateway_state.protocol import (
    DESTINATION_HEADER,
    FAIRNESS_HEADERS,
    LB_METADATA_NAMESPACE,
    MIRROR_FRACTION_METADATA_KEY,
    MIRROR_POOL_METADATA_KEY,
    OBJECTIVE_HEADERS,
    POOL_METADATA_KEY,
    SERVED_ENDPOINT_KEY,
    SUBSET_HINT_KEY,
    SUBSET_HINT_NAMESPACE,
)
from picker.director import Answer, Arrival, Director
from picker.errors import BadRequest, GatewayError, InternalError, MethodNotAllowed, PickerUnavailable
from picker.intake import models
from picker.metrics import PickerMetrics
from picker.roles import Mirror
from picker.snapshot import SnapshotSource

log = logging.getLogger("picker")

_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
_DUPLEX = processing_mode_pb2.ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
# Bodies go back to Envoy in chunks of this size; gRPC messages stay small.
_STREAMED_CHUNK_BYTES = 64 * 1024


@dataclass
class _Stream:
    pool: str | None
    mirror: Mirror | None = None  # the route's InferencePool mirror
    request_id: str = ""
    method: str = ""
    path: str = ""
    body: bytearray = field(default_factory=bytearray)
    answer: Answer | None = None  # the director's, once placed
    duplex_request: bool = False  # FULL_DUPLEX_STREAMED: headers answered after the body, body sent back
    duplex_response: bool = False
    subset: frozenset[str] | None = None  # the gateway's candidate endpoints, when it narrows them
    objective: str | None = None  # the InferenceObjective the request names
    tenant: str = ""  # its fairness id (flow control)
    decided: bool = False  # the request has had its answer (a destination or an immediate response)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=_OVERWRITE)


def _immediate(status: int, body: dict[str, object], details: str,
               retry_after_s: int | None = None) -> pb.ProcessingResponse:
    headers = [_header("content-type", "application/json")]
    if retry_after_s is not None:
        headers.append(_header("retry-after", str(retry_after_s)))
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status={"code": status},
        headers=pb.HeaderMutation(set_headers=headers),
        body=json.dumps(body).encode(), details=details))


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated code, untyped
    def __init__(self, snapshots: SnapshotSource, director: Director, metrics: PickerMetrics,
                 default_pool: str | None = None) -> None:
        """`snapshots`: for `GET /v1/models`, which lists the route's models without placing anything."""
        self._snapshots = snapshots
        self._director = director
        self._metrics = metrics
        # The pool of a picker deployed for one InferencePool, when the gateway names none.
        self._default_pool = default_pool

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        metadata = dict(context.invocation_metadata() or ())
        stream = _Stream(pool=metadata.get(POOL_METADATA_KEY) or self._default_pool, mirror=_mirror(metadata))
        first = True
        try:
            async for message in request_iterator:
                if first:
                    first = False
                    stream.duplex_request = message.protocol_config.request_body_mode == _DUPLEX
                    stream.duplex_response = message.protocol_config.response_body_mode == _DUPLEX
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    try:
                        stream.subset = _subset_hint(message.metadata_context)
                        response = self._on_headers(stream, message.request_headers)
                    except Exception as exc:  # noqa: BLE001 (the one guard: see the module's docstring)
                        response = self._internal_error(stream, exc)
                    if response is not None:
                        yield response
                elif kind == "request_body":
                    if stream.decided:  # rejected at the headers: the rest of the body is moot
                        continue
                    stream.body += message.request_body.body
                    if message.request_body.end_of_stream:
                        for response in await self._decide(stream, context):
                            yield response
                    elif not stream.duplex_request:
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                elif kind == "request_trailers":
                    if stream.duplex_request and not stream.decided:  # trailers end a streamed body
                        for response in await self._decide(stream, context):
                            yield response
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_headers":
                    self._served(stream, message.metadata_context)
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif kind == "response_body":
                    yield _response_body(stream, message.response_body)
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:
            if stream.answer is not None:
                self._director.finish(stream.answer)

    async def _decide(self, stream: _Stream, context: grpc.aio.ServicerContext) -> list[pb.ProcessingResponse]:
        stream.decided = True
        try:
            return await self._on_body(stream)
        except PickerUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # abort raises; this line is never reached
        except Exception as exc:  # noqa: BLE001 (the one guard: see the module's docstring)
            return [self._internal_error(stream, exc)]

    def _served(self, stream: _Stream, context: base_pb2.Metadata) -> None:
        """Count which endpoint the gateway reports served the request: the picked one, or a fallback."""
        if stream.answer is None or LB_METADATA_NAMESPACE not in context.filter_metadata:
            return
        field = context.filter_metadata[LB_METADATA_NAMESPACE].fields.get(SERVED_ENDPOINT_KEY)
        if field is None:
            return
        served = field.string_value
        primary = stream.answer.placements.primary
        keys = [c.endpoint.key for c in primary.endpoints]
        outcome = "picked" if served == keys[0] else "fallback" if served in keys else "other"
        self._metrics.of(self._metrics.served_endpoints, primary.pool, outcome).inc()

    def _internal_error(self, stream: _Stream, exc: Exception) -> pb.ProcessingResponse:
        log.error("Request Failed request_id=%s pool=%s path=%s: internal error", stream.request_id or "-",
                  stream.pool or "-", stream.path, exc_info=exc)
        self._metrics.internal_errors.inc()
        return self._reject(stream, InternalError("The gateway failed to route the request; it has been logged."))

    def _on_headers(self, stream: _Stream, headers: pb.HttpHeaders) -> pb.ProcessingResponse | None:
        for h in headers.headers.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            if h.key == ":method":
                stream.method = value
            elif h.key == ":path":
                stream.path = value
            elif h.key == "x-request-id":
                stream.request_id = value
            elif h.key in OBJECTIVE_HEADERS:
                stream.objective = value
            elif h.key in FAIRNESS_HEADERS:
                stream.tenant = value
        path = stream.path.split("?", 1)[0]
        if stream.method == "GET" and path.rstrip("/") == "/v1/models":
            return self._models(stream)
        if stream.method != "POST":
            return self._reject(stream, MethodNotAllowed(
                f"Method {stream.method} is not allowed for {path}; send POST with a JSON body."))
        if headers.end_of_stream:
            return self._reject(stream, BadRequest("Request body is empty; expected a JSON object."))
        # Duplex: the headers' answer carries the destination, so it waits for the body.
        return None if stream.duplex_request else pb.ProcessingResponse(request_headers=pb.HeadersResponse())

    def _models(self, stream: _Stream) -> pb.ProcessingResponse:
        stream.decided = True
        created = int(time.time())
        data = [{"id": m.name, "object": "model", "created": created, "owned_by": m.pool}
                for m in models(self._snapshots.current.config, stream.pool)]
        return _immediate(200, {"object": "list", "data": data}, "models_listed_by_picker")

    async def _on_body(self, stream: _Stream) -> list[pb.ProcessingResponse]:
        arrival = Arrival(stream.pool, stream.path, bytes(stream.body), stream.subset, stream.mirror,
                          stream.objective, stream.tenant, stream.request_id)
        try:
            stream.answer = answer = await self._director.decide(arrival)
        except GatewayError as err:
            return [self._reject(stream, err)]
        set_headers = [_header(key, value) for key, value in answer.headers]
        metadata = struct_pb2.Struct()
        # The upstream endpoint-picker protocol: the ordered list, chosen endpoint first.
        metadata.fields[LB_METADATA_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = \
            answer.destinations
        body = answer.body
        if stream.duplex_request:
            # The destination rides on the held headers' answer; the body, rewritten or not, goes back whole.
            headers = pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=set_headers), clear_route_cache=True)),
                dynamic_metadata=metadata)
            return [headers, *_streamed_body(body if body is not None else arrival.body)]
        body_mutation = None
        if body is not None:
            set_headers.append(_header("content-length", str(len(body))))
            body_mutation = pb.BodyMutation(body=body)
        return [pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=set_headers), body_mutation=body_mutation,
                clear_route_cache=True)),
            dynamic_metadata=metadata)]

    def _reject(self, stream: _Stream, err: GatewayError) -> pb.ProcessingResponse:
        stream.decided = True
        # No model label: a client-chosen name would make the label set unbounded.
        self._metrics.of(self._metrics.requests, "", stream.pool or "", "", str(err.status)).inc()
        log.info("Request Rejected request_id=%s pool=%s status=%d reason=%s", stream.request_id or "-",
                 stream.pool or "-", err.status, err.message)
        return _immediate(err.status, err.body(), f"picker_{err.status}", err.retry_after_s)



def _streamed_body(body: bytes) -> list[pb.ProcessingResponse]:
    chunks = [body[i:i + _STREAMED_CHUNK_BYTES] for i in range(0, len(body), _STREAMED_CHUNK_BYTES)] or [b""]
    return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=chunk, end_of_stream=i == len(chunks) - 1)))))
        for i, chunk in enumerate(chunks)]


def _response_body(stream: _Stream, body: pb.HttpBody) -> pb.ProcessingResponse:
    """Duplex: the model server's bytes go on to the client only if sent back; otherwise no change."""
    if not stream.duplex_response:
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=body.body, end_of_stream=body.end_of_stream)))))


def _mirror(metadata: dict[str, str | bytes]) -> Mirror | None:
    """The route's InferencePool mirror, from the stream's gRPC metadata (the controller writes it)."""
    pool = metadata.get(MIRROR_POOL_METADATA_KEY)
    if not isinstance(pool, str) or not pool:
        return None
    try:
        fraction = float(metadata.get(MIRROR_FRACTION_METADATA_KEY) or 1.0)
    except ValueError:
        fraction = 1.0
    return Mirror(pool, min(1.0, max(0.0, fraction)))


def _subset_hint(context: base_pb2.Metadata) -> frozenset[str] | None:
    """The gateway's candidate endpoints (`ip:port`), as a list or a comma-separated string; None: all."""
    if SUBSET_HINT_NAMESPACE not in context.filter_metadata:
        return None
    value = context.filter_metadata[SUBSET_HINT_NAMESPACE].fields.get(SUBSET_HINT_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        items = [v.string_value for v in value.list_value.values]
    else:
        items = value.string_value.split(",")
    return frozenset(i.strip() for i in items if i.strip())
