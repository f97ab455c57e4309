"""IPAM models in Calico's v3 / libcalico-go shapes, and their JSON (de)serialisation.

Everything here is a value: frozen dataclasses, ``ipaddress`` types inside, Calico's JSON field names outside.
Parsing is strict about shape (a wrong type is an :class:`InvalidResource` naming the field) and tolerant of
fields Calico added over time (unknown fields are kept where a round trip matters, ignored elsewhere).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipam.errors import InvalidResource
from ipam.selector import SelectorError, parse_selector

Bad = Callable[[str, str], InvalidResource]  # an InvalidResource naming the field and the reason

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

API_VERSION = "projectcalico.org/v3"
ENCAP_MODES = ("Never", "Always", "CrossSubnet")
ALLOWED_USES = ("Workload", "Tunnel")
DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}
LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}

AFFINITY_PENDING = "pending"
AFFINITY_CONFIRMED = "confirmed"
AFFINITY_PENDING_DELETION = "pendingDeletion"
AFFINITY_STATES = (AFFINITY_PENDING, AFFINITY_CONFIRMED, AFFINITY_PENDING_DELETION)

HOST_AFFINITY_PREFIX = "host:"


def family_name(version: int) -> str:
    return f"ipv{version}"


# --------------------------------------------------------------------------------------------- IP pools


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: IPNetwork
    block_size: int
    ipip_mode: str = "Never"
    vxlan_mode: str = "Never"
    nat_outgoing: bool = False
    node_selector: str = "all()"
    disabled: bool = False
    disable_bgp_export: bool = False
    allowed_uses: tuple[str, ...] = ALLOWED_USES
    # metadata other than the name (uid, labels, timestamps): carried through a round trip untouched
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def version(self) -> int:
        return self.cidr.version

    def matches_node(self, labels: Mapping[str, str]) -> bool:
        return parse_selector(self.node_selector).matches(labels)

    def to_v3(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "cidr": str(self.cidr),
            "blockSize": self.block_size,
            "ipipMode": self.ipip_mode,
            "vxlanMode": self.vxlan_mode,
            "natOutgoing": self.nat_outgoing,
            "nodeSelector": self.node_selector,
            "allowedUses": list(self.allowed_uses),
            "disabled": self.disabled,
            "disableBGPExport": self.disable_bgp_export,
        }
        return {
            "apiVersion": API_VERSION,
            "kind": "IPPool",
            "metadata": {**self.metadata, "name": self.name},
            "spec": spec,
        }

    @classmethod
    def from_v3(cls, obj: Any) -> IPPool:
        """Parse and validate an IPPool resource on its own (overlap with others: :func:`check_overlap`)."""
        name = _resource_name(obj, "IPPool")

        def bad(field_name: str, reason: str) -> InvalidResource:
            return InvalidResource("IPPool", name, field_name, reason)

        spec = obj.get("spec")
        if not isinstance(spec, dict):
            raise bad("spec", "missing or not a mapping")
        known = {"cidr", "blockSize", "ipipMode", "vxlanMode", "natOutgoing", "nodeSelector", "disabled",
                 "disableBGPExport", "allowedUses"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise bad(f"spec.{unknown[0]}", f"unknown field (known fields: {', '.join(sorted(known))})")
        cidr = parse_cidr(spec.get("cidr"), bad, "spec.cidr")
        version = cidr.version
        if cidr.overlaps(LINK_LOCAL[version]):
            raise bad("spec.cidr", f"{cidr} overlaps the link-local range {LINK_LOCAL[version]}")
        block_size = _pool_block_size(spec, cidr, bad)
        modes = _pool_modes(spec, version, bad)
        flags = {}
        for key in ("natOutgoing", "disabled", "disableBGPExport"):
            value = spec.get(key, False)
            if not isinstance(value, bool):
                raise bad(f"spec.{key}", f"must be true or false, got {value!r}")
            flags[key] = value
        selector = _pool_node_selector(spec, bad)
        uses = spec.get("allowedUses") or list(ALLOWED_USES)
        if not isinstance(uses, list) or not uses or any(use not in ALLOWED_USES for use in uses):
            raise bad("spec.allowedUses", f"must be a list drawn from {', '.join(ALLOWED_USES)}, got {uses!r}")
        metadata = {k: v for k, v in obj["metadata"].items() if k != "name"}
        return cls(
            name=name, cidr=cidr, block_size=block_size, ipip_mode=modes["ipipMode"],
            vxlan_mode=modes["vxlanMode"], nat_outgoing=flags["natOutgoing"], node_selector=selector,
            disabled=flags["disabled"], disable_bgp_export=flags["disableBGPExport"],
            allowed_uses=tuple(uses), metadata=metadata,
        )


def _pool_block_size(spec: dict[str, Any], cidr: IPNetwork, bad: Bad) -> int:
    version = cidr.version
    block_size = spec.get("blockSize", DEFAULT_BLOCK_SIZE[version])
    low, high = BLOCK_SIZE_RANGE[version]
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not low <= block_size <= high:
        raise bad("spec.blockSize", f"must be an integer from {low} to {high} for IPv{version}, got {block_size!r}")
    if block_size < cidr.prefixlen:
        raise bad("spec.blockSize", f"/{block_size} blocks do not fit in the /{cidr.prefixlen} pool "
                                     f"(blockSize must be >= {cidr.prefixlen})")
    return block_size


def _pool_modes(spec: dict[str, Any], version: int, bad: Bad) -> dict[str, str]:
    modes = {}
    for key in ("ipipMode", "vxlanMode"):
        mode = spec.get(key, "Never")
        if mode not in ENCAP_MODES:
            raise bad(f"spec.{key}", f"must be one of {', '.join(ENCAP_MODES)}, got {mode!r}")
        modes[key] = mode
    if modes["ipipMode"] != "Never" and modes["vxlanMode"] != "Never":
        raise bad("spec.ipipMode", "IPIP and VXLAN cannot both be enabled on one pool")
    if version == 6 and modes["ipipMode"] != "Never":
        raise bad("spec.ipipMode", "IPIP is IPv4 only")
    return modes


def _pool_node_selector(spec: dict[str, Any], bad: Bad) -> str:
    selector = spec.get("nodeSelector", "all()") or "all()"
    if not isinstance(selector, str):
        raise bad("spec.nodeSelector", f"must be a selector string, got {selector!r}")
    try:
        if parse_selector(selector).is_global:
            raise bad("spec.nodeSelector", "global() is not allowed in a pool's nodeSelector")
    except SelectorError as exc:
        raise bad("spec.nodeSelector", str(exc)) from None
    return selector


def parse_cidr(value: Any, bad: Any, field_name: str) -> IPNetwork:
    """A strictly masked network; ``bad(field, reason)`` builds the error to raise."""
    if not isinstance(value, str) or not value:
        raise bad(field_name, "missing; give a network such as 10.244.0.0/16")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise bad(field_name, f"{value!r} is not a valid IPv4 or IPv6 network") from None
        raise bad(field_name, f"{value} has host bits set; did you mean {loose}?") from None


def check_overlap(pool: IPPool, others: list[IPPool]) -> None:
    """Refuse a pool whose CIDR overlaps another pool (a pool with the same name is the one being replaced)."""
    for other in others:
        if other.name != pool.name and other.cidr.version == pool.cidr.version and other.cidr.overlaps(pool.cidr):
            raise InvalidResource("IPPool", pool.name, "spec.cidr",
                                  f"{pool.cidr} overlaps pool {other.name!r} ({other.cidr})")


def _resource_name(obj: Any, kind: str) -> str:
    if not isinstance(obj, dict):
        raise InvalidResource(kind, "?", "(document)", "not a mapping")
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidResource(kind, "?", "metadata.name", "missing")
    if obj.get("kind", kind) != kind:
        raise InvalidResource(kind, name, "kind", f"expected {kind}, got {obj.get('kind')!r}")
    if obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidResource(kind, name, "apiVersion", f"expected {API_VERSION}, got {obj.get('apiVersion')!r}")
    return name


# --------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class AllocationAttribute:
    handle_id: str | None
    secondary: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"handle_id": self.handle_id, "secondary": dict(self.secondary) or None}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AllocationAttribute:
        return cls(handle_id=obj.get("handle_id"), secondary=dict(obj.get("secondary") or {}))


@dataclass(frozen=True)
class Block:
    """An allocation block: one slot per address, a FIFO of free ordinals, shared attributes."""

    cidr: IPNetwork
    affinity: str | None
    allocations: tuple[int | None, ...]
    unallocated: tuple[int, ...]
    attributes: tuple[AllocationAttribute, ...]
    sequence_number: int
    sequence_number_for_allocation: Mapping[int, int] = field(default_factory=dict)
    affinity_claim_time: str | None = None
    deleted: bool = False

    @property
    def size(self) -> int:
        return len(self.allocations)

    @property
    def free(self) -> int:
        return len(self.unallocated)

    @property
    def in_use(self) -> int:
        return self.size - self.free

    @property
    def is_empty(self) -> bool:
        return self.free == self.size

    @property
    def host(self) -> str | None:
        """The node this block is affine to, or None."""
        if self.affinity and self.affinity.startswith(HOST_AFFINITY_PREFIX):
            return self.affinity[len(HOST_AFFINITY_PREFIX):]
        return None

    def address(self, ordinal: int) -> IPAddress:
        return self.cidr.network_address + ordinal

    def ordinal(self, address: IPAddress) -> int:
        return int(address) - int(self.cidr.network_address)

    def attribute_of(self, ordinal: int) -> AllocationAttribute | None:
        index = self.allocations[ordinal]
        return None if index is None else self.attributes[index]

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "allocations": list(self.allocations),
            "unallocated": list(self.unallocated),
            "attributes": [a.to_json() for a in self.attributes],
            "sequenceNumber": self.sequence_number,
            "sequenceNumberForAllocation": {str(k): v for k, v in sorted(self.sequence_number_for_allocation.items())},
            "deleted": self.deleted,
        }
        if self.affinity_claim_time:
            obj["affinityClaimTime"] = self.affinity_claim_time
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Block:
        seqs = obj.get("sequenceNumberForAllocation") or {}
        return cls(
            cidr=ipaddress.ip_network(obj["cidr"]),
            affinity=obj.get("affinity"),
            allocations=tuple(obj["allocations"]),
            unallocated=tuple(obj["unallocated"]),
            attributes=tuple(AllocationAttribute.from_json(a) for a in obj.get("attributes") or ()),
            sequence_number=int(obj.get("sequenceNumber") or 0),
            sequence_number_for_allocation={int(k): int(v) for k, v in seqs.items()},
            affinity_claim_time=obj.get("affinityClaimTime"),
            deleted=bool(obj.get("deleted", False)),
        )


@dataclass(frozen=True)
class BlockAffinity:
    node: str
    cidr: IPNetwork
    state: str = AFFINITY_CONFIRMED
    deleted: bool = False

    @property
    def confirmed(self) -> bool:
        return self.state == AFFINITY_CONFIRMED and not self.deleted

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "deleted": self.deleted}

    @classmethod
    def from_json(cls, node: str, cidr: IPNetwork, obj: Mapping[str, Any] | None) -> BlockAffinity:
        # An empty value (very old Calico data) means confirmed.
        obj = obj or {}
        return cls(node=node, cidr=cidr, state=obj.get("state") or AFFINITY_CONFIRMED,
                   deleted=bool(obj.get("deleted", False)))


@dataclass(frozen=True)
class Handle:
    """Secondary index: how many addresses a handle holds in each block (keyed by block CIDR text)."""

    handle_id: str
    blocks: Mapping[str, int] = field(default_factory=dict)
    deleted: bool = False

    @property
    def total(self) -> int:
        return sum(self.blocks.values())

    def adjusted(self, block_cidr: IPNetwork, delta: int) -> Handle:
        counts = dict(self.blocks)
        key = str(block_cidr)
        counts[key] = counts.get(key, 0) + delta
        if counts[key] <= 0:
            del counts[key]
        return Handle(self.handle_id, counts, self.deleted)

    def to_json(self) -> dict[str, Any]:
        return {"handleID": self.handle_id, "block": dict(sorted(self.blocks.items())), "deleted": self.deleted}

    @classmethod
    def from_json(cls, handle_id: str, obj: Mapping[str, Any]) -> Handle:
        return cls(handle_id=obj.get("handleID") or handle_id,
                   blocks={k: int(v) for k, v in (obj.get("block") or {}).items()},
                   deleted=bool(obj.get("deleted", False)))


@dataclass(frozen=True)
class IPAMConfig:
    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    # 0 = no cap. Calico silently caps at 20 when 0 (its issues #4861, #9462); we do not.
    max_blocks_per_host: int = 0

    def to_json(self) -> dict[str, Any]:
        # Calico's own mix of snake and camel case.
        return {"strict_affinity": self.strict_affinity, "auto_allocate_blocks": self.auto_allocate_blocks,
                "maxBlocksPerHost": self.max_blocks_per_host}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> IPAMConfig:
        obj = obj or {}
        return cls(strict_affinity=bool(obj.get("strict_affinity", False)),
                   auto_allocate_blocks=bool(obj.get("auto_allocate_blocks", True)),
                   max_blocks_per_host=int(obj.get("maxBlocksPerHost", 0) or 0))
