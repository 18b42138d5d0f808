"""The trivial ext_proc server: the floor under any picker written on Python's gRPC.

It answers the request's headers and body as the picker's protocol does (one
answer each, the body's naming an endpoint: one fixed endpoint, or the next of a
list in turn) and decides nothing: no parsing, no state, no metrics. It runs on
the picker's event loop (uvloop), so the picker's CPU per decision minus this
server's is what routing costs, and this server's is what the transport costs.
`benchmarks.gateway_figures` measures both in one run; `benchmarks.routing`'s
`ext_proc_floor` router runs the workloads through it, round robin over the pool
(the floor under any router that answers Envoy's ext_proc from Python's gRPC).

    .venv/bin/python -m benchmarks.extproc_floor --port 50100 [--destination HOST:PORT[,HOST:PORT...]]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from gateway_state.protocol import DESTINATION_HEADER


class TrivialProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated code, untyped
    def __init__(self, destinations: list[str]) -> None:
        """Each request's answer names the next of `destinations`, round robin."""
        self._destinations = itertools.cycle([base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
            key=DESTINATION_HEADER, raw_value=d.encode())) for d in destinations])

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif kind == "request_body":
                yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=[next(self._destinations)]), clear_route_cache=True)))


async def serve(port: int, destinations: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(TrivialProcessor(destinations), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)  # serving, for Envoy's checks
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--destination", default="127.0.0.1:8000",
                   help="the endpoint every request is sent to, or several (comma-separated) in turn")
    args = p.parse_args()
    uvloop.run(serve(args.port, [d.strip() for d in args.destination.split(",") if d.strip()]))


if __name__ == "__main__":
    main()
