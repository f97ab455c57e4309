"""What a crash or a forgetful runtime leaves behind, and what the daemon takes back (bgpd/cleanup.py, pure part)."""

from __future__ import annotations

from bgpd.cleanup import named_by_other_nodes, orphan_interfaces, unattached_handles
from bgpd.resources import WorkloadEndpoint


def endpoint(interface: str, node: str = "node1") -> WorkloadEndpoint:
    return WorkloadEndpoint(namespace="default", name=f"{node}-k8s-{interface}-eth0", node=node,
                            container_id=f"ctr-{interface}", pod=interface, endpoint="eth0", interface=interface,
                            ip_networks=("10.244.0.1/32",), mac="02:00:00:00:00:01", orchestrator="k8s")


def test_a_cali_interface_no_endpoint_names_is_an_orphan() -> None:
    present = ["lo", "eth0", "eth1", "cali0000000000a", "cali0000000000b", "vxlan.calico", "tunl0"]
    assert orphan_interfaces(present, [endpoint("cali0000000000a")]) == ["cali0000000000b"]


def test_interfaces_that_are_not_workloads_are_never_orphans() -> None:
    assert orphan_interfaces(["lo", "eth1", "vxlan.calico", "tunl0", "kube-ipvs0", "docker0"], []) == []


def test_every_named_interface_is_kept_and_the_rest_come_sorted() -> None:
    present = ["cali3", "cali1", "cali2", "cali1"]
    assert orphan_interfaces(present, [endpoint("cali2")]) == ["cali1", "cali3"]
    assert orphan_interfaces(present, [endpoint(i) for i in ("cali1", "cali2", "cali3")]) == []


def test_an_interface_another_nodes_endpoint_names_is_kept_and_reported() -> None:
    # A renamed node finds none of its own endpoints: its pods' veths must survive the sweep.
    endpoints = [endpoint("cali1", node="old-name"), endpoint("cali2", node="old-name"), endpoint("cali3")]
    present = ["cali1", "cali2", "cali3", "cali4"]
    assert orphan_interfaces(present, endpoints) == ["cali4"]
    assert named_by_other_nodes(present, endpoints, "node1") == ["cali1", "cali2"]
    assert named_by_other_nodes(present, endpoints, "old-name") == ["cali3"]


NET = "k8s-pod-network"


def test_gc_releases_this_networks_handles_on_this_node_the_runtime_no_longer_has() -> None:
    held = {f"{NET}.kept": {"node1"}, f"{NET}.gone": {"node1"}}
    assert unattached_handles(NET, [f"{NET}.kept"], held, "node1") == [f"{NET}.gone"]


def test_gc_leaves_other_networks_other_nodes_and_tunnel_addresses_alone() -> None:
    held = {
        "other-net.gone": {"node1"},  # another network's attachment: its own GC decides
        f"{NET}.elsewhere": {"node2"},  # a pod of another node
        "ipip-tunnel-addr-node1": {"node1"},
        f"{NET}.gone": {"node1"},
    }
    assert unattached_handles(NET, [], held, "node1") == [f"{NET}.gone"]


def test_a_handle_with_addresses_on_several_nodes_counts_for_each() -> None:
    held = {f"{NET}.moved": {"node1", "node2"}}
    assert unattached_handles(NET, [], held, "node2") == [f"{NET}.moved"]
    assert unattached_handles(NET, [f"{NET}.moved"], held, "node2") == []


def test_with_every_attachment_valid_nothing_is_released() -> None:
    held = {f"{NET}.a": {"node1"}, f"{NET}.b": {"node1"}}
    assert unattached_handles(NET, held, held, "node1") == []
