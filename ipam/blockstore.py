"""The datastore side of blocks: what an allocation step reads, and the one transaction that writes it.

Like libcalico-go's block reader/writer beside its pure block methods (:mod:`ipam.blocks`): the allocator decides,
this module reads blocks, affinities, pools and handles at one revision and commits an allocation through
:class:`ipam.cas.CasWriter`.

Each allocation is one etcd transaction that changes the block, the handle's counts and (for a claim) the affinity
together, guarded by the mod_revision of every key it touches (and for a claim, of the block's pool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ipam import blocks, keys
from ipam.cas import CasWriter
from ipam.datastore import Condition, KeyValue, ModRevisionIs, Operation, Put, Snapshot
from ipam.model import Block, BlockAffinity, Handle, IPAddress, IPAMConfig, IPNetwork, IPPool

POOLS = "ippools"
NODES = "nodes"

Extra = Callable[[list[IPAddress]], Sequence[Put]]  # more keys for an allocation's transaction, given its addresses


@dataclass(frozen=True)
class NodeView:
    """What one allocation step needs to know, read at one revision."""

    config: IPAMConfig
    pools: list[IPPool]
    pool_revisions: dict[str, int]  # a block is only claimed for a pool still as read here
    labels: dict[str, str]
    affinities: dict[IPNetwork, tuple[BlockAffinity, KeyValue]]
    handle: KeyValue | None
    blocks: dict[str, KeyValue | None]  # the blocks this node was last seen to own, read in the same snapshot


def _pools(snapshot: Snapshot) -> list[IPPool]:
    return [IPPool.from_v3(kv.json()) for kv in snapshot.prefixes[keys.resource_prefix(POOLS)]]


def _pool_revisions(snapshot: Snapshot) -> dict[str, int]:
    return {kv.key.rsplit("/", 1)[-1]: kv.mod_revision for kv in snapshot.prefixes[keys.resource_prefix(POOLS)]}


class BlockStore:
    """Reads of blocks and a node's view, and allocation writes, through one :class:`CasWriter`."""

    def __init__(self, cas: CasWriter) -> None:
        self.cas = cas
        self.store = cas.store

    async def node_view(self, node: str, version: int, handle_id: str, hinted: Iterable[IPNetwork]) -> NodeView:
        """``node``'s view for an IPv``version`` allocation to ``handle_id``, with the ``hinted`` blocks."""
        affinity_prefix = keys.affinities_prefix(node, version)
        block_keys = [keys.block_key(c) for c in hinted]
        snapshot = await self.store.read(
            keys=[keys.IPAM_CONFIG, keys.resource_key(NODES, node), keys.handle_key(handle_id), *block_keys],
            prefixes=[keys.resource_prefix(POOLS), affinity_prefix],
        )
        config_kv = snapshot.keys[keys.IPAM_CONFIG]
        node_kv = snapshot.keys[keys.resource_key(NODES, node)]
        labels = ((node_kv.json() or {}).get("metadata") or {}).get("labels") or {} if node_kv else {}
        affinities = {}
        for kv in snapshot.prefixes[affinity_prefix]:
            _, cidr = keys.parse_affinity_key(kv.key)
            affinities[cidr] = (BlockAffinity.from_json(node, cidr, kv.json()), kv)
        return NodeView(
            config=IPAMConfig.from_json(config_kv.json() if config_kv else None),
            pools=_pools(snapshot),
            pool_revisions=_pool_revisions(snapshot),
            labels=labels,
            affinities=affinities,
            handle=snapshot.keys[keys.handle_key(handle_id)],
            blocks={k: snapshot.keys[k] for k in block_keys},
        )

    async def blocks(self, version: int) -> dict[IPNetwork, tuple[Block, KeyValue]]:
        """Every IPv``version`` block, by CIDR."""
        found = {}
        for kv in await self.store.get_prefix(keys.blocks_prefix(version)):
            block = Block.from_json(kv.json())
            found[block.cidr] = (block, kv)
        return found

    async def holds(self, cidr: IPNetwork, handle_id: str, addresses: Iterable[IPAddress]) -> bool:
        """Whether block ``cidr`` holds every one of ``addresses`` for ``handle_id``."""
        kv = await self.store.get(keys.block_key(cidr))
        if kv is None:
            return False
        block = Block.from_json(kv.json())
        return all((a := block.attribute_of(block.ordinal(ip))) is not None and a.handle_id == handle_id
                   for ip in addresses)

    async def write_allocation(self, before: KeyValue | None, after: Block, addresses: list[IPAddress],
                               view: NodeView, handle_id: str, claim_for: str | None = None,
                               extra: Extra | None = None) -> None:
        """One transaction: the block (created when ``before`` is None), the handle, and for a claim the
        confirmed affinity of ``claim_for``. Raises :class:`ipam.cas.Conflict` when any of them changed."""
        handle = Handle.from_json(handle_id, view.handle.json()) if view.handle else Handle(handle_id)
        block_key, handle_key = keys.block_key(after.cidr), keys.handle_key(handle_id)
        conditions: list[Condition] = [
            ModRevisionIs(block_key, before.mod_revision if before else 0),
            ModRevisionIs(handle_key, view.handle.mod_revision if view.handle else 0),
        ]
        operations: list[Operation] = [
            Put.json(block_key, after.to_json()),
            Put.json(handle_key, handle.adjusted(after.cidr, len(addresses)).to_json()),
        ]
        if claim_for is not None:
            conditions += _claim_conditions(claim_for, after.cidr, view)
            operations.append(Put.json(keys.affinity_key(claim_for, after.cidr),
                                       BlockAffinity(claim_for, after.cidr).to_json()))
        if extra is not None:
            operations += extra(addresses)
        await self.cas.commit(conditions, operations, landed=lambda: self.holds(after.cidr, handle_id, addresses))
        self.cas.stats["allocations"] += len(addresses)
        if claim_for is not None:
            self.cas.stats["blocks_claimed"] += 1


def _claim_conditions(node: str, cidr: IPNetwork, view: NodeView) -> list[Condition]:
    """A claim's guards: the affinity as read, and the pool as read (a pool deleted, and maybe re-created with
    another blockSize, since gets no block of its old shape)."""
    existing = view.affinities.get(cidr)
    pool = blocks.pool_for_block(cidr, view.pools)
    assert pool is not None, f"claim of {cidr}, which is a block of no pool"
    return [ModRevisionIs(keys.affinity_key(node, cidr), existing[1].mod_revision if existing else 0),
            ModRevisionIs(keys.resource_key(POOLS, pool.name), view.pool_revisions[pool.name])]
