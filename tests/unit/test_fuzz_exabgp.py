"""Fuzzing the ExaBGP JSON consumer (``ExaBGP._handle``): what ExaBGP passes on comes from the network, so no line
may raise, and only well-formed routes may reach ``learned()`` (and from there the kernel).

Three layers of input: arbitrary bytes, arbitrary JSON, and UPDATEs shaped like ExaBGP's with garbage in their
values (prefixes that are not prefixes, next hops that are not addresses, huge or out-of-range AS paths,
negative or huge MED and LOCAL_PREF, nested junk). For the last, a small model says what must be learned.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import GLOBAL, ORIGINS, PeerSpec, canonical_prefix

ROUTER_ID = "10.0.0.11"
PEERS = ("10.0.0.12", "10.0.0.13")
U32_MAX = 2**32 - 1
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def speaker() -> ExaBGP:
    made = ExaBGP(Path("/nonexistent"), ROUTER_ID, on_routes=lambda: None)  # _handle never touches the disk
    # One internal peer and one external: an external peer's LOCAL_PREF takes another code path (it is ignored).
    made.set_peers([PeerSpec(address, 64512, peer_as, ROUTER_ID, GLOBAL, f"peer-{address}")
                    for address, peer_as in zip(PEERS, (64512, 64999), strict=True)])
    return made


def assert_learned_is_sane(learned: dict[str, tuple[str, ...]]) -> None:
    """Whatever was fed in, what comes out is canonical prefixes with usable IPv4 next hops."""
    for prefix, next_hops in learned.items():
        assert canonical_prefix(prefix) == prefix, prefix
        for next_hop in next_hops:
            address = ipaddress.IPv4Address(next_hop)
            assert not (address.is_unspecified or address.is_loopback or address.is_multicast), next_hop


# ------------------------------------------------------------------ strategies

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=25)
peers = st.sampled_from(PEERS) | st.text(max_size=15) | json_values

valid_prefixes = st.builds(lambda address, length: str(ipaddress.ip_network(f"{address}/{length}", strict=False)),
                           st.ip_addresses(v=4), st.integers(0, 32))
junk_prefixes = st.sampled_from(["10.244.1.1/26", "10.244.1.0/33", "10.244.1.0/-1", "bogus", "10.244.1/24", "",
                                 "10.0.0.0/x", "fd00::/64", "10.244.1.0 /26", "010.244.1.0/26", "10.244.1.0/26\n",
                                 "1e3.0.0.0/8"]) | st.text(max_size=20) | json_values
prefix_texts = valid_prefixes | junk_prefixes
nlri = prefix_texts | st.builds(lambda p: {"nlri": p}, prefix_texts)  # compact strings, or ExaBGP's objects

valid_next_hops = st.sampled_from(["10.0.0.12", "10.0.0.13", "192.0.2.7", "10.0.0.11"])
junk_next_hops = st.sampled_from(["0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255", "10.0.0.256",
                                  "10.0.0", "::1", "self", "", " 10.0.0.12"]) | st.text(max_size=15)
u32ish = st.integers(0, U32_MAX) | st.integers(-(2**40), 2**40) | st.booleans() | st.floats() | st.text(max_size=5)
as_numbers = st.integers(0, U32_MAX) | st.integers(-(2**40), 2**40) | st.sampled_from([True, "65001", 1.5, None])
segments = st.fixed_dictionaries({"element": st.sampled_from(["as-sequence", "as-set", "as-confusion", 7]),
                                  "value": st.lists(as_numbers, max_size=6) | json_values})
as_paths = (st.builds(lambda segs: {str(i): s for i, s in enumerate(segs)}, st.lists(segments, max_size=3))
            | st.lists(as_numbers, max_size=6)
            | st.lists(st.integers(0, U32_MAX), min_size=500, max_size=3000)  # huge, and valid
            | json_values)
attribute_fields = {"origin": st.sampled_from([*ORIGINS, "IGP", "", 0]) | json_values, "as-path": as_paths,
                    "local-preference": u32ish, "med": u32ish,
                    "originator-id": valid_next_hops | junk_next_hops | json_values,
                    "cluster-list": st.lists(valid_next_hops | junk_next_hops, max_size=3) | json_values}
attributes = st.fixed_dictionaries({}, optional=attribute_fields) | json_values


@st.composite
def updates(draw: st.DrawFn) -> dict[str, Any]:
    """An UPDATE as ExaBGP's JSON encoder writes it, every value possibly garbage."""
    announce = draw(st.dictionaries(valid_next_hops | junk_next_hops, st.lists(nlri, max_size=5) | json_values,
                                    max_size=3))
    update: dict[str, Any] = {"announce": {"ipv4 unicast": announce}}
    if draw(st.booleans()):
        update["attribute"] = draw(attributes)
    if draw(st.booleans()):
        update["withdraw"] = {"ipv4 unicast": draw(st.lists(nlri, max_size=4) | json_values)}
    return update


# ------------------------------------------------------------------ the model of what must be learned

def attributes_ok(value: Any) -> bool:
    if not isinstance(value, dict):
        return False

    def u32(x: Any) -> bool:
        return type(x) is int and 0 <= x <= U32_MAX

    def address(x: Any) -> bool:
        try:
            return isinstance(x, str) and bool(ipaddress.IPv4Address(x))
        except ValueError:
            return False

    path = value.get("as-path", [])
    path_segments = list(path.values()) if isinstance(path, dict) else [{"element": "as-sequence", "value": path}]
    return (isinstance(path, (list, dict))
            and all(isinstance(s, dict) and s.get("element") in ("as-sequence", "as-set")
                    and isinstance(s.get("value"), list) and all(u32(a) for a in s["value"]) for s in path_segments)
            and u32(value.get("local-preference", 100)) and u32(value.get("med", 0))
            and isinstance(value.get("origin", "igp"), str) and value.get("origin", "igp") in ORIGINS
            and ("originator-id" not in value or address(value["originator-id"]))
            and isinstance(value.get("cluster-list", []), list)
            and all(address(c) for c in value.get("cluster-list", [])))


def usable_next_hop(value: str) -> bool:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_loopback or address.is_multicast or address.packed == b"\xff" * 4)


def prefix_of(entry: Any) -> str | None:
    text = entry.get("nlri") if isinstance(entry, dict) else entry
    return canonical_prefix(text) if isinstance(text, str) else None


def expected_table(update: dict[str, Any]) -> dict[str, str]:
    """prefix -> next hop that one UPDATE leaves in a fresh peer table."""
    table: dict[str, str] = {}
    good = attributes_ok(update.get("attribute", {}))
    originator = update.get("attribute", {}).get("originator-id") if isinstance(update.get("attribute"), dict) else None
    for next_hop, entries in update["announce"]["ipv4 unicast"].items():
        if not usable_next_hop(next_hop):
            continue
        for entry in entries if isinstance(entries, list) else []:
            prefix = prefix_of(entry)
            if prefix is None:
                continue
            if good and originator != ROUTER_ID:  # our own route coming back is a loop (RFC 4456)
                table[prefix] = next_hop
            else:
                table.pop(prefix, None)  # treat-as-withdraw
    withdrawn = update.get("withdraw", {}).get("ipv4 unicast")
    for entry in withdrawn if isinstance(withdrawn, list) else []:
        if (prefix := prefix_of(entry)) is not None:
            table.pop(prefix, None)
    return table


def message(peer: Any, update: Any) -> bytes:
    return json.dumps({"exabgp": "5.0.0", "type": "update",
                       "neighbor": {"address": {"local": ROUTER_ID, "peer": peer}, "message": {"update": update}}}
                      ).encode()


# ------------------------------------------------------------------ the properties

@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_arbitrary_bytes_never_raise_and_learn_nothing(lines: list[bytes]) -> None:
    fed = speaker()
    for line in lines:
        assert fed._handle(line) in (True, False)
    assert fed.learned() == {}


@FUZZ
@given(st.lists(json_values | st.fixed_dictionaries(
    {"type": st.sampled_from(["update", "state", "open", "notification"]) | json_values,
     "neighbor": st.fixed_dictionaries({"address": st.fixed_dictionaries({"peer": peers}) | json_values},
                                       optional={"state": json_values, "direction": st.just("receive") | json_values,
                                                 "message": json_values, "open": json_values,
                                                 "reason": json_values})}), max_size=6))
def test_arbitrary_json_never_raises_and_learns_only_sane_routes(messages: list[Any]) -> None:
    fed = speaker()
    for item in messages:
        fed._handle(json.dumps(item).encode())
    assert_learned_is_sane(fed.learned())
    assert all(isinstance(t, int) and 0 <= t <= 4095 for t in fed.rib.restart_times.values())


@FUZZ
@given(st.sampled_from(PEERS), updates())
def test_garbage_in_updates_is_dropped_and_good_routes_are_kept(peer: str, update: dict[str, Any]) -> None:
    fed = speaker()
    fed._handle(message(peer, update))
    learned = fed.learned()
    assert learned == {prefix: (next_hop,) for prefix, next_hop in expected_table(update).items()}
    assert_learned_is_sane(learned)


def test_a_malformed_attribute_withdraws_what_the_peer_announced_before() -> None:
    fed = speaker()
    good = {"announce": {"ipv4 unicast": {"10.0.0.12": ["10.244.2.0/26"]}}, "attribute": {"med": 5}}
    fed._handle(message("10.0.0.12", good))
    assert fed.learned() == {"10.244.2.0/26": ("10.0.0.12",)}
    fed._handle(message("10.0.0.12", {**good, "attribute": {"med": -1}}))  # RFC 7606 treat-as-withdraw
    assert fed.learned() == {} and fed.rib.malformed == {"10.0.0.12": 1}


def test_deeply_nested_json_does_not_raise() -> None:
    fed = speaker()
    assert fed._handle(b"[" * 100_000 + b"]" * 100_000) is False  # RecursionError inside json, not ValueError
    assert fed._handle(message("10.0.0.12", {"announce": {"ipv4 unicast": {"10.0.0.12": [[[[["x"]]]]]}}})) is False


# ------------------------------------------------------------------ IPv6 (the dual-stack path)

valid_prefixes6 = st.builds(lambda address, length: str(ipaddress.ip_network(f"{address}/{length}", strict=False)),
                            st.ip_addresses(v=6), st.integers(0, 128))
nlri6 = (valid_prefixes6 | junk_prefixes | st.sampled_from(["fd00::/129", "fd00:::/64", "FD00::/64", "10.244.1.0/26"])
         | st.builds(lambda p: {"nlri": p}, valid_prefixes6 | junk_prefixes))
next_hops6 = st.sampled_from(["fd00::12", "fd00::13", "2001:db8::7", "::", "::1", "fe80::1", "ff02::1",
                              "::ffff:10.0.0.12", "10.0.0.12", "fd00::12%eth1", "fd00::g"]) | st.text(max_size=15)


def assert_learned6_is_sane(learned: dict[str, tuple[str, ...]]) -> None:
    """IPv6 prefixes come out canonical, each with usable global IPv6 next hops (never link-local, v4-mapped,
    loopback, unspecified or multicast)."""
    for prefix, next_hops in learned.items():
        assert canonical_prefix(prefix, ipaddress.ip_network(prefix).version) == prefix, prefix
        for next_hop in next_hops:
            address = ipaddress.IPv6Address(next_hop)
            assert not (address.is_unspecified or address.is_loopback or address.is_multicast
                        or address.is_link_local or address.ipv4_mapped), next_hop


@FUZZ
@given(st.sampled_from(PEERS), st.dictionaries(next_hops6, st.lists(nlri6, max_size=5) | json_values, max_size=3),
       attributes, st.lists(nlri6, max_size=4) | json_values)
def test_garbage_in_ipv6_updates_never_raises_and_learns_only_sane_routes(
        peer: str, announce: dict[str, Any], attribute: Any, withdraw: Any) -> None:
    fed = speaker()
    fed._handle(message(peer, {"announce": {"ipv6 unicast": announce}, "attribute": attribute,
                               "withdraw": {"ipv6 unicast": withdraw}}))
    assert_learned6_is_sane(fed.learned())


def test_a_good_ipv6_update_is_learned_and_a_bad_next_hop_is_not() -> None:
    fed = speaker()
    fed._handle(message("10.0.0.12", {"announce": {"ipv6 unicast": {
        "fd00::12": ["fd00:10::/122"], "fe80::1": ["fd00:10::40/122"], "::ffff:10.0.0.12": ["fd00:10::80/122"]}}}))
    assert fed.learned() == {"fd00:10::/122": ("fd00::12",)}
