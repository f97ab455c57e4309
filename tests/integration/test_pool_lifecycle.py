"""Calico's documented block-size change on real etcd, driven through calicoctl-py's commands and the allocator as
nodes drive it: temporary pool, old pool disabled, pods re-created, old pool deleted and created again with the
new blockSize, pods moved back, temporary pool deleted. No address may be held twice at any step, and
``ipam check`` stays clean throughout."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import pytest

from calicoctl_py.commands import resources
from calicoctl_py.commands.resources import UserError
from ipam import keys
from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.datastore import Datastore, Delete, Put
from ipam.errors import AddressInUse
from ipam.model import IPAddress, IPNetwork
from tests.integration.ipamhelpers import add_pool, held_by_handle, make_pool, store_for

pytestmark = pytest.mark.etcd

OLD_CIDR = ipaddress.ip_network("10.0.0.0/24")
TEMP_CIDR = ipaddress.ip_network("10.1.0.0/24")
NODES = ["node-a", "node-b", "node-c"]
PODS_PER_NODE = 3


@pytest.fixture
async def store(etcd_endpoints: list[str]) -> AsyncIterator[Datastore]:
    async with store_for(etcd_endpoints) as datastore:
        yield datastore


def pool_doc(name: str, cidr: IPNetwork, block_size: int, disabled: bool = False) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": str(cidr), "blockSize": block_size, "disabled": disabled}}


async def calicoctl(store: Datastore, mode: str, doc: dict[str, Any]) -> list[str]:
    return await resources.write(store, [("pool.yaml", doc)], mode)


class Cluster:
    """Pods on nodes, each node with its own IPAM client as its CNI plugin would have."""

    def __init__(self, store: Datastore) -> None:
        self.store = store
        self.ipams = {node: IPAM(store) for node in NODES}
        self.pods: dict[str, tuple[str, IPAddress]] = {}  # handle -> (node, address)
        self.generation = 0

    async def start_pod(self, node: str, handle: str) -> IPAddress:
        [address] = (await self.ipams.setdefault(node, IPAM(self.store)).auto_assign(handle, node)).ipv4
        self.pods[handle] = (node, address)
        return address

    async def start(self, pods_per_node: int) -> None:
        await asyncio.gather(*(self.start_pod(node, f"k8s-pod-network.{node}-{i}")
                               for node in NODES for i in range(pods_per_node)))

    async def recreate_all(self) -> None:
        """Delete every pod and start it again on its node (a rollout): new handle, new address."""
        self.generation += 1
        old = dict(self.pods)

        async def recreate(handle: str, node: str) -> None:
            await self.ipams[node].release_by_handle(handle)
            del self.pods[handle]
            await self.start_pod(node, f"{handle.rsplit('.g', 1)[0]}.g{self.generation}")
        await asyncio.gather(*(recreate(handle, node) for handle, (node, _) in old.items()))

    def addresses(self) -> list[IPAddress]:
        return [address for _, address in self.pods.values()]


async def assert_consistent(cluster: Cluster, step: str) -> None:
    """ipam check is clean, no address is held by two handles (or twice), and etcd holds exactly the pods'."""
    state = await load_state(cluster.store)
    report = check(state)
    assert report.ok, (step, report.problems)
    held = await held_by_handle(cluster.store)
    every = [address for addresses in held.values() for address in addresses]
    assert len(every) == len(set(every)), (step, held)
    assert {h: sorted(a) for h, a in held.items()} == {h: [a] for h, (_, a) in cluster.pods.items()}, step


def assert_in_blocks_of(addresses: list[IPAddress], cidr: IPNetwork, block_size: int, blocks: set[IPNetwork]) -> None:
    for address in addresses:
        assert address in cidr
        assert ipaddress.ip_network((address, block_size), strict=False) in blocks, address


async def test_documented_block_size_change_hands_out_no_address_twice(store: Datastore) -> None:
    cluster = Cluster(store)
    await calicoctl(store, "create", pool_doc("default-pool", OLD_CIDR, 26))
    await cluster.start(PODS_PER_NODE)
    await assert_consistent(cluster, "pods in the /26 pool")

    await calicoctl(store, "create", pool_doc("temporary-pool", TEMP_CIDR, 26))
    await calicoctl(store, "apply", pool_doc("default-pool", OLD_CIDR, 26, disabled=True))
    await cluster.recreate_all()
    assert all(address in TEMP_CIDR for address in cluster.addresses())
    await assert_consistent(cluster, "pods moved to the temporary pool")

    # The old pool's blocks are empty but still affine to their nodes: deleting the pool takes them along.
    [line] = await resources.delete(store, [("ippool", "default-pool")])
    assert line.startswith("IPPool 'default-pool' deleted")
    state = await load_state(store)
    assert not [c for c in state.blocks if c.subnet_of(OLD_CIDR)]
    assert not [a for a, _ in state.affinities if a.cidr.subnet_of(OLD_CIDR)]
    await assert_consistent(cluster, "old pool deleted")

    await calicoctl(store, "create", pool_doc("default-pool", OLD_CIDR, 28))
    await calicoctl(store, "apply", pool_doc("temporary-pool", TEMP_CIDR, 26, disabled=True))
    await cluster.recreate_all()
    await cluster.start_pod("node-d", "k8s-pod-network.node-d-0")  # a node that never had a /26
    await assert_consistent(cluster, "pods moved back into the /28 pool")
    state = await load_state(store)
    assert all(c.prefixlen == 28 for c in state.blocks if c.subnet_of(OLD_CIDR))
    assert_in_blocks_of(cluster.addresses(), OLD_CIDR, 28, set(state.blocks))

    await resources.delete(store, [("ippool", "temporary-pool")])
    await assert_consistent(cluster, "temporary pool deleted")
    assert not [c for c in (await load_state(store)).blocks if c.subnet_of(TEMP_CIDR)]


async def test_forced_delete_keeps_live_blocks_unusable_and_refuses_a_pool_of_another_size(store: Datastore) -> None:
    cluster = Cluster(store)
    await calicoctl(store, "create", pool_doc("default-pool", OLD_CIDR, 26))
    await cluster.start(PODS_PER_NODE)
    live_blocks = {ipaddress.ip_network((a, 26), strict=False) for a in cluster.addresses()}
    await calicoctl(store, "create", pool_doc("temporary-pool", TEMP_CIDR, 26))

    [line] = await resources.delete(store, [("ippool", "default-pool")], force=True)
    state = await load_state(store)
    assert {c for c in state.blocks if c.subnet_of(OLD_CIDR)} == live_blocks
    assert all(state.blocks[c][0].host is None for c in live_blocks)
    assert not [a for a, _ in state.affinities if a.cidr.subnet_of(OLD_CIDR)]
    assert f"{len(live_blocks)} blocks still holding {len(cluster.pods)} addresses kept" in line
    # What check says now is true: live addresses outside every pool; nothing else.
    assert set(check(state).counts()) == {"block-outside-pools"}

    before = {kv.key: kv.value for kv in await store.get_prefix("/calico/")}
    with pytest.raises(UserError, match=r"IPPool 'default-pool': field spec.blockSize: 28 conflicts with existing "
                                        r"blocks 10\.0\.0\.\d+/26, .*; release their addresses first; nothing was "
                                        r"written"):
        await calicoctl(store, "create", pool_doc("default-pool", OLD_CIDR, 28))
    assert {kv.key: kv.value for kv in await store.get_prefix("/calico/")} == before

    # New pods come from the temporary pool, never from the kept blocks.
    await cluster.start_pod("node-a", "k8s-pod-network.extra")
    assert cluster.pods["k8s-pod-network.extra"][1] in TEMP_CIDR
    await cluster.recreate_all()  # the live blocks empty out and, affine to no node, go
    assert all(address in TEMP_CIDR for address in cluster.addresses())
    assert not [c for c in (await load_state(store)).blocks if c.subnet_of(OLD_CIDR)]
    await assert_consistent(cluster, "old pool's addresses released")

    await calicoctl(store, "create", pool_doc("default-pool", OLD_CIDR, 28))
    await calicoctl(store, "apply", pool_doc("temporary-pool", TEMP_CIDR, 26, disabled=True))
    await cluster.recreate_all()
    await assert_consistent(cluster, "pods in the /28 pool")
    assert_in_blocks_of(cluster.addresses(), OLD_CIDR, 28, set((await load_state(store)).blocks))


async def test_blocks_left_by_a_pool_of_another_size_are_never_allocated_from(store: Datastore) -> None:
    """Data as an earlier release left it: the /26 pool deleted without its blocks and created again as /28."""
    old = await add_pool(store, "default-pool", str(OLD_CIDR), 26)
    cluster = Cluster(store)
    await cluster.start(1)
    await cluster.ipams["node-a"].release_by_handle("k8s-pod-network.node-a-0")  # node-a keeps an empty /26
    del cluster.pods["k8s-pod-network.node-a-0"]
    pool_key = keys.resource_key("ippools", old.name)
    await store.txn([], [Delete(pool_key)])
    await store.txn([], [Put.json(pool_key, make_pool(old.name, str(OLD_CIDR), 28).to_v3())])
    leftovers = {c for c in (await load_state(store)).blocks if c.prefixlen == 26}
    assert len(leftovers) == len(NODES)

    for node in [*NODES, "node-d", "node-e"]:
        for i in range(3):
            await cluster.start_pod(node, f"k8s-pod-network.{node}-new-{i}")
    state = await load_state(store)
    new_blocks = {c for c in state.blocks if c.prefixlen == 28}
    assert not any(n.overlaps(o) for n in new_blocks for o in leftovers)
    assert_in_blocks_of([a for h, (_, a) in cluster.pods.items() if "-new-" in h], OLD_CIDR, 28, new_blocks)
    every = [address for addresses in (await held_by_handle(store)).values() for address in addresses]
    assert len(every) == len(set(every))

    inside_leftover = next(iter(sorted(leftovers))).network_address + 5
    with pytest.raises(AddressInUse, match=r"overlaps block 10\.0\.0\.\d+/26 of another blockSize"):
        await cluster.ipams["node-a"].assign_ip(inside_leftover, "k8s-pod-network.fixed", "node-a")
