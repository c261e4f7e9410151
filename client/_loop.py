"""An asyncio event loop on its own daemon thread, behind the blocking facades.

grpc.aio channels belong to the loop that creates them, so a blocking caller (the sync
client, the model-side connector) hands every coroutine to this one loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvstore.client._async import KVClient
from kvstore.client._errors import Unavailable
from kvstore.client._options import ClientOptions
from kvstore.layout import Namespace

T = TypeVar("T")

# How long a stop waits for the calls it cancels to unwind.
_STOP_WAIT_S = 10.0


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._stopping = False  # set once by stop(): nothing new is taken after it

    @property
    def running(self) -> bool:
        return self.loop.is_running() and not self._stopping

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._stopping:
                coroutine.close()
                raise Unavailable("this client is closed; make a new one")
            return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result; Unavailable if the loop is
        stopped (the client closed by another thread) before or while it runs."""
        future = self.submit(coroutine)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._stopping:
                raise Unavailable("the client was closed during the call") from None
            raise

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(callback, *args)

    def open_client(
        self, target: str, namespace: Namespace, options: ClientOptions | None
    ) -> KVClient:
        """A KVClient whose channel belongs to this loop."""

        async def create() -> KVClient:
            return KVClient(target, namespace, options=options)

        return self.run(create())

    def stop(self) -> None:
        """Stop the loop and join its thread; the caller has closed what runs on it.
        Calls other threads still wait on are cancelled first, so none of them waits for
        ever on a loop that is gone; calls made after this raise Unavailable."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if not self.loop.is_running():
            return

        async def cancel_the_rest() -> None:
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(_STOP_WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
