"""IPAM against a real etcd: allocation, claims, borrowing, release, check and GC."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from ipam import keys
from ipam.allocator import IPAM
from ipam.check import check, gc, load_state
from ipam.datastore import Datastore, Delete, Put
from ipam.errors import (
    AddressInUse,
    AddressNotInPool,
    DatastoreUnavailable,
    InvalidResource,
    NoEligiblePool,
    PoolExhausted,
)
from ipam.model import Block, IPAMConfig
from ipam.pools import delete_pool, list_pools, save_pool
from tests.integration.ipamhelpers import (
    Outcome,
    add_pool,
    clients,
    close_clients,
    held_by_handle,
    ip,
    make_pool,
    run_workers,
    store_for,
)

pytestmark = pytest.mark.etcd


@pytest.fixture
async def store(etcd_endpoints: list[str]):
    async with store_for(etcd_endpoints) as datastore:
        yield datastore


async def test_dual_stack_assign_writes_calico_shaped_keys_and_release_cleans_up(store: Datastore) -> None:
    await add_pool(store, "v4", "10.244.0.0/16")
    await add_pool(store, "v6", "fd00:10:244::/48")
    ipam = IPAM(store)
    result = await ipam.auto_assign("k8s-pod-network.abc", "node-a", num_v4=1, num_v6=1,
                                    attrs={"namespace": "ns", "pod": "web-0"})
    [v4], [v6] = result.ipv4, result.ipv6
    assert v4 in ipaddress.ip_network("10.244.0.0/16") and v6.version == 6

    block4 = ipaddress.ip_network((v4, 26), strict=False)
    raw = (await store.get(keys.block_key(block4))).json()
    assert raw["affinity"] == "host:node-a" and raw["cidr"] == str(block4)
    assert raw["attributes"][0]["handle_id"] == "k8s-pod-network.abc"
    assert raw["attributes"][0]["secondary"]["pod"] == "web-0"
    assert raw["attributes"][0]["secondary"]["node"] == "node-a"
    assert (await store.get(keys.affinity_key("node-a", block4))).json() == {"state": "confirmed",
                                                                              "deleted": False}
    handle = (await store.get(keys.handle_key("k8s-pod-network.abc"))).json()
    assert handle["block"] == {str(block4): 1, str(ipaddress.ip_network((v6, 122), strict=False)): 1}

    assert set(await ipam.release_by_handle("k8s-pod-network.abc")) == {v4, v6}
    assert await store.get(keys.handle_key("k8s-pod-network.abc")) is None
    # An empty affine block stays with its node.
    assert Block.from_json((await store.get(keys.block_key(block4))).json()).is_empty
    assert await store.get(keys.affinity_key("node-a", block4)) is not None
    assert await ipam.release_by_handle("k8s-pod-network.abc") == []  # idempotent
    assert check(await load_state(store)).ok


FIRST = 480  # the first phase: about 60 a node, so no node needs more than the two blocks it can have of 16


async def test_eight_nodes_four_workers_fill_a_pool_to_exhaustion(store: Datastore, etcd_endpoints: list[str]) -> None:
    await add_pool(store, "default-ipv4-ippool", "10.244.0.0/22")  # 16 blocks of 64
    nodes = [f"node-{i}" for i in range(8)]
    workers = clients(nodes, 4, etcd_endpoints)
    try:
        phase1 = Outcome()
        await run_workers(workers, FIRST, phase1)
        assert phase1.failed == {}
        addresses = phase1.addresses
        assert len(addresses) == FIRST and len(set(addresses)) == FIRST

        state = await load_state(store)
        assert {cidr.prefixlen for cidr in state.blocks} == {26}
        owner = {cidr: block.host for cidr, (block, _) in state.blocks.items()}
        # The pool never ran out of free blocks: every address comes from its node's own block.
        for handle, [address] in phase1.allocated.items():
            block = ipaddress.ip_network((address, 26), strict=False)
            assert owner[block] == phase1.node_of[handle], f"{address} of {handle} was borrowed early"
        assert check(state).ok

        # Keep going until the pool is full: once no block is free, nodes borrow from others' blocks.
        phase2 = Outcome()
        await run_workers(workers, 1024 - FIRST + 32, phase2, prefix="k8s-pod-network.d")
        assert len(phase2.addresses) == 1024 - FIRST
        assert len(phase2.failed) == 32 and all(f.startswith("PoolExhausted") for f in phase2.failed.values())
        state = await load_state(store)
        assert len(state.blocks) == 16 and all(b.free == 0 for b, _ in state.blocks.values())
        borrowed = [(block.host, block.attributes[i].secondary["node"])
                    for block, _ in state.blocks.values() for i in block.allocations
                    if i is not None and block.attributes[i].secondary["node"] != block.host]
        assert borrowed, "the full pool shows no borrowed address"
        everything = addresses + phase2.addresses
        assert len(set(everything)) == 1024
        held = await held_by_handle(store)
        assert {h: sorted(v) for h, v in held.items()} == {
            h: sorted(v) for h, v in {**phase1.allocated, **phase2.allocated}.items()}

        # Release all, from every worker at once: no handle left, check clean, blocks stay with their nodes.
        handles = sorted(held)

        async def release(index: int, ipam: IPAM) -> None:
            for handle in handles[index::len(workers)]:
                await ipam.release_by_handle(handle)
        await asyncio.gather(*(release(i, ipam) for i, (_, ipam) in enumerate(workers)))
        state = await load_state(store)
        assert state.handles == {}
        assert all(block.is_empty for block, _ in state.blocks.values())
        report = check(state, known_nodes=nodes)
        assert report.ok, report.problems
    finally:
        await close_clients(workers)


async def test_strict_affinity_exhaustion_is_a_clear_error_and_writes_nothing(store: Datastore) -> None:
    await add_pool(store, "small", "10.9.0.0/24", 26)  # four blocks
    ipam = IPAM(store)
    await ipam.set_config(IPAMConfig(strict_affinity=True))
    for n in range(4):
        await ipam.auto_assign(f"h-{n}", f"node-{n}")
    before = await store.read(prefixes=["/"])
    with pytest.raises(PoolExhausted, match="strictAffinity forbids borrowing"):
        await ipam.auto_assign("h-late", "node-late")
    after = await store.read(prefixes=["/"])
    assert after.revision == before.revision  # not a single write
    # The same node can still fill its own block, but not beyond it.
    for n in range(63):
        await ipam.auto_assign(f"h-0-{n}", "node-0")
    with pytest.raises(PoolExhausted):
        await ipam.auto_assign("h-0-full", "node-0")
    assert await store.get(keys.handle_key("h-0-full")) is None


async def test_two_nodes_racing_for_the_last_block_one_wins(store: Datastore, etcd_endpoints: list[str]) -> None:
    await add_pool(store, "one-block", "10.7.0.0/26", 26)
    await IPAM(store).set_config(IPAMConfig(strict_affinity=True))
    async with store_for(etcd_endpoints) as s1, store_for(etcd_endpoints) as s2:
        a, b = IPAM(s1), IPAM(s2)
        results = await asyncio.gather(*(ipam.auto_assign(f"h-{i}", node) for i in range(10)
                                         for ipam, node in ((a, "node-a"), (b, "node-b"))),
                                       return_exceptions=True)
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 10 and len(lost) == 10 and all(isinstance(e, PoolExhausted) for e in lost)
    state = await load_state(store)
    assert len(state.affinities) == 1 and check(state).ok


async def test_assign_a_specific_address(store: Datastore) -> None:
    await add_pool(store, "p", "10.5.0.0/16")
    ipam = IPAM(store)
    await ipam.assign_ip(ip("10.5.3.7"), "fixed", "node-a", {"pod": "db-0"})
    with pytest.raises(AddressInUse, match=r"10\.5\.3\.7 is already assigned"):
        await ipam.assign_ip(ip("10.5.3.7"), "other", "node-b")
    with pytest.raises(AddressNotInPool):
        await ipam.assign_ip(ip("10.6.0.1"), "x", "node-a")
    state = await load_state(store)
    block = state.blocks[ipaddress.ip_network("10.5.3.0/26")][0]
    assert block.host == "node-a" and block.in_use == 1 and check(state).ok
    assert await ipam.release_ips([ip("10.5.3.7"), ip("10.5.9.9")]) == [ip("10.5.9.9")]


async def test_last_release_frees_a_block_nobody_owns_but_keeps_an_affine_one(store: Datastore) -> None:
    await add_pool(store, "p", "10.8.0.0/24", 26)
    ipam = IPAM(store)
    [mine] = (await ipam.auto_assign("h1", "node-a")).ipv4
    [theirs] = (await ipam.auto_assign("h2", "node-b")).ipv4
    block_b = ipaddress.ip_network((theirs, 26), strict=False)
    # node-b is gone: its affinity was removed (as node removal does), the block keeps an address.
    await store.txn([], [Delete(keys.affinity_key("node-b", block_b))])
    await ipam.release_by_handle("h2")
    assert await store.get(keys.block_key(block_b)) is None
    await ipam.release_by_handle("h1")
    assert await store.get(keys.block_key(ipaddress.ip_network((mine, 26), strict=False))) is not None


async def test_no_eligible_pool_messages(store: Datastore) -> None:
    ipam = IPAM(store)
    with pytest.raises(NoEligiblePool, match="no IPv4 pool exists"):
        await ipam.auto_assign("h", "node-a")
    await add_pool(store, "racks", "10.1.0.0/16", nodeSelector="rack == 'r1'")
    with pytest.raises(NoEligiblePool, match="selects node node-a"):
        await ipam.auto_assign("h", "node-a")
    await store.put(keys.resource_key("nodes", "node-a"),
                    b'{"kind":"Node","metadata":{"name":"node-a","labels":{"rack":"r1"}},"spec":{}}')
    assert (await ipam.auto_assign("h", "node-a")).ipv4[0] in ipaddress.ip_network("10.1.0.0/16")
    with pytest.raises(NoEligiblePool, match="requested pools nope"):
        await ipam.auto_assign("h2", "node-a", pools=["nope"])


async def test_pools_are_validated_against_each_other(store: Datastore) -> None:
    await save_pool(store, make_pool("a", "10.244.0.0/16"))
    with pytest.raises(InvalidResource, match="overlaps pool 'a'"):
        await save_pool(store, make_pool("b", "10.244.128.0/17"))
    with pytest.raises(InvalidResource, match="cannot change"):
        await save_pool(store, make_pool("a", "10.245.0.0/16"))
    await save_pool(store, make_pool("a", "10.244.0.0/16", natOutgoing=True))
    assert [p.nat_outgoing for p in await list_pools(store)] == [True]
    # Two overlapping pools written at once: exactly one lands.
    results = await asyncio.gather(save_pool(store, make_pool("c", "10.250.0.0/16")),
                                   save_pool(store, make_pool("d", "10.250.0.0/20")), return_exceptions=True)
    assert sum(isinstance(r, InvalidResource) for r in results) == 1
    assert len(await list_pools(store)) == 2
    await delete_pool(store, "a")
    assert [p.name for p in await list_pools(store)] in (["c"], ["d"])


async def test_check_reports_each_kind_of_inconsistency_and_gc_cleans_leaks(store: Datastore) -> None:
    await add_pool(store, "p", "10.3.0.0/16")
    ipam = IPAM(store)
    live = (await ipam.auto_assign("live", "node-a")).ipv4
    await ipam.auto_assign("leaked", "node-a", num_v4=2)
    await ipam.auto_assign("vxlan-tunnel-addr-node-a", "node-a", use="Tunnel")
    assert check(await load_state(store)).ok

    # Break things the way crashes and hand edits do.
    await store.txn([], [Delete(keys.handle_key("leaked"))])
    await store.put(keys.handle_key("ghost"), b'{"handleID":"ghost","block":{"10.3.99.0/26":1},"deleted":false}')
    await store.put(keys.affinity_key("node-x", ipaddress.ip_network("10.3.200.0/26")),
                    b'{"state":"confirmed","deleted":false}')
    report = check(await load_state(store), known_nodes=["node-a"])
    kinds = report.counts()
    assert kinds["ip-without-handle"] == 2
    assert kinds["handle-without-ips"] == 1
    assert kinds["affinity-without-block"] == 1
    assert kinds["affinity-of-missing-node"] == 1
    assert not report.ok

    result = await gc(ipam, live_handles={"live"})
    assert len(result.released) == 2 and result.handles_deleted == ["ghost"]
    assert len(result.affinities_deleted) == 1
    state = await load_state(store)
    assert check(state).ok, check(state).problems
    held = await held_by_handle(store)
    assert held["live"] == live and "vxlan-tunnel-addr-node-a" in held  # tunnel addresses are kept


async def test_check_finds_count_mismatch_overlap_and_corrupt_blocks(store: Datastore) -> None:
    await add_pool(store, "p", "10.4.0.0/16")
    ipam = IPAM(store)
    [address] = (await ipam.auto_assign("h", "node-a")).ipv4
    cidr = ipaddress.ip_network((address, 26), strict=False)
    await store.put(keys.handle_key("h"), b'{"handleID":"h","block":{"' + str(cidr).encode() + b'":3}}')
    raw = (await store.get(keys.block_key(cidr))).json()
    raw["unallocated"] = raw["unallocated"][1:]  # an ordinal neither free nor allocated
    await store.txn([], [Put.json(keys.block_key(cidr), raw)])
    overlapping = ipaddress.ip_network(f"{cidr.network_address}/28")
    await store.txn([], [Put.json(keys.block_key(overlapping), {
        "cidr": str(overlapping), "affinity": None, "allocations": [None] * 16, "unallocated": list(range(16)),
        "attributes": [], "sequenceNumber": 1, "deleted": False})])
    kinds = check(await load_state(store)).counts()
    assert kinds["handle-count-mismatch"] == 1
    assert kinds["block-corrupt"] == 1
    assert kinds["overlapping-blocks"] == 1


async def test_unreachable_etcd_is_a_clear_error() -> None:
    async with store_for(["http://127.0.0.1:9"], failover_timeout=0.5, request_timeout=0.2) as store:
        with pytest.raises(DatastoreUnavailable, match=r"etcd unreachable .*check ETCD_ENDPOINTS"):
            await IPAM(store).auto_assign("h", "node-a")

