"""A rogue BGP peer (tests/faults/data/rogue.clab.yml): what a configured external peer announces that no node
may install never reaches a kernel, the sessions stay up (or reset cleanly over a malformed UPDATE and come
back), a log line and ``calico_py_bgp_routes_rejected_total`` say what was dropped, and pods keep talking.

The rule (docs/bgp.md, "What a peer may announce"): inside the pools, aggregates, blocks and host routes are
accepted (a borrowed pod address travels as a /32 more specific of another node's block and must keep
working); refused are prefixes outside every pool, a default route, a prefix between the block size and a host
route (a /28 inside node2's /26: it could only take part of node2's block away), an AS path over 100 ASNs, and
an UPDATE that cannot be parsed (ExaBGP resets that session). A /32 from a configured peer is accepted, as in
Calico: who may peer is the protection against that (BGPPeer is admin-only, TCP-MD5); that a borrowed address's
/32 keeps working is tests/e2e/test_bgp.py::test_a_borrowed_address_is_announced_as_a_host_route. An external
peer's LOCAL_PREF is ignored (RFC 4271 5.1.5): honoured, it let the rogue take node2's whole block.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipam import keys
from tests.lab.bgp import apply_resources, place_pods, sessions
from tests.lab.cni import Pods
from tests.lab.daemon import daemon_log
from tests.lab.handle import Deployer, LabHandle
from tests.lab.health import get, sample
from tests.lab.report import FaultRecord
from tests.lab.traffic import Pinger, pod_ping

DATA = Path(__file__).parent / "data"
NODES = ("node1", "node2")
ROGUE, RAW = "10.0.7.66", "10.0.7.67"  # the GoBGP peer (both nodes) and the raw Python speaker (node1 only)
POOL = ipaddress.ip_network("10.244.0.0/16")
ACCEPTED = "10.244.210.0/24"  # an aggregate inside the pool: the rogue may announce it, the nodes take it
LONG_PATH = "10.244.220.0/24"  # inside the pool, but with a 1000-ASN AS path
RAW_ROUTE = "10.244.230.0/24"  # what the raw speaker announces once its session is up
RAW_LONG_PATH = "10.244.221.0/24"  # what it announces with 1000 ASNs
RAW_MARKER = "10.244.233.0/24"  # what it announces right after a hijack attempt, to know it was read
RAW_MARKER2 = "10.244.234.0/24"  # the same after an UPDATE with a broken attribute


# A BGPPeer another tool wrote straight to etcd, which calicoctl-py would have refused: the nodes must ignore it
# (with a warning) and still peer as the valid resources say.
BROKEN_PEER = {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "broken"},
               "spec": {"peerIP": "10.0.7.99", "asNumber": "sixty-five thousand"}}


@pytest.fixture
def rogue(lab: Deployer) -> LabHandle:
    handle = lab(DATA / "rogue.clab.yml")
    etcd = str(handle.topology.mgmt_addresses()["etcd"].ip)
    put = handle.exec("node1", "etcdctl", f"--endpoints=http://{etcd}:2379", "put",
                      f"{keys.resource_prefix('bgppeers')}broken", json.dumps(BROKEN_PEER))
    assert put.returncode == 0, put.stderr
    apply_resources(handle, etcd, DATA / "rogue-bgp.yaml")
    return handle


@pytest.fixture
def raw_speaker(rogue: LabHandle) -> Iterator[subprocess.Popen[str]]:
    """rogue_speaker.py in the raw node's namespace; stopped by closing its stdin (then killed by PID)."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", rogue.netns("raw"), sys.executable, str(DATA / "rogue_speaker.py"), RAW, "65067",
         RAW_ROUTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kernel_routes(handle: LabHandle, node: str) -> dict[str, dict]:
    """The node's routes of our protocol (80), by destination."""
    out = handle.exec(node, "ip", "-json", "route", "show", "proto", "80").stdout
    return {route["dst"]: route for route in json.loads(out or "[]")}


def every_route(handle: LabHandle, node: str) -> list[dict]:
    return json.loads(handle.exec(node, "ip", "-json", "route", "show", "table", "all").stdout or "[]")


def rejected(handle: LabHandle, node: str, peer: str, reason: str) -> float:
    status, body = get(handle, node, "/metrics")
    assert status == 200, body
    return sample(body, "calico_py_bgp_routes_rejected_total", peer=peer, reason=reason) or 0.0


def tell(speaker: subprocess.Popen[str], command: str) -> None:
    assert speaker.stdin is not None
    speaker.stdin.write(command + "\n")
    speaker.stdin.flush()


def downs_once_up(log: str, peer: str) -> int:
    """Times the session to ``peer`` went down after it first came up. Before that, connection attempts that
    cross (both sides dialling at once, RFC 4271 6.8) log a ``down`` each without any session having existed."""
    lines = log.splitlines()
    first_up = next((i for i, line in enumerate(lines) if line.endswith(f"bgp peer {peer} up")), len(lines))
    return sum(line.endswith(f"bgp peer {peer} down") for line in lines[first_up:])


def gobgp(handle: LabHandle, *argv: str) -> None:
    done = handle.exec("rogue", "gobgp", *argv)
    assert done.returncode == 0, f"gobgp {' '.join(argv)}: {done.stderr or done.stdout}"


def test_a_rogue_peer_gets_nothing_outside_the_pools_into_any_kernel(
        rogue: LabHandle, raw_speaker: subprocess.Popen[str], pods: Pods, tmp_path: Path,
        fault_report: FaultRecord) -> None:
    fault_report.fault = "rogue peer announcements"
    fault_report.runs = 1
    expected = {"node1": {"10.0.7.12", ROGUE, RAW}, "node2": {"10.0.7.11", ROGUE}}
    for node, peers in expected.items():
        rogue.wait_for(lambda node=node, peers=peers: set(sessions(rogue, node)) == peers, timeout=90,
                       what=f"{node} to have Established sessions to {sorted(peers)}")
    placed = place_pods(rogue, pods, tmp_path, NODES, "rogue")
    (ns1, pod1), (ns2, pod2) = placed["node1"], placed["node2"]
    for node, other in (("node1", pod2), ("node2", pod1)):
        rogue.wait_for(lambda node=node, other=other: "via" in rogue.exec(
            node, "ip", "route", "show", "proto", "80", "match", other).stdout, timeout=30,
            what=f"{node} to learn the block of {other}")
    assert pod_ping(ns1, pod2), "pods cannot reach each other before the rogue announces anything"
    # A /28 inside node2's block holding node2's pod: installed on node1 it would pull that pod's traffic to the
    # rogue (longest prefix wins over node2's /26).
    hijack = str(ipaddress.ip_network(f"{pod2}/28", strict=False))
    refused = {"192.0.2.0/24": "outside-pools", "0.0.0.0/0": "default-route", hijack: "more-specific-than-block",
               LONG_PATH: "as-path-too-long"}

    with Pinger(ns1, pod2) as pinger:
        started = time.monotonic()
        for prefix in ("192.0.2.0/24", "0.0.0.0/0", hijack, ACCEPTED):
            gobgp(rogue, "global", "rib", "add", "-a", "ipv4", prefix)
        # 250 ASNs (and GoBGP's own): GoBGP 3.10 panics prepending to a segment of 255 (the raw speaker below
        # sends 1000).
        gobgp(rogue, "global", "rib", "add", "-a", "ipv4", LONG_PATH, "aspath",
              ",".join(str(64000 + i) for i in range(250)))
        # The control: the rogue's routes do arrive and are judged one by one; the one inside the pool is taken.
        for node in NODES:
            rogue.wait_for(lambda node=node: (kernel_routes(rogue, node).get(ACCEPTED) or {}).get("gateway") == ROGUE,
                           timeout=30, what=f"{node} to install {ACCEPTED} via the rogue peer")
            for prefix, reason in refused.items():
                rogue.wait_for(lambda node=node, reason=reason: rejected(rogue, node, ROGUE, reason) >= 1,
                               timeout=30, what=f"{node} to count {prefix} from {ROGUE} as {reason}")
        announced_in = time.monotonic() - started

        # Malformed: the raw speaker's session is up and its route installed; then a broken UPDATE.
        rogue.wait_for(lambda: (kernel_routes(rogue, "node1").get(RAW_ROUTE) or {}).get("gateway") == RAW,
                       timeout=30, what=f"node1 to install {RAW_ROUTE} from the raw speaker")
        # node2's whole block with LOCAL_PREF 1000: an external peer's LOCAL_PREF is ignored (RFC 4271 5.1.5),
        # else it would outrank node2's own announcement and take the block. Then a marker, to know it was read.
        node2_block = str(ipaddress.ip_network(f"{pod2}/26", strict=False))
        tell(raw_speaker, f"preferred {node2_block}")
        tell(raw_speaker, f"announce {RAW_MARKER}")
        rogue.wait_for(lambda: RAW_MARKER in kernel_routes(rogue, "node1"), timeout=30,
                       what=f"node1 to install {RAW_MARKER}, announced after node2's block with LOCAL_PREF 1000")
        assert kernel_routes(rogue, "node1")[node2_block].get("gateway") == "10.0.7.12", \
            f"node1 routes node2's block via the rogue: {kernel_routes(rogue, 'node1')[node2_block]}"
        # 1000 ASNs in four AS_SEQUENCE segments: an UPDATE of 4050 octets, just inside BGP's 4096.
        tell(raw_speaker, f"long-path {RAW_LONG_PATH} 1000")
        rogue.wait_for(lambda: rejected(rogue, "node1", RAW, "as-path-too-long") >= 1, timeout=30,
                       what=f"node1 to count {RAW_LONG_PATH} with 1000 ASNs as as-path-too-long")
        # An attribute overrunning the attribute list: RFC 7606 treat-as-withdraw, the session stays. TCP keeps
        # order, so once the route announced after it is installed, the broken UPDATE has been dealt with.
        tell(raw_speaker, "malformed-attribute")
        tell(raw_speaker, f"announce {RAW_MARKER2}")
        rogue.wait_for(lambda: RAW_MARKER2 in kernel_routes(rogue, "node1"), timeout=30,
                       what=f"node1 to install {RAW_MARKER2}, announced after the broken attribute")
        assert downs_once_up(daemon_log(rogue, "node1"), RAW) == 0, "an attribute error reset the session"
        assert RAW_ROUTE in kernel_routes(rogue, "node1") and "10.244.231.0/24" not in kernel_routes(rogue, "node1")
        # A Total Path Attribute Length past the end of the message: nothing in it can be trusted; ExaBGP sends a
        # NOTIFICATION (UPDATE Message Error) and closes the session, which must come back by itself.
        broken_at = time.monotonic()
        tell(raw_speaker, "malformed-length")
        rogue.wait_for(lambda: rejected(rogue, "node1", RAW, "malformed") >= 1, timeout=30,
                       what="node1 to count the raw speaker's malformed UPDATE")
        rogue.wait_for(lambda: RAW in sessions(rogue, "node1") and (kernel_routes(
            rogue, "node1").get(RAW_ROUTE) or {}).get("gateway") == RAW, timeout=60,
            what="the raw speaker's session and route to come back after the reset")
        fault_report.recovery_seconds.append(time.monotonic() - broken_at)
    fault_report.packets_sent, fault_report.packets_lost = pinger.sent, pinger.lost
    fault_report.notes = (f"GoBGP: 4 refused, 1 accepted, all judged in {announced_in:.1f}s; raw speaker: 1000-ASN "
                          "path refused, malformed UPDATE: session reset and back (recovery = that)")

    for node in NODES:
        installed = kernel_routes(rogue, node)
        for prefix in (*refused, RAW_LONG_PATH, "10.244.231.0/24", "10.244.232.0/24"):
            assert prefix not in installed and (prefix != "0.0.0.0/0" or "default" not in installed), \
                f"{node} installed {prefix} from the rogue peer: {installed.get(prefix) or installed.get('default')}"
        # Nothing outside the pools, in any table, from any protocol, goes via an external peer.
        for route in every_route(rogue, node):
            hops = {route.get("gateway"), *(hop.get("gateway") for hop in route.get("nexthops") or [])}
            if hops & {ROGUE, RAW}:
                dst = route["dst"]
                assert dst != "default" and ipaddress.ip_network(dst).subnet_of(POOL), f"{node}: {route}"
        log = daemon_log(rogue, node)
        for prefix, reason in refused.items():
            assert f"bgp route {prefix} from peer {ROGUE} rejected ({reason})" in log, f"{node} log lacks {prefix}"
    node1_log = daemon_log(rogue, "node1")
    assert f"bgp route {RAW_LONG_PATH} from peer {RAW} rejected (as-path-too-long): AS path of 1000 ASNs" in node1_log
    assert f"bgp peer {RAW} sent a malformed UPDATE: session reset" in node1_log
    for node in NODES:  # the broken BGPPeer: said once, ignored, and nothing tried to peer with it
        log = daemon_log(rogue, node)
        assert log.count("resource /calico/resources/v3/projectcalico.org/bgppeers/broken: spec.asNumber") == 1
        assert "10.0.7.99" not in sessions(rogue, node) and "bgp sync failed" not in log
    # The sessions that only sent refused routes stayed up throughout: never down, Established now.
    for node in NODES:
        assert downs_once_up(daemon_log(rogue, node), ROGUE) == 0, f"{node}'s session to the rogue reset"
        assert ROGUE in sessions(rogue, node), f"{node} lost its session to the rogue peer"
    # Pods kept talking while all this went on: the mesh routes were never displaced.
    assert pinger.sent > 0 and pinger.lost == 0, pinger.summary()
    assert pod_ping(ns2, pod1) and pod_ping(ns1, pod2)
