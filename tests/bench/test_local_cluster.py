"""LocalCluster (kvstore.bench.local_cluster): a real etcd and daemons as separate processes;
membership follows kill, restart and add_node; nothing outlives the block."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from child_processes import children_named  # tests/child_processes.py

from kvstore.bench.local_cluster import LocalCluster, node_dram_share
from kvstore.bench.local_etcd import EtcdMissing, EtcdServer, etcd_missing_reason

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    reason = etcd_missing_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    assert children_named("kvstore.server.main", "etcd") == []
    yield
    assert children_named("kvstore.server.main", "etcd") == []


def test_dram_share_is_whole_pages_that_add_up_to_at_most_the_total() -> None:
    assert node_dram_share(96 * MiB, 3, 64 * 1024) == 32 * MiB
    share = node_dram_share(100 * MiB, 3, 64 * 1024)
    assert share % (64 * 1024) == 0
    assert 3 * share <= 100 * MiB < 3 * (share + 64 * 1024)
    with pytest.raises(ValueError, match="under one"):
        node_dram_share(128 * 1024, 3, 64 * 1024)
    with pytest.raises(ValueError, match="at least one node"):
        node_dram_share(MiB, 0, 4096)


def test_a_missing_etcd_binary_says_to_install_etcd_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no etcd here
    with pytest.raises(EtcdMissing, match="install Debian's etcd-server"):
        EtcdServer(tmp_path / "etcd").start()
    with (
        pytest.raises(EtcdMissing, match="install Debian's etcd-server"),
        LocalCluster(1, dram_bytes=8 * MiB),
    ):
        pass


def test_a_daemon_that_cannot_start_fails_the_start_with_its_log_and_leaves_nothing(
    tmp_path: Path, no_leftovers: None
) -> None:
    cluster = LocalCluster(1, dram_bytes=8 * MiB, server_args=["--page-bytes", "1000"])
    with (
        pytest.raises(
            RuntimeError, match=r"(?s)node 0 .* exited; its log:.*page_bytes must be a power of two"
        ),
        cluster,
    ):
        pass
    assert cluster.nodes[0].process is not None
    assert cluster.nodes[0].process.returncode is not None
    assert not cluster.etcd.running


def test_teardown_after_the_body_raises_leaves_no_process_and_no_directory(
    no_leftovers: None,
) -> None:
    cluster = LocalCluster(1, dram_bytes=8 * MiB)
    seen: dict[str, object] = {}

    def failing_body() -> None:
        with cluster:
            seen["daemons"] = children_named("kvstore.server.main")
            seen["work_dir"] = cluster.work_dir
            raise KeyError("the body failed")

    with pytest.raises(KeyError, match="the body failed"):
        failing_body()
    assert seen["daemons"] != []
    work_dir = seen["work_dir"]
    assert isinstance(work_dir, Path)
    assert not work_dir.exists()
    assert not cluster.etcd.running


@pytest.mark.slow  # five daemon starts and a lease expiry
def test_membership_follows_kill_restart_add_node_and_etcd_restart(
    tmp_path: Path, no_leftovers: None
) -> None:
    with LocalCluster(3, dram_bytes=8 * MiB, lease_ttl_s=2, work_dir=tmp_path) as cluster:
        members = {m.node_id: m for m in cluster.members()}
        ids = [node.node_id for node in cluster.nodes]
        assert len(set(ids)) == 3
        assert set(members) == set(ids)
        assert {m.address for m in members.values()} == {n.target for n in cluster.nodes}
        assert all(m.capacity_bytes["dram"] == 8 * MiB for m in members.values())
        assert cluster.etcd_target == f"etcd://{cluster.etcd.endpoint}/kvstore"
        assert cluster.static_target == "cluster://" + ",".join(n.target for n in cluster.nodes)

        cluster.kill(1)
        assert cluster.nodes[1].process is not None
        assert cluster.nodes[1].process.returncode == -9
        assert {m.node_id for m in cluster.wait_for_members()} == {ids[0], ids[2]}

        cluster.restart(1)  # the same SSD directory: the same node id, on the same port
        assert cluster.nodes[1].node_id == ids[1]
        listed = cluster.wait_for_members({*ids})
        assert {m.address for m in listed} == {n.target for n in cluster.nodes}

        added = cluster.add_node()
        assert added == 3
        assert cluster.nodes[added].node_id not in ids
        assert len(cluster.wait_for_members()) == 4
        assert cluster.nodes[added].target in cluster.static_target

        cluster.stop_etcd()
        assert all(node.alive for node in cluster.nodes)  # the daemons serve on
        cluster.start_etcd()
        assert {m.node_id for m in cluster.wait_for_members()} == {*ids, cluster.nodes[3].node_id}
    assert all(
        node.process is not None and node.process.returncode is not None for node in cluster.nodes
    )
    assert (tmp_path / "node-1" / "ssd").is_dir()  # a given work_dir is kept
