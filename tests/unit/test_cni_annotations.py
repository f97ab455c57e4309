"""Calico's pod and namespace annotations for IPAM, decided purely."""

from __future__ import annotations

import ipaddress

import pytest

from bgpd.cni.annotations import IP_ADDRS, IPV4_POOLS, IPV6_POOLS, AnnotationError, pod_request, unknown_pools


def test_pod_annotation_wins_over_namespace_and_config() -> None:
    chosen = pod_request({IPV4_POOLS: '["blue"]'}, {IPV4_POOLS: '["green"]'}, {}, ["config-pool"])
    assert chosen.ipv4_pools == ("blue",) and chosen.ipv6_pools is None and not chosen.fixed
    assert pod_request({}, {IPV4_POOLS: '["green"]', IPV6_POOLS: '["v6"]'}, {}, ["config-pool"]).ipv4_pools \
        == ("green",)
    assert pod_request({}, {}, {}, ["config-pool"]).ipv4_pools == ("config-pool",)
    assert pod_request({}, {}, {}).ipv4_pools is None


def test_fixed_addresses_and_labels() -> None:
    chosen = pod_request({IP_ADDRS: '["10.244.9.9", "fd00::9"]'}, {}, {"app": "web", "tier": "1"})
    assert chosen.fixed == (ipaddress.ip_address("10.244.9.9"), ipaddress.ip_address("fd00::9"))
    assert chosen.attributes == {"labels": '{"app":"web","tier":"1"}'}


@pytest.mark.parametrize(("annotations", "says"), [
    ({IPV4_POOLS: "blue"}, "is not JSON"),
    ({IPV4_POOLS: "[]"}, "non-empty JSON list"),
    ({IPV4_POOLS: '[1]'}, "non-empty JSON list"),
    ({IP_ADDRS: '["10.0.0.300"]'}, "is not an IP address"),
    ({IP_ADDRS: '["10.0.0.1", "10.0.0.2"]'}, "one address per IP family"),
])
def test_bad_annotations_are_named(annotations: dict[str, str], says: str) -> None:
    with pytest.raises(AnnotationError, match=says) as caught:
        pod_request(annotations, {}, {})
    assert next(iter(annotations)) in str(caught.value)


def test_unknown_pools_by_name_or_cidr() -> None:
    assert unknown_pools(["blue", "10.245.0.0/16", "gone"], ["blue"], ["10.245.0.0/16"]) == ["gone"]


def test_node_settings_from_kubernetes_under_the_environment() -> None:
    from bgpd.resources import AS_ANNOTATION, RR_CLUSTER_ANNOTATION, node_settings
    kube_labels = {"topology.kubernetes.io/zone": "a", "rack": "r1"}
    settings = node_settings(kube_labels, {AS_ANNOTATION: "65010", RR_CLUSTER_ANNOTATION: "224.0.0.9"},
                             {"rack": "r2"}, None, None)
    assert settings.labels == {"topology.kubernetes.io/zone": "a", "rack": "r2"}  # the environment wins
    assert (settings.as_number, settings.rr_cluster_id, settings.problems) == (65010, "224.0.0.9", ())
    assert node_settings({}, {AS_ANNOTATION: "65010"}, {}, 64999, None).as_number == 64999
    bad = node_settings({}, {AS_ANNOTATION: "x", RR_CLUSTER_ANNOTATION: "nope"}, {}, None, None)
    assert bad.as_number is None and bad.rr_cluster_id is None and len(bad.problems) == 2


def test_kubernetes_internal_ip_autodetection() -> None:
    import ipaddress as ip

    from bgpd.config import Config, ConfigError
    from bgpd.daemon import node_address
    from bgpd.kube import KubeNode
    config = Config.from_env({"NODENAME": "node1", "IP": "autodetect",
                              "IP_AUTODETECTION_METHOD": "kubernetes-internal-ip"})
    node = KubeNode("node1", {}, {}, internal_ip="192.0.2.7", external_ip=None)
    assert node_address(config, node) == ip.IPv4Interface("192.0.2.7/32")  # no local interface holds it here
    with pytest.raises(ConfigError, match="InternalIP"):
        node_address(config, None)
