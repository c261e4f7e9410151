"""Client exceptions: one class per gRPC status code.

    KVStoreClientError
    ├── Cancelled
    ├── Unknown
    ├── InvalidArgument
    ├── DeadlineExceeded
    ├── NotFound
    ├── AlreadyExists
    ├── PermissionDenied
    ├── ResourceExhausted
    ├── FailedPrecondition
    ├── Aborted
    ├── OutOfRange
    ├── Unimplemented
    ├── Internal
    │   └── ProtocolError     (raised by the client: a reply's bytes are not a well-formed
    │                          kvstore.v1 message, on gRPC or the data plane)
    ├── Unavailable
    ├── DataLoss
    │   └── ChecksumError     (raised by the client: received bytes failed their checksum)
    └── Unauthenticated

Every RPC error is raised `from` the grpc.aio.AioRpcError it came from, except a
lookup's error carried as a result on the lookup stream: no call failed, so it has none.
A ProtocolError is raised `from` the kvstore.wire.errors.WireError that found the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from kvstore.wire.errors import WireError


class KVStoreClientError(Exception):
    """Base class; `code` is the gRPC status code and `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str) -> None:
        super().__init__(f"{self.code.name}: {details}")
        self.details = details


class Cancelled(KVStoreClientError):
    code = grpc.StatusCode.CANCELLED


class Unknown(KVStoreClientError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(KVStoreClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(KVStoreClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(KVStoreClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KVStoreClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(KVStoreClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(KVStoreClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(KVStoreClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(KVStoreClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(KVStoreClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(KVStoreClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(KVStoreClientError):
    code = grpc.StatusCode.INTERNAL


class ProtocolError(Internal):
    """A reply that is not a well-formed kvstore.v1 message (or data-plane frame).

    Fields the client does not know are skipped, so a newer server's additions are
    not this error; bytes that cannot be parsed at all are.
    """


class Unavailable(KVStoreClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(KVStoreClientError):
    code = grpc.StatusCode.DATA_LOSS


class ChecksumError(DataLoss):
    """A received layer's bytes do not match the checksum stored with them."""


class Unauthenticated(KVStoreClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[KVStoreClientError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_for(error: grpc.aio.AioRpcError) -> KVStoreClientError:
    cls = _BY_CODE.get(error.code(), Unknown)
    return cls(error.details() or "")


def error_for_code(code: int, details: str) -> KVStoreClientError:
    """The exception for a status code the server sent as a number (a stream's result)."""
    status = _STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(status, Unknown)(details)


def protocol_error(error: WireError) -> ProtocolError:
    return ProtocolError(f"the server's reply is malformed: {error}")


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise gRPC errors as the matching KVStoreClientError subclass, and wire
    errors (a malformed reply) as ProtocolError."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise error_for(error) from error
    except grpc.aio.UsageError as error:  # a call on the channel of a closed client
        raise Unavailable(f"this client is closed ({error}); make a new one") from error
    except asyncio.CancelledError:
        raise_if_closed_during_call()
        raise
    except WireError as error:
        raise protocol_error(error) from error


def raise_if_closed_during_call() -> None:
    """Raise Unavailable for a CancelledError no one asked of the running task: gRPC
    cancels the calls of a channel that the client's close() shuts, and the caller must
    get a client error for that, as the data plane gives, not a cancellation."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() == 0:
        raise Unavailable("the client was closed during the call; make a new one") from None
