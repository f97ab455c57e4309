"""The speaker's configuration planned from the node's view (bgpd/speaker/plan.py): peers, announcements
(borrowed addresses as /32s), the pools the filter judges by, graceful restart, the cluster id, secrets."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

from bgpd.resources import WorkloadEndpoint
from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import MESH_PASSWORD
from bgpd.speaker.plan import plan_speaker, restart_seconds, secret_refs
from bgpd.speaker.sync import BGPSync
from bgpd.view import ENDPOINTS, NodeView
from ipam.model import IPPool

POOL = IPPool("p", ipaddress.ip_network("10.244.0.0/16"), 26)
PRIVATE = IPPool("q", ipaddress.ip_network("10.245.0.0/16"), 26, disable_bgp_export=True)
NODES = {"node1": {"metadata": {"name": "node1"}, "spec": {"bgp": {"ipv4Address": "10.0.0.11/24",
                                                                   "routeReflectorClusterID": "224.0.0.1"}}},
         "node2": {"metadata": {"name": "node2"}, "spec": {"bgp": {"ipv4Address": "10.0.0.12/24"}}}}
BORROWED = WorkloadEndpoint("ns", "node1-k8s-b-eth0", "node1", "c", "b", "eth0", "calib", ("10.244.9.7/32",), "",
                            "k8s")


def test_the_plan_follows_the_view() -> None:
    view = NodeView("node1", nodes=NODES, pools=(POOL, PRIVATE), endpoints=(BORROWED,),
                    borrowed=frozenset({ipaddress.ip_address("10.244.9.7")}),
                    affinities=(ipaddress.ip_network("10.244.1.0/26"), ipaddress.ip_network("10.245.1.0/26")),
                    bgp_configuration={"spec": {"nodeMeshMaxRestartTime": "30s",
                                                "nodeMeshPassword": {"secretKeyRef": {"name": "s", "key": "k"}}}})
    plan = plan_speaker(view, {MESH_PASSWORD: "pw"})
    assert plan is not None
    assert [(p.address, p.password, p.rr_client) for p in plan.peers] == [("10.0.0.12", "pw", True)]
    assert plan.announcements == {"10.244.1.0/26", "10.244.9.7/32"}  # the private pool's block stays inside
    assert plan.pools == (POOL, PRIVATE) and plan.graceful_restart == 30 and plan.cluster_id == "224.0.0.1"
    assert secret_refs(view) == {MESH_PASSWORD: ("s", "k")}


def test_no_node_resource_no_plan_and_durations_as_calico_writes_them() -> None:
    assert plan_speaker(NodeView("node3", nodes=NODES), {}) is None
    assert [restart_seconds(d) for d in (None, "0s", "2m", "1m30s", "bogus")] == [120, 0, 120, 90, 120]


def test_only_a_borrowed_address_among_this_nodes_endpoints_wakes_the_bgp_sync(tmp_path: Path) -> None:
    view = {"now": NodeView("node1", nodes=NODES, affinities=(ipaddress.ip_network("10.244.1.0/26"),))}
    sync = BGPSync(lambda: view["now"], ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None))
    sync.on_view_change({ENDPOINTS})
    assert not sync._wake.is_set()  # a pod inside this node's block: nothing new to announce
    view["now"] = replace(view["now"], borrowed=frozenset({ipaddress.ip_address("10.244.9.7")}))
    sync.on_view_change({ENDPOINTS})
    assert sync._wake.is_set()
