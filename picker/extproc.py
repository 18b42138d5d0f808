"""Envoy's ext_proc protocol: request headers, then the buffered body, then the stream's end.

This is the edge: GatewayErrors become OpenAI-shaped immediate responses here
and nowhere else, and it is the one guard around the request path: any other
exception is logged with its traceback and answered with an OpenAI-shaped 500,
so no input can break the stream and send the request past the picker. With
response body mode NONE, Envoy keeps the stream open until the HTTP exchange
ends, so the stream's end is the request's end and the placement is released then.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from gateway_state.protocol import DESTINATION_HEADER, POOL_METADATA_KEY
from picker.errors import BadRequest, GatewayError, InternalError, MethodNotAllowed, PickerUnavailable
from picker.intake import Intake, models
from picker.metrics import PickerMetrics
from picker.placement import Placed, Placement
from picker.snapshot import SnapshotSource

log = logging.getLogger("picker")

_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class _Stream:
    pool: str | None
    request_id: str = ""
    method: str = ""
    path: str = ""
    body: bytearray = field(default_factory=bytearray)
    placed: Placed | None = None


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=_OVERWRITE)


def _immediate(status: int, body: dict[str, object], details: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status={"code": status},
        headers=pb.HeaderMutation(set_headers=[_header("content-type", "application/json")]),
        body=json.dumps(body).encode(), details=details))


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated code, untyped
    def __init__(self, snapshots: SnapshotSource, intake: Intake, placement: Placement,
                 metrics: PickerMetrics) -> None:
        self._snapshots = snapshots
        self._intake = intake
        self._placement = placement
        self._metrics = metrics

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        metadata = dict(context.invocation_metadata() or ())
        stream = _Stream(pool=metadata.get(POOL_METADATA_KEY))
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    try:
                        response = self._on_headers(stream, message.request_headers)
                    except Exception as exc:  # noqa: BLE001 (the one guard: see the module's docstring)
                        response = self._internal_error(stream, exc)
                    yield response
                elif kind == "request_body":
                    stream.body += message.request_body.body
                    if message.request_body.end_of_stream:
                        try:
                            response = await self._on_body(stream)
                        except PickerUnavailable as exc:
                            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                        except Exception as exc:  # noqa: BLE001 (the one guard: see the module's docstring)
                            response = self._internal_error(stream, exc)
                        yield response
                    else:
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                elif kind == "response_headers":
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        finally:
            if stream.placed is not None:
                self._placement.release(stream.placed)

    def _internal_error(self, stream: _Stream, exc: Exception) -> pb.ProcessingResponse:
        log.error("Request Failed request_id=%s pool=%s path=%s: internal error", stream.request_id or "-",
                  stream.pool or "-", stream.path, exc_info=exc)
        self._metrics.internal_errors.inc()
        return self._reject(stream, InternalError("The gateway failed to route the request; it has been logged."))

    def _on_headers(self, stream: _Stream, headers: pb.HttpHeaders) -> pb.ProcessingResponse:
        for h in headers.headers.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            if h.key == ":method":
                stream.method = value
            elif h.key == ":path":
                stream.path = value
            elif h.key == "x-request-id":
                stream.request_id = value
        path = stream.path.split("?", 1)[0]
        if stream.method == "GET" and path.rstrip("/") == "/v1/models":
            return self._models(stream)
        if stream.method != "POST":
            return self._reject(stream, MethodNotAllowed(
                f"Method {stream.method} is not allowed for {path}; send POST with a JSON body."))
        if headers.end_of_stream:
            return self._reject(stream, BadRequest("Request body is empty; expected a JSON object."))
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse())

    def _models(self, stream: _Stream) -> pb.ProcessingResponse:
        created = int(time.time())
        data = [{"id": m.name, "object": "model", "created": created, "owned_by": m.pool}
                for m in models(self._snapshots.current.config, stream.pool)]
        return _immediate(200, {"object": "list", "data": data}, "models_listed_by_picker")

    async def _on_body(self, stream: _Stream) -> pb.ProcessingResponse:
        snapshot = self._snapshots.current
        try:
            request = self._intake.read(snapshot.config, stream.pool, stream.path, bytes(stream.body))
            stream.placed = placed = await self._placement.place(request, snapshot.load.get(request.pool.name, {}))
        except GatewayError as err:
            return self._reject(stream, err)
        chosen = placed.chosen.endpoint
        self._metrics.requests.labels(request.model, placed.pool, chosen.name, "routed").inc()
        self._metrics.decision_seconds.labels(placed.pool, request.pool.strategy.value).observe(
            placed.decision_seconds)
        prompt_blocks, matched = len(request.block_hashes), placed.chosen.matched_blocks
        if prompt_blocks:
            self._metrics.prefix_blocks_queried.labels(placed.pool).inc(prompt_blocks)
            self._metrics.prefix_blocks_matched.labels(placed.pool).inc(matched)
        log.info("Request Handled request_id=%s model=%s target_model=%s pool=%s pod=%s endpoint=%s strategy=%s "
                 "prefix_blocks=%d/%d fallbacks=%s decision_ms=%.3f schedule_ms=%.3f",
                 stream.request_id or "-", request.model, request.target_model, placed.pool, chosen.name,
                 chosen.key, request.pool.strategy.value, matched, prompt_blocks,
                 ",".join(c.endpoint.key for c in placed.endpoints[1:]) or "-", placed.decision_seconds * 1000,
                 placed.schedule_seconds * 1000)
        all_endpoints = ",".join(c.endpoint.key for c in placed.endpoints)
        set_headers = [_header(DESTINATION_HEADER, chosen.key)]
        body_mutation = None
        if request.body is not None:
            set_headers.append(_header("content-length", str(len(request.body))))
            body_mutation = pb.BodyMutation(body=request.body)
        metadata = struct_pb2.Struct()
        # The upstream endpoint-picker protocol: the ordered list, chosen endpoint first.
        metadata.update({"envoy.lb": {DESTINATION_HEADER: all_endpoints}})
        return pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=set_headers), body_mutation=body_mutation,
                clear_route_cache=True)),
            dynamic_metadata=metadata)

    def _reject(self, stream: _Stream, err: GatewayError) -> pb.ProcessingResponse:
        # No model label: a client-chosen name would make the label set unbounded.
        self._metrics.requests.labels("", stream.pool or "", "", str(err.status)).inc()
        log.info("Request Rejected request_id=%s pool=%s status=%d reason=%s", stream.request_id or "-",
                 stream.pool or "-", err.status, err.message)
        return _immediate(err.status, err.body(), f"picker_{err.status}")

