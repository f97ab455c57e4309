"""BGP with other routers (tests/e2e/data/tor.clab.yml): equal-cost paths from two top-of-rack peers become one
multipath route, what a peer announces outside the pools never reaches the kernel, and a BIRD router works as a
client of our route reflector in both directions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.lab.bgp import apply_resources, place_pods, sessions
from tests.lab.cni import Pods
from tests.lab.handle import Deployer, LabHandle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
DATA = Path(__file__).parent / "data"
TORS = ("10.0.6.1", "10.0.6.2")
BIRD_CLIENT = "10.0.6.30"


@pytest.fixture(scope="module")
def tor(module_lab: Deployer) -> LabHandle:
    """One lab for both tests: they only read it (the reflector test's pod is its own)."""
    handle = module_lab(DATA / "tor.clab.yml")
    apply_resources(handle, str(handle.topology.mgmt_addresses()["etcd"].ip), DATA / "tor" / "calico-bgp.yaml")
    expected = {"node1": {"10.0.6.12", BIRD_CLIENT, *TORS}, "node2": {"10.0.6.11", *TORS}}
    for node, peers in expected.items():
        handle.wait_for(lambda node=node, peers=peers: set(sessions(handle, node)) == peers, timeout=60,
                        what=f"{node} to have Established sessions to {sorted(peers)}")
    return handle


def our_routes(handle: LabHandle, node: str) -> dict[str, dict]:
    out = handle.exec(node, "ip", "-json", "route", "show", "proto", "80").stdout
    return {route["dst"]: route for route in json.loads(out or "[]")}


def birdc(handle: LabHandle, *command: str) -> str:
    return handle.exec("birdc", "birdc", "-s", str(handle.lab.run_dir / "birdc" / "bird.ctl"), *command).stdout


def test_equal_paths_from_two_tors_become_one_multipath_route_and_nothing_outside_the_pools_is_taken(
        tor: LabHandle) -> None:
    for node in ("node1", "node2"):
        def multipath(node: str = node) -> bool:
            route = our_routes(tor, node).get("10.244.250.0/24") or {}
            return sorted(hop.get("gateway") for hop in route.get("nexthops") or []) == list(TORS)
        tor.wait_for(multipath, timeout=30, what=f"{node} to route 10.244.250.0/24 via both ToRs")
        installed = our_routes(tor, node)
        # tor1 announced these too (they sit in its BGP table on our side, filtered): never in the kernel.
        for refused in ("default", "10.0.6.0/24", "192.0.2.0/24"):
            assert refused not in installed, f"{node} installed {refused} from a peer: {installed[refused]}"
        assert all(dst.startswith("10.244.") for dst in installed if installed[dst].get("type") != "blackhole")


def test_a_bird_client_of_our_reflector_learns_and_is_learned(tor: LabHandle, pods: Pods, tmp_path: Path) -> None:
    placed = place_pods(tor, pods, tmp_path, ("node2",), "rrc")
    pod_address = placed["node2"][1]
    # node2's block reaches BIRD through node1, reflected per RFC 4456: next hop kept, ORIGINATOR_ID node2,
    # our cluster id in CLUSTER_LIST.
    def reflected() -> bool:
        table = birdc(tor, "show", "route", "for", pod_address, "all")
        return "10.0.6.12" in table and "BGP.originator_id: 10.0.6.12" in table and "224.0.0.1" in table
    tor.wait_for(reflected, timeout=30, what=f"BIRD to learn the block of {pod_address} reflected by node1")
    assert "via 10.0.6.12" in birdc(tor, "show", "route", "for", pod_address)
    # And the other way: BIRD's prefix reaches node2 through the reflector, with BIRD as the next hop.
    tor.wait_for(lambda: (our_routes(tor, "node2").get("10.244.240.0/24") or {}).get("gateway") == BIRD_CLIENT,
                 timeout=30, what="node2 to learn BIRD's 10.244.240.0/24 via 10.0.6.30")
