"""Removing a node that is gone for good: its addresses, its block affinities, its Node resource.

Each step is one etcd transaction per key group guarded by mod_revision, committed through the client's
:class:`ipam.cas.CasWriter` like the rest of IPAM: addresses are released block by block through
:meth:`IPAM.release_ips` (at the allocation sequence numbers seen, so an address handed to someone else meanwhile
stays), then each affine block is, in one transaction with its affinity, deleted when empty or made affinity-less
when other nodes still borrow from it. Freed blocks are claimed by the next node that needs one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ipam import blocks, keys
from ipam.allocator import IPAM
from ipam.datastore import Condition, Delete, ModRevisionIs, Operation, Put
from ipam.model import AllocationAttribute, Block, IPAddress, IPNetwork

NODES = "nodes"


@dataclass
class NodeRemoval:
    node: str
    released: list[IPAddress] = field(default_factory=list)
    blocks_deleted: list[IPNetwork] = field(default_factory=list)
    blocks_unaffined: list[IPNetwork] = field(default_factory=list)  # still holding other nodes' addresses
    node_resource_deleted: bool = False


@dataclass(frozen=True)
class Allocation:
    address: IPAddress
    attribute: AllocationAttribute
    node: str | None  # the node that allocated it: the attribute's ``node``, else the block's
    sequence_number: int  # the block's allocation sequence number, to release exactly this allocation


def allocations(all_blocks: Iterable[Block]) -> Iterator[Allocation]:
    for block in all_blocks:
        for ordinal, index in enumerate(block.allocations):
            if index is None or index >= len(block.attributes):
                continue  # a corrupt index: `check` reports it
            attribute = block.attributes[index]
            yield Allocation(block.address(ordinal), attribute, attribute.secondary.get("node") or block.host,
                             block.sequence_number_for_allocation.get(ordinal, 0))


def node_allocations(all_blocks: Iterable[Block], node: str) -> dict[IPAddress, int]:
    """Every address ``node`` allocated (borrowed addresses in other nodes' blocks too) -> sequence number."""
    return {a.address: a.sequence_number for a in allocations(all_blocks) if a.node == node}


async def remove_node(ipam: IPAM, node: str) -> NodeRemoval:
    """Release everything ``node`` holds (tunnel addresses included), free its blocks, delete its Node resource.
    Safe to repeat: a second call finds nothing left to do."""
    result = NodeRemoval(node)
    store = ipam.store
    snapshot = await store.read(prefixes=[keys.blocks_prefix(4), keys.blocks_prefix(6)])
    all_blocks = [Block.from_json(kv.json()) for kvs in snapshot.prefixes.values() for kv in kvs]
    held = node_allocations(all_blocks, node)
    if held:
        sequence_numbers = {a: s for a, s in held.items() if s}
        kept = set(await ipam.release_ips(list(held), sequence_numbers=sequence_numbers))
        result.released = [a for a in held if a not in kept]

    for affinity_kv in await store.get_prefix(keys.host_prefix(node)):
        if "/block/" not in affinity_kv.key:
            continue
        _, cidr = keys.parse_affinity_key(affinity_kv.key)
        await _free_block(ipam, node, cidr, result)

    node_key = keys.resource_key(NODES, node)

    async def delete_node_resource() -> None:
        kv = await store.get(node_key)
        if kv is not None:
            await ipam.cas.commit([ModRevisionIs(node_key, kv.mod_revision)], [Delete(node_key)],
                                  landed=lambda: ipam.cas.gone(node_key))
            result.node_resource_deleted = True

    await ipam.cas.retry(delete_node_resource)
    return result


async def _free_block(ipam: IPAM, node: str, cidr: IPNetwork, result: NodeRemoval) -> None:
    """One transaction: the node's affinity for ``cidr`` goes, and the block with it when empty; a block other
    nodes still borrow from stays, with no affinity, until its last address is released."""
    affinity_key, block_key = keys.affinity_key(node, cidr), keys.block_key(cidr)

    async def step() -> None:
        snapshot = await ipam.store.read(keys=[affinity_key, block_key])
        affinity_kv, block_kv = snapshot.keys[affinity_key], snapshot.keys[block_key]
        if affinity_kv is None:
            return
        conditions: list[Condition] = [ModRevisionIs(affinity_key, affinity_kv.mod_revision),
                                       ModRevisionIs(block_key, block_kv.mod_revision if block_kv else 0)]
        operations: list[Operation] = [Delete(affinity_key)]
        block = Block.from_json(block_kv.json()) if block_kv else None
        if block is not None and block.host == node:
            operations.append(Delete(block_key) if block.is_empty
                              else Put.json(block_key, blocks.with_affinity(block, None).to_json()))
        await ipam.cas.commit(conditions, operations, landed=lambda: ipam.cas.gone(affinity_key))
        if block is not None and block.host == node:
            (result.blocks_deleted if block.is_empty else result.blocks_unaffined).append(cidr)

    await ipam.cas.retry(step)
