"""Validation of Calico v3 resources other than IPPool (BGPPeer, BGPConfiguration, Node), from field tables.

Each kind is a table of dotted field paths and checks; unknown fields are refused (a typo must not be dropped
silently), and every error is an :class:`InvalidResource` naming the resource, the field and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from ipam.errors import InvalidResource
from ipam.model import API_VERSION
from ipam.selector import SelectorError, parse_selector

Check = Callable[[Any], str | None]  # returns the reason a value is wrong, or None
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def is_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


def int_range(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be a whole number from {low} to {high}, got {value!r}"
        return None
    return check


AS_NUMBER = int_range(1, 4294967295)


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def is_selector(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a selector string, got {value!r}"
    try:
        parse_selector(value)
    except SelectorError as exc:
        return str(exc)
    return None


def is_ip(value: Any) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def is_ipv4(value: Any) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return f"{value!r} is not an IPv4 address"
    return None


def is_interface(version: int) -> Check:
    def check(value: Any) -> str | None:
        try:
            address = ipaddress.ip_interface(value)
            if "/" not in value:
                raise ValueError
        except (ValueError, TypeError):
            return f"{value!r} is not an address with prefix length, e.g. 10.0.0.11/24"
        return None if address.version == version else f"{value!r} is not an IPv{version} address"
    return check


def is_cidr(value: Any) -> str | None:
    try:
        ipaddress.ip_network(value)
    except ValueError:
        return f"{value!r} is not a network such as 10.96.0.0/12"
    return None


def is_peer_ip(value: Any) -> str | None:
    """``10.0.0.1``, ``10.0.0.1:1179``, ``fd00::1`` or ``[fd00::1]:1179``."""
    if not isinstance(value, str):
        return f"must be an IP address, got {value!r}"
    match = re.fullmatch(r"\[(.+)\]:(\d+)", value) or re.fullmatch(r"([^:]+):(\d+)", value)
    address, port = (match.group(1), int(match.group(2))) if match else (value, 179)
    if is_ip(address) or not 1 <= port <= 65535:
        return f"{value!r} is not an IP address, optionally with :port"
    return None


def is_duration(value: Any) -> str | None:
    return None if isinstance(value, str) and DURATION.match(value) else f"{value!r} is not a duration like 120s"


def is_mac(value: Any) -> str | None:
    ok = isinstance(value, str) and re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", value)
    return None if ok else f"{value!r} is not a MAC address"


def is_labels(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return "must be a mapping of strings to strings"
    return None


def is_secret_ref(value: Any) -> str | None:
    ref = value.get("secretKeyRef") if isinstance(value, dict) else None
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not isinstance(ref.get("key"), str):
        return "must be {secretKeyRef: {name: ..., key: ...}}"
    return None


def is_cidr_list(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of {cidr: ...}"
    for item in value:
        reason = is_cidr(item.get("cidr")) if isinstance(item, dict) else "must be {cidr: ...}"
        if reason:
            return reason
    return None


# Per kind: dotted spec field -> check. Metadata is checked separately.
SCHEMAS: dict[str, dict[str, Check]] = {
    "BGPPeer": {
        "node": is_str, "nodeSelector": is_selector, "peerIP": is_peer_ip, "peerSelector": is_selector,
        "asNumber": AS_NUMBER, "password": is_secret_ref, "keepOriginalNextHop": is_bool,
        "maxRestartTime": is_duration, "sourceAddress": one_of("UseNodeIP", "None"),
        "numAllowedLocalASNumbers": int_range(0, 10), "ttlSecurity": int_range(0, 255),
    },
    "BGPConfiguration": {
        "nodeToNodeMeshEnabled": is_bool, "asNumber": AS_NUMBER, "listenPort": int_range(1, 65535),
        "logSeverityScreen": one_of("Debug", "Info", "Warning", "Error", "Fatal"),
        "serviceClusterIPs": is_cidr_list, "serviceExternalIPs": is_cidr_list,
        "serviceLoadBalancerIPs": is_cidr_list, "nodeMeshMaxRestartTime": is_duration,
        "nodeMeshPassword": is_secret_ref, "bindMode": one_of("None", "NodeIP"),
    },
    "Node": {
        "bgp": lambda v: None if isinstance(v, dict) else "must be a mapping",
        "bgp.ipv4Address": is_interface(4), "bgp.ipv6Address": is_interface(6), "bgp.asNumber": AS_NUMBER,
        "bgp.routeReflectorClusterID": is_ipv4, "bgp.ipv4IPIPTunnelAddr": is_ipv4,
        "ipv4VXLANTunnelAddr": is_ipv4, "vxlanTunnelMACAddr": is_mac,
        "orchRefs": lambda v: None if isinstance(v, list) else "must be a list",
    },
}


def _flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}{key}"
        flat[path] = value
        if isinstance(value, dict) and path == "bgp":
            flat.update(_flatten(value, f"{path}."))
    return flat


def validate(obj: Any) -> dict[str, Any]:
    """Check a BGPPeer, BGPConfiguration or Node document; returns it (normalised: apiVersion and kind set)."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in SCHEMAS:
        raise InvalidResource(str(kind), "?", "kind", "unknown kind")
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidResource(kind, str(name or "?"), "metadata.name",
                              "missing or not a DNS-1123 name (lowercase letters, digits, - and .)")
    if obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidResource(kind, name, "apiVersion", f"expected {API_VERSION}, got {obj.get('apiVersion')!r}")
    if "labels" in metadata and (reason := is_labels(metadata["labels"])):
        raise InvalidResource(kind, name, "metadata.labels", reason)
    spec = obj.get("spec", {})
    if not isinstance(spec, dict):
        raise InvalidResource(kind, name, "spec", "must be a mapping")
    schema = SCHEMAS[kind]
    for path, value in _flatten(spec).items():
        check = schema.get(path)
        if check is None:
            raise InvalidResource(kind, name, f"spec.{path}", "unknown field")
        if reason := check(value):
            raise InvalidResource(kind, name, f"spec.{path}", reason)
    if kind == "BGPPeer":
        if "peerIP" in spec and "peerSelector" in spec:
            raise InvalidResource(kind, name, "spec.peerSelector", "give peerIP or peerSelector, not both")
        if "peerIP" not in spec and "peerSelector" not in spec:
            raise InvalidResource(kind, name, "spec.peerIP", "give peerIP (with asNumber) or peerSelector")
        if "peerIP" in spec and "asNumber" not in spec:
            raise InvalidResource(kind, name, "spec.asNumber", "required with peerIP")
        if "node" in spec and "nodeSelector" in spec:
            raise InvalidResource(kind, name, "spec.nodeSelector", "give node or nodeSelector, not both")
    if kind == "BGPConfiguration" and name != "default" and not name.startswith("node."):
        raise InvalidResource(kind, name, "metadata.name", "must be default or node.<nodename>")
    return {**obj, "apiVersion": API_VERSION, "kind": kind}
