"""Node churn on mesh3: node3 leaves (destroyed: its namespace, processes, links and disk gone) and joins again
(redeployed), 20 times; and a node that stays away longer than the graceful-restart time.

After every return the mesh has converged (every session Established, each surviving node saw a new session to
the returning one) and every kernel's proto-80 routes are exactly what the datastore and the live pods call for:
the blocks affine to each other live node via that node's address, a blackhole per own block, a /32 per live pod.
While node3 is away the others keep its routes (graceful restart, 120 s: it is back long before that) and its
return replaces them; a node away for longer than its restart time has its routes withdrawn everywhere (measured
in the second test). A pod on the rejoined node gets an address and reaches a pod on node1, the pod that died
with the node is deleted by the runtime (CNI DEL on the new node: its address is released), and traffic between
the two nodes that stay is not disturbed at all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from containerlab import netns, runner
from tests.lab.bgp import has_route, mesh_with, place_pods, sessions_of
from tests.lab.cni import CONF, NETWORK, Pods, Runtime, ipam_state
from tests.lab.daemon import daemon_log
from tests.lab.handle import Deployer, LabHandle
from tests.lab.report import FaultRecord
from tests.lab.traffic import Pinger, pod_ping

CYCLES = 20
CHURNED = "node3"
STEADY = ("node1", "node2")
NODES = (*STEADY, CHURNED)
ETCD = "http://172.20.20.2:2379"
AFFINITIES = "/calico/ipam/v2/host/"
RESTART_TIME = 120  # nodeMeshMaxRestartTime for the churn (Calico's default): far longer than a node is away
SHORT_RESTART = 5  # for the node that stays away
CONVERGE_TIMEOUT = 60.0


def affine_blocks(handle: LabHandle) -> dict[str, set[str]]:
    """Confirmed block affinities in etcd, node -> blocks, read with etcdctl (not with our own IPAM code)."""
    result = handle.exec("node1", "etcdctl", "--endpoints", ETCD, "get", "--prefix", AFFINITIES)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    blocks: dict[str, set[str]] = {}
    for key, value in zip(lines[::2], lines[1::2], strict=True):
        node, _, rest = key[len(AFFINITIES):].partition("/")
        if '"confirmed"' in value:
            blocks.setdefault(node, set()).add(rest.rsplit("/", 1)[-1].replace("-", "/"))
    return blocks


def kernel_routes(handle: LabHandle, node: str) -> set[tuple[str, str]]:
    """The node's proto-80 routes as (kind, destination [-> gateway])."""
    routes: list[dict[str, Any]] = json.loads(handle.exec(node, "ip", "-j", "route", "show", "proto", "80").stdout)
    found = set()
    for route in routes:
        if route.get("type") == "blackhole":
            found.add(("blackhole", route["dst"]))
        elif "gateway" in route:
            found.add(("remote", f"{route['dst']} via {route['gateway']}"))
        else:
            found.add(("pod", route["dst"]))
    return found


def wanted_routes(blocks: dict[str, set[str]], addresses: dict[str, str], pods_on: dict[str, set[str]],
                  node: str) -> set[tuple[str, str]]:
    """What ``node`` must hold with these live nodes: other nodes' blocks via them, its own blocks as
    blackholes, its live pods as /32s."""
    wanted = {("blackhole", block) for block in blocks.get(node, set())}
    wanted |= {("pod", address) for address in pods_on.get(node, set())}
    wanted |= {("remote", f"{block} via {addresses[other]}") for other in addresses if other != node
               for block in blocks.get(other, set())}
    return wanted


def route_mismatch(handle: LabHandle, addresses: dict[str, str], pods_on: dict[str, set[str]]) -> dict[str, Any]:
    """Per node, the routes it holds that it should not (stale) and those it lacks; empty when all agree."""
    blocks = affine_blocks(handle)
    wrong = {}
    for node in addresses:
        have, want = kernel_routes(handle, node), wanted_routes(blocks, addresses, pods_on, node)
        if have != want:
            wrong[node] = {"stale": sorted(have - want), "missing": sorted(want - have)}
    return wrong


def peer_ups(handle: LabHandle, node: str, peer: str) -> int:
    return daemon_log(handle, node).count(f"bgp peer {peer} up")


def test_node_churn_20_cycles_converges_without_stale_routes(lab: Deployer, pods: Pods,
                                                              tmp_path: Path, fault_report: FaultRecord) -> None:
    fault_report.fault = "node churn (mesh3, node3 destroyed and redeployed)"
    handle = mesh_with(lab, tmp_path, f"{RESTART_TIME}s")
    addresses = {node: handle.address(node).ip.exploded for node in NODES}
    placed = place_pods(handle, pods, tmp_path, NODES, "churn")
    bin_dir = tmp_path / "cni-bin"  # place_pods installed the shim there
    pods_on = {node: {address} for node, (_, address) in placed.items()}
    live = {node: (f"churn{node}", *placed[node]) for node in NODES}  # node -> (container id, netns, address)
    pod_names = {f"churn{node}": f"churn-{node}" for node in NODES}  # container id -> pod name, as place_pods has them
    handle.wait_for(lambda: not route_mismatch(handle, addresses, pods_on), 30, "every node's routes before churn")
    churned_blocks = affine_blocks(handle)[CHURNED]

    converge_times: list[float] = []
    stale_found = 0
    held_while_away = 0
    handed_out: list[str] = [address for _, _, address in live.values()]
    with Pinger(placed["node1"][0], placed["node2"][1], 0.1) as bystanders:
        for cycle in range(CYCLES):
            ups_before = {node: peer_ups(handle, node, addresses[CHURNED]) for node in STEADY}
            processes = [p for p in handle.processes() if p.node == CHURNED]
            assert processes and all(p.alive() for p in processes)

            handle.lab.destroy_node(CHURNED)
            assert handle.netns(CHURNED) not in netns.namespaces()
            assert not any(p.alive() for p in processes), f"cycle {cycle}: node3's processes outlived it"
            pods_on[CHURNED] = set()  # its pod died with it
            # Graceful restart: the others keep node3's routes while it is away (it is back within seconds).
            if all(has_route(handle, node, block.split("/")[0]) for node in STEADY for block in churned_blocks):
                held_while_away += 1

            rejoin_at = time.monotonic()
            report = handle.lab.deploy()
            assert report.created_nodes == [CHURNED] and report.started == [f"{CHURNED}/calico-py-node"], report

            def converged(ups_before: dict[str, int] = ups_before) -> bool:
                return (all(peer_ups(handle, node, addresses[CHURNED]) > ups_before[node] for node in STEADY)
                        and all(len(peers) == 2 for peers in sessions_of(handle, NODES).values())
                        and not route_mismatch(handle, addresses, pods_on))
            try:
                handle.wait_for(converged, CONVERGE_TIMEOUT, f"the mesh to converge after rejoin {cycle}")
            except AssertionError:
                mismatch = route_mismatch(handle, addresses, pods_on)
                stale_found += sum(len(m["stale"]) for m in mismatch.values())
                raise AssertionError(f"cycle {cycle}: not converged; routes: {mismatch}; sessions: "
                                     f"{sessions_of(handle, NODES)}") from None
            converge_times.append(time.monotonic() - rejoin_at)

            # The runtime deletes the pod that died with the node (its address goes back), then starts a new one.
            runtime = Runtime(handle, bin_dir, CHURNED)
            old_id, _, old_address = live[CHURNED]
            deleted = runtime.delete(old_id, None, pod=pod_names[old_id])
            assert deleted.rc == 0, f"cycle {cycle}: {deleted}"
            new_id = f"churn{cycle}"
            ns = pods.new(f"c{cycle}")
            pod_names[new_id] = new_id
            added = runtime.call("ADD", CONF, new_id, ns, pod=new_id)
            assert added.rc == 0, f"cycle {cycle}: {added}"
            address = added.json["ips"][0]["address"].split("/")[0]
            assert address not in {a for _, _, a in live.values() if a != old_address}, f"{address} given twice"
            handed_out.append(address)
            live[CHURNED] = (new_id, ns, address)
            pods_on[CHURNED] = {address}
            assert pod_ping(placed["node1"][0], address, timeout=20), f"cycle {cycle}: node1 -> new pod"
            assert pod_ping(ns, placed["node1"][1], timeout=20), f"cycle {cycle}: new pod -> node1"
            handle.wait_for(lambda: not route_mismatch(handle, addresses, pods_on), 10,
                            f"cycle {cycle}: routes to hold the new pod and nothing else")

    # IPAM: the live pods hold exactly their addresses, nothing leaked by the dead ones, nothing twice.
    state = ipam_state(handle)
    assert state["report"]["problems"] == [], state["report"]["problems"]
    handles = set(state["handles"])
    live_handles = {f"{NETWORK}.{container}" for container, _, _ in live.values()}
    lost = len(live_handles - handles)
    leaked = handles - live_handles
    live_addresses = [address for _, _, address in live.values()]
    duplicated = len(live_addresses) - len(set(live_addresses))

    fault_report.runs = CYCLES
    fault_report.packets_sent = bystanders.sent
    fault_report.packets_lost = bystanders.lost
    fault_report.allocations_lost = lost
    fault_report.allocations_duplicated = duplicated
    fault_report.recovery_seconds = converge_times
    fault_report.notes = (f"stale routes found: {stale_found}; node3's routes kept by the others while away "
                          f"(GR {RESTART_TIME}s) in {held_while_away}/{CYCLES} cycles; {len(set(handed_out))} "
                          f"addresses handed out; pings node1->node2 throughout")
    print(f"\nconverge seconds per cycle: {[round(t, 2) for t in converge_times]}\n{fault_report.notes}")
    assert lost == 0 and duplicated == 0 and not leaked, (lost, duplicated, leaked)
    assert bystanders.lost == 0, f"traffic between the steady nodes lost packets: {bystanders.summary()}"
    assert held_while_away == CYCLES  # graceful restart covered every absence


def test_a_node_away_longer_than_the_restart_time_is_withdrawn_everywhere_and_returns(
        lab: Deployer, pods: Pods, tmp_path: Path, fault_report: FaultRecord) -> None:
    fault_report.fault = f"node gone past graceful restart ({SHORT_RESTART}s)"
    handle = mesh_with(lab, tmp_path, f"{SHORT_RESTART}s")
    addresses = {node: handle.address(node).ip.exploded for node in NODES}
    placed = place_pods(handle, pods, tmp_path, NODES, "away")
    pods_on = {node: {address} for node, (_, address) in placed.items()}
    handle.wait_for(lambda: not route_mismatch(handle, addresses, pods_on), 30, "every node's routes")

    node_dir = handle.lab.run_dir / CHURNED
    assert (node_dir / "exabgp.conf").exists()
    # Through the CLI this time: calico-py-lab destroy --node.
    assert runner.main(["destroy", "-t", str(handle.topology.path), "--name", handle.topology.name,
                        "--node", CHURNED]) == 0
    left_at = time.monotonic()
    assert handle.netns(CHURNED) not in netns.namespaces()
    assert [r.state for r in handle.lab.inspect() if r.node == CHURNED] == ["absent"]
    # Its disk went with it, its log stays for reading.
    assert not (node_dir / "exabgp.conf").exists() and (node_dir / "calico-py-node.log").exists()
    survivors = {node: addresses[node] for node in STEADY}
    survivors_pods = {node: pods_on[node] for node in STEADY}

    def withdrawn() -> bool:  # node3 is no live node now: the others' routes are each other's only
        blocks = affine_blocks(handle)
        return all(kernel_routes(handle, node) == wanted_routes(blocks, survivors, survivors_pods, node)
                   for node in STEADY)
    handle.wait_for(withdrawn, SHORT_RESTART + 10, "node3's routes to be withdrawn everywhere")
    withdrawn_after = time.monotonic() - left_at
    assert SHORT_RESTART - 1 <= withdrawn_after <= SHORT_RESTART + 3, f"withdrawn after {withdrawn_after:.1f}s"

    rejoin_at = time.monotonic()
    handle.lab.deploy()
    pods_on[CHURNED] = set()
    handle.wait_for(lambda: all(len(peers) == 2 for peers in sessions_of(handle, NODES).values())
                    and not route_mismatch(handle, addresses, pods_on), CONVERGE_TIMEOUT, "the mesh after rejoin")
    back_after = time.monotonic() - rejoin_at
    fault_report.runs = 1
    fault_report.recovery_seconds = [back_after]
    fault_report.notes = (f"node3's routes withdrawn everywhere {withdrawn_after:.1f}s after it left; "
                          f"back {back_after:.1f}s after redeploy")
    print(f"\n{fault_report.notes}")
