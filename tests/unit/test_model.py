"""IPPool validation and the JSON shapes of IPAM objects and keys."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ipam import keys
from ipam.datastore import EtcdConfig
from ipam.errors import DatastoreError, InvalidResource
from ipam.model import BlockAffinity, Handle, IPAMConfig, IPPool, check_overlap


def pool_doc(name: str = "p1", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": "10.244.0.0/16", **spec}}


def test_defaults_follow_calico() -> None:
    pool = IPPool.from_v3(pool_doc())
    assert pool.block_size == 26 and pool.ipip_mode == "Never" and pool.vxlan_mode == "Never"
    assert pool.node_selector == "all()" and not pool.disabled and not pool.nat_outgoing
    v6 = IPPool.from_v3(pool_doc(cidr="fd00:10:244::/48"))
    assert v6.block_size == 122 and v6.version == 6


def test_round_trip_keeps_metadata() -> None:
    doc = pool_doc(blockSize=24, natOutgoing=True, nodeSelector="rack == 'r1'", vxlanMode="CrossSubnet")
    doc["metadata"]["labels"] = {"a": "b"}
    pool = IPPool.from_v3(doc)
    again = IPPool.from_v3(pool.to_v3())
    assert again == pool and again.metadata == {"labels": {"a": "b"}}


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({"cidr": "10.244.0.1/16"}, "spec.cidr", "did you mean 10.244.0.0/16"),
    ({"cidr": "10.244.0.0/33"}, "spec.cidr", "not a valid"),
    ({"cidr": "banana"}, "spec.cidr", "not a valid"),
    ({"cidr": ""}, "spec.cidr", "missing"),
    ({"cidr": "169.254.0.0/24"}, "spec.cidr", "link-local"),
    ({"blockSize": 33}, "spec.blockSize", "from 20 to 32"),
    ({"blockSize": "26"}, "spec.blockSize", "integer"),
    ({"cidr": "10.0.0.0/28", "blockSize": 26}, "spec.blockSize", "must be >= 28"),
    ({"ipipMode": "Sometimes"}, "spec.ipipMode", "Never, Always, CrossSubnet"),
    ({"ipipMode": "Always", "vxlanMode": "Always"}, "spec.ipipMode", "cannot both"),
    ({"cidr": "fd00::/48", "ipipMode": "Always"}, "spec.ipipMode", "IPv4 only"),
    ({"natOutgoing": "yes"}, "spec.natOutgoing", "true or false"),
    ({"nodeSelector": "rack =="}, "spec.nodeSelector", "invalid selector"),
    ({"nodeSelector": "global()"}, "spec.nodeSelector", "global()"),
    ({"allowedUses": ["Everything"]}, "spec.allowedUses", "Workload, Tunnel"),
    ({"cidrr": "10.0.0.0/8"}, "spec.cidrr", "unknown field"),
])
def test_invalid_pools_name_the_field(spec: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        IPPool.from_v3(pool_doc(**spec))
    assert caught.value.field == field
    assert reason in str(caught.value)
    assert str(caught.value).startswith("IPPool 'p1': field ")


def test_document_shape_errors() -> None:
    with pytest.raises(InvalidResource, match=r"metadata.name: missing"):
        IPPool.from_v3({"kind": "IPPool", "spec": {"cidr": "10.0.0.0/8"}})
    with pytest.raises(InvalidResource, match="expected IPPool"):
        IPPool.from_v3({**pool_doc(), "kind": "BGPPeer"})
    with pytest.raises(InvalidResource, match="spec: missing"):
        IPPool.from_v3({"kind": "IPPool", "metadata": {"name": "x"}})


def test_overlap_is_refused_but_same_name_is_a_replacement() -> None:
    a = IPPool.from_v3(pool_doc("a", cidr="10.244.0.0/16"))
    b = IPPool.from_v3(pool_doc("b", cidr="10.244.128.0/17"))
    with pytest.raises(InvalidResource, match="overlaps pool 'a'"):
        check_overlap(b, [a])
    check_overlap(IPPool.from_v3(pool_doc("a", cidr="10.244.0.0/16", natOutgoing=True)), [a])
    check_overlap(IPPool.from_v3(pool_doc("c", cidr="10.245.0.0/16")), [a])


def test_keys_follow_calicos_layout() -> None:
    cidr = ipaddress.ip_network("10.244.3.64/26")
    assert keys.block_key(cidr) == "/calico/ipam/v2/assignment/ipv4/block/10.244.3.64-26"
    assert keys.affinity_key("node-a", cidr) == "/calico/ipam/v2/host/node-a/ipv4/block/10.244.3.64-26"
    assert keys.parse_affinity_key(keys.affinity_key("node-a", cidr)) == ("node-a", cidr)
    v6 = ipaddress.ip_network("fd00::40/122")
    assert keys.block_key(v6) == "/calico/ipam/v2/assignment/ipv6/block/fd00::40-122"
    assert keys.parse_affinity_key(keys.affinity_key("n", v6)) == ("n", v6)
    assert keys.handle_key("k8s-pod-network.abc") == "/calico/ipam/v2/handle/k8s-pod-network.abc"
    assert keys.resource_key("ippools", "p") == "/calico/resources/v3/projectcalico.org/ippools/p"


def test_small_objects_json() -> None:
    cidr = ipaddress.ip_network("10.244.3.64/26")
    assert BlockAffinity("n", cidr).to_json() == {"state": "confirmed", "deleted": False}
    assert BlockAffinity.from_json("n", cidr, None).confirmed  # legacy empty value
    assert not BlockAffinity.from_json("n", cidr, {"state": "pending"}).confirmed
    handle = Handle("h").adjusted(cidr, 2).adjusted(cidr, -1)
    assert handle.to_json() == {"handleID": "h", "block": {"10.244.3.64/26": 1}, "deleted": False}
    assert handle.adjusted(cidr, -1).total == 0 and handle.adjusted(cidr, -1).blocks == {}
    assert IPAMConfig.from_json(None) == IPAMConfig()
    assert IPAMConfig.from_json(IPAMConfig(strict_affinity=True).to_json()).strict_affinity


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("127.0.0.1:2379", r"expected http\(s\)://HOST:PORT"),
    ("http://127.0.0.1", r"expected http\(s\)://HOST:PORT"),
    ("ftp://127.0.0.1:2379", r"expected http\(s\)://HOST:PORT"),
])
def test_bad_etcd_endpoints(text: str, message: str) -> None:
    with pytest.raises(DatastoreError, match=message):
        EtcdConfig.parse(text)


def test_etcd_config_from_env() -> None:
    config = EtcdConfig.from_env({"ETCD_ENDPOINTS": "http://127.0.0.1:1,http://127.0.0.1:2"})
    assert config.endpoints == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert EtcdConfig.from_env({}).endpoints == ("http://127.0.0.1:2379",)
    with pytest.raises(DatastoreError, match="together"):
        EtcdConfig.from_env({"ETCD_ENDPOINTS": "https://h:1", "ETCD_CERT_FILE": "/x"})
