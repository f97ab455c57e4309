"""What a Kubernetes pod asks of IPAM through Calico's annotations, decided purely from the pod's and its
namespace's annotations (the daemon fetches them through :mod:`bgpd.kube`).

- ``cni.projectcalico.org/ipv4pools`` / ``ipv6pools``: a JSON list of pool names or CIDRs to allocate from; on
  the pod, else on its namespace, else the network config's ``ipam.ipv4_pools``.
- ``cni.projectcalico.org/ipAddrs``: a JSON list of fixed addresses (at most one per family), taken exactly.
- The pod's labels go into the allocation's attributes (as one JSON attribute, ``labels``).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

IPV4_POOLS = "cni.projectcalico.org/ipv4pools"
IPV6_POOLS = "cni.projectcalico.org/ipv6pools"
IP_ADDRS = "cni.projectcalico.org/ipAddrs"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PodSource(Protocol):
    """What the CNI path needs of the Kubernetes API (:class:`bgpd.kube.Kube` provides it)."""

    def get_pod(self, namespace: str, name: str) -> Any: ...  # with .annotations and .labels, or None

    def namespace_annotations(self, name: str) -> dict[str, str]: ...


class AnnotationError(ValueError):
    """An annotation that cannot be used; the message names it and says what is wrong."""


@dataclass(frozen=True)
class PodRequest:
    ipv4_pools: tuple[str, ...] | None = None  # None: any pool the node may use
    ipv6_pools: tuple[str, ...] | None = None
    fixed: tuple[IPAddress, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)


def _short(raw: str, limit: int = 80) -> str:
    """The annotation as quoted in an error: its repr (one line), cut short when long."""
    return repr(raw) if len(raw) <= limit else f"{raw[:limit]!r}... ({len(raw)} characters)"


def _json_list(annotations: Mapping[str, str], key: str, where: str) -> list[str] | None:
    raw = annotations.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise AnnotationError(f"{where} annotation {key} is not JSON: {_short(raw)}; write a list such as "
                              '["default-ipv4-ippool"]') from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise AnnotationError(f"{where} annotation {key} must be a non-empty JSON list of strings, not {_short(raw)}")
    return value


def pod_request(pod_annotations: Mapping[str, str], namespace_annotations: Mapping[str, str],
                labels: Mapping[str, str], config_ipv4_pools: Sequence[str] | None = None) -> PodRequest:
    """The allocation a pod asks for (raises :class:`AnnotationError`)."""
    pools: dict[str, tuple[str, ...] | None] = {}
    for key in (IPV4_POOLS, IPV6_POOLS):
        chosen = _json_list(pod_annotations, key, "pod")
        if chosen is None:
            chosen = _json_list(namespace_annotations, key, "namespace")
        pools[key] = tuple(chosen) if chosen is not None else None
    if pools[IPV4_POOLS] is None and config_ipv4_pools:
        pools[IPV4_POOLS] = tuple(config_ipv4_pools)
    fixed: list[IPAddress] = []
    for text in _json_list(pod_annotations, IP_ADDRS, "pod") or []:
        try:
            fixed.append(ipaddress.ip_address(text))
        except ValueError:
            raise AnnotationError(f"pod annotation {IP_ADDRS}: {text!r} is not an IP address") from None
    if len({a.version for a in fixed}) != len(fixed):
        raise AnnotationError(f"pod annotation {IP_ADDRS}: at most one address per IP family")
    attributes = {"labels": json.dumps(dict(sorted(labels.items())), separators=(",", ":"))} if labels else {}
    return PodRequest(pools[IPV4_POOLS], pools[IPV6_POOLS], tuple(fixed), attributes)


def unknown_pools(requested: Sequence[str], pool_names: Sequence[str], pool_cidrs: Sequence[str]) -> list[str]:
    """The requested pools (names or CIDRs) that no pool has."""
    known = set(pool_names) | set(pool_cidrs)
    return [p for p in requested if p not in known]
