"""ExaBGP's API, both ways, with no I/O: its JSON lines decoded into :mod:`bgpd.speaker.rib` events (validated
first: it is input from the network), and the text commands we send it.

ExaBGP runs with ``exabgp.api.compact`` (unicast NLRI as plain strings) and ``manual-eor``; older shapes
(``{"nlri": ...}`` objects, a plain-list AS path) are read too.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from bgpd.speaker.peers import ORIGINS, BGPPath, canonical_prefix
from bgpd.speaker.rib import EndOfRib, Event, Opened, SessionState, Update

U32_MAX = 2**32 - 1  # AS numbers, LOCAL_PREF and MED are four-octet fields
RESTART_TIME_MAX = 4095  # the graceful-restart capability's restart time is 12 bits (RFC 4724)


def decode(line: bytes) -> Event | None:
    """The event one line from ExaBGP describes, or None when it is nothing to act on (not JSON, an ack, a
    message of another kind, a field of the wrong type)."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None  # not JSON, or nested deeper than Python parses
    neighbor = _dict(_dict(message).get("neighbor"))
    peer = _dict(neighbor.get("address")).get("peer")
    if not isinstance(peer, str):
        return None
    kind = message.get("type")
    if kind == "state":
        return SessionState(peer, str(neighbor.get("state", "")), str(neighbor.get("reason", "") or ""))
    if kind == "open" and neighbor.get("direction") == "receive":
        capabilities = _dict(_dict(neighbor.get("open")).get("capabilities"))
        restart = [c.get("time") for c in capabilities.values() if isinstance(c, dict)
                   and str(c.get("name", "")).replace("-", " ") == "graceful restart"]
        return Opened(peer, restart[0] if restart and _uint(restart[0], RESTART_TIME_MAX) else 0)
    if kind == "update":
        body = _dict(neighbor.get("message"))
        if body.get("eor"):
            return EndOfRib(peer)
        return _update(peer, _dict(body.get("update")))
    return None


def _update(peer: str, update: dict[str, Any]) -> Update:
    announced: list[tuple[str, BGPPath | None]] = []
    withdrawn: list[str] = []
    attributes = update.get("attribute", {})
    for version in (4, 6):
        family = f"ipv{version} unicast"
        for next_hop, entries in _dict(_dict(update.get("announce")).get(family)).items():
            if not _next_hop(next_hop, version):
                continue
            path = _path(next_hop, attributes)
            for entry in entries if isinstance(entries, list) else []:
                if prefix := _prefix(entry, version):
                    announced.append((prefix, path))
        entries = _dict(update.get("withdraw")).get(family)
        withdrawn += [p for entry in (entries if isinstance(entries, list) else []) if (p := _prefix(entry, version))]
    return Update(peer, tuple(announced), tuple(withdrawn))


# ------------------------------------------------------------------ commands to ExaBGP


def announce(prefix: str, peer: str | None = None) -> bytes:
    """Announce one of our prefixes (to every peer of its family, or to ``peer`` only)."""
    return f"{f'neighbor {peer} ' if peer else ''}announce route {prefix} next-hop self\n".encode()


def withdraw(prefix: str) -> bytes:
    return f"withdraw route {prefix} next-hop self\n".encode()


def end_of_rib(peer: str, version: int) -> bytes:
    return f"neighbor {peer} announce eor ipv{version} unicast\n".encode()


def reflect(peer: str, prefix: str, path: BGPPath) -> bytes:
    """Re-advertise a peer's path to another peer, as a route reflector (RFC 4456)."""
    return (f"neighbor {peer} announce route {prefix} next-hop {path.next_hop} {path.exabgp_attributes()} "
            f"originator-id {path.originator_id} cluster-list [ {' '.join(path.cluster_list)} ]\n").encode()


def unreflect(peer: str, prefix: str, path: BGPPath) -> bytes:
    return f"neighbor {peer} withdraw route {prefix} next-hop {path.next_hop}\n".encode()


# ------------------------------------------------------------------ validation of what ExaBGP passes on


def _path(next_hop: str, attributes: Any) -> BGPPath | None:
    """The path an UPDATE's attributes describe (ExaBGP's JSON), or None when one is malformed: of the wrong
    type or out of its range. An attribute that is absent takes its default."""
    if not isinstance(attributes, dict):
        return None
    originator = attributes.get("originator-id")
    clusters = attributes.get("cluster-list", [])
    as_path = _as_path(attributes.get("as-path", []))
    local_pref, med = attributes.get("local-preference", 100), attributes.get("med", 0)
    origin = attributes.get("origin", "igp")
    if ((originator is not None and not _address(originator))
            or not (isinstance(clusters, list) and all(_address(c) for c in clusters))
            or as_path is None or not _uint(local_pref, U32_MAX) or not _uint(med, U32_MAX)
            or not (isinstance(origin, str) and origin in ORIGINS)):
        return None
    return BGPPath(next_hop, originator_id=originator, cluster_list=tuple(clusters), as_path=as_path,
                   local_pref=local_pref, med=med, origin=origin)


def _as_path(value: Any) -> tuple[int, ...] | None:
    """ExaBGP 5 gives ``{"0": {"element": "as-sequence", "value": [65001, ...]}, ...}`` (older ones a plain
    list). An AS_SET counts as one AS (RFC 4271 9.1.2.2), kept as its first member. None when malformed."""
    if isinstance(value, list):
        segments: list[Any] = [{"element": "as-sequence", "value": value}]
    elif isinstance(value, dict):
        segments = list(value.values())
    else:
        return None
    path: list[int] = []
    for segment in segments:
        if not isinstance(segment, dict):
            return None
        element, members = segment.get("element"), segment.get("value")
        if (element not in ("as-sequence", "as-set") or not isinstance(members, list)
                or not all(_uint(a, U32_MAX) for a in members)):
            return None
        path += members[:1] if element == "as-set" else members
    return tuple(path)


def _prefix(entry: Any, version: int = 4) -> str | None:
    """An NLRI as ExaBGP gives it: a plain string (``exabgp.api.compact``) or ``{"nlri": ...}``, canonical; None
    unless it is a network of the family it came under."""
    nlri = entry.get("nlri") if isinstance(entry, dict) else entry
    return canonical_prefix(nlri, version) if isinstance(nlri, str) else None


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one: a field of the wrong type is as good as absent."""
    return value if isinstance(value, dict) else {}


def _uint(value: Any, maximum: int) -> bool:
    """An integer in 0..maximum (JSON's true and false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def _address(text: Any) -> bool:
    """A dotted-quad IPv4 address as text (an integer would pass ``IPv4Address`` too)."""
    if not isinstance(text, str):
        return False
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _next_hop(text: Any, version: int = 4) -> bool:
    """An address of the route's IP version a route can point at: not unspecified (0.0.0.0, ::), a loopback,
    multicast, the broadcast address, or (IPv6) link-local: a link-local next hop names no interface, and
    calico-py routes via the peer's global address on the shared segment."""
    if version == 4:
        if not _address(text):
            return False
        address = ipaddress.IPv4Address(text)
        return not (address.is_unspecified or address.is_loopback or address.is_multicast
                    or address == ipaddress.IPv4Address("255.255.255.255"))
    if not isinstance(text, str):
        return False
    try:
        address6 = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return not (address6.is_unspecified or address6.is_loopback or address6.is_multicast or address6.is_link_local
                or address6.ipv4_mapped is not None)
