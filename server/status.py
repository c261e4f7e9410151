"""Core, wire and lifecycle exceptions → gRPC status codes: the one place the server maps
errors. Both transports answer with these (the data plane sends the code in an ERROR frame)."""

from __future__ import annotations

import logging

import grpc

from kvstore.errors import CapacityExhausted, ChecksumMismatch, InvalidRequest
from kvstore.server.auth import PermissionDenied, Unauthenticated
from kvstore.server.lifecycle import Draining
from kvstore.server.pacing import StreamCut
from kvstore.wire.errors import WireError

logger = logging.getLogger("kvstore.server")

_STATUS_BY_ERROR: dict[type[Exception], grpc.StatusCode] = {
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ChecksumMismatch: grpc.StatusCode.DATA_LOSS,
    CapacityExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Draining: grpc.StatusCode.UNAVAILABLE,
    StreamCut: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message to answer `error` with. Unexpected errors are INTERNAL."""
    for error_type, code in _STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            return code, str(error)
    logger.exception("internal error while serving a request", exc_info=error)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal server error ({type(error).__name__}); see the server log",
    )
