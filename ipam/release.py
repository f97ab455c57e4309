"""Releasing addresses: block by block, each block in one transaction with the handles it frees and its affinity.

An empty block that no node owns (no confirmed affinity) is deleted in the same transaction; an empty affine block
stays with its node. A handle whose count drops to zero is deleted with it.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from ipam import blocks, keys
from ipam.blockstore import BlockStore
from ipam.cas import CasWriter
from ipam.datastore import Condition, Delete, KeyValue, ModRevisionIs, Operation, Put, Snapshot
from ipam.model import Block, BlockAffinity, Handle, IPAddress, IPNetwork

Select = Callable[[Block], list[IPAddress]]  # the addresses of a block to release


class Releaser:
    """Frees addresses by address or by handle, through one :class:`CasWriter`."""

    def __init__(self, cas: CasWriter, block_store: BlockStore) -> None:
        self.cas = cas
        self.store = cas.store
        self.block_store = block_store

    async def release_ips(self, addresses: Iterable[IPAddress], handle_id: str | None = None,
                          sequence_numbers: Mapping[IPAddress, int] | None = None) -> list[IPAddress]:
        """Free addresses (only those held by ``handle_id`` when given; only at the given allocation sequence
        numbers when given). Returns the addresses that were not freed because they were not so allocated."""
        wanted = list(dict.fromkeys(addresses))
        by_block: dict[IPNetwork, list[IPAddress]] = {}
        for version in sorted({a.version for a in wanted}):
            cidrs = list(await self.block_store.blocks(version))
            for address in (a for a in wanted if a.version == version):
                cidr = next((c for c in cidrs if address in c), None)
                if cidr is not None:
                    by_block.setdefault(cidr, []).append(address)
        freed: list[IPAddress] = []
        for cidr, group in by_block.items():
            def select(block: Block, group: list[IPAddress] = group) -> list[IPAddress]:
                return [a for a in group if (attr := block.attribute_of(block.ordinal(a))) is not None
                        and (handle_id is None or attr.handle_id == handle_id)]
            freed += await self.release_in_block(cidr, select, sequence_numbers)
        done = set(freed)
        return [a for a in wanted if a not in done]

    async def release_by_handle(self, handle_id: str) -> list[IPAddress]:
        """Free everything ``handle_id`` holds; a missing handle is success (idempotent DEL)."""
        kv = await self.store.get(keys.handle_key(handle_id))
        if kv is None:
            return []
        freed: list[IPAddress] = []
        for cidr_text in Handle.from_json(handle_id, kv.json()).blocks:
            freed += await self.release_in_block(
                ipaddress.ip_network(cidr_text), lambda b: blocks.addresses_of_handle(b, handle_id), None)
        await self._drop_empty_handle(handle_id)
        return freed

    async def _drop_empty_handle(self, handle_id: str) -> None:
        """Delete a handle that still exists though its blocks no longer hold it (stale counts)."""
        async def step() -> None:
            kv = await self.store.get(keys.handle_key(handle_id))
            if kv is None:
                return
            handle = Handle.from_json(handle_id, kv.json())
            snapshot = await self.store.read(keys=[keys.block_key(ipaddress.ip_network(c))
                                                   for c in handle.blocks])
            for found in snapshot.keys.values():
                if found is not None and blocks.addresses_of_handle(Block.from_json(found.json()), handle_id):
                    return
            await self.cas.commit([ModRevisionIs(kv.key, kv.mod_revision)], [Delete(kv.key)])
        await self.cas.retry(step)

    async def release_in_block(self, cidr: IPNetwork, select: Select,
                               sequence_numbers: Mapping[IPAddress, int] | None) -> list[IPAddress]:
        """Free the addresses ``select`` picks in block ``cidr`` (at ``sequence_numbers`` when given), in one
        transaction; returns those freed."""
        freed: list[IPAddress] = []

        async def step() -> None:
            kv = await self.store.get(keys.block_key(cidr))
            if kv is None:
                return
            block = Block.from_json(kv.json())
            after, released = blocks.release(block, select(block), sequence_numbers)
            if not released:
                return
            per_handle = Counter(block.attribute_of(block.ordinal(a)).handle_id for a in released)  # type: ignore[union-attr]
            affinity_key = keys.affinity_key(block.host, cidr) if block.host else None
            snapshot = await self.store.read(keys=[keys.handle_key(h) for h in per_handle if h is not None]
                                             + ([affinity_key] if affinity_key else []))
            conditions, operations = release_transaction(cidr, kv, block, after, per_handle, affinity_key, snapshot)
            await self.cas.commit(conditions, operations, lambda: self._released(cidr, released))
            freed[:] = released
            self.cas.stats["releases"] += len(released)

        await self.cas.retry(step)
        return freed

    async def _released(self, cidr: IPNetwork, addresses: list[IPAddress]) -> bool:
        """Whether none of ``addresses`` is allocated in block ``cidr`` (gone counts as released)."""
        now = await self.store.get(keys.block_key(cidr))
        if now is None:
            return True
        current = Block.from_json(now.json())
        return all(current.allocations[current.ordinal(a)] is None for a in addresses)


def release_transaction(cidr: IPNetwork, kv: KeyValue, block: Block, after: Block, per_handle: Counter[str | None],
                        affinity_key: str | None, snapshot: Snapshot) -> tuple[list[Condition], list[Operation]]:
    """The guarded transaction that turns block ``cidr`` (read as ``kv``, decoded as ``block``) into ``after``:
    the block written (or deleted when empty and affine to no node), each handle's count lowered by ``per_handle``
    (deleted at zero). ``snapshot`` holds the handles and the block's affinity (``affinity_key``) as read."""
    conditions: list[Condition] = [ModRevisionIs(kv.key, kv.mod_revision)]
    operations: list[Operation] = []
    affinity_kv = snapshot.keys.get(affinity_key) if affinity_key else None
    owned = affinity_kv is not None and BlockAffinity.from_json(block.host or "", cidr, affinity_kv.json()).confirmed
    if affinity_key:
        conditions.append(ModRevisionIs(affinity_key, affinity_kv.mod_revision if affinity_kv else 0))
    # An empty block nobody owns goes; an empty affine block stays with its node.
    operations.append(Delete(kv.key) if after.is_empty and not owned else Put.json(kv.key, after.to_json()))
    for handle_id in (h for h in per_handle if h is not None):
        handle_kv = snapshot.keys[keys.handle_key(handle_id)]
        conditions.append(ModRevisionIs(keys.handle_key(handle_id), handle_kv.mod_revision if handle_kv else 0))
        if handle_kv is None:
            continue
        handle = Handle.from_json(handle_id, handle_kv.json()).adjusted(cidr, -per_handle[handle_id])
        operations.append(Put.json(handle_kv.key, handle.to_json()) if handle.total else Delete(handle_kv.key))
    return conditions, operations
