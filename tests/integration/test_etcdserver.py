"""The etcd test harness itself: the shared server, the wipe between tests, and a 3-member cluster surviving
the loss and return of a member."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.etcdserver import EtcdCluster, etcd_available, etcdctl, wipe_all_keys
from tests.eventually import eventually

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not etcd_available(), reason="etcd-server not installed")]

LEFTOVER_KEY = "/test-etcdserver/leftover"
CONVERGE_SECONDS = 20.0


def get_value(endpoints: list[str], key: str, *flags: str) -> str:
    return etcdctl(endpoints, "get", key, "--print-value-only", *flags).stdout.strip()


def test_single_server_answers_put_and_get(etcd_endpoints: list[str]) -> None:
    assert len(etcd_endpoints) == 1 and etcd_endpoints[0].startswith("http://127.0.0.1:")
    etcdctl(etcd_endpoints, "put", "/test-etcdserver/a", "hello")
    assert get_value(etcd_endpoints, "/test-etcdserver/a") == "hello"


def all_keys(endpoints: list[str]) -> list[str]:
    out = etcdctl(endpoints, "get", "", "--from-key=true", "--keys-only").stdout
    return [line for line in out.splitlines() if line]


def test_wipe_helper_deletes_every_key(etcd_endpoints: list[str]) -> None:
    keys = ["/b", "/c/d", "a", "zzz"]
    for key in keys:
        etcdctl(etcd_endpoints, "put", key, "v")
    assert all_keys(etcd_endpoints) == keys
    wipe_all_keys(etcd_endpoints)
    assert all_keys(etcd_endpoints) == []


# These two run in file order: the first leaves a key behind, the fixture must wipe it before the second.
def test_leaves_a_key_behind(etcd_endpoints: list[str]) -> None:
    etcdctl(etcd_endpoints, "put", LEFTOVER_KEY, "still here")
    assert get_value(etcd_endpoints, LEFTOVER_KEY) == "still here"


def test_next_test_starts_with_an_empty_etcd(etcd_endpoints: list[str]) -> None:
    assert all_keys(etcd_endpoints) == []


def test_session_server_is_the_same_across_tests(etcd_server: EtcdCluster, etcd_endpoints: list[str]) -> None:
    assert etcd_endpoints == etcd_server.endpoints
    assert all(member.is_running() for member in etcd_server.members)


def test_three_members_survive_losing_one_and_take_it_back(etcd_cluster3: EtcdCluster) -> None:
    cluster = etcd_cluster3
    assert len(cluster.endpoints) == 3 and len(set(cluster.endpoints)) == 3
    etcdctl(cluster.endpoints, "put", "/before", "1")

    cluster.kill(0)
    assert not cluster.members[0].is_running()
    survivors = cluster.endpoints[1:]

    def put_on_survivors() -> bool:
        # A leader election may be under way if the killed member led; a put then fails until it is over.
        return etcdctl(survivors, "put", "/after", "2", "--command-timeout=2s", check=False).returncode == 0

    eventually(put_on_survivors, CONVERGE_SECONDS, "a put on the two surviving members")
    for endpoint in survivors:
        assert get_value([endpoint], "/after") == "2"
        assert get_value([endpoint], "/before") == "1"

    cluster.restart_member(0)
    assert cluster.members[0].is_running()
    assert cluster.members[0].probe_health()

    def restarted_member_caught_up() -> bool:
        result = etcdctl(cluster.endpoints[:1], "get", "/after", "--print-value-only", "--consistency=s",
                         "--command-timeout=2s", check=False)
        return result.returncode == 0 and result.stdout.strip() == "2"

    eventually(restarted_member_caught_up, CONVERGE_SECONDS, "a serializable read of /after on the restarted member")
    etcdctl(cluster.endpoints[:1], "put", "/after-restart", "3")  # it takes writes again too
    assert get_value(cluster.endpoints[2:], "/after-restart") == "3"


def test_stop_member_and_restart(etcd_cluster3: EtcdCluster) -> None:
    cluster = etcd_cluster3
    cluster.stop_member(2)
    assert not cluster.members[2].is_running()
    etcdctl(cluster.endpoints[:2], "put", "/k", "v")
    cluster.restart_member(2)
    eventually(lambda: get_value(cluster.endpoints[2:], "/k", "--consistency=s") == "v", CONVERGE_SECONDS,
               "the restarted member to serve /k")


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    cluster = EtcdCluster(3, tmp_path / "c")
    with cluster:
        started = time.monotonic()
        assert cluster.startup_seconds is not None
        pids = cluster.pids
        assert len(pids) == 3
        for pid in pids:
            os.kill(pid, 0)  # alive
        cluster.kill(1)  # one already dead when the cluster stops
    assert time.monotonic() - started < 15
    for member in cluster.members:
        assert member.process is not None and member.process.returncode is not None  # reaped by stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    cluster.stop()  # idempotent, and quiet about dead members
    cluster.kill(0)


@pytest.mark.parametrize(("index", "which"), [(1, "client_port"), (2, "peer_port")])
def test_a_port_taken_before_start_is_retried_with_new_ports(tmp_path: Path, index: int, which: str) -> None:
    cluster = EtcdCluster(3, tmp_path / "c")
    taken = getattr(cluster.members[index], which)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with cluster:
            assert getattr(cluster.members[index], which) != taken
            assert "address already in use" in cluster.members[index].log_path.read_text()
            etcdctl(cluster.endpoints, "put", "/k", "v")
            assert [get_value([endpoint], "/k") for endpoint in cluster.endpoints] == ["v", "v", "v"]
    assert not any(member.is_running() for member in cluster.members)


def test_start_failure_raises_with_the_log_and_cleans_up(tmp_path: Path) -> None:
    cluster = EtcdCluster(1, tmp_path / "bad")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so etcd cannot create a data dir under it")
    cluster.members[0].data_dir = blocker / "data"
    with pytest.raises(RuntimeError, match="m0 exited") as failure:
        cluster.start(timeout=10)
    assert "last lines of" in str(failure.value)
    assert not cluster.members[0].is_running()
