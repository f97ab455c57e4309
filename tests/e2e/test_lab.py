"""Every shipped topology deploys, carries packets across each of its links, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from containerlab import netns
from containerlab.lab import Lab
from containerlab.topology import Topology, load
from tests.lab.handle import TOPOLOGIES, Deployer, LabHandle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")

TOPOLOGY_FILES = sorted(p.name for p in TOPOLOGIES.glob("*.clab.yml"))


def segments(topology: Topology) -> list[list[tuple[str, str]]]:
    """Each L2 segment as its (node, interface) ends on linux nodes: a bridge with its ports, or a point-to-point
    link between two linux nodes."""
    bridges: dict[str, list[tuple[str, str]]] = {}
    result = []
    for link in topology.links:
        ends = [(e.node, e.interface) for e in (link.a, link.b) if topology.nodes[e.node].kind == "linux"]
        bridge = next((e.node for e in (link.a, link.b) if topology.nodes[e.node].kind == "bridge"), None)
        if bridge:
            bridges.setdefault(bridge, []).extend(ends)
        else:
            result.append(ends)
    return result + list(bridges.values())


def ping_every_segment(handle: LabHandle) -> int:
    """From one end of each segment, ping every other end that has an IPv4 address. Returns pings done."""
    done = 0
    for segment in segments(handle.topology):
        addressed = []
        for node, interface in segment:
            try:
                addressed.append((node, handle.address(node, interface)))
            except Exception:
                continue  # an interface enslaved to a bridge inside the node (a leaf's rack ports)
        for (source, _), (target, address) in zip([addressed[0]] * len(addressed), addressed[1:], strict=False):
            assert handle.ping(source, address.ip), f"{source} cannot reach {target} at {address.ip}"
            done += 1
    return done


def leafspine_routes_between_racks_over_bgp(handle: LabHandle) -> None:
    # node1 (rack 1) reaches node3 and node4 (rack 2) only once the leaves learned each other's rack subnet
    # through the spines over eBGP.
    for target in ("node3", "node4"):
        address = handle.address(target, "eth1").ip
        assert handle.ping("node1", address, timeout=60), f"node1 cannot reach {target} at {address} across the spines"
    handle.wait_for(lambda: handle.exec("leaf1", "ip", "route", "show", "10.1.2.0/24").stdout.count("nexthop") == 2,
                    timeout=60, what="leaf1 to reach rack 2 over both spines (ECMP)")


def crosssubnet_routes_through_the_plain_router(handle: LabHandle) -> None:
    assert handle.ping("node1", handle.address("node3", "eth1").ip)
    assert handle.ping("node4", handle.address("node2", "eth1").ip)


# Beyond its own segments, what a topology must route, checked on the deployment the test already made.
ROUTED_ACROSS: dict[str, Callable[[LabHandle], None]] = {
    "leafspine.clab.yml": leafspine_routes_between_racks_over_bgp,
    "crosssubnet.clab.yml": crosssubnet_routes_through_the_plain_router,
}


@pytest.mark.parametrize("topology_file", TOPOLOGY_FILES)
def test_topology_deploys_pings_and_destroys(lab: Deployer, topology_file: str) -> None:
    handle = lab(topology_file)
    namespaces = set(handle.lab.all_namespaces())
    assert namespaces <= netns.namespaces()
    rows = handle.lab.inspect()
    assert all(r.state == "running" for r in rows), rows
    assert ping_every_segment(handle) >= 1
    if topology_file in ROUTED_ACROSS:
        ROUTED_ACROSS[topology_file](handle)
    # The management network reaches every node from every node (etcd and status traffic ride on it).
    mgmt = handle.topology.mgmt_addresses()
    first = next(iter(mgmt))
    for node, address in mgmt.items():
        assert handle.ping(first, address.ip, timeout=5), f"{first} cannot reach {node} on the management network"
    seconds = handle.lab.destroy()
    assert not namespaces & netns.namespaces()
    print(f"\n{topology_file}: deploy {handle.deploy_seconds:.2f}s, destroy {seconds:.2f}s")


def test_deploy_recreates_a_removed_link_is_idempotent_and_destroy_needs_no_state(lab: Deployer) -> None:
    handle = lab("mesh3.clab.yml")
    before = {(r.node, tuple(r.processes)) for r in handle.lab.inspect()}
    link = handle.topology.links[0]
    handle.exec(link.a.node, "ip", "link", "del", link.a.interface)
    report = handle.lab.deploy()
    assert report.created_links == 1
    assert link.a.interface in netns.links(handle.netns(link.a.node))
    # With nothing missing, a deploy makes and starts nothing.
    again = handle.lab.deploy()
    assert again.created_nodes == [] and again.created_links == 0 and again.started == []
    assert {(r.node, tuple(r.processes)) for r in handle.lab.inspect()} == before
    # A runner that crashed loses its state: destroy still finds every namespace and every process in them.
    pids = [pid for ns in handle.lab.all_namespaces() for pid in netns.namespace_pids(ns)]
    assert pids
    handle.lab.state_file.unlink()
    handle.lab.destroy()
    assert not set(handle.lab.all_namespaces()) & netns.namespaces()
    assert all(netns.start_time(pid) is None for pid in pids)


def test_cli_inspect_exec_graph_and_a_broken_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topo = TOPOLOGIES / "mesh3.clab.yml"
    name = f"cli-t{os.getpid() % 100000}"
    cli = [sys.executable, "-m", "containerlab.runner", "--run-dir", str(run_dir)]

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120, check=False)

    try:
        deployed = call("deploy", "-t", str(topo), "--name", name)
        assert deployed.returncode == 0, deployed.stderr
        assert "NODE" in deployed.stdout and "PROCESSES" in deployed.stdout
        rows = json.loads(call("inspect", "-t", str(topo), "--name", name, "-o", "json").stdout)
        assert {r["node"] for r in rows} == set(load(topo).nodes)
        out = call("exec", "-t", str(topo), "--name", name, "--node", "node1", "--", "ip", "-br", "addr", "show",
                   "eth1")
        assert out.returncode == 0 and "eth1" in out.stdout
        failing = call("exec", "-t", str(topo), "--name", name, "--node", "node1", "--", "false")
        assert failing.returncode == 1
    finally:
        destroyed = call("destroy", "-t", str(topo), "--name", name)
        assert destroyed.returncode == 0, destroyed.stderr
    assert not {ns for ns in netns.namespaces() if ns.startswith(f"clab-{name}")}
    png = tmp_path / "mesh3.png"
    assert call("graph", "-t", str(topo), "-o", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    broken = tmp_path / "broken.clab.yml"
    broken.write_text(topo.read_text().replace('["node1:eth1", "lan:eth1"]', '["node9:eth1", "lan:eth1"]'))
    result = call("deploy", "-t", str(broken))
    line = next(i for i, text in enumerate(broken.read_text().splitlines(), 1) if "node9" in text)
    assert result.returncode == 1
    assert f"broken.clab.yml:{line}: link endpoint node9:eth1 names node 'node9'" in result.stderr


def test_lab_object_refuses_unknown_node(tmp_path: Path) -> None:
    lab_ = Lab(load(TOPOLOGIES / "mesh3.clab.yml"), root=tmp_path)
    with pytest.raises(netns.LabError, match="no node 'nope'"):
        lab_.netns("nope")


def test_bird_frr_and_gobgp_images_run_their_daemons_and_peer(lab: Deployer) -> None:
    handle = lab(Path(__file__).parent / "data" / "peers.clab.yml")
    state = handle.lab.run_dir

    def established() -> bool:
        bird = handle.exec("bird", "birdc", "-s", str(state / "bird" / "bird.ctl"), "show", "protocols").stdout
        frr = handle.exec("frr", "vtysh", "--vty_socket", str(state / "frr"), "-c", "show bgp summary json").stdout
        gobgp = handle.exec("gobgp", "gobgp", "neighbor").stdout
        frr_peers = json.loads(frr or "{}").get("ipv4Unicast", {}).get("peers", {})
        return (bird.count("Established") == 2 and gobgp.count("Establ") == 2
                and sum(p.get("state") == "Established" for p in frr_peers.values()) == 2)

    handle.wait_for(established, timeout=60, what="BIRD, FRR and GoBGP sessions to be Established")


def test_destroy_cleans_up_after_a_runner_killed_mid_deploy(tmp_path: Path) -> None:
    topo = Path(__file__).parent / "data" / "peers.clab.yml"
    name = f"crash-t{os.getpid() % 100000}"
    lab_ = Lab(load(topo, name_override=name), root=tmp_path / "run")
    cli = [sys.executable, "-m", "containerlab.runner", "--run-dir", str(tmp_path / "run"), "deploy", "-t",
           str(topo), "--name", name]
    runner = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        # Kill it once it has made something: a node namespace with at least one link.
        while not any(len(netns.links(ns)) > 1 for ns in set(lab_.all_namespaces()[1:]) & netns.namespaces()):
            assert runner.poll() is None, "the runner finished before it could be killed"
            assert time.monotonic() < deadline, "the runner made nothing within 30s"
            time.sleep(0.005)
        runner.kill()
        runner.wait()
        assert set(lab_.all_namespaces()) & netns.namespaces()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        lab_.destroy()
    assert not set(lab_.all_namespaces()) & netns.namespaces()


def bgp_story(run_dir: Path) -> str:
    """Each node's BGP lines from its daemon and ExaBGP's reload lines: what a failed demo needs explained (the
    lab's logs go with it)."""
    story = []
    for node_dir in sorted(p for p in run_dir.iterdir() if (p / "exabgp.log").exists()):
        daemon = (node_dir / "calico-py-node.log").read_text(errors="replace").splitlines()
        exabgp = (node_dir / "exabgp.log").read_text(errors="replace").splitlines()
        story += [f"== {node_dir.name}", *[line for line in daemon if ".bgp " in line][-15:],
                  *[f"exabgp: {line}" for line in exabgp if "reload" in line or "SIGUSR1" in line][-10:]]
    return "\n".join(story)


def test_demo_makes_pods_that_reach_each_other_and_destroy_takes_them(tmp_path: Path) -> None:
    topo = TOPOLOGIES / "mesh3.clab.yml"
    name = f"demo-t{os.getpid() % 100000}"
    cli = [sys.executable, "-m", "containerlab.runner", "--run-dir", str(tmp_path / "run")]
    try:
        demo = subprocess.run([*cli, "demo", "-t", str(topo), "--name", name], capture_output=True, text=True,
                              timeout=300, check=False)
        assert demo.returncode == 0, demo.stdout + demo.stderr + bgp_story(tmp_path / "run" / name)
        assert "all pods reach each other" in demo.stdout
        assert demo.stdout.count("Established") == 6  # three nodes, two mesh peers each
        assert sum(ns.startswith(f"clab-{name}-pod-") for ns in netns.namespaces()) == 6
    finally:
        destroyed = subprocess.run([*cli, "destroy", "-t", str(topo), "--name", name], capture_output=True,
                                   text=True, timeout=120, check=False)
        assert destroyed.returncode == 0, destroyed.stderr
    assert not [ns for ns in netns.namespaces() if ns.startswith(f"clab-{name}")]
