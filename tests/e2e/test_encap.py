"""Encapsulation and NAT outgoing with real packets: VXLAN across subnets only (crosssubnet), VXLAN everywhere with
BGP off (tests/e2e/data/vxlan3.clab.yml), a pool's mode switched live, masquerading toward the outside, the pod
MTU across VXLAN, and IPIP (skipped where the kernel has no ipip module)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab.bgp import CLI, place_pods
from tests.lab.cni import Pods, in_ns
from tests.lab.handle import Deployer, LabHandle
from tests.lab.traffic import interrupt, pod_ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
DATA = Path(__file__).parent / "data"
VXLAN_PORT = "udp port 4789"


@contextlib.contextmanager
def capture(netns: str, interface: str, expression: str) -> Iterator[Callable[[], list[str]]]:
    """tcpdump on ``interface`` of ``netns`` while the block runs; the callable gives the captured packets (one
    line each) once the block is done. Started and stopped by PID; the capture file is removed."""
    with tempfile.TemporaryDirectory(prefix="encap-cap-") as tmp:
        path = Path(tmp) / "cap.pcap"
        # --immediate-mode: without it packets wait in the kernel's buffer for up to a second, and the stop below
        # would lose them. -Z root: tcpdump would drop to its own user, who cannot write here.
        process = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "--immediate-mode", "-Z", "root", "-ni",
                                    interface, "-U", "-w", str(path), expression],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        try:
            assert process.stderr is not None
            banner = process.stderr.readline()  # "listening on ...": the capture is live from here on
            assert "listening" in banner, banner
            yield lambda: lines
        finally:
            interrupt(process)
        lines += subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True,
                                check=False).stdout.splitlines()


def vxlan_ready(handle: LabHandle, nodes: tuple[str, ...]) -> None:
    for node in nodes:
        handle.wait_for(lambda node=node: "vxlan.calico" in handle.exec(node, "ip", "link").stdout, timeout=30,
                        what=f"{node} to bring up vxlan.calico")


def calicoctl(handle: LabHandle, *argv: str) -> subprocess.CompletedProcess[str]:
    etcd = handle.topology.mgmt_addresses()["etcd"].ip
    return handle.exec("node1", "env", f"ETCD_ENDPOINTS=http://{etcd}:2379", CLI, *argv)


def switch_pool(handle: LabHandle, tmp_path: Path, old: str, new: str) -> None:
    """Rewrite the default pool with calicoctl-py get / apply, as an operator would."""
    pool = calicoctl(handle, "get", "ippool", "default-ipv4-ippool", "-o", "yaml")
    assert old in pool.stdout, pool.stdout + pool.stderr
    changed = tmp_path / "pool.yaml"
    changed.write_text(pool.stdout.replace(old, new))
    applied = calicoctl(handle, "apply", "-f", str(changed))
    assert applied.returncode == 0, applied.stderr


def route_device(handle: LabHandle, node: str, address: str) -> str:
    out = handle.exec(node, "ip", "route", "get", address).stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else ""


def test_crosssubnet_encapsulates_between_subnets_only_and_a_mode_switch_applies_live(
        lab: Deployer, pods: Pods, tmp_path: Path) -> None:
    handle = lab("crosssubnet.clab.yml")
    vxlan_ready(handle, ("node1", "node2", "node3"))
    placed = place_pods(handle, pods, tmp_path, ("node1", "node2", "node3"), "xs")
    (ns1, _), (_, pod2), (_, pod3) = placed["node1"], placed["node2"], placed["node3"]
    router = handle.netns("router")
    with capture(router, "eth1", VXLAN_PORT) as across:
        assert pod_ping(ns1, pod3, timeout=30), "node1's pod cannot reach node3's pod in the other subnet"
    assert any("10.0.10.11" in line and "10.0.20.13" in line for line in across()), across()
    handle.wait_for(lambda: route_device(handle, "node1", pod2) == "eth1", timeout=30,
                    what="node1 to route node2's block plainly (same subnet)")
    with capture(handle.netns("node2"), "eth1", VXLAN_PORT) as same:
        assert pod_ping(ns1, pod2, timeout=30), "node1's pod cannot reach node2's pod in the same subnet"
    assert same() == [], f"same-subnet pod traffic was encapsulated: {same()}"

    switch_pool(handle, tmp_path, "vxlanMode: CrossSubnet", "vxlanMode: Always")
    handle.wait_for(lambda: route_device(handle, "node1", pod2) == "vxlan.calico", timeout=30,
                    what="node1 to route node2's block through VXLAN after the switch to Always")
    with capture(handle.netns("node2"), "eth1", VXLAN_PORT) as switched:
        assert pod_ping(ns1, pod2, timeout=30)
    assert switched(), "after the switch to Always, same-subnet traffic is not encapsulated"


@pytest.fixture(scope="module")
def vxlan3(module_lab: Deployer) -> LabHandle:
    """One lab for the VXLAN tests: they add pods and read what the packets do."""
    handle = module_lab(DATA / "vxlan3.clab.yml")
    vxlan_ready(handle, ("node1", "node2", "node3"))
    return handle


def test_vxlan_always_without_bgp_connects_every_pod_and_nat_masquerades_only_outside_traffic(
        vxlan3: LabHandle, pods: Pods, tmp_path: Path) -> None:
    nodes = ("node1", "node2", "node3")
    placed = place_pods(vxlan3, pods, tmp_path, nodes, "vx")
    assert "Established" not in calicoctl(vxlan3, "node", "status").stdout  # no BGP at all
    for node in nodes:
        for other in nodes:
            if other != node:
                assert pod_ping(placed[node][0], placed[other][1], timeout=30), f"{node} cannot reach {other}"
    # Toward the outside the source is the node's address; between pods it stays the pod's.
    with capture(vxlan3.netns("internet"), "eth1", "icmp") as outside:
        assert pod_ping(placed["node1"][0], "10.0.7.100", timeout=30), "a pod cannot reach the outside host"
    sources = {line.split()[2] for line in outside() if "echo request" in line}
    assert sources == {"10.0.7.11"}, outside()
    with capture(placed["node2"][0], "eth0", "icmp") as inside:
        assert pod_ping(placed["node1"][0], placed["node2"][1], timeout=30)
    assert {line.split()[2] for line in inside() if "echo request" in line} == {placed["node1"][1]}, inside()


def test_the_largest_packet_that_fits_the_pod_mtu_crosses_vxlan_and_one_byte_more_is_refused(
        vxlan3: LabHandle, pods: Pods, tmp_path: Path) -> None:
    placed = place_pods(vxlan3, pods, tmp_path, ("node1", "node2"), "mtu")
    ns1, target = placed["node1"][0], placed["node2"][1]
    mtu = 1500 - 50  # the lab's underlay MTU minus VXLAN's overhead: what pods get by default
    assert in_ns(ns1, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == str(mtu)
    assert pod_ping(ns1, target, timeout=30)
    fits = in_ns(ns1, "ping", "-n", "-M", "do", "-c", "1", "-W", "2", "-s", str(mtu - 28), target)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    too_big = in_ns(ns1, "ping", "-n", "-M", "do", "-c", "1", "-W", "2", "-s", str(mtu - 27), target)
    assert too_big.returncode != 0 and "message too long" in (too_big.stdout + too_big.stderr).lower(), too_big


def kernel_has_ipip() -> bool:
    name = f"ipipchk-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        return subprocess.run(["ip", "-n", name, "link", "add", "t0", "type", "ipip"], capture_output=True,
                              check=False).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.skipif(not kernel_has_ipip(), reason="this kernel has no ipip module: `ip link add type ipip` fails")
def test_ipip_pool_routes_through_tunl0(lab: Deployer, pods: Pods, tmp_path: Path) -> None:
    handle = lab("mesh3.clab.yml")
    switch_pool(handle, tmp_path, "ipipMode: Never", "ipipMode: Always")
    placed = place_pods(handle, pods, tmp_path, ("node1", "node2"), "ipip")
    handle.wait_for(lambda: route_device(handle, "node1", placed["node2"][1]) == "tunl0", timeout=30,
                    what="node1 to route node2's block through tunl0")
    assert pod_ping(placed["node1"][0], placed["node2"][1], timeout=30)
