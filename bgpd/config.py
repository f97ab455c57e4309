"""The node daemon's settings: Calico's environment variable names, parsed and validated in one place."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from bgpd.speaker.peers import DEFAULT_HOLD_TIME
from ipam.datastore import EtcdConfig
from ipam.envvalues import env_int
from ipam.errors import IPAMError
from ipam.model import IPPool


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and what to give instead."""


ENCAP = ("Never", "Always", "CrossSubnet")
AUTODETECT_METHODS = ("first-found", "can-reach=", "interface=", "skip-interface=", "cidr=", "kubernetes-internal-ip")
AUTODETECT6_METHODS = ("first-found", "can-reach=", "interface=", "skip-interface=", "cidr=")


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}={env[name]!r}: give true or false")


def _int(env: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    return env_int(env, name, default, low, high, ConfigError)


@dataclass(frozen=True)
class Config:
    nodename: str
    ip: str  # an address (optionally with /prefix), "autodetect" or "none"
    ip_autodetection_method: str
    as_number: int | None
    etcd: EtcdConfig
    default_pool: dict[str, Any] | None  # a v3 IPPool document, or None with NO_DEFAULT_POOLS
    networking_backend: str
    mtu: int | None  # None: the underlay's MTU minus the encapsulation's overhead
    reconcile_interval: float
    log_level: str
    labels: dict[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    health_host: str = "127.0.0.1"  # /liveness, /readiness, /metrics
    health_port: int = 9099
    ip6: str = "none"  # IP6: an IPv6 address (optionally with /prefix), "autodetect" or "none" (Calico's default)
    ip6_autodetection_method: str = "first-found"
    default_pool6: dict[str, Any] | None = None  # default-ipv6-ippool from CALICO_IPV6POOL_CIDR, if given
    bgp_hold_time: int = DEFAULT_HOLD_TIME  # seconds; ExaBGP takes 0 (no keepalives) or 3 and more

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        nodename = env.get("NODENAME") or env.get("HOSTNAME") or socket.gethostname()
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", nodename):
            raise ConfigError(f"NODENAME={nodename!r}: use a DNS-1123 name (lowercase letters, digits, - and .)")
        ip = env.get("IP", "autodetect").strip() or "autodetect"
        if ip not in ("autodetect", "none"):
            try:
                ipaddress.ip_interface(ip)
            except ValueError:
                raise ConfigError(f"IP={ip!r}: give an IPv4 address (optionally /prefix), autodetect or none") from None
        method = env.get("IP_AUTODETECTION_METHOD", "first-found")
        if not method.startswith(AUTODETECT_METHODS):
            raise ConfigError(f"IP_AUTODETECTION_METHOD={method!r}: use first-found, can-reach=DEST, "
                              "interface=REGEX, skip-interface=REGEX, cidr=CIDR or kubernetes-internal-ip")
        ip6 = env.get("IP6", "none").strip() or "none"
        if ip6 not in ("autodetect", "none"):
            try:
                ipaddress.IPv6Interface(ip6)
            except ValueError:
                raise ConfigError(f"IP6={ip6!r}: give an IPv6 address (optionally /prefix), autodetect or none"
                                  ) from None
        method6 = env.get("IP6_AUTODETECTION_METHOD", "first-found")
        if not method6.startswith(AUTODETECT6_METHODS):
            raise ConfigError(f"IP6_AUTODETECTION_METHOD={method6!r}: use first-found, can-reach=DEST, "
                              "interface=REGEX, skip-interface=REGEX or cidr=CIDR")
        as_number = _int(env, "AS", 0, 1, 4294967295) or None
        backend = env.get("CALICO_NETWORKING_BACKEND", "bird")
        if backend not in ("bird", "vxlan", "none"):
            raise ConfigError(f"CALICO_NETWORKING_BACKEND={backend!r}: use bird, vxlan or none")
        return cls(
            nodename=nodename, ip=ip, ip_autodetection_method=method, as_number=as_number,
            etcd=EtcdConfig.from_env(env), default_pool=default_pool(env), networking_backend=backend,
            mtu=_int(env, "CALICO_MTU", 0, 576, 65535) or None,
            reconcile_interval=float(_int(env, "CALICO_RECONCILE_INTERVAL", 60, 1, 86400)),
            bgp_hold_time=_int(env, "CALICO_BGP_HOLD_TIME", DEFAULT_HOLD_TIME, 3, 65535),
            health_host=env.get("CALICO_HEALTH_HOST", "127.0.0.1"),
            health_port=_int(env, "CALICO_HEALTH_PORT", 9099, 0, 65535),
            log_level=env.get("LOG_LEVEL", "info"),
            labels=dict(item.split("=", 1) for item in env.get("CALICO_NODE_LABELS", "").split(",") if "=" in item),
            rr_cluster_id=_cluster_id(env),
            ip6=ip6, ip6_autodetection_method=method6, default_pool6=default_pool6(env),
        )


def _cluster_id(env: dict[str, str]) -> str | None:
    """CALICO_ROUTE_REFLECTOR_CLUSTER_ID: our stand-in for Calico's Node field / annotation (an IPv4 form)."""
    value = env.get("CALICO_ROUTE_REFLECTOR_CLUSTER_ID", "").strip()
    if not value:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"CALICO_ROUTE_REFLECTOR_CLUSTER_ID={value!r}: give an IPv4-style id such as "
                          "224.0.0.1") from None


def default_pool(env: dict[str, str]) -> dict[str, Any] | None:
    """calico-node's ``default-ipv4-ippool`` from CALICO_IPV4POOL_* (checked here, so a typo stops start-up)."""
    if _bool(env, "NO_DEFAULT_POOLS", False):
        return None
    spec: dict[str, Any] = {
        "cidr": env.get("CALICO_IPV4POOL_CIDR", "192.168.0.0/16"),
        "blockSize": _int(env, "CALICO_IPV4POOL_BLOCK_SIZE", 26, 20, 32),
        "ipipMode": env.get("CALICO_IPV4POOL_IPIP", "Never"),
        "vxlanMode": env.get("CALICO_IPV4POOL_VXLAN", "Never"),
        "natOutgoing": _bool(env, "CALICO_IPV4POOL_NAT_OUTGOING", True),
        "nodeSelector": env.get("CALICO_IPV4POOL_NODE_SELECTOR", "all()"),
    }
    return _pool_document("default-ipv4-ippool", spec, "CALICO_IPV4POOL_*")


def default_pool6(env: dict[str, str]) -> dict[str, Any] | None:
    """calico-node's ``default-ipv6-ippool`` from CALICO_IPV6POOL_* when CALICO_IPV6POOL_CIDR is given (Calico
    invents a random ULA /48 when it is not; calico-py creates no IPv6 pool it was not asked for). Blocks are /122
    unless CALICO_IPV6POOL_BLOCK_SIZE says otherwise; NAT outgoing is off unless asked for, as in Calico."""
    cidr = env.get("CALICO_IPV6POOL_CIDR", "").strip()
    if _bool(env, "NO_DEFAULT_POOLS", False) or not cidr:
        return None
    try:
        version = ipaddress.ip_network(cidr).version
    except ValueError:
        version = 0
    if version != 6:
        raise ConfigError(f"CALICO_IPV6POOL_CIDR={cidr!r}: give an IPv6 network such as fd00:10:244::/64")
    spec: dict[str, Any] = {
        "cidr": cidr,
        "blockSize": _int(env, "CALICO_IPV6POOL_BLOCK_SIZE", 122, 116, 128),
        "ipipMode": "Never",  # IPIP carries IPv4 only
        "vxlanMode": env.get("CALICO_IPV6POOL_VXLAN", "Never"),
        "natOutgoing": _bool(env, "CALICO_IPV6POOL_NAT_OUTGOING", False),
        "nodeSelector": env.get("CALICO_IPV6POOL_NODE_SELECTOR", "all()"),
    }
    return _pool_document("default-ipv6-ippool", spec, "CALICO_IPV6POOL_*")


def _pool_document(name: str, spec: dict[str, Any], settings: str) -> dict[str, Any]:
    """The IPPool resource, checked here so that a typo in ``settings`` stops start-up with its name."""
    document = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name}, "spec": spec}
    try:
        IPPool.from_v3(document)
    except IPAMError as exc:
        raise ConfigError(f"{settings}: {exc}") from None
    return document
