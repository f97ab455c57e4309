"""Dual-stack BGP on mesh3-dual (tests/e2e/data/mesh3-dual.clab.yml): every node has an IPv4 and an IPv6 address
(IP and IP6), there is an IPv4 and an IPv6 pool, and the mesh runs separate IPv4 and IPv6 sessions. Pods get an
address of each family; each node's kernel routes the other nodes' IPv6 blocks via their IPv6 addresses, and pods
on different nodes reach each other over both families. A BIRD router peering over IPv6 only learns node1's IPv6
block, and of what it announces node1 installs only what the IPv6 pool's filter lets through."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.lab.bgp import CLI, apply_resources
from tests.lab.cni import CONF, Pods, Runtime, cni_bin_dir
from tests.lab.handle import Deployer, LabHandle
from tests.lab.traffic import pod_ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
DATA = Path(__file__).parent / "data"
NODES = ("node1", "node2", "node3")
V4 = {"node1": "10.0.7.11", "node2": "10.0.7.12", "node3": "10.0.7.13"}
V6 = {"node1": "fd00:7::11", "node2": "fd00:7::12", "node3": "fd00:7::13"}
BIRD6 = "fd00:7::30"
POOL6 = ipaddress.ip_network("fd00:10:244::/64")
DUAL_CONF: dict[str, Any] = {**CONF, "ipam": {"type": "calico-py-ipam", "assign_ipv4": "true",
                                              "assign_ipv6": "true"}}


def established(handle: LabHandle, node: str) -> dict[int, set[str]]:
    """IP version -> the peers ``calicoctl-py node status`` shows Established, read under each family's heading."""
    found: dict[int, set[str]] = {4: set(), 6: set()}
    version = 4
    for line in handle.exec(node, CLI, "node", "status").stdout.splitlines():
        if line.startswith("IPv6 BGP status"):
            version = 6
        words = line.split()
        if words and line.rstrip().endswith("Established"):
            address = ipaddress.ip_address(words[0])
            assert address.version == version, f"{node}: {address} listed under IPv{version} BGP status"
            found[version].add(str(address))
    return found


def route6(handle: LabHandle, node: str, address: str) -> dict[str, Any]:
    """The proto-80 IPv6 route ``node`` uses for ``address`` (empty when it has none)."""
    out = handle.exec(node, "ip", "-json", "-6", "route", "show", "proto", "80", "match", address).stdout
    routes = [r for r in json.loads(out or "[]") if r.get("type") != "blackhole"]
    return routes[0] if routes else {}


def birdc(handle: LabHandle, *command: str) -> str:
    return handle.exec("bird6", "birdc", "-s", str(handle.lab.run_dir / "bird6" / "bird.ctl"), *command).stdout


def test_dual_stack_mesh_routes_and_pings_over_ipv6_and_ipv4(lab: Deployer, pods: Pods, tmp_path: Path) -> None:
    handle: LabHandle = lab(DATA / "mesh3-dual.clab.yml")
    apply_resources(handle, str(handle.topology.mgmt_addresses()["etcd"].ip), DATA / "dual" / "calico-bgp.yaml")
    for node in NODES:
        others = [n for n in NODES if n != node]
        want = {4: {V4[n] for n in others}, 6: {V6[n] for n in others} | ({BIRD6} if node == "node1" else set())}
        handle.wait_for(lambda node=node, want=want: established(handle, node) == want, timeout=60,
                        what=f"{node} to have Established sessions {want}")

    bin_dir = tmp_path / "cni-bin"
    cni_bin_dir(bin_dir)
    placed: dict[str, tuple[str, str, str]] = {}  # node -> (pod netns, IPv4, IPv6)
    for node in NODES:
        ns = pods.new(f"v6-{node}")
        added = Runtime(handle, bin_dir, node).call("ADD", DUAL_CONF, f"v6{node}", ns, pod=f"v6-{node}")
        assert added.rc == 0, added
        addresses = [ipaddress.ip_interface(ip["address"]).ip for ip in added.json["ips"]]
        v4 = next(str(a) for a in addresses if a.version == 4)
        v6 = next(a for a in addresses if a.version == 6)
        assert v6 in POOL6, f"{node}'s pod got {v6}, outside the IPv6 pool {POOL6}"
        placed[node] = (ns, v4, str(v6))

    for node in NODES:
        for other in NODES:
            if other == node:
                continue
            # The other node's IPv6 block came over the IPv6 session: via its IPv6 address, onlink on eth1.
            handle.wait_for(lambda n=node, o=other: route6(handle, n, placed[o][2]).get("gateway") == V6[o],
                            timeout=30, what=f"{node} to route {other}'s IPv6 block via {V6[other]}")
            route = route6(handle, node, placed[other][2])
            assert route["dev"] == "eth1" and ipaddress.ip_network(route["dst"]).prefixlen == 122, route
            ns = placed[node][0]
            assert pod_ping(ns, placed[other][2], 20, version=6), \
                f"pod on {node} cannot reach {placed[other][2]} on {other}"
            assert pod_ping(ns, placed[other][1], 20), f"pod on {node} cannot reach {placed[other][1]} on {other}"
        # Its own IPv6 block is blackholed here (addresses no pod holds go nowhere else).
        blackholes = handle.exec(node, "ip", "-6", "route", "show", "proto", "80", "type", "blackhole").stdout
        assert route6_block(placed[node][2]) in blackholes, blackholes

    # BIRD, an IPv6-only eBGP peer of node1: it learns node1's IPv6 block with node1's IPv6 address as next hop.
    block1 = route6_block(placed["node1"][2])
    handle.wait_for(lambda: f"via {V6['node1']}" in birdc(handle, "show", "route", "for", placed["node1"][2]),
                    timeout=30, what=f"BIRD to learn {block1} via {V6['node1']}")
    # Of BIRD's announcements node1 takes the block-sized prefix inside the pool, not the default route or the
    # prefix outside the pools (the IPv6 pool's import filter, as for IPv4).
    handle.wait_for(lambda: route6(handle, "node1", "fd00:10:244::ffc1").get("gateway") == BIRD6, timeout=30,
                    what="node1 to route BIRD's fd00:10:244::ffc0/122 via fd00:7::30")
    # And the burst of 40 more blocks, applied in one `ip -batch` (whose lines once carried a "-6" ip refused).
    blocks = ipaddress.ip_network("fd00:10:244:0:ff::/80").subnets(new_prefix=122)
    burst = {str(block) for block in itertools.islice(blocks, 40)}

    def bird_routes() -> set[str]:
        out = handle.exec("node1", "ip", "-json", "-6", "route", "show", "proto", "80").stdout
        return {r["dst"] for r in json.loads(out or "[]") if r.get("gateway") == BIRD6}
    handle.wait_for(lambda: burst <= bird_routes(), timeout=30, what="node1 to install BIRD's 40 IPv6 blocks")
    installed = handle.exec("node1", "ip", "-6", "route", "show", "proto", "80").stdout
    assert "fd00:99::/64" not in installed and "default" not in installed, installed
    assert "route change failed" not in (handle.lab.run_dir / "node1" / "calico-py-node.log").read_text()

    for node in NODES:
        deleted = Runtime(handle, bin_dir, node).call("DEL", DUAL_CONF, f"v6{node}", placed[node][0],
                                                      pod=f"v6-{node}")
        assert deleted.rc == 0, deleted


def route6_block(address: str) -> str:
    """The /122 block (the IPv6 pool's block size) that holds ``address``."""
    return str(ipaddress.ip_interface(f"{address}/122").network)
