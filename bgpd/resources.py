"""Node and WorkloadEndpoint resources in Calico's v3 shapes, as values (their etcd storage: :mod:`bgpd.store`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ipam import keys

API_VERSION = "projectcalico.org/v3"


def node_resource(name: str, ipv4: ipaddress.IPv4Interface | None, ipv6: ipaddress.IPv6Interface | None,
                  as_number: int | None, labels: dict[str, str], existing: dict[str, Any] | None,
                  rr_cluster_id: str | None = None) -> dict[str, Any]:
    """The Node resource for this node: our fields set, everything else someone stored kept."""
    node = dict(existing or {"apiVersion": API_VERSION, "kind": "Node", "metadata": {"name": name}, "spec": {}})
    metadata = dict(node.get("metadata") or {})
    metadata["name"] = name
    if labels:
        metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
    spec = dict(node.get("spec") or {})
    bgp = dict(spec.get("bgp") or {})
    for key, value in (("ipv4Address", ipv4), ("ipv6Address", ipv6), ("asNumber", as_number)):
        if value is None:
            bgp.pop(key, None)
        else:
            bgp[key] = value if isinstance(value, int) else str(value)
    if rr_cluster_id:  # set by us only when configured; otherwise whatever an operator stored stays
        bgp["routeReflectorClusterID"] = rr_cluster_id
    spec["bgp"] = bgp
    return {**node, "metadata": metadata, "spec": spec}


@dataclass(frozen=True)
class WorkloadEndpoint:
    """Calico's WorkloadEndpoint: what the CNI plugin plumbed, so the daemon can rebuild routes after a restart
    and DEL/CHECK know the interface."""

    namespace: str
    name: str
    node: str
    container_id: str
    pod: str
    endpoint: str
    interface: str
    ip_networks: tuple[str, ...]
    mac: str
    orchestrator: str

    @property
    def key(self) -> str:
        return wep_key(self.namespace, self.name)

    def to_v3(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "WorkloadEndpoint",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"node": self.node, "orchestrator": self.orchestrator, "containerID": self.container_id,
                         "pod": self.pod, "endpoint": self.endpoint, "interfaceName": self.interface,
                         "ipNetworks": list(self.ip_networks), "mac": self.mac}}

    @classmethod
    def from_v3(cls, obj: dict[str, Any]) -> WorkloadEndpoint:
        spec, meta = obj["spec"], obj["metadata"]
        return cls(namespace=meta["namespace"], name=meta["name"], node=spec["node"],
                   container_id=spec.get("containerID", ""), pod=spec.get("pod", ""),
                   endpoint=spec.get("endpoint", ""), interface=spec["interfaceName"],
                   ip_networks=tuple(spec.get("ipNetworks") or ()), mac=spec.get("mac", ""),
                   orchestrator=spec.get("orchestrator", "cni"))


def wep_name(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """Calico's naming: parts joined by ``-`` with dashes inside a part doubled."""
    return "-".join(part.replace("-", "--") for part in (node, orchestrator, workload, endpoint))


def wep_key(namespace: str, name: str) -> str:
    return f"{keys.resource_prefix('workloadendpoints')}{namespace}/{name}"


AS_ANNOTATION = "projectcalico.org/ASNumber"
RR_CLUSTER_ANNOTATION = "projectcalico.org/RouteReflectorClusterID"


@dataclass(frozen=True)
class NodeSettings:
    """What the node's Kubernetes object adds to its own settings: labels (so pool and BGPPeer selectors work on
    Kubernetes labels), and the AS number and route-reflector cluster id from annotations."""

    labels: dict[str, str]
    as_number: int | None
    rr_cluster_id: str | None
    problems: tuple[str, ...] = ()  # annotations that were ignored, and why


def node_settings(kube_labels: dict[str, str], kube_annotations: dict[str, str], labels: dict[str, str],
                  as_number: int | None, rr_cluster_id: str | None) -> NodeSettings:
    """Kubernetes' labels and annotations under the daemon's own settings (the environment wins)."""
    problems = []
    annotated_as = kube_annotations.get(AS_ANNOTATION)
    if as_number is None and annotated_as is not None:
        if annotated_as.isdigit() and 0 < int(annotated_as) < 2**32:
            as_number = int(annotated_as)
        else:
            problems.append(f"annotation {AS_ANNOTATION}={annotated_as!r} is not an AS number (1-4294967295)")
    annotated_rr = kube_annotations.get(RR_CLUSTER_ANNOTATION)
    if rr_cluster_id is None and annotated_rr:
        try:
            rr_cluster_id = str(ipaddress.IPv4Address(annotated_rr))
        except ValueError:
            problems.append(f"annotation {RR_CLUSTER_ANNOTATION}={annotated_rr!r} is not an IPv4-style cluster id")
    return NodeSettings({**kube_labels, **labels}, as_number, rr_cluster_id, tuple(problems))
