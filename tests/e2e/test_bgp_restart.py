"""Graceful restart: a daemon restart loses no packet; a dead node's routes go after the restart time, or at once
with graceful restart off; a withdrawal leaves the kernel at once in the restart window after a start, and a peer
without graceful restart (no End-of-RIB) is not waited for."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from containerlab import netns
from tests.lab.bgp import apply_resources, has_route, mesh_with, place_pods, sessions
from tests.lab.cni import Pods
from tests.lab.daemon import daemon_process
from tests.lab.handle import Deployer, LabHandle
from tests.lab.traffic import Pinger, pod_ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
DATA = Path(__file__).parent / "data"
# The dead node's restart time: long enough to tell apart from the removal at once with graceful restart off.
DEAD_NODE_RESTART = 5
GONE_AT_ONCE = 4.0


def test_daemon_restart_with_graceful_restart_loses_nothing(lab: Deployer, pods: Pods,
                                                            tmp_path: Path) -> None:
    handle = mesh_with(lab, tmp_path, "30s")
    placed = place_pods(handle, pods, tmp_path, ("node1", "node3"), "gr")
    assert pod_ping(placed["node1"][0], placed["node3"][1], timeout=30)
    with Pinger(placed["node1"][0], placed["node3"][1]) as pinger:
        daemon = daemon_process(handle, "node3")
        os.kill(daemon.pid, signal.SIGKILL)
        handle.wait_for(lambda: not daemon.alive(), 10, "node3's daemon to die")
        handle.lab.deploy()  # restarts it; it replaces the ExaBGP the dead daemon left
        handle.wait_for(lambda: len(sessions(handle, "node3")) == 2, 60, "node3's sessions to come back")
        time.sleep(1)  # let the ping run on a moment after recovery (a measurement window, not synchronisation)
    # The pings span the kill, the restart and a second after (0.05 s apart): at least that second's worth.
    assert pinger.sent >= 20 and pinger.lost <= 1, pinger.summary()


@pytest.mark.parametrize("restart_seconds", [DEAD_NODE_RESTART, 0])
def test_a_dead_nodes_routes_go_after_the_restart_time(lab: Deployer, pods: Pods, tmp_path: Path,
                                                        restart_seconds: int) -> None:
    handle = mesh_with(lab, tmp_path, f"{restart_seconds}s")
    placed = place_pods(handle, pods, tmp_path, ("node3",), "gr")
    address = placed["node3"][1]
    handle.wait_for(lambda: has_route(handle, "node1", address), 30, "node1 to learn node3's block")
    # node3 dies: every process in its namespace stops (daemon and ExaBGP), the namespace stays.
    netns.stop_pids([(pid, None) for pid in netns.namespace_pids(handle.netns("node3"))])
    died = time.monotonic()
    handle.wait_for(lambda: not has_route(handle, "node1", address), 30, "node1 to drop node3's block")
    gone_after = time.monotonic() - died
    if restart_seconds:
        assert restart_seconds - 1 <= gone_after <= restart_seconds + 7, \
            f"routes went after {gone_after:.1f}s, expected about {restart_seconds}s"
    else:
        assert gone_after < GONE_AT_ONCE, f"routes went after {gone_after:.1f}s with graceful restart off"


FRR, GOBGP = "10.0.8.2", "10.0.8.3"
FRR_WITHDRAWN_LIVE, FRR_WITHDRAWN_WHILE_DOWN, FROM_GOBGP = "10.244.250.0/24", "10.244.251.0/24", "10.244.252.0/24"
RR_FRR_NODES = ("node1", "node2")


def vtysh(handle: LabHandle, *commands: str) -> None:
    argv = ["vtysh", "--vty_socket", str(handle.lab.run_dir / "frr")]
    for command in commands:
        argv += ["-c", command]
    done = handle.exec("frr", *argv)
    assert done.returncode == 0, f"vtysh {commands}: {done.stderr or done.stdout}"


def frr_withdraws(handle: LabHandle, prefix: str) -> None:
    vtysh(handle, "configure terminal", "router bgp 64512", "address-family ipv4 unicast", f"no network {prefix}")


def routed(handle: LabHandle, node: str, prefix: str) -> bool:
    return f"{prefix} via" in handle.exec(node, "ip", "route", "show", "proto", "80", prefix).stdout


def test_a_withdrawal_leaves_the_kernel_at_once_while_a_peer_sends_no_end_of_rib(
        lab: Deployer) -> None:
    """FRR (graceful restart: sends End-of-RIB) and GoBGP (no graceful restart, no End-of-RIB) peer with both
    nodes, inside the restart window (120 s by default) after the daemons start. A route FRR withdraws leaves
    every kernel at once; after a daemon restart, a route withdrawn while the daemon was down is kept only until
    FRR's End-of-RIB (GoBGP is not waited for), and GoBGP's route stays."""
    handle = lab(DATA / "rr-frr.clab.yml")
    apply_resources(handle, str(handle.topology.mgmt_addresses()["etcd"].ip), DATA / "rr-frr" / "calico-bgp.yaml")
    for node in RR_FRR_NODES:
        handle.wait_for(lambda node=node: set(sessions(handle, node)) == {FRR, GOBGP}, timeout=60,
                        what=f"{node} to have Established sessions to FRR and GoBGP only")
    done = handle.exec("gobgp", "gobgp", "global", "rib", "add", "-a", "ipv4", FROM_GOBGP)
    assert done.returncode == 0, done.stderr
    for node in RR_FRR_NODES:
        for prefix in (FRR_WITHDRAWN_LIVE, FRR_WITHDRAWN_WHILE_DOWN, FROM_GOBGP):
            handle.wait_for(lambda node=node, prefix=prefix: routed(handle, node, prefix), timeout=30,
                            what=f"{node} to install {prefix}")

    frr_withdraws(handle, FRR_WITHDRAWN_LIVE)
    for node in RR_FRR_NODES:
        handle.wait_for(lambda node=node: not routed(handle, node, FRR_WITHDRAWN_LIVE), timeout=10,
                        what=f"{node} to remove {FRR_WITHDRAWN_LIVE}, withdrawn by FRR")

    # node1's daemon dies (its ExaBGP lives on, no longer heard): FRR's next withdrawal stays in node1's kernel
    # until the restarted daemon has FRR's End-of-RIB.
    daemon = daemon_process(handle, "node1")
    os.kill(daemon.pid, signal.SIGKILL)
    handle.wait_for(lambda: not daemon.alive(), 10, "node1's daemon to die")
    frr_withdraws(handle, FRR_WITHDRAWN_WHILE_DOWN)
    handle.wait_for(lambda: not routed(handle, "node2", FRR_WITHDRAWN_WHILE_DOWN), timeout=10,
                    what=f"node2 to remove {FRR_WITHDRAWN_WHILE_DOWN}")
    assert routed(handle, "node1", FRR_WITHDRAWN_WHILE_DOWN), "node1's kernel lost a route with no daemon running"
    handle.lab.deploy()  # restarts node1's daemon, which replaces the ExaBGP the dead one left
    handle.wait_for(lambda: set(sessions(handle, "node1")) == {FRR, GOBGP}, timeout=60,
                    what="node1's sessions to FRR and GoBGP to come back")
    handle.wait_for(lambda: not routed(handle, "node1", FRR_WITHDRAWN_WHILE_DOWN), timeout=10,
                    what=f"node1 to remove {FRR_WITHDRAWN_WHILE_DOWN} after FRR's End-of-RIB")
    assert routed(handle, "node1", FROM_GOBGP), f"node1 lost {FROM_GOBGP}, still announced by GoBGP"
