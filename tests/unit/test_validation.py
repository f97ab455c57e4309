"""BGPPeer, BGPConfiguration and Node validation: good documents pass, each bad field is named."""

from __future__ import annotations

from typing import Any

import pytest

from ipam.errors import InvalidResource
from ipam.validation import validate


def doc(kind: str, name: str = "x", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("good", [
    doc("BGPPeer", peerIP="10.0.0.1", asNumber=65000),
    doc("BGPPeer", peerIP="[fd00::1]:1179", asNumber=65000, node="node1", keepOriginalNextHop=True),
    doc("BGPPeer", nodeSelector="all()", peerSelector="has(route-reflector)"),
    doc("BGPPeer", peerIP="10.0.0.1:1179", asNumber=4200000000, password={"secretKeyRef": {"name": "s", "key": "k"}},
        maxRestartTime="120s", sourceAddress="None"),
    doc("BGPConfiguration", "default", nodeToNodeMeshEnabled=False, asNumber=64512, listenPort=179,
        serviceClusterIPs=[{"cidr": "10.96.0.0/12"}], logSeverityScreen="Info"),
    doc("BGPConfiguration", "node.node1", asNumber=65001),
    doc("Node", "node1", bgp={"ipv4Address": "10.0.0.11/24", "asNumber": 65101, "routeReflectorClusterID": "224.0.0.1"},
        ipv4VXLANTunnelAddr="10.244.0.1", vxlanTunnelMACAddr="66:aa:bb:cc:dd:ee"),
])
def test_good_documents(good: dict[str, Any]) -> None:
    assert validate(good)["kind"] == good["kind"]


@pytest.mark.parametrize(("bad", "field", "reason"), [
    (doc("BGPPeer", peerIP="10.0.0.1", asNumber=-5), "spec.asNumber", "whole number"),
    (doc("BGPPeer", peerIP="10.0.0.1", asNumber=True), "spec.asNumber", "whole number"),
    (doc("BGPPeer", peerIP="banana", asNumber=1), "spec.peerIP", "not an IP address"),
    (doc("BGPPeer", peerIP="10.0.0.1:99999", asNumber=1), "spec.peerIP", "not an IP address"),
    (doc("BGPPeer", peerIP="10.0.0.1"), "spec.asNumber", "required with peerIP"),
    (doc("BGPPeer", asNumber=1), "spec.peerIP", "give peerIP"),
    (doc("BGPPeer", peerIP="10.0.0.1", asNumber=1, peerSelector="all()"), "spec.peerSelector", "not both"),
    (doc("BGPPeer", peerSelector="all()", node="a", nodeSelector="all()"), "spec.nodeSelector", "not both"),
    (doc("BGPPeer", peerSelector="rack =="), "spec.peerSelector", "invalid selector"),
    (doc("BGPPeer", peerSelector="all()", password="secret"), "spec.password", "secretKeyRef"),
    (doc("BGPPeer", peerSelector="all()", maxRestartTime="2 minutes"), "spec.maxRestartTime", "duration"),
    (doc("BGPPeer", peerSelector="all()", peerIPs="10.0.0.1"), "spec.peerIPs", "unknown field"),
    (doc("BGPConfiguration", "default", listenPort=70000), "spec.listenPort", "1 to 65535"),
    (doc("BGPConfiguration", "default", logSeverityScreen="Loud"), "spec.logSeverityScreen", "one of"),
    (doc("BGPConfiguration", "default", serviceClusterIPs=["10.96.0.0/12"]), "spec.serviceClusterIPs", "cidr"),
    (doc("BGPConfiguration", "global"), "metadata.name", "default or node."),
    (doc("Node", "node1", bgp={"ipv4Address": "10.0.0.11"}), "spec.bgp.ipv4Address", "prefix length"),
    (doc("Node", "node1", bgp={"ipv4Address": "fd00::1/64"}), "spec.bgp.ipv4Address", "not an IPv4"),
    (doc("Node", "node1", bgp={"routeReflectorClusterID": "cluster-1"}), "spec.bgp.routeReflectorClusterID", "IPv4"),
    (doc("Node", "Node_1"), "metadata.name", "DNS-1123"),
    ({**doc("Node", "n"), "metadata": {"name": "n", "labels": {"a": 1}}}, "metadata.labels", "strings"),
])
def test_bad_fields_are_named(bad: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        validate(bad)
    assert caught.value.field == field and reason in caught.value.reason
