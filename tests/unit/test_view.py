"""The node's view (bgpd/view.py): what it keeps of a watch's listings and events, and what it leaves out."""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

from bgpd.resources import WorkloadEndpoint
from bgpd.view import BLOCKS, ENDPOINTS, NODES, POOLS, ViewBuilder
from ipam import keys


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


def endpoint(node: str, name: str, address: str) -> tuple[str, bytes]:
    key = keys.resource_key("workloadendpoints", f"ns/{name}")
    return key, encode({"metadata": {"namespace": "ns", "name": name},
                        "spec": {"node": node, "interfaceName": f"cali{name}", "ipNetworks": [f"{address}/32"]}})


POOL = (keys.resource_key("ippools", "p"), encode({"metadata": {"name": "p"}, "spec": {"cidr": "10.244.0.0/16"}}))
BLOCK = ipaddress.ip_network("10.244.1.0/26")


def test_a_listing_keeps_only_this_nodes_endpoints_and_confirmed_affinities() -> None:
    builder = ViewBuilder("node1")
    changed = builder.resync(7, {
        POOLS: [POOL], NODES: [(keys.resource_key("nodes", "node1"), encode({"metadata": {"name": "node1"},
                                                                             "spec": {}}))],
        ENDPOINTS: [endpoint("node1", "a", "10.244.1.1"), endpoint("node2", "b", "10.244.2.1")],
        keys.host_prefix("node1"): [(keys.affinity_key("node1", BLOCK), b'{"state":"confirmed"}'),
                                    (keys.affinity_key("node1", ipaddress.ip_network("10.244.9.0/26")),
                                     b'{"state":"pending"}')]})
    view = builder.view()
    assert changed == {POOLS, NODES, ENDPOINTS, keys.host_prefix("node1")}
    assert view.revision == 7 and [p.name for p in view.pools] == ["p"] and set(view.nodes) == {"node1"}
    assert [e.name for e in view.endpoints] == ["a"] and view.affinities == (BLOCK,)
    assert view.blocks is None  # not watched
    assert builder.view() is view  # unchanged: the same value


def test_events_change_the_view_and_another_nodes_endpoint_changes_nothing() -> None:
    builder = ViewBuilder("node1")
    builder.resync(1, {POOLS: [POOL]})
    assert builder.event(2, *endpoint("node2", "b", "10.244.2.1")) is None
    assert builder.event(3, *endpoint("node1", "a", "10.244.1.1")) == ENDPOINTS
    assert builder.event(4, endpoint("node1", "a", "")[0], None) == ENDPOINTS
    assert builder.view().endpoints == () and builder.view().revision == 4
    assert builder.event(5, "/calico/ipam/v2/handle/x", b"{}") is None  # not watched


def test_an_unusable_resource_is_absent_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    builder = ViewBuilder("node1")
    bad_pool = (keys.resource_key("ippools", "bad"), encode({"metadata": {"name": "bad"}, "spec": {"cidr": "x"}}))
    with caplog.at_level(logging.WARNING, logger="calico-py-node.view"):
        builder.resync(1, {POOLS: [POOL, bad_pool], NODES: [(keys.resource_key("nodes", "n"), b"not json")]})
        view = builder.view()
        builder.event(2, *endpoint("node1", "a", "10.244.1.1"))
        builder.view()
    assert [p.name for p in view.pools] == ["p"] and view.nodes == {}
    assert len(view.problems) == 2 and len(caplog.records) == 2  # warned once each, not again on the next view
    builder.event(3, *bad_pool[:1], POOL[1])  # fixed
    assert len(builder.view().problems) == 1


def test_this_nodes_own_endpoint_write_is_known_before_its_event() -> None:
    builder = ViewBuilder("node1")
    builder.resync(1, {ENDPOINTS: []})
    key, value = endpoint("node1", "a", "10.244.1.1")
    builder.local_endpoint(key, WorkloadEndpoint.from_v3(json.loads(value)))
    assert [e.name for e in builder.view().endpoints] == ["a"]
    assert builder.event(2, key, value) is None  # the watch confirms what was known
    builder.local_endpoint(key, None)
    assert builder.view().endpoints == ()


def test_blocks_are_kept_only_while_watched() -> None:
    builder = ViewBuilder("node1")
    builder.with_blocks(True)
    block = {"cidr": str(BLOCK), "affinity": "host:node2", "allocations": [None] * 64,
             "unallocated": list(range(64)), "attributes": []}
    builder.resync(1, {BLOCKS: [(keys.block_key(BLOCK), encode(block))]})
    assert [b.cidr for b in builder.view().blocks or ()] == [BLOCK]
    builder.with_blocks(False)
    assert builder.view().blocks is None


def test_the_view_knows_this_nodes_borrowed_addresses_as_endpoints_and_blocks_change() -> None:
    builder = ViewBuilder("node1")
    builder.resync(1, {ENDPOINTS: [endpoint("node1", "a", "10.244.1.1")]})
    assert builder.view().borrowed == {ipaddress.ip_address("10.244.1.1")}  # no block yet: borrowed
    builder.event(2, keys.affinity_key("node1", BLOCK), b'{"state":"confirmed"}')
    assert builder.view().borrowed == frozenset()
    builder.event(3, *endpoint("node1", "b", "10.244.7.9"))
    assert builder.view().borrowed == {ipaddress.ip_address("10.244.7.9")}
    builder.event(4, endpoint("node1", "b", "")[0], None)
    assert builder.view().borrowed == frozenset()
