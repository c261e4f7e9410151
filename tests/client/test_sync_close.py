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
    TLSOptions,
    Unavailable,
)

LAYOUT = KVLayout(num_layers=4, num_kv_heads=4, head_dim=32, dtype=DType.FLOAT16, block_tokens=16)
NAMESPACE = Namespace(tenant="t", model_fingerprint="sync-close", layout=LAYOUT)


@pytest.mark.parametrize("transport", ["tcp", "shm", "grpc"])
@pytest.mark.parametrize("attempt", [1, 2, 3])  # a race: each run may close at another point
def test_closing_while_other_threads_call_ends_every_call(transport: str, attempt: int) -> None:
    shared_memory = transport == "shm"
    options = ClientOptions(shared_memory=shared_memory or None, data_plane=transport != "grpc")
    with server_thread(shm_socket="auto" if shared_memory else "off") as target:
        client = SyncKVClient(target, NAMESPACE, options=options)
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


def test_a_client_that_fails_to_open_leaves_no_thread() -> None:
    def loop_threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "kvstore-client"]

    before = loop_threads()
    options = ClientOptions(tls=TLSOptions(ca_file="/nonexistent/ca.pem"))
    for _ in range(5):
        with pytest.raises(Exception, match=r"ca\.pem"):
            SyncKVClient("127.0.0.1:1", NAMESPACE, options=options)
    assert [thread for thread in loop_threads() if thread not in before] == []
