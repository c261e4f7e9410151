"""SyncKVClient.close() while other threads are mid-call: every call ends, with its
result or a client error that says the client closed, and none waits for ever."""

from __future__ import annotations

import threading

import pytest
import torch
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.client import (
    ClientOptions,
    DType,
    KVForm,
    KVLayout,
    KVStoreClientError,
    Namespace,
    SyncKVClient,
    Unavailable,
)

LAYOUT = KVLayout(num_layers=4, num_kv_heads=4, head_dim=32, dtype=DType.FLOAT16, block_tokens=16)
NAMESPACE = Namespace(tenant="t", model_fingerprint="sync-close", layout=LAYOUT)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["tcp", "shm"])
def test_closing_while_other_threads_call_ends_every_call(shared_memory: bool) -> None:
    with server_thread(shm_socket="auto" if shared_memory else "off") as target:
        client = SyncKVClient(
            target, NAMESPACE, options=ClientOptions(shared_memory=shared_memory or None)
        )
        keys = [b"k-%d" % index for index in range(8)]
        kv = torch.randn(8, LAYOUT.num_layers, *LAYOUT.layer_shape).to(torch.float16)
        assert client.put_blocks(keys, kv).num_committed == 8
        outcomes: list[str] = []
        started = threading.Barrier(5)

        def loop() -> None:
            dest = torch.zeros_like(kv)
            started.wait()
            try:
                while True:
                    client.get_into(keys, dest, form=KVForm.BLOCKS)
            except Unavailable as error:
                outcomes.append("closed" if "closed" in str(error) else f"other: {error}")
            except KVStoreClientError as error:  # cut off mid-transfer by the close
                outcomes.append(f"client error: {type(error).__name__}")

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        started.wait()
        client.close()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), "a call never returned"
        assert len(outcomes) == 4
        assert outcomes.count("closed") >= 1, outcomes
        with pytest.raises(Unavailable, match="closed"):
            client.lookup_keys(keys)
