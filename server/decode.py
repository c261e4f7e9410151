"""Request decoding: bytes and kvstore.v1 requests into core values, checked.

Everything a request carries is checked here or in the core before it touches the
store: bytes that do not parse, unknown fields, the namespace, the keys and the
server's limit on them. gRPC and the data plane decode through these same functions,
so a bad request gets the same status and message on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from kvstore.errors import InvalidRequest
from kvstore.layout import Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.namespace import namespace_from_wire, reject_unknown_fields

RequestT = TypeVar("RequestT", bound=Message)
# The requests that name blocks: a namespace and a list of keys.
KeyedT = TypeVar(
    "KeyedT",
    pb.LookupPrefixRequest,
    pb.GetBlocksRequest,
    pb.PinRequest,
    pb.UnpinRequest,
    pb.DeleteRequest,
)


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    message_type: str
    error: str

    def rejection(self) -> InvalidRequest:
        return InvalidRequest(f"malformed {self.message_type}: {self.error}")


def parse_request(message_type: type[RequestT], data: bytes) -> RequestT | MalformedRequest:
    """The request in `data`; a MalformedRequest, answered later, if it does not parse."""
    try:
        return message_type.FromString(data)
    except DecodeError as error:
        return MalformedRequest(message_type.DESCRIPTOR.full_name, str(error))


def open_request(request: RequestT | MalformedRequest) -> RequestT:
    """The request, once it parsed and carries no field this server does not know."""
    if isinstance(request, MalformedRequest):
        raise request.rejection()
    reject_unknown_fields(request, request.DESCRIPTOR.name)
    return request


def open_keyed_request(
    request: KeyedT | MalformedRequest, max_keys: int, *, allow_empty: bool = False
) -> tuple[KeyedT, Namespace, list[bytes]]:
    """The request, its namespace and its keys, checked; only a lookup may name no key."""
    request = open_request(request)
    namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
    return request, namespace, _keys_from_wire(request.keys, max_keys, allow_empty)


def open_watch_request(
    request: pb.WatchBlocksRequest | MalformedRequest,
) -> tuple[pb.WatchBlocksRequest, Namespace]:
    """The watch request and its namespace, checked."""
    request = open_request(request)
    return request, namespace_from_wire(request.namespace, request.HasField("namespace"))


def put_namespace_from_wire(data: bytes | None) -> Namespace:
    """The namespace of a put, carried serialized in its first message."""
    if data is None:
        raise InvalidRequest("namespace is required in the first message of a put")
    try:
        message = pb.Namespace.FromString(data)
    except DecodeError as error:
        raise InvalidRequest(f"malformed namespace: {error}") from None
    return namespace_from_wire(message, True)


def _keys_from_wire(keys: Sequence[bytes], max_keys: int, allow_empty: bool) -> list[bytes]:
    """The request's keys as a list; the core validates each key (kvstore.keys)."""
    if not keys and not allow_empty:
        raise InvalidRequest("keys is empty; name at least one block key")
    if len(keys) > max_keys:
        raise InvalidRequest(
            f"{len(keys)} keys in one request; the server's limit is {max_keys} (split the request)"
        )
    return list(keys[:])  # slicing a repeated field is the fastest way to a list
