"""grpcio's health and reflection services, registered so that a request that does not
parse is answered INVALID_ARGUMENT.

grpcio's generated `add_*Servicer_to_server` registers each method with the message's
`FromString` as its deserializer, and a deserializer that raises makes the aio server
answer UNKNOWN ("Unexpected DecodeError"), whatever it raises: it runs before the
method, where no status can be set (measured with grpcio 1.85). So the method tables
the generated code builds are taken as they are, and each method's deserializer is
wrapped to hand a stand-in for bytes that do not parse to the method, whose wrapper
aborts with INVALID_ARGUMENT, as the KVStore service does (kvstore.server.handlers).
Behaviour for requests that parse, and the methods registered, are grpcio's own.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from kvstore.server.decode import MalformedRequest

Context: TypeAlias = grpc.aio.ServicerContext


def add_health_service(servicer: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    """grpc.health.v1.Health (Check, Watch; List as grpcio answers it) on `server`."""
    _add_parsed(
        server, lambda target: health_pb2_grpc.add_HealthServicer_to_server(servicer, target)
    )


def add_reflection_service(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """grpc.reflection.v1alpha.ServerReflection, listing `service_names`, on `server`."""
    servicer = reflection.aio.ReflectionServicer(tuple(service_names))
    _add_parsed(
        server,
        lambda target: reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, target),
    )


class _Tables:
    """Stands in for the server while generated code registers a service: keeps the
    method tables it hands over."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same table again, as a generic handler: built from `services` instead

    def add_registered_method_handlers(self, service: str, methods: dict[str, Any]) -> None:
        self.services[service] = methods


def _add_parsed(server: grpc.aio.Server, register: Callable[[_Tables], None]) -> None:
    tables = _Tables()
    register(tables)
    for service, methods in tables.services.items():
        parsed = {
            name: _parsed_handler(f"{service}/{name}", handler) for name, handler in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, parsed),))
        server.add_registered_method_handlers(service, parsed)


def _parsed_handler(method: str, handler: Any) -> Any:
    """`handler` with a deserializer that never raises, and a behaviour that answers
    a request that did not parse with INVALID_ARGUMENT."""
    parse = _lenient(method, handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _stream_stream(handler.stream_stream), parse, serialize
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _stream_unary(handler.stream_unary), parse, serialize
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _unary_stream(handler.unary_stream), parse, serialize
        )
    return grpc.unary_unary_rpc_method_handler(_unary_unary(handler.unary_unary), parse, serialize)


def _lenient(method: str, deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return MalformedRequest(f"request to {method}", f"{error}; send a serialized request")

    return parse


async def _opened(request: Any, context: Context) -> Any:
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.rejection()))
    return request


async def _opened_all(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        yield await _opened(request, context)


async def _settled(reply: Any) -> Any:
    """What a behaviour returned: grpcio's own may be plain functions (Health.List)."""
    return await reply if inspect.isawaitable(reply) else reply


def _unary_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: Context) -> Any:
        return await _settled(behaviour(await _opened(request, context), context))

    return handle


def _stream_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(requests: AsyncIterator[Any], context: Context) -> Any:
        return await _settled(behaviour(_opened_all(requests, context), context))

    return handle


def _unary_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    # A streaming behaviour either yields its replies or writes them to the context
    # (Health.Watch): the wrapper does as it does.
    if not inspect.isasyncgenfunction(behaviour):
        return _unary_unary(behaviour)

    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        async for reply in behaviour(await _opened(request, context), context):
            yield reply

    return handle


def _stream_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behaviour):
        return _stream_unary(behaviour)

    async def handle(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for reply in behaviour(_opened_all(requests, context), context):
            yield reply

    return handle
