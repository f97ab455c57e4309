"""Faults of node1's ExaBGP in mesh3.

Killed with SIGKILL, three times in one lab: the daemon must start a new one; meanwhile node1's kernel keeps the
routes it learned and the other nodes keep node1's routes (graceful restart on both sides), so a continuous ping
between pods on node1 and node2 loses (almost) nothing; every session is Established again within seconds.

Deaf to reloads: ExaBGP 5.0 drops a SIGUSR1 without a word while a configured peer that is down has routes queued
(the cause of the mesh3 flake where a session stayed Active at both ends). The daemon must notice and get the new
peers configured anyway.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from containerlab import netns
from tests.eventually import within
from tests.lab.bgp import (
    MESH3_ETCD,
    apply_resources,
    delete_resources,
    has_route,
    mesh3,
    peer_rows,
    place_pods,
    sessions,
)
from tests.lab.cni import Pods
from tests.lab.handle import Deployer, LabHandle
from tests.lab.report import FaultRecord
from tests.lab.traffic import Pinger, pod_ping

RUNS = 3
RECOVERY_DEADLINE = 45.0  # seconds; a loaded CI host is slow, a stuck session is not
ADDRESSES = {"node1": "10.0.0.11", "node2": "10.0.0.12", "node3": "10.0.0.13"}


def exabgp_pid(handle: LabHandle, node: str) -> int | None:
    """The node's running ExaBGP: the PID its daemon recorded, if that process lives in the node's namespace and
    is an ExaBGP (never found by name: other labs run ExaBGPs too)."""
    try:
        pid = int((handle.lab.run_dir / node / "exabgp.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if b"exabgp" not in cmdline or pid not in netns.namespace_pids(handle.netns(node)):
        return None
    return pid


def missing_replies(output: str) -> list[int]:
    """The icmp_seq numbers ping sent and got no answer for (ping prints one line per answer)."""
    answered = {int(seq) for seq in re.findall(r"icmp_seq=(\d+)", output)}
    return sorted(set(range(1, max(answered, default=0) + 1)) - answered)


class RouteMonitor:
    """``ip monitor route`` in a node for as long as the ``with`` block lasts; afterwards ``deleted`` holds the BGP
    routes (proto 80, via a gateway) the kernel lost meanwhile, as ip printed them. Sees a gap of a millisecond,
    which polling the table would miss."""

    def __init__(self, handle: LabHandle, node: str) -> None:
        self.argv = ["ip", "netns", "exec", handle.netns(node), "ip", "monitor", "route"]
        self.node = node
        self.deleted: list[str] = []
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> RouteMonitor:
        self._process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        output = self._process.communicate(timeout=10)[0]
        self.deleted = [f"{self.node}: {line}" for line in output.splitlines()
                        if line.startswith("Deleted") and "proto 80" in line and " via " in line]


@pytest.fixture(scope="module")
def mesh(module_lab: Deployer) -> LabHandle:
    """One mesh3 for both faults: each leaves node1 with a running ExaBGP, the mesh Established and its own
    resources removed."""
    return mesh3(module_lab)


def mesh_up_with_node1(handle: LabHandle) -> bool:
    """node1 has both sessions Established, and both other nodes have theirs to node1."""
    return (len(sessions(handle, "node1")) == 2
            and all(ADDRESSES["node1"] in sessions(handle, node) for node in ("node2", "node3")))


def test_exabgp_killed_is_restarted_and_forwarding_survives(mesh: LabHandle, pods: Pods, tmp_path: Path,
                                                            fault_report: FaultRecord) -> None:
    fault_report.fault = "ExaBGP SIGKILL"
    handle = mesh
    placed = place_pods(handle, pods, tmp_path, ("node1", "node2"), "xk")
    (pod1, address1), (_, address2) = placed["node1"], placed["node2"]
    assert pod_ping(pod1, address2, timeout=30), "pods on node1 and node2 do not reach each other before the fault"
    handle.wait_for(lambda: has_route(handle, "node1", address2) and has_route(handle, "node2", address1), 30,
                    "each node's route to the other's pod block")

    for run in range(1, RUNS + 1):
        old = exabgp_pid(handle, "node1")
        assert old is not None, "node1's ExaBGP is not running"
        with contextlib.ExitStack() as stack:
            monitors = [stack.enter_context(RouteMonitor(handle, node)) for node in ADDRESSES]
            pinger = stack.enter_context(Pinger(pod1, address2))
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()

            def restarted(old: int = old) -> bool:
                new = exabgp_pid(handle, "node1")
                return new is not None and new != old

            recovered = within(lambda: restarted() and mesh_up_with_node1(handle), RECOVERY_DEADLINE, every=0.1)
            assert recovered, (
                f"run {run}: node1's ExaBGP restarted={restarted()}, sessions node1={sessions(handle, 'node1')}"
                f" node2={sessions(handle, 'node2')} node3={sessions(handle, 'node3')} after {RECOVERY_DEADLINE:g}s")
            recovery = time.monotonic() - killed
            # The routes are still right once the new ExaBGP relearned them (stale ones replaced, not dropped).
            assert has_route(handle, "node1", address2) and has_route(handle, "node2", address1)
            time.sleep(1)  # ping and monitors run on a moment after recovery: a measurement window, not a wait
        fault_report.runs += 1
        fault_report.packets_sent += pinger.sent
        fault_report.packets_lost += pinger.lost
        fault_report.recovery_seconds.append(recovery)
        print(f"\nrun {run}: sessions back {recovery:.1f}s after the kill; unanswered icmp_seq "
              f"{missing_replies(pinger.output)} of {pinger.sent}; {pinger.summary()}")
        # Graceful restart, both ways: no kernel lost a BGP route at any moment, so no packet was lost.
        assert not [line for monitor in monitors for line in monitor.deleted], [m.deleted for m in monitors]
        assert pinger.sent > 10 and pinger.lost == 0, pinger.summary()
    fault_report.notes = "IPAM untouched by this fault; routes kept in every kernel throughout (graceful restart)"


def test_peers_added_while_another_peer_is_down_still_come_up(mesh: LabHandle, pods: Pods,
                                                              tmp_path: Path, fault_report: FaultRecord) -> None:
    fault_report.fault = "ExaBGP drops reloads (a peer down)"
    handle = mesh
    placed = place_pods(handle, pods, tmp_path, ("node1", "node2"), "rd")
    config = tmp_path / "mesh.yaml"
    config.write_text("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n"
                      "spec: {nodeToNodeMeshEnabled: false}\n")
    apply_resources(handle, MESH3_ETCD, config)
    nowhere = tmp_path / "nowhere.yaml"
    nowhere.write_text("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: nowhere}\n"
                       "spec: {node: node1, peerIP: 10.0.0.99, asNumber: 64512}\n")  # no speaker there: down for good
    apply_resources(handle, MESH3_ETCD, nowhere)
    handle.wait_for(lambda: set(peer_rows(handle, "node1")) == {"10.0.0.99"}, 30, "node1 to have only the dead peer")
    # A new ExaBGP gets our routes for every configured peer: the dead one's stay queued from now on.
    old = exabgp_pid(handle, "node1")
    assert old is not None
    exabgp_log = handle.lab.run_dir / "node1" / "exabgp.log"
    offset = exabgp_log.stat().st_size
    os.kill(old, signal.SIGKILL)
    handle.wait_for(lambda: "route added to neighbor 10.0.0.99" in exabgp_log.read_text(errors="replace")[offset:],
                    30, "node1's new ExaBGP to queue our routes for the dead peer")
    node_log = handle.lab.run_dir / "node1" / "calico-py-node.log"
    node_offset = node_log.stat().st_size

    config.write_text(config.read_text().replace("false", "true"))
    apply_resources(handle, MESH3_ETCD, config)  # the mesh is back: node1's ExaBGP must add two peers
    changed = time.monotonic()
    handle.wait_for(lambda: len(sessions(handle, "node1")) == 2, 60,
                    "node1's mesh sessions to come up although its ExaBGP drops reloads")
    recovery = time.monotonic() - changed
    log = node_log.read_text(errors="replace")[node_offset:]
    assert "did not act on reload signal" in log, "ExaBGP took the reload: this test no longer meets its fault"
    assert pod_ping(placed["node1"][0], placed["node2"][1], timeout=30)
    fault_report.runs = 1
    fault_report.recovery_seconds.append(recovery)
    dropped = log.count("did not act on reload signal")
    fault_report.notes = (f"ExaBGP dropped {dropped} reload signal(s); "
                          + ("then restarted with the new peers" if "restarting it" in log else "a resent one took"))
    print(f"\nmesh sessions up {recovery:.1f}s after the change, through: "
          + "; ".join(line.split(" ", 4)[-1] for line in log.splitlines() if "reload" in line))
    delete_resources(handle, MESH3_ETCD, nowhere)
    handle.wait_for(lambda: set(peer_rows(handle, "node1")) == set(ADDRESSES.values()) - {ADDRESSES["node1"]}, 30,
                    "node1 to drop the dead peer")
