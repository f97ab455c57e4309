"""Pure pool decisions: what deleting a pool removes, which blocks a new pool refuses, which blocks allocation
may use."""

from __future__ import annotations

import ipaddress
import json

import pytest

from ipam import blocks, keys
from ipam.datastore import Delete, ModRevisionIs, PrefixUnchangedSince, Put
from ipam.errors import InvalidResource
from ipam.model import AllocationAttribute, Block, IPNetwork, IPPool
from ipam.pools import PoolInUse, check_blocks_fit, first_steps, plan_removal

POOL = IPPool(name="p", cidr=ipaddress.ip_network("10.0.0.0/24"), block_size=26)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def block(cidr: str, node: str | None, used: int = 0) -> Block:
    empty = blocks.new_block(net(cidr), node, 1)
    return blocks.allocate(empty, used, AllocationAttribute("h"))[0] if used else empty


def test_a_delete_removes_empty_blocks_and_every_affinity_in_the_pool_in_one_transaction() -> None:
    found = {net("10.0.0.0/26"): (block("10.0.0.0/26", "a"), 11), net("10.9.0.0/26"): (block("10.9.0.0/26", "x"), 12)}
    affinities = {("a", net("10.0.0.0/26")): 21, ("b", net("10.0.0.64/26")): 22,  # b's block is gone
                  ("x", net("10.9.0.0/26")): 23}
    removal = plan_removal(POOL, 5, found, affinities, revision=30, force=False)
    conditions, operations = removal.as_one_transaction()
    pool_key = keys.resource_key("ippools", "p")
    assert set(conditions) == {ModRevisionIs(pool_key, 5), PrefixUnchangedSince(keys.blocks_prefix(4), 30),
                               ModRevisionIs(keys.block_key(net("10.0.0.0/26")), 11),
                               ModRevisionIs(keys.affinity_key("a", net("10.0.0.0/26")), 21),
                               ModRevisionIs(keys.affinity_key("b", net("10.0.0.64/26")), 22)}
    assert set(operations) == {Delete(pool_key), Delete(keys.block_key(net("10.0.0.0/26"))),
                               Delete(keys.affinity_key("a", net("10.0.0.0/26"))),
                               Delete(keys.affinity_key("b", net("10.0.0.64/26")))}
    assert removal.deleted_blocks == [net("10.0.0.0/26")] and removal.kept_blocks == []


def test_a_pool_in_use_is_refused_unless_forced_and_then_its_live_blocks_lose_their_affinity() -> None:
    live = block("10.0.0.128/26", "a", used=3)
    found = {live.cidr: (live, 11)}
    affinities = {("a", live.cidr): 21}
    with pytest.raises(PoolInUse, match=r"IPPool 'p' still has 3 addresses allocated; .* --force"):
        plan_removal(POOL, 5, found, affinities, revision=30, force=False)
    removal = plan_removal(POOL, 5, found, affinities, revision=30, force=True)
    _, operations = removal.as_one_transaction()
    [put] = [o for o in operations if isinstance(o, Put)]
    kept = Block.from_json(json.loads(put.value))
    assert put.key == keys.block_key(live.cidr) and kept.host is None and kept.allocations == live.allocations
    assert Delete(keys.affinity_key("a", live.cidr)) in operations
    assert removal.kept_blocks == [live.cidr] and "1 block still holding 3 addresses kept" in removal.summary()


def test_a_large_removal_is_cut_into_transactions_of_at_most_max_ops() -> None:
    found = {c: (blocks.new_block(c, "n", 1), 1) for c in blocks.walk_order(IPPool("p", POOL.cidr, 28), "n")}
    removal = plan_removal(IPPool("p", POOL.cidr, 28), 5, found, {("n", c): 2 for c in found}, 30, force=False)
    steps = first_steps(removal, 5)
    assert len(steps) == 2 and all(len(s.operations) == 2 for s in steps)


def test_a_new_pool_is_refused_over_blocks_of_another_size() -> None:
    existing = [net("10.0.0.0/26"), net("10.0.0.64/28"), net("10.0.1.0/26"), net("10.0.0.0/23")]
    assert blocks.misfits(IPPool("q", POOL.cidr, 28), existing) == [net("10.0.0.0/23"), net("10.0.0.0/26")]
    with pytest.raises(InvalidResource, match=r"IPPool 'q': field spec.blockSize: 28 conflicts with existing "
                                              r"blocks 10.0.0.0/23, 10.0.0.0/26; release their addresses first"):
        check_blocks_fit(IPPool("q", POOL.cidr, 28), existing)
    check_blocks_fit(POOL, [net("10.0.0.0/26"), net("10.0.1.0/28")])


def test_allocation_uses_only_blocks_of_the_pools_size_that_overlap_no_other() -> None:
    pool = IPPool("p", POOL.cidr, 28)
    existing = {c: block(str(c), "a") for c in (net("10.0.0.0/26"), net("10.0.0.16/28"), net("10.0.0.64/28"),
                                                net("10.0.0.128/28"), net("10.0.0.128/30"))}
    assert blocks.usable_blocks([pool], existing) == {net("10.0.0.64/28")}
    assert blocks.overlapping(existing) == [(net("10.0.0.0/26"), net("10.0.0.16/28")),
                                            (net("10.0.0.128/28"), net("10.0.0.128/30"))]
    assert [b.cidr for b in blocks.borrow_candidates([pool], existing, "b")] == [net("10.0.0.64/28")]
    chosen = {blocks.choose_new_block([pool], existing, f"node-{i}") for i in range(20)}
    assert chosen and not any(c.overlaps(e) for c in chosen for e in existing)  # type: ignore[union-attr]
