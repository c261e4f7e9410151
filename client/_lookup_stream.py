"""Lookups over long-lived LookupPrefixStream calls.

In Python gRPC a unary call costs its caller and the server about twice what one
message on an open stream does (0.8 ms against 0.4 ms a round trip on the 2-core
reference machine, and 0.6 ms against 0.3 ms of server CPU), so the client keeps a few
streams open and sends lookups over them. Each stream carries one lookup at a time: the
result that comes back is the one for the request just sent, with no ids to match. A
lookup that finds every stream busy, or the server without the method, or its stream
broken, goes out as a unary call instead.
"""

from __future__ import annotations

import asyncio

import grpc

from kvstore.client._credentials import Metadata
from kvstore.client._errors import DeadlineExceeded, error_for_code, raise_if_closed_during_call
from kvstore.client._settle import CallSettle
from kvstore.v1 import kvstore_pb2 as pb

_METHOD = "/kvstore.v1.KVStore/LookupPrefixStream"
_OK = grpc.StatusCode.OK.value[0]
# After UNIMPLEMENTED, how long to use unary calls before asking again (a server upgrade).
_RETRY_UNSUPPORTED_S = 60.0
# How long close() lets idle streams end cleanly before it cancels them.
_CLOSE_GRACE_S = 0.5


class LookupStreams:
    """Up to `max_streams` open streams; a lookup takes an idle one or opens another."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        max_streams: int,
        settle: CallSettle,
        metadata: Metadata = (),
    ) -> None:
        self._metadata = metadata  # sent when each stream opens
        self._open_call = channel.stream_stream(
            _METHOD,
            request_serializer=pb.LookupPrefixRequest.SerializeToString,
            response_deserializer=pb.LookupPrefixResult.FromString,
        )
        self._max_streams = max_streams
        self._idle: list[grpc.aio.StreamStreamCall] = []
        self._in_use: set[grpc.aio.StreamStreamCall] = set()
        self._unsupported_until = 0.0  # loop time
        self._settle = settle  # told of every cancelled stream; the client's close waits
        self._closed = False

    @property
    def num_open(self) -> int:
        """Streams open now, idle or carrying a lookup."""
        return len(self._idle) + len(self._in_use)

    @property
    def supported(self) -> bool:
        """False for a while after the server answered UNIMPLEMENTED (no lookup stream)."""
        return asyncio.get_running_loop().time() >= self._unsupported_until

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse | None:
        """The server's answer, or None if no stream could carry the request.

        `deadline` is an instant on the running loop's clock. A server error for this
        request raises its KVStoreClientError, as the unary call would.
        """
        call = self._take()
        if call is None:
            return None
        result: object = None
        try:
            async with asyncio.timeout_at(deadline):
                await call.write(request)
                result = await call.read()
        except TimeoutError:
            raise DeadlineExceeded("no lookup result before the deadline") from None
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                loop = asyncio.get_running_loop()
                self._unsupported_until = loop.time() + _RETRY_UNSUPPORTED_S
            return None
        except asyncio.InvalidStateError:  # the call had already ended (server restart)
            return None
        except asyncio.CancelledError:
            raise_if_closed_during_call()  # the client's close() ended the stream
            raise
        finally:
            self._in_use.discard(call)
            # Only a stream that answered is reused. One whose lookup timed out or was
            # cancelled may still deliver that result and pair it with the next request.
            if isinstance(result, pb.LookupPrefixResult) and not self._closed:
                self._idle.append(call)
            else:
                self._cancel(call)
        if not isinstance(result, pb.LookupPrefixResult):
            return None  # the stream ended, or its reply did not decode: unary instead
        if result.code != _OK:
            raise error_for_code(result.code, result.message)
        return result.match

    async def close(self) -> None:
        """End every stream. Idle streams end cleanly (the server sees the end of the
        requests and answers OK); a lookup still in flight is cancelled, as closing a
        channel cancels calls. The client's close then waits out the settle time.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for call in list(self._in_use):
            self._cancel(call)
        endings = [asyncio.ensure_future(_end(call)) for call in idle]
        if endings:
            _, stuck = await asyncio.wait(endings, timeout=_CLOSE_GRACE_S)
            for task in stuck:
                task.cancel()  # its call is cancelled in turn
            await asyncio.gather(*endings, return_exceptions=True)
            if stuck:
                self._settle.note_cancel()

    def _take(self) -> grpc.aio.StreamStreamCall | None:
        if self._closed or not self.supported:
            return None
        if self._idle:
            call = self._idle.pop()
        elif self.num_open < self._max_streams:
            call = self._open_call(metadata=self._metadata)
        else:
            return None
        self._in_use.add(call)
        return call

    def _cancel(self, call: grpc.aio.StreamStreamCall) -> None:
        # gRPC may have cancelled it already (an interrupted read or write does that).
        call.cancel()
        self._settle.note_cancel()


async def _end(call: grpc.aio.StreamStreamCall) -> None:
    try:
        await call.done_writing()
        await call.code()
    finally:
        call.cancel()  # a no-op once the call is over
