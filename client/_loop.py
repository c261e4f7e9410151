"""An asyncio event loop on its own daemon thread, behind the blocking facades.

grpc.aio channels belong to the loop that creates them, so a blocking caller (the sync
client, the model-side connector) hands every coroutine to this one loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvstore.client._async import KVClient
from kvstore.client._options import ClientOptions
from kvstore.layout import Namespace

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self.loop.is_running()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result."""
        return self.submit(coroutine).result()

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
        """Stop the loop and join its thread; the caller has closed what runs on it."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
