"""Lookups from the calling thread (kvstore.client._blocking_lookup): the sync facade's
lookups answer the same as the async client's, over a data-plane connection of their
own, and fall back to the loop thread, with the same errors, wherever they cannot."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from daemons import Launch, daemon_launcher  # tests/daemons.py
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.client import (
    ClientOptions,
    DeadlineExceeded,
    InvalidArgument,
    KVClient,
    PermissionDenied,
    SyncKVClient,
    Timeouts,
    Unauthenticated,
)
from kvstore.codec import KVForm, expected_shape
from kvstore.layout import KVLayout, Namespace
from kvstore.server.auth import token_sha256

BLOCKS = 6


@pytest.fixture
def target() -> Iterator[str]:
    with server_thread() as address:
        yield address


MakeNamespace = Callable[..., Namespace]


def _stored_prefix(client: SyncKVClient, blocks: int, first_token: int = 1000) -> list[bytes]:
    """Keys of a chain of BLOCKS blocks whose first `blocks` are stored."""
    layout = client.namespace.layout
    tokens = list(range(first_token, first_token + BLOCKS * layout.block_tokens))
    kv = _blocks(layout, blocks)
    client.put(tokens[: blocks * layout.block_tokens], kv, form=KVForm.BLOCKS)
    return client.keys(tokens)


def _blocks(layout: KVLayout, count: int) -> torch.Tensor:
    shape = expected_shape(layout, KVForm.BLOCKS, count)
    return torch.ones(shape, dtype=layout.dtype.torch_dtype)


def _async_lookup(target: str, namespace: Namespace, keys: list[bytes]) -> tuple[int, list[int]]:
    async def look() -> tuple[int, list[int]]:
        async with KVClient(target, namespace) as client:
            match = await client.lookup_keys(keys)
            return match.num_matched, [int(tier) for tier in match.tiers]

    return asyncio.run(look())


@pytest.mark.parametrize("shared_memory", [None, False], ids=["unix-socket", "tcp"])
def test_sync_lookups_answer_from_the_calling_thread_as_the_async_client_does(
    target: str, shared_memory: bool | None, make_namespace: MakeNamespace
) -> None:
    namespace = make_namespace()
    options = ClientOptions(shared_memory=shared_memory)
    with SyncKVClient(target, namespace, options=options) as client:
        keys = _stored_prefix(client, 4)
        expected = _async_lookup(target, namespace, keys)
        assert expected[0] == 4
        answered = client._lookups.answered
        lookups = client.stats().lookups
        for _ in range(3):
            match = client.lookup_keys(keys)
            assert (match.num_matched, [int(tier) for tier in match.tiers]) == expected
        miss = client.lookup(list(range(50_000, 50_000 + 2 * namespace.layout.block_tokens)))
        assert miss.num_matched == 0
        assert client._lookups.answered == answered + 4  # none went through the loop
        assert client.stats().lookups == lookups + 4  # and none was made twice
        plane = client._client.data_plane
        assert plane is not None
        assert plane.startswith("unix:") == (shared_memory is None)


def test_a_refused_lookup_raises_as_the_async_client_does_and_later_ones_are_answered_here(
    target: str, monkeypatch: pytest.MonkeyPatch, make_namespace: MakeNamespace
) -> None:
    namespace = make_namespace()
    with SyncKVClient(target, namespace) as client:
        keys = _stored_prefix(client, 3)
        client.lookup_keys(keys)
        answered = client._lookups.answered
        # The server's ERROR ends the connection; the loop's lookup raises the error.
        with pytest.raises(InvalidArgument, match="keys"):
            client.lookup_keys([b"\x01" * 32] * 65_537)  # over the server's max_keys
        # The error closed the connection: the loop makes the next lookup on a new one,
        # and the one after borrows it.
        assert client.lookup_keys(keys).num_matched == 3
        assert client.lookup_keys(keys).num_matched == 3
        assert client._lookups.answered == answered + 1


def test_another_tenants_namespace_is_refused_on_this_path_too(
    tmp_path: Path, make_namespace: MakeNamespace
) -> None:
    token = "blocking-lookup-token-of-team-a"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256(token)}"\ntenant = "team-a"\nrole = "tenant"\n'
    )
    options = ClientOptions(token=token)
    with server_thread(**{"auth.tokens_file": str(tokens)}) as target:
        with SyncKVClient(target, make_namespace(tenant="team-a"), options=options) as own:
            keys = _stored_prefix(own, 2)
            assert own.lookup_keys(keys).num_matched == 2
            assert own._lookups.answered == 1  # the HELLO carried the token
        with (
            SyncKVClient(target, make_namespace(tenant="team-b"), options=options) as other,
            pytest.raises(PermissionDenied),
        ):
            other.lookup_keys(keys)
        with (
            SyncKVClient(target, make_namespace(tenant="team-a")) as anonymous,
            pytest.raises(Unauthenticated),
        ):
            anonymous.lookup_keys(keys)


@pytest.mark.parametrize("shared_memory", [None, False], ids=["unix-socket", "tcp"])
def test_lookups_borrow_the_pools_connection_and_open_none_against_the_quota(
    tmp_path: Path, make_namespace: MakeNamespace, shared_memory: bool | None
) -> None:
    # One data-plane connection is all team-a may hold: lookups from the calling thread
    # must share it with the transfers, never open a second one that the quota refuses
    # (and that would push the tenant's transfers onto gRPC).
    token = "blocking-lookup-quota-token"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256(token)}"\ntenant = "team-a"\nrole = "tenant"\n'
    )
    settings = {
        "auth.tokens_file": str(tokens),
        "quotas": {"team-a": {"max_data_connections": 1}},
    }
    options = ClientOptions(token=token, shared_memory=shared_memory)
    with (
        server_thread(**settings) as target,
        SyncKVClient(target, make_namespace(tenant="team-a"), options=options) as client,
    ):
        keys = _stored_prefix(client, 3)  # the put made the one connection
        for _ in range(5):
            assert client.lookup_keys(keys).num_matched == 3
        assert client._lookups.answered == 5
        layout = client.namespace.layout
        dest = torch.empty_like(_blocks(layout, 3))
        assert client.get_into(keys[:3], dest, form=KVForm.BLOCKS) == 3
        assert torch.equal(dest, _blocks(layout, 3))
        assert client._client.data_plane is not None  # transfers still on the data plane
        # The quota is live on this path: a second client of team-a gets no connection
        # while the first holds its one, and its put goes over gRPC.
        with SyncKVClient(target, make_namespace(tenant="team-a"), options=options) as other:
            _stored_prefix(other, 2, first_token=50_000)
            assert other._client.data_plane is None


@pytest.fixture
def launch() -> Iterator[Launch]:
    with daemon_launcher() as start:
        yield start


def test_a_stalled_daemon_costs_one_timeout_and_its_late_answer_is_never_read(
    launch: Launch, tmp_path: Path, make_namespace: MakeNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = launch(tmp_path / "ssd")
    namespace = make_namespace()
    options = ClientOptions(timeouts=Timeouts(lookup=1.0))
    with SyncKVClient(daemon.target, namespace, options=options) as client:
        hit_keys = _stored_prefix(client, 5)
        miss_keys = client.keys(list(range(90_000, 90_000 + 5 * namespace.layout.block_tokens)))
        assert client.lookup_keys(hit_keys).num_matched == 5
        answered = client._lookups.answered
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.lookup_keys(hit_keys)
            assert time.monotonic() - started < 1.9  # one timeout, not the loop's as well
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        # The hit's answer, sent once the daemon runs again, must not answer the miss.
        time.sleep(0.2)
        assert client.lookup_keys(miss_keys).num_matched == 0
        assert client.lookup_keys(hit_keys).num_matched == 5
        assert client._lookups.answered > answered


def test_lookups_from_many_threads_and_transfers_on_the_loop_each_get_their_own_answer(
    target: str, make_namespace: MakeNamespace
) -> None:
    with SyncKVClient(target, make_namespace()) as client:
        layout = client.namespace.layout
        chains = [
            (_stored_prefix(client, stored, first_token=stored * 10_000), stored)
            for stored in range(1, 5)
        ]
        payload = torch.randn(expected_shape(layout, KVForm.BLOCKS, BLOCKS)).to(
            layout.dtype.torch_dtype
        )
        moved_keys = client.keys(list(range(80_000, 80_000 + BLOCKS * layout.block_tokens)))
        client.put_blocks(moved_keys, payload)

        def check(round_: int) -> None:
            if round_ % 5 == 0:  # a get on the loop thread, on the same pool
                dest = torch.empty_like(payload)
                assert client.get_into(moved_keys, dest, form=KVForm.BLOCKS) == BLOCKS
                assert torch.equal(dest, payload)
                return
            keys, stored = chains[round_ % len(chains)]
            assert client.lookup_keys(keys).num_matched == stored

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(check, range(400)))
        assert client._lookups.answered > 0
