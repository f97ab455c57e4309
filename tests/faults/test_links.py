"""Link loss: a veth taken down inside a lab. Routes via the lost link go after the BGP hold time, traffic takes
the path that is left (leafspine), and everything comes back with the link.

Two labs:
- leafspine, its BIRD fabric tuned by the test (hold time 3 s, link-state checking off on the leaves, so the leaf
  notices the loss by its hold timer as it must when the fault is out of its sight, e.g. a switch in between);
  the link taken down is the one the test's pod-to-pod flow is hashed onto, so the failover is in the measured
  traffic;
- mesh3 with the hold time shortened to 9 s (CALICO_BGP_HOLD_TIME; 30 s by default) and graceful restart to 5 s:
  node1's LAN interface goes down, and the other nodes drop node1's routes after hold time plus restart time.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.eventually import within
from tests.lab.bgp import CLI, apply_resources, mesh_with, place_pods, sessions
from tests.lab.cni import Pods
from tests.lab.daemon import daemon_log
from tests.lab.handle import TOPOLOGIES, Deployer, LabHandle
from tests.lab.report import FaultRecord
from tests.lab.traffic import Pinger, pod_ping

FABRIC_HOLD = 3  # seconds; BIRD's minimum (keepalive 1 s)
MESH_HOLD = 9  # CALICO_BGP_HOLD_TIME for the mesh test: the hold time the daemon gives ExaBGP; keepalives every
# third of it
MESH_KEEPALIVE = MESH_HOLD / 3
MESH_RESTART = 5  # nodeMeshMaxRestartTime for the mesh test, seconds
SLACK = 3.0  # polling and a loaded 2-core machine: how late past a timer an observation may come
PING_INTERVAL = 0.05


# ---------------------------------------------------------------------------------------------- leafspine


def fast_fabric(tmp_path: Path) -> Path:
    """The leafspine topology with the fabric's BGP timers for this test, derived from the shipped files (so the
    fabric stays the one the lab documents). Leaves: hold time 3 s, no link-state check; both tiers: a session
    that failed may restart after 1 s (BIRD waits 60 s by default) and retries connecting every 2 s."""
    shutil.copy(TOPOLOGIES / "leafspine.clab.yml", tmp_path)
    shutil.copytree(TOPOLOGIES / "leafspine", tmp_path / "leafspine")
    timers = f"  hold time {FABRIC_HOLD};\n  keepalive time 1;\n  error wait time 1, 5;\n  connect retry time 2;\n"
    for conf, template in (("leaf1", "spine"), ("leaf2", "spine"), ("spine1", "leaf"), ("spine2", "leaf")):
        path = tmp_path / "leafspine" / f"{conf}.conf"
        extra = timers + ("  check link off;\n" if conf.startswith("leaf") else "")
        text, count = re.subn(rf"(template bgp {template} \{{\n)", lambda m, e=extra: m.group(1) + e,
                              path.read_text())
        assert count == 1, f"{path.name}: no 'template bgp {template}' to tune"
        path.write_text(text.replace("connect retry time 5;\n", "", 1))
    return tmp_path / "leafspine.clab.yml"


def uplink(handle: LabHandle, spine: str, leaf: str) -> tuple[str, str]:
    """The spine's end of its link to ``leaf``: (interface, address)."""
    link = next(link for link in handle.topology.links if (link.a.node, link.b.node) == (spine, leaf))
    return link.a.interface, handle.address(spine, link.a.interface).ip.exploded


def bird_state(handle: LabHandle, node: str, protocol: str) -> str:
    """BIRD's state of one protocol ("Established", "Idle", "Active", ...)."""
    socket = handle.lab.run_dir / node / "bird.ctl"
    for line in handle.exec(node, "birdc", "-s", str(socket), "show", "protocols", protocol).stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == protocol:
            return fields[5] if len(fields) > 5 else fields[3]
    return "?"


def routed_via(handle: LabHandle, router: str, destination: str, source: str, iif: str) -> str:
    """The next hop ``router`` forwards this flow to (ECMP hashing included), as the kernel decides it."""
    result = handle.exec(router, "ip", "-j", "route", "get", destination, "from", source, "iif", iif)
    routes: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    return str(routes[0].get("gateway", routes[0].get("type", "?"))) if routes else "none"


def nexthops(handle: LabHandle, router: str, destination: str) -> set[str]:
    """The gateways of ``router``'s route towards ``destination`` (all of them for a multipath route)."""
    result = handle.exec(router, "ip", "-j", "route", "show", "match", destination, "proto", "bird")
    routes: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    if not routes:
        return set()
    best = max(routes, key=lambda r: int(r["dst"].partition("/")[2] or 32) if r["dst"] != "default" else 0)
    return {hop["gateway"] for hop in best.get("nexthops", [])} or ({best["gateway"]} if "gateway" in best else set())


def test_leafspine_uplink_loss_fails_over_to_the_other_spine_and_back(
        lab: Deployer, pods: Pods, tmp_path: Path, fault_report: FaultRecord) -> None:
    fault_report.fault = f"link loss leaf-spine (hold {FABRIC_HOLD}s)"
    handle = lab(fast_fabric(tmp_path))
    apply_resources(handle, "172.20.23.2", tmp_path / "leafspine" / "calico-bgp.yaml")
    for node in ("node1", "node2", "node3", "node4"):
        handle.wait_for(lambda node=node: len(sessions(handle, node)) == 1, 60, f"{node}'s session to its leaf")
    placed = place_pods(handle, pods, tmp_path, ("node1", "node3"), "link")
    (source_ns, source), (_, destination) = placed["node1"], placed["node3"]
    assert pod_ping(source_ns, destination, timeout=60), "rack 1 pod cannot reach rack 2 pod before the fault"
    handle.wait_for(lambda: len(nexthops(handle, "leaf1", destination)) == 2, 30, "leaf1's ECMP route to rack 2")

    # The fault goes on the uplink leaf1 hashes the flow onto, at the spine's end: leaf1 only loses carrier.
    gateway = routed_via(handle, "leaf1", destination, source, "br-rack")
    spine = next(s for s in ("spine1", "spine2") if uplink(handle, s, "leaf1")[1] == gateway)
    spine_interface = uplink(handle, spine, "leaf1")[0]
    other_spine = ({"spine1", "spine2"} - {spine}).pop()
    remaining = uplink(handle, other_spine, "leaf1")[1]

    with Pinger(source_ns, destination, PING_INTERVAL) as outage:
        handle.wait_for(lambda: pod_ping(source_ns, destination, 2), 10, "traffic before the fault")
        down_at = time.monotonic()
        assert handle.exec(spine, "ip", "link", "set", spine_interface, "down").returncode == 0
        handle.wait_for(lambda: gateway not in nexthops(handle, "leaf1", destination), FABRIC_HOLD + 2 * SLACK,
                        f"leaf1 to withdraw its route via {spine}")
        withdrawn_after = time.monotonic() - down_at
        assert bird_state(handle, "leaf1", spine) != "Established"
        assert nexthops(handle, "leaf1", destination) == {remaining}
        # Rack 2's leaf no longer reaches rack 1 through the spine that lost its link either.
        handle.wait_for(lambda: nexthops(handle, "leaf2", source) == {uplink(handle, other_spine, "leaf2")[1]},
                        2 * SLACK, f"leaf2 to reach rack 1 over {other_spine} only")
        assert pod_ping(source_ns, destination, timeout=5), "no traffic over the remaining spine"
    failover = outage.lost * PING_INTERVAL
    # Packets are lost only until the leaf withdraws the dead path: at most the hold time's worth (plus one
    # poll), at least part of it (the flow was on that path, and the leaf kept it until its hold timer fired).
    assert withdrawn_after >= FABRIC_HOLD - 1.5, f"withdrawn after {withdrawn_after:.1f}s, before the hold time"
    assert outage.lost > 0 and failover <= withdrawn_after + 1.0, (outage.summary(), withdrawn_after)

    with Pinger(source_ns, destination, PING_INTERVAL) as comeback:
        handle.wait_for(lambda: pod_ping(source_ns, destination, 2), 10, "traffic before the link returns")
        up_at = time.monotonic()
        assert handle.exec(spine, "ip", "link", "set", spine_interface, "up").returncode == 0
        handle.wait_for(lambda: bird_state(handle, "leaf1", spine) == "Established", 30,
                        f"leaf1's session to {spine} to re-establish")
        session_after = time.monotonic() - up_at
        handle.wait_for(lambda: nexthops(handle, "leaf1", destination) == {gateway, remaining}, 30,
                        "leaf1's route to rack 2 over both spines again")
        handle.wait_for(lambda: len(nexthops(handle, "leaf2", source)) == 2, 30, "leaf2's two paths to rack 1")
        restored_after = time.monotonic() - up_at
        assert routed_via(handle, "leaf1", destination, source, "br-rack") == gateway  # the flow is back on it
        assert pod_ping(source_ns, destination, timeout=5)
    assert comeback.lost == 0, comeback.summary()

    fault_report.runs = 1
    fault_report.packets_sent = outage.sent + comeback.sent
    fault_report.packets_lost = outage.lost + comeback.lost
    fault_report.recovery_seconds = [failover]
    fault_report.notes = (f"{spine}-leaf1 down: leaf1 withdrew after {withdrawn_after:.1f}s, {outage.lost} pings "
                          f"lost (~{failover:.1f}s); link up: session {session_after:.1f}s, ECMP back "
                          f"{restored_after:.1f}s, {comeback.lost} lost")
    print(f"\n{fault_report.notes}")


# ---------------------------------------------------------------------------------------------- mesh3


def block_routes(handle: LabHandle, node: str) -> dict[str, str]:
    """``node``'s proto-80 routes to other nodes' blocks: destination -> gateway."""
    routes = json.loads(handle.exec(node, "ip", "-j", "route", "show", "proto", "80").stdout or "[]")
    return {r["dst"]: r["gateway"] for r in routes if "gateway" in r}


def session_down_at(handle: LabHandle, node: str, peer: str, after: float) -> float:
    """The wall-clock time ``node``'s daemon logged its session to ``peer`` down, the first time after ``after``."""
    for line in daemon_log(handle, node).splitlines():
        if line.endswith(f"bgp peer {peer} down"):
            logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if logged >= after:
                return logged
    raise AssertionError(f"{node} never logged its session to {peer} down")


def test_mesh3_node_link_down_withdraws_its_routes_after_hold_time_and_they_return(
        lab: Deployer, pods: Pods, tmp_path: Path, fault_report: FaultRecord) -> None:
    fault_report.fault = f"link loss mesh3 node1 (hold {MESH_HOLD}s, GR {MESH_RESTART}s)"
    handle = mesh_with(lab, tmp_path, f"{MESH_RESTART}s", {"CALICO_BGP_HOLD_TIME": str(MESH_HOLD)})
    nodes = ("node1", "node2", "node3")
    assert f"hold-time {MESH_HOLD};" in (handle.lab.run_dir / "node2" / "exabgp.conf").read_text()
    placed = place_pods(handle, pods, tmp_path, nodes, "lk")
    address = {node: handle.address(node).ip.exploded for node in nodes}
    expected: dict[str, dict[str, str]] = {}  # node -> the block routes it holds with the mesh whole
    for node in nodes:
        handle.wait_for(lambda node=node: len(block_routes(handle, node)) == 2, 30, f"{node} to learn both blocks")
        expected[node] = block_routes(handle, node)
    node1_blocks = {dst for dst, gateway in expected["node2"].items() if gateway == address["node1"]}
    assert node1_blocks, expected

    survivors = ("node2", "node3")
    withdrawn: dict[str, float] = {}
    with Pinger(placed["node2"][0], placed["node3"][1], PING_INTERVAL) as bystanders:
        down_at, down_clock = time.monotonic(), time.time()
        assert handle.exec("node1", "ip", "link", "set", "eth1", "down").returncode == 0

        def each_withdrew() -> bool:
            """Notes when each survivor dropped node1's blocks; true once both did."""
            for node in survivors:
                if node not in withdrawn and not node1_blocks & set(block_routes(handle, node)):
                    withdrawn[node] = time.monotonic() - down_at
            return len(withdrawn) == len(survivors)
        patience = MESH_HOLD + MESH_RESTART + 2 * SLACK
        assert within(each_withdrew, patience, every=0.2), f"node1's routes still held after {patience:.0f}s"
    # When each survivor gave up on node1: its daemon's log line, to the millisecond (a poll of `node status`
    # would add its own latency on a loaded machine).
    held = {node: session_down_at(handle, node, address["node1"], down_clock) - down_clock for node in survivors}
    for node in survivors:
        # The hold timer fires 6-9 s after the last keepalive heard before the fault (one every 3 s), then
        # graceful restart keeps the routes for its restart time, then they go.
        assert MESH_HOLD - MESH_KEEPALIVE - 1 <= held[node] <= MESH_HOLD + SLACK, (node, held[node])
        assert MESH_RESTART - 1 <= withdrawn[node] - held[node] <= MESH_RESTART + SLACK, (node, held, withdrawn)
    assert bystanders.lost == 0, f"node2 -> node3 lost packets while node1 was cut off: {bystanders.summary()}"

    up_at = time.monotonic()
    assert handle.exec("node1", "ip", "link", "set", "eth1", "up").returncode == 0
    # The host's own route config, which the kernel dropped with the link (the lab's exec: put it there).
    assert handle.exec("node1", "ip", "route", "replace", "default", "dev", "eth1", "metric", "4096").returncode == 0
    for node in nodes:
        handle.wait_for(lambda node=node: len(sessions(handle, node)) == 2, 60, f"{node}'s sessions to come back")
    sessions_after = time.monotonic() - up_at
    for node in nodes:
        handle.wait_for(lambda node=node: block_routes(handle, node) == expected[node], 60,
                        f"{node}'s block routes to be what they were before the fault")
    restored_after = time.monotonic() - up_at
    for node, other in (("node1", "node2"), ("node2", "node1"), ("node3", "node1")):
        assert pod_ping(placed[node][0], placed[other][1], timeout=10), f"pod on {node} cannot reach {other}'s"
    status = handle.exec("node1", CLI, "node", "status").stdout
    assert status.count("Established") == 2, status

    fault_report.runs = 1
    fault_report.packets_sent = bystanders.sent
    fault_report.packets_lost = bystanders.lost
    fault_report.recovery_seconds = [restored_after]
    fault_report.notes = (f"node1 eth1 down: sessions dropped after {max(held.values()):.1f}s, routes withdrawn "
                          f"after {max(withdrawn.values()):.1f}s; link up: sessions {sessions_after:.1f}s, routes "
                          f"{restored_after:.1f}s; pings node2->node3 during the fault")
    print(f"\n{fault_report.notes}")
