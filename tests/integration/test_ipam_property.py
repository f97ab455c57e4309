"""Random assign/release sequences on real etcd against an in-memory model of the same operations; and the same
with pools deleted (with and without force) and created again with another blockSize."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from calicoctl_py.commands import resources
from calicoctl_py.commands.resources import UserError
from ipam import blocks, pools
from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.datastore import Datastore
from ipam.errors import AddressInUse, AddressNotInPool, InvalidResource, NoEligiblePool, PoolExhausted, ResourceNotFound
from ipam.model import IPAddress
from ipam.pools import save_pool
from tests.integration.ipamhelpers import add_pool, held_by_handle, make_pool, store_for

pytestmark = pytest.mark.etcd

POOL = ipaddress.ip_network("10.77.0.0/27")  # four /29 blocks: small enough to run out often
HANDLES = [f"h{i}" for i in range(5)]
NODES = ["node-a", "node-b", "node-c"]

operations = st.one_of(
    st.tuples(st.just("auto"), st.sampled_from(HANDLES), st.sampled_from(NODES), st.integers(1, 3)),
    st.tuples(st.just("assign"), st.sampled_from(HANDLES), st.sampled_from(NODES), st.integers(0, 31)),
    st.tuples(st.just("release_handle"), st.sampled_from(HANDLES)),
    st.tuples(st.just("release_ip"), st.integers(0, 31)),
)


async def run(endpoints: list[str], ops: list[tuple]) -> None:
    async with store_for(endpoints) as store:
        await store.delete_prefix("/calico/")
        await add_pool(store, "p", str(POOL), 29)
        ipam = IPAM(store)
        model: dict[IPAddress, str] = {}
        for op in ops:
            if op[0] == "auto":
                _, handle, node, count = op
                if POOL.num_addresses - len(model) >= count:
                    got = (await ipam.auto_assign(handle, node, num_v4=count)).ipv4
                    assert len(got) == count and not set(got) & set(model)
                    model.update(dict.fromkeys(got, handle))
                else:
                    with pytest.raises(PoolExhausted):
                        await ipam.auto_assign(handle, node, num_v4=count)
            elif op[0] == "assign":
                _, handle, node, ordinal = op
                address = POOL.network_address + ordinal
                if address in model:
                    with pytest.raises(AddressInUse):
                        await ipam.assign_ip(address, handle, node)
                else:
                    await ipam.assign_ip(address, handle, node)
                    model[address] = handle
            elif op[0] == "release_handle":
                expected = sorted(a for a, h in model.items() if h == op[1])
                assert sorted(await ipam.release_by_handle(op[1])) == expected
                model = {a: h for a, h in model.items() if h != op[1]}
            else:
                address = POOL.network_address + op[1]
                not_freed = await ipam.release_ips([address])
                assert not_freed == ([] if address in model else [address])
                model.pop(address, None)

        held = await held_by_handle(store)
        assert {a: h for h, addresses in held.items() for a in addresses} == model
        state = await load_state(store)
        assert set(state.handles) == set(model.values())
        report = check(state)
        assert report.ok, report.problems


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operations, min_size=1, max_size=30))
def test_random_sequences_match_the_model(etcd_endpoints: list[str], ops: list[tuple]) -> None:
    asyncio.run(run(etcd_endpoints, ops))


# ------------------------------------------------------------------ pools deleted and created again

POOL_CIDRS = {"p0": ipaddress.ip_network("10.78.0.0/27"), "p1": ipaddress.ip_network("10.78.0.32/27")}
BLOCK_SIZES = [28, 29, 30]
BASE = ipaddress.ip_address("10.78.0.0")

pool_operations = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(sorted(POOL_CIDRS)), st.sampled_from(BLOCK_SIZES), st.booleans()),
    st.tuples(st.just("toggle"), st.sampled_from(sorted(POOL_CIDRS))),
    st.tuples(st.just("delete"), st.sampled_from(sorted(POOL_CIDRS)), st.booleans(), st.booleans()),
    st.tuples(st.just("auto"), st.sampled_from(HANDLES), st.sampled_from(NODES), st.integers(1, 2)),
    st.tuples(st.just("assign"), st.sampled_from(HANDLES), st.sampled_from(NODES), st.integers(0, 63)),
    st.tuples(st.just("release_handle"), st.sampled_from(HANDLES)),
)


def pool_doc(name: str, block_size: int, disabled: bool = False) -> dict:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": str(POOL_CIDRS[name]), "blockSize": block_size, "disabled": disabled}}


class PoolModel:
    """What the pools and allocations should be, and the checks of etcd against it after every operation."""

    def __init__(self, store: Datastore) -> None:
        self.store = store
        self.ipams = {node: IPAM(store) for node in NODES}
        self.pools: dict[str, tuple[int, bool]] = {}  # name -> (blockSize, disabled)
        self.held: dict[IPAddress, str] = {}

    def enabled_pool_of(self, address: IPAddress) -> tuple[str, int] | None:
        for name, (block_size, disabled) in self.pools.items():
            if address in POOL_CIDRS[name] and not disabled:
                return name, block_size
        return None

    def in_use(self, name: str) -> int:
        return sum(1 for address in self.held if address in POOL_CIDRS[name])

    async def keyspace(self) -> dict[str, bytes]:
        return {kv.key: kv.value for kv in await self.store.get_prefix("/calico/")}

    async def assert_allocated_right(self, addresses: list[IPAddress]) -> None:
        """Each new address lies in an enabled pool, in a block of that pool's blockSize, and was free."""
        state = await load_state(self.store)
        for address in addresses:
            assert address not in self.held, address
            found = self.enabled_pool_of(address)
            assert found is not None, address
            assert blocks.block_containing(address, found[1]) in state.blocks, (address, sorted(state.blocks))

    async def create(self, name: str, block_size: int, via_cli: bool) -> None:
        if name in self.pools:
            return
        state = await load_state(self.store)
        misfits = blocks.misfits(make_pool(name, str(POOL_CIDRS[name]), block_size), state.blocks)
        before = await self.keyspace()
        try:
            if via_cli:
                await resources.write(self.store, [("pool.yaml", pool_doc(name, block_size))], "create")
            else:
                await save_pool(self.store, make_pool(name, str(POOL_CIDRS[name]), block_size))
        except (UserError, InvalidResource) as exc:
            assert misfits and "conflicts with existing blocks" in str(exc), exc
            event("create refused over blocks of another size")
            assert await self.keyspace() == before
            return
        assert not misfits, f"pool /{block_size} created over blocks {misfits}"
        self.pools[name] = (block_size, False)

    async def toggle(self, name: str) -> None:
        if name in self.pools:
            block_size, disabled = self.pools[name]
            await resources.write(self.store, [("pool.yaml", pool_doc(name, block_size, not disabled))], "apply")
            self.pools[name] = (block_size, not disabled)

    async def delete(self, name: str, force: bool, small_transactions: bool) -> None:
        before = await self.keyspace()
        refused = name not in self.pools or (self.in_use(name) > 0 and not force)
        try:
            if small_transactions:  # removal in several transactions of at most 4 operations
                await pools.delete_pool(self.store, name, force=force, max_ops=4)
            else:
                await resources.delete(self.store, [("ippool", name)], force=force)
        except (UserError, pools.PoolInUse, ResourceNotFound) as exc:
            assert refused, exc
            assert await self.keyspace() == before
            return
        assert not refused
        del self.pools[name]
        state = await load_state(self.store)
        cidr = POOL_CIDRS[name]
        if any(c.subnet_of(cidr) for c in state.blocks):
            event("forced delete kept blocks holding addresses")
        assert not [a for a, _ in state.affinities if a.cidr.subnet_of(cidr)]
        assert all(not b.is_empty and b.host is None for c, (b, _) in state.blocks.items() if c.subnet_of(cidr))

    async def auto(self, handle: str, node: str, count: int) -> None:
        try:
            got = (await self.ipams[node].auto_assign(handle, node, num_v4=count)).ipv4
        except (PoolExhausted, NoEligiblePool):
            return
        assert len(got) == count
        await self.assert_allocated_right(got)
        self.held.update(dict.fromkeys(got, handle))

    async def assign(self, handle: str, node: str, ordinal: int) -> None:
        address = BASE + ordinal
        try:
            await self.ipams[node].assign_ip(address, handle, node)
        except AddressInUse:
            if address not in self.held:  # only a block of another size (kept by a forced delete) may refuse it
                state = await load_state(self.store)
                found = self.enabled_pool_of(address)
                assert found is not None and any(address in c and c.prefixlen != found[1] for c in state.blocks)
            return
        except AddressNotInPool:
            assert self.enabled_pool_of(address) is None
            return
        await self.assert_allocated_right([address])
        self.held[address] = handle

    async def release_handle(self, handle: str) -> None:
        expected = sorted(a for a, h in self.held.items() if h == handle)
        assert sorted(await self.ipams[NODES[0]].release_by_handle(handle)) == expected
        self.held = {a: h for a, h in self.held.items() if h != handle}

    async def assert_consistent(self) -> None:
        held = await held_by_handle(self.store)
        every = [address for addresses in held.values() for address in addresses]
        assert len(every) == len(set(every)), held  # no address held twice
        assert {a: h for h, addresses in held.items() for a in addresses} == self.held
        state = await load_state(self.store)
        for problem in check(state).problems:
            # Only the blocks a forced delete kept, still holding addresses, lie outside every pool.
            block = state.blocks[ipaddress.ip_network(problem.block or "")][0] if problem.block else None
            assert problem.kind == "block-outside-pools" and block is not None and not block.is_empty \
                and block.host is None, problem


async def run_pools(endpoints: list[str], ops: list[tuple]) -> None:
    async with store_for(endpoints) as store:
        await store.delete_prefix("/calico/")
        model = PoolModel(store)
        for op in ops:
            await getattr(model, op[0])(*op[1:])
            await model.assert_consistent()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(pool_operations, min_size=1, max_size=25))
@example(ops=[("create", "p0", 28, True), ("auto", "h0", "node-a", 1), ("release_handle", "h0"),
              ("delete", "p0", False, False), ("create", "p0", 29, True), ("auto", "h1", "node-b", 2)])
@example(ops=[("create", "p0", 28, False), ("auto", "h0", "node-a", 2), ("delete", "p0", True, False),
              ("create", "p0", 29, False), ("create", "p1", 30, True), ("auto", "h1", "node-b", 1),
              ("assign", "h2", "node-c", 1), ("release_handle", "h0"), ("create", "p0", 29, True),
              ("auto", "h3", "node-a", 2), ("delete", "p0", False, True), ("delete", "p0", True, True)])
def test_pools_deleted_and_created_again_never_hand_out_an_address_twice(etcd_endpoints: list[str],
                                                                          ops: list[tuple]) -> None:
    asyncio.run(run_pools(etcd_endpoints, ops))
