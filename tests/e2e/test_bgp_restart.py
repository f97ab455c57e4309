"""Graceful restart: a daemon restart loses no packet; a dead node's routes go after the restart time, or at once
with graceful restart off."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from containerlab import netns
from tests.e2e.test_bgp import apply_resources, place_pods, sessions
from tests.e2e.test_cni import Pods, pod_ping
from tests.labfixture import LabHandle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
NODES = ("node1", "node2", "node3")


def mesh_with(lab: Callable[..., LabHandle], tmp_path: Path, restart_time: str) -> LabHandle:
    handle = lab("mesh3.clab.yml")
    config = tmp_path / "bgp.yaml"
    config.write_text("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n"
                      f"spec: {{nodeMeshMaxRestartTime: {restart_time}}}\n")
    handle.wait_for(lambda: "ready" in (handle.lab.run_dir / "node1" / "calico-py-node.log").read_text()
                    if (handle.lab.run_dir / "node1" / "calico-py-node.log").exists() else False, 60, "node1 ready")
    apply_resources(handle, "172.20.20.2", config)
    for node in NODES:
        handle.wait_for(lambda node=node: len(sessions(handle, node)) == 2, timeout=60,
                        what=f"{node} to have both mesh sessions Established")
    return handle


def has_route(handle: LabHandle, node: str, address: str) -> bool:
    return "via" in handle.exec(node, "ip", "route", "show", "proto", "80", "match", address).stdout


def test_daemon_restart_with_graceful_restart_loses_nothing(lab: Callable[..., LabHandle], pods: Pods,
                                                            tmp_path: Path) -> None:
    handle = mesh_with(lab, tmp_path, "30s")
    placed = place_pods(handle, pods, tmp_path, ("node1", "node3"), "gr")
    assert pod_ping(placed["node1"][0], placed["node3"][1], timeout=30)
    pinger = subprocess.Popen(["ip", "netns", "exec", placed["node1"][0], "ping", "-i", "0.05", placed["node3"][1]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        daemon = next(p for p in handle.lab._load_processes() if p.node == "node3" and p.daemon == "calico-py-node")
        os.kill(daemon.pid, signal.SIGKILL)
        handle.wait_for(lambda: not daemon.alive(), 10, "node3's daemon to die")
        handle.lab.deploy()  # restarts it; it replaces the ExaBGP the dead daemon left
        handle.wait_for(lambda: len(sessions(handle, "node3")) == 2, 60, "node3's sessions to come back")
        time.sleep(1)  # let the ping run on a moment after recovery (a measurement window, not synchronisation)
    finally:
        pinger.send_signal(signal.SIGINT)
        output = pinger.communicate(timeout=10)[0]
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", output).groups())
    assert sent > 40 and received >= sent - 1, output.splitlines()[-3:]


@pytest.mark.parametrize(("restart_time", "kept"), [("8s", True), ("0s", False)])
def test_a_dead_nodes_routes_go_after_the_restart_time(lab: Callable[..., LabHandle], pods: Pods, tmp_path: Path,
                                                        restart_time: str, kept: bool) -> None:
    handle = mesh_with(lab, tmp_path, restart_time)
    placed = place_pods(handle, pods, tmp_path, ("node3",), "gr")
    address = placed["node3"][1]
    handle.wait_for(lambda: has_route(handle, "node1", address), 30, "node1 to learn node3's block")
    # node3 dies: every process in its namespace stops (daemon and ExaBGP), the namespace stays.
    netns.stop_pids([(pid, None) for pid in netns.namespace_pids(handle.netns("node3"))])
    died = time.monotonic()
    handle.wait_for(lambda: not has_route(handle, "node1", address), 30, "node1 to drop node3's block")
    gone_after = time.monotonic() - died
    if kept:
        assert 6 <= gone_after <= 15, f"routes went after {gone_after:.1f}s, expected about 8s"
    else:
        assert gone_after < 4, f"routes went after {gone_after:.1f}s with graceful restart off"
