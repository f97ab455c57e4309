"""Calico's etcd v3 key layout (libcalico-go's etcdv3 backend), so Calico tooling and ours read the same data."""

from __future__ import annotations

import ipaddress

from ipam.model import IPNetwork, family_name

RESOURCES = "/calico/resources/v3/projectcalico.org/"
IPAM = "/calico/ipam/v2/"
IPAM_CONFIG = IPAM + "config"
HANDLES = IPAM + "handle/"
HOSTS = IPAM + "host/"

# Calico's resource kinds, by the plural their keys are stored under.
IP_POOLS = "ippools"
NODES = "nodes"
BGP_PEERS = "bgppeers"
BGP_CONFIGURATIONS = "bgpconfigurations"
WORKLOAD_ENDPOINTS = "workloadendpoints"


def cidr_segment(cidr: IPNetwork) -> str:
    return str(cidr).replace("/", "-")


def parse_cidr_segment(segment: str) -> IPNetwork:
    address, _, prefix = segment.rpartition("-")
    return ipaddress.ip_network(f"{address}/{prefix}")


def resource_prefix(plural: str) -> str:
    return f"{RESOURCES}{plural}/"


def resource_key(plural: str, name: str) -> str:
    return f"{RESOURCES}{plural}/{name}"


def blocks_prefix(version: int) -> str:
    return f"{IPAM}assignment/{family_name(version)}/block/"


def block_key(cidr: IPNetwork) -> str:
    return blocks_prefix(cidr.version) + cidr_segment(cidr)


def host_prefix(node: str) -> str:
    return f"{HOSTS}{node}/"


def affinities_prefix(node: str, version: int) -> str:
    return f"{HOSTS}{node}/{family_name(version)}/block/"


def affinity_key(node: str, cidr: IPNetwork) -> str:
    return affinities_prefix(node, cidr.version) + cidr_segment(cidr)


def parse_affinity_key(key: str) -> tuple[str, IPNetwork]:
    """``/calico/ipam/v2/host/<node>/ipv4/block/<cidr>`` -> (node, cidr)."""
    rest = key[len(HOSTS):]
    node, _, tail = rest.partition("/")
    return node, parse_cidr_segment(tail.rsplit("/", 1)[-1])


def handle_key(handle_id: str) -> str:
    return HANDLES + handle_id


def handle_id_of(key: str) -> str:
    return key[len(HANDLES):]
