"""BGP with ExaBGP on mesh3: full-mesh sessions, block routes in every kernel, pods reach pods on other nodes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab.bgp import (
    CLI,
    MESH3_ETCD,
    MESH3_NODES,
    apply_resources,
    delete_resources,
    mesh3,
    peer_rows,
    place_pods,
    remove_pods,
    sessions,
    wait_mesh,
)
from tests.lab.cni import CONF, Pods
from tests.lab.handle import TOPOLOGIES, Deployer, LabHandle
from tests.lab.traffic import pod_ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
NODES = MESH3_NODES


@pytest.fixture(scope="module")
def mesh(module_lab: Deployer) -> LabHandle:
    """One mesh3 for the tests that leave it as they found it: pods deleted, resources they applied removed, the
    mesh Established again."""
    return mesh3(module_lab)


def test_mesh3_pods_on_every_node_reach_each_other_over_bgp(mesh: LabHandle, pods: Pods, tmp_path: Path) -> None:
    placed = place_pods(mesh, pods, tmp_path, NODES, "bgp")
    namespaces = {node: ns for node, (ns, _) in placed.items()}
    addresses = {node: address for node, (_, address) in placed.items()}
    for node in NODES:
        for other in NODES:
            if other != node:
                # The other node's block arrives over BGP and lands in this node's kernel with our protocol.
                mesh.wait_for(lambda n=node, o=other: "via" in mesh.exec(
                    n, "ip", "route", "show", "proto", "80", "match", addresses[o]).stdout, timeout=30,
                    what=f"{node} to learn the block of {other}")
                assert pod_ping(namespaces[node], addresses[other]), f"pod on {node} cannot reach pod on {other}"
    remove_pods(mesh, tmp_path, placed, "bgp")


def test_leafspine_nodes_peer_with_their_leaf_and_pods_reach_across_racks(lab: Deployer,
                                                                          pods: Pods, tmp_path: Path) -> None:
    handle = lab("leafspine.clab.yml")
    apply_resources(handle, "172.20.23.2", TOPOLOGIES / "leafspine" / "calico-bgp.yaml")
    for node in ("node1", "node2", "node3", "node4"):
        handle.wait_for(lambda node=node: " global " in handle.exec(node, CLI, "node", "status").stdout
                        and handle.exec(node, CLI, "node", "status").stdout.count("Established") == 1,
                        timeout=60, what=f"{node} to have one Established session, to its leaf")
    placed = place_pods(handle, pods, tmp_path, ("node1", "node3"), "ls")  # one per rack
    assert pod_ping(placed["node1"][0], placed["node3"][1], timeout=60), "rack 1 pod cannot reach rack 2 pod"
    assert pod_ping(placed["node3"][0], placed["node1"][1], timeout=60)
    leaf_routes = handle.exec("leaf1", "ip", "route").stdout
    assert f"{placed['node1'][1]}/26" in leaf_routes or placed["node1"][1].rsplit(".", 1)[0] in leaf_routes
    for line in leaf_routes.splitlines():
        if "proto bird" in line:  # what the leaf learned: pod blocks and the other rack's subnet only
            destination = line.split()[0]
            assert destination.startswith(("10.244.", "10.1.", "10.255.")), line


@pytest.mark.parametrize("topology", ["rr.clab.yml", "rr-bird.clab.yml"])
def test_clients_peer_only_with_the_reflectors_and_reach_every_pod(lab: Deployer, pods: Pods,
                                                                  tmp_path: Path, topology: str) -> None:
    handle = lab(topology)
    name = topology.removesuffix(".clab.yml")
    etcd = str(handle.topology.mgmt_addresses()["etcd"].ip)
    apply_resources(handle, etcd, TOPOLOGIES / name / "calico-bgp.yaml")
    reflectors = {"10.0.1.1", "10.0.1.2"}
    clients = ("node1", "node2", "node3", "node4")
    for node in clients:
        handle.wait_for(lambda node=node: set(sessions(handle, node)) == reflectors, timeout=60,
                        what=f"{node} to have sessions to the two reflectors only")
    placed = place_pods(handle, pods, tmp_path, clients, name)
    for node in clients:
        for other in clients:
            if other != node:
                assert pod_ping(placed[node][0], placed[other][1], timeout=60), f"{node} cannot reach {other}'s pod"
    # Reflected routes keep the originating client as next hop: traffic goes client to client, not via a reflector.
    route = handle.exec("node1", "ip", "route", "show", "proto", "80", "match", placed["node4"][1]).stdout
    assert "via 10.0.1.14" in route, route


def test_a_new_peer_does_not_drop_the_sessions_that_did_not_change(mesh: LabHandle, tmp_path: Path) -> None:
    before = peer_rows(mesh, "node1")
    assert set(before) == {"10.0.0.12", "10.0.0.13"}
    log_file = mesh.lab.run_dir / "node1" / "calico-py-node.log"
    offset = len(log_file.read_text())
    extra = tmp_path / "peer.yaml"
    extra.write_text("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: somewhere}\n"
                     "spec: {node: node1, peerIP: 10.0.0.99, asNumber: 65099}\n")
    apply_resources(mesh, MESH3_ETCD, extra)
    mesh.wait_for(lambda: "10.0.0.99" in peer_rows(mesh, "node1"), timeout=30, what="node1 to list the new peer")
    after = peer_rows(mesh, "node1")
    assert after["10.0.0.99"][1:3] == ["node", "specific"]
    for address in ("10.0.0.12", "10.0.0.13"):
        assert after[address] == before[address], f"the session to {address} was reset: {after[address]}"
    log = log_file.read_text()[offset:]  # only what happened after the change
    assert "exabgp reloads its configuration" in log
    assert "bgp peer 10.0.0.12 down" not in log and "bgp peer 10.0.0.13 down" not in log
    delete_resources(mesh, MESH3_ETCD, extra)  # the module's other tests count node1's peers
    mesh.wait_for(lambda: set(peer_rows(mesh, "node1")) == set(before), 30, "node1 to drop the new peer")


def test_md5_wrong_password_never_establishes_and_status_says_why(lab: Deployer, tmp_path: Path) -> None:
    mesh = mesh3(lab)  # its own: the session to node3 stays down
    for node, password in (("node1", "s3cret"), ("node2", "s3cret"), ("node3", "wrong")):
        secret = mesh.lab.run_dir / node / "secrets" / "bgp-mesh" / "password"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(password + "\n")
    config = tmp_path / "mesh-password.yaml"
    config.write_text("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n"
                      "spec: {nodeMeshPassword: {secretKeyRef: {name: bgp-mesh, key: password}}}\n")
    apply_resources(mesh, MESH3_ETCD, config)
    # node1 and node2 agree on the password: their session comes back with TCP-MD5 on.
    mesh.wait_for(lambda: "md5-password" in (mesh.lab.run_dir / "node1" / "exabgp.conf").read_text(), 30,
                  "node1's ExaBGP configuration to carry the password")
    mesh.wait_for(lambda: "10.0.0.12" in sessions(mesh, "node1"), 60, "node1-node2 to re-establish with MD5")
    status = mesh.exec("node1", CLI, "node", "status").stdout
    row = next(line for line in status.splitlines() if line.startswith("10.0.0.13"))
    assert "Established" not in row and "TCP-MD5 on" in row, row
    assert "10.0.0.13" not in sessions(mesh, "node1")


def test_peers_added_by_a_reload_get_our_routes(mesh: LabHandle, pods: Pods, tmp_path: Path) -> None:
    placed = place_pods(mesh, pods, tmp_path, ("node1", "node3"), "rl")
    assert pod_ping(placed["node1"][0], placed["node3"][1], timeout=30)
    config = tmp_path / "mesh.yaml"
    for enabled in ("false", "true"):  # mesh off: every peer goes; mesh on: they come back through a reload
        config.write_text("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n"
                          f"spec: {{nodeToNodeMeshEnabled: {enabled}}}\n")
        apply_resources(mesh, MESH3_ETCD, config)
        want = 2 if enabled == "true" else 0
        for node in NODES:
            mesh.wait_for(lambda node=node, want=want: len(peer_rows(mesh, node)) == want, 30,
                          f"{node} to have {want} peers")
    wait_mesh(mesh)
    assert pod_ping(placed["node1"][0], placed["node3"][1], timeout=30), "routes were not re-announced"
    assert pod_ping(placed["node3"][0], placed["node1"][1], timeout=30)
    remove_pods(mesh, tmp_path, placed, "rl")


def test_a_borrowed_address_is_announced_as_a_host_route(mesh: LabHandle, pods: Pods, tmp_path: Path) -> None:
    pool = tmp_path / "tiny.yaml"
    pool.write_text("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tiny}\n"
                    "spec: {cidr: 10.99.0.0/26, blockSize: 26}\n")  # a single block: the second node must borrow
    apply_resources(mesh, MESH3_ETCD, pool)
    config = {**CONF, "ipam": {"type": "calico-py-ipam", "ipv4_pools": ["tiny"]}}
    placed = place_pods(mesh, pods, tmp_path, ("node1", "node2"), "borrow", config)
    borrowed = placed["node2"][1]
    # node1 owns the block (its blackhole stays) but the borrower's /32 is more specific, on every node.
    for node in ("node1", "node3"):
        mesh.wait_for(lambda node=node: f"{borrowed} via 10.0.0.12" in mesh.exec(
            node, "ip", "route", "show", "proto", "80").stdout, 30, f"{node} to route {borrowed} to node2")
    assert "blackhole 10.99.0.0/26" in mesh.exec("node1", "ip", "route", "show", "proto", "80").stdout
    assert pod_ping(placed["node1"][0], borrowed, timeout=30)
    assert pod_ping(placed["node2"][0], placed["node1"][1], timeout=30)
    remove_pods(mesh, tmp_path, placed, "borrow", config)
    delete_resources(mesh, MESH3_ETCD, pool)  # the module's other pods come from the default pool again
