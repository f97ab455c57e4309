"""Node daemon pure logic: CNI request parsing and results, desired routes, settings, address choice."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re

import pytest

from bgpd import desired
from bgpd.autodetect import choose
from bgpd.cni import spec
from bgpd.config import Config, ConfigError
from bgpd.dataplane.workloads import host_interface_name, random_mac
from bgpd.resources import node_resource, wep_name
from bgpd.speaker.peers import MESH, PeerSpec, render_exabgp
from ipam.errors import DatastoreError

CONF = json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py",
                   "ipam": {"type": "calico-py-ipam"}})
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/p", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=nginx-0", "CNI_PATH": "/opt/cni/bin"}


def test_a_good_add_request() -> None:
    request = spec.parse_request(ENV, CONF)
    assert request.handle_id == "k8s-pod-network.abc123"
    assert (request.pod_namespace, request.pod_name) == ("web", "nginx-0")
    assert request.cni_version == "1.0.0"


@pytest.mark.parametrize(("env", "stdin", "code", "message"), [
    ({}, CONF, spec.INVALID_ENVIRONMENT, "CNI_COMMAND"),
    (ENV, "{not json", spec.DECODE_FAILURE, "not valid JSON"),
    (ENV, "[1]", spec.DECODE_FAILURE, "JSON object"),
    (ENV, CONF.replace("1.0.0", "9.9.9"), spec.INCOMPATIBLE_VERSION, "cniVersion '9.9.9' is not supported"),
    (ENV, CONF.replace('"name": "k8s-pod-network", ', ""), spec.INVALID_NETWORK_CONFIG, "no name"),
    ({**ENV, "CNI_NETNS": ""}, CONF, spec.INVALID_ENVIRONMENT, "CNI_NETNS is missing"),
    ({**ENV, "CNI_CONTAINERID": ""}, CONF, spec.INVALID_ENVIRONMENT, "CNI_CONTAINERID"),
    ({**ENV, "CNI_IFNAME": "a/b"}, CONF, spec.INVALID_ENVIRONMENT, "CNI_IFNAME"),
    ({**ENV, "CNI_ARGS": "novalue"}, CONF, spec.INVALID_ENVIRONMENT, "CNI_ARGS item"),
])
def test_bad_requests_get_the_spec_codes(env: dict[str, str], stdin: str, code: int, message: str) -> None:
    with pytest.raises(spec.CNIError) as caught:
        spec.parse_request(env, stdin)
    assert caught.value.code == code and message in caught.value.msg


def test_del_needs_no_netns_and_version_needs_no_config() -> None:
    assert spec.parse_request({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, CONF).netns == ""
    assert spec.parse_request({"CNI_COMMAND": "VERSION"}, "").command == "VERSION"


def test_result_shapes_by_version() -> None:
    result = spec.Result(interfaces=[spec.Interface("cali1", "ee:ee:ee:ee:ee:ee"),
                                     spec.Interface("eth0", "02:00:00:00:00:01", "/run/netns/p")],
                         ips=[(ipaddress.ip_interface("10.244.0.5/32"), 1, None)],
                         routes=[("0.0.0.0/0", "169.254.1.1")])
    new = result.to_json("1.0.0")
    assert new["ips"] == [{"address": "10.244.0.5/32", "interface": 1}]
    assert new["interfaces"][1]["sandbox"] == "/run/netns/p"
    assert new["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert result.to_json("0.3.1")["ips"][0]["version"] == "4"
    assert spec.CNIError(spec.TRY_AGAIN_LATER, "later", "why").to_json("1.0.0") == {
        "cniVersion": "1.0.0", "code": 11, "msg": "later", "details": "why"}


def test_host_interface_names_follow_calico() -> None:
    # sha1("default.nginx") starts with 3aa2e0aa00b...: Calico's name for that pod
    name = host_interface_name("default", "nginx", "ignored")
    assert name.startswith("cali") and len(name) == 15
    assert name == "cali" + hashlib.sha1(b"default.nginx").hexdigest()[:11]
    assert host_interface_name("", "", "abc") == "cali" + hashlib.sha1(b"abc").hexdigest()[:11]
    mac = random_mac()
    assert int(mac.split(":")[0], 16) & 0x03 == 0x02  # locally administered unicast


def test_desired_routes_and_diff() -> None:
    w1 = desired.LocalWorkload("cali1", (ipaddress.ip_address("10.244.0.1"), ipaddress.ip_address("fd00::1")))
    w2 = desired.LocalWorkload("cali2", (ipaddress.ip_address("10.244.0.2"),))
    blocks = [ipaddress.ip_network("10.244.0.0/26"), ipaddress.ip_network("10.244.9.9/32")]
    want = desired.desired_routes([w1, w2], blocks, existing_interfaces={"cali1"})
    assert want == {desired.RouteSpec("10.244.0.0/26", "blackhole"),
                    desired.RouteSpec("10.244.0.1/32", device="cali1"),
                    desired.RouteSpec("fd00::1/128", device="cali1")}
    have = {desired.RouteSpec("10.244.0.1/32", device="cali1"), desired.RouteSpec("10.244.7.0/26", "blackhole")}
    diff = desired.diff_routes(want, have)
    assert set(diff.add) == want - have and diff.remove == (desired.RouteSpec("10.244.7.0/26", "blackhole"),)
    assert desired.diff_routes(want, want).empty


def test_config_from_env_and_its_errors() -> None:
    config = Config.from_env({"NODENAME": "node1", "IP": "10.0.0.11", "AS": "65101",
                              "ETCD_ENDPOINTS": "http://172.20.20.2:2379", "CALICO_IPV4POOL_CIDR": "10.244.0.0/16",
                              "CALICO_IPV4POOL_VXLAN": "CrossSubnet"})
    assert config.as_number == 65101 and config.default_pool["spec"]["vxlanMode"] == "CrossSubnet"
    assert config.default_pool["spec"]["natOutgoing"] is True
    assert Config.from_env({"NODENAME": "n", "NO_DEFAULT_POOLS": "true"}).default_pool is None
    for env, message in [({"NODENAME": "Bad_Name"}, "NODENAME"), ({"NODENAME": "n", "IP": "10.0.0"}, "IP="),
                         ({"NODENAME": "n", "AS": "x"}, "AS="),
                         ({"NODENAME": "n", "CALICO_IPV4POOL_CIDR": "10.0.0.1/8"}, "did you mean 10.0.0.0/8"),
                         ({"NODENAME": "n", "CALICO_NETWORKING_BACKEND": "gobgp"}, "bird, vxlan or none"),
                         ({"NODENAME": "n", "IP_AUTODETECTION_METHOD": "magic"}, "first-found"),
                         ({"NODENAME": "n", "CALICO_BGP_HOLD_TIME": "2"}, "CALICO_BGP_HOLD_TIME='2': .* 3 to")]:
        with pytest.raises(ConfigError, match=message):
            Config.from_env(env)


def test_hold_time_and_failover_timeout_from_env_and_their_errors() -> None:
    default = Config.from_env({"NODENAME": "n"})
    assert (default.bgp_hold_time, default.etcd.failover_timeout) == (30, 30.0)
    config = Config.from_env({"NODENAME": "n", "CALICO_BGP_HOLD_TIME": "9", "CALICO_DATASTORE_FAILOVER_TIMEOUT": "12"})
    assert (config.bgp_hold_time, config.etcd.failover_timeout) == (9, 12.0)
    peer = PeerSpec("10.0.0.12", 64512, 64512, "10.0.0.11", MESH, "node2")
    assert "    hold-time 9;" in render_exabgp("10.0.0.11", [peer], ["relay"], hold_time=9).splitlines()
    for value in ("0", "x", "7200"):
        with pytest.raises(DatastoreError, match=f"CALICO_DATASTORE_FAILOVER_TIMEOUT={value!r}: give a number"):
            Config.from_env({"NODENAME": "n", "CALICO_DATASTORE_FAILOVER_TIMEOUT": value})


def test_address_autodetection_choice() -> None:
    candidates = [(name, ipaddress.IPv4Interface(address)) for name, address in (
        ("lo", "127.0.0.1/8"), ("eth0", "172.20.20.3/24"), ("cali1", "10.244.0.1/32"), ("eth1", "10.0.0.11/24"))]
    assert choose(candidates, "first-found") == ipaddress.IPv4Interface("172.20.20.3/24")
    assert choose(candidates, "interface=eth1") == ipaddress.IPv4Interface("10.0.0.11/24")
    assert choose(candidates, "skip-interface=eth0") == ipaddress.IPv4Interface("10.0.0.11/24")
    assert choose(candidates, "cidr=10.0.0.0/8") == ipaddress.IPv4Interface("10.0.0.11/24")
    assert choose(candidates, "interface=wlan.*") is None


def test_node_resource_keeps_what_others_stored() -> None:
    existing = {"apiVersion": "projectcalico.org/v3", "kind": "Node",
                "metadata": {"name": "n1", "labels": {"rack": "r1"}},
                "spec": {"bgp": {"routeReflectorClusterID": "224.0.0.1", "ipv4Address": "10.0.0.1/24"}}}
    node = node_resource("n1", ipaddress.IPv4Interface("10.0.0.11/24"), None, 65101, {"zone": "a"}, existing)
    assert node["spec"]["bgp"] == {"routeReflectorClusterID": "224.0.0.1", "ipv4Address": "10.0.0.11/24",
                                   "asNumber": 65101}
    assert node["metadata"]["labels"] == {"rack": "r1", "zone": "a"}
    assert wep_name("node-1", "k8s", "web-0", "eth0") == "node--1-k8s-web--0-eth0"


def test_node_status_table(capsys: pytest.CaptureFixture[str]) -> None:
    from calicoctl_py.commands.node import print_status
    status = {"node": "node1", "address": "10.0.0.11/24", "ready": True, "uptime_seconds": 5,
              "reconcile": {"routes": 3, "last_seconds": 0.002, "runs": 4, "errors": 0}, "workloads": 2, "bgp": True,
              "peers": [{"address": "10.0.0.12", "type": "node-to-node mesh", "state": "up", "since": "08:00:01",
                         "info": "Established"}]}
    assert print_status(status) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[out.index("IPv4 BGP status") + 1]
    assert re.split(r"\s{2,}", header) == ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]
    assert out[out.index("IPv4 BGP status") + 2].split() == ["10.0.0.12", "node-to-node", "mesh", "up", "08:00:01",
                                                            "Established"]
    assert "No IPv6 peers found." in out


def test_ip6_and_the_default_ipv6_pool_settings() -> None:
    base = {"NODENAME": "n1", "IP": "10.0.0.11"}
    config = Config.from_env(base)
    assert config.ip6 == "none" and config.default_pool6 is None  # Calico's default: no IPv6
    config = Config.from_env({**base, "IP6": "fd00:7::11/64", "CALICO_IPV6POOL_CIDR": "fd00:10:244::/64"})
    assert config.ip6 == "fd00:7::11/64"
    assert config.default_pool6 is not None
    assert config.default_pool6["metadata"]["name"] == "default-ipv6-ippool"
    assert config.default_pool6["spec"]["blockSize"] == 122 and config.default_pool6["spec"]["natOutgoing"] is False
    assert Config.from_env({**base, "IP6": "autodetect", "IP6_AUTODETECTION_METHOD": "interface=eth1"}).ip6 == \
        "autodetect"
    assert Config.from_env({**base, "CALICO_IPV6POOL_CIDR": "fd00::/64", "NO_DEFAULT_POOLS": "true"}
                           ).default_pool6 is None
    for bad, named in (({"IP6": "10.0.0.11"}, "IP6="), ({"IP6": "fd00::zz"}, "IP6="),
                       ({"IP6_AUTODETECTION_METHOD": "kubernetes-internal-ip"}, "IP6_AUTODETECTION_METHOD"),
                       ({"CALICO_IPV6POOL_CIDR": "10.245.0.0/16"}, "CALICO_IPV6POOL_CIDR"),
                       ({"CALICO_IPV6POOL_CIDR": "fd00::/64", "CALICO_IPV6POOL_BLOCK_SIZE": "100"},
                        "CALICO_IPV6POOL_BLOCK_SIZE")):
        with pytest.raises(ConfigError, match=named):
            Config.from_env({**base, **bad})


def test_ipv6_autodetection_and_the_node_resource() -> None:
    candidates = [(name, ipaddress.ip_interface(address)) for name, address in (
        ("lo", "::1/128"), ("eth1", "fe80::1/64"), ("cali1", "fd00:10:244::5/128"), ("eth0", "fd00:20::3/64"),
        ("eth1", "fd00:7::11/64"))]
    assert choose(candidates, "first-found") == ipaddress.IPv6Interface("fd00:20::3/64")  # link-local never
    assert choose(candidates, "interface=eth1") == ipaddress.IPv6Interface("fd00:7::11/64")
    assert choose(candidates, "cidr=fd00:7::/64") == ipaddress.IPv6Interface("fd00:7::11/64")
    assert choose(candidates, "cidr=10.0.0.0/8") is None
    node = node_resource("n1", ipaddress.IPv4Interface("10.0.0.11/24"), ipaddress.IPv6Interface("fd00:7::11/64"),
                         None, {}, None)
    assert node["spec"]["bgp"] == {"ipv4Address": "10.0.0.11/24", "ipv6Address": "fd00:7::11/64"}


def test_node_status_lists_ipv6_sessions_under_their_heading(capsys: pytest.CaptureFixture[str]) -> None:
    from calicoctl_py.commands.node import print_status
    status = {"node": "node1", "address": "10.0.0.11/24", "address6": "fd00:7::11/64", "ready": True, "bgp": True,
              "peers": [{"address": "10.0.0.12", "family": "IPv4", "type": "node-to-node mesh", "state": "up",
                         "since": "08:00:01", "info": "Established"},
                        {"address": "fd00:7::12", "family": "IPv6", "type": "node-to-node mesh", "state": "up",
                         "since": "08:00:02", "info": "Established"}]}
    assert print_status(status) == 0
    out = capsys.readouterr().out.splitlines()
    assert "IPv6: fd00:7::11/64" in out[2]
    v4, v6 = out.index("IPv4 BGP status"), out.index("IPv6 BGP status")
    assert out[v4 + 2].split()[0] == "10.0.0.12" and out[v6 + 2].split()[0] == "fd00:7::12"
    assert "fd00:7::12" not in "\n".join(out[v4:v6])
