"""IPPool resources in etcd: validated, overlap-free, written with compare-and-swap.

Creating a pool refuses existing blocks in its range that are not of its blockSize; deleting one takes its blocks
and affinities with it (:func:`plan_removal` decides what goes, :func:`delete_pool` writes it), so a pool deleted
and created again with another blockSize never finds an old block to allocate from.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ipam import blocks, keys
from ipam.datastore import Condition, Datastore, Delete, KeyValue, ModRevisionIs, Operation, PrefixUnchangedSince, Put
from ipam.errors import ConflictRetriesExhausted, InvalidResource, IPAMError, ResourceExists, ResourceNotFound
from ipam.model import Block, IPNetwork, IPPool, check_overlap

PLURAL = "ippools"
PREFIX = keys.resource_prefix(PLURAL)
# etcd refuses a transaction with more operations than its --max-txn-ops (128 by default).
MAX_TXN_OPS = 128
DELETE_ATTEMPTS = 100


class PoolInUse(IPAMError):
    """Delete of a pool whose blocks still hold addresses, without force."""


async def list_pools(store: Datastore) -> list[IPPool]:
    return sorted((IPPool.from_v3(kv.json()) for kv in await store.get_prefix(PREFIX)), key=lambda p: p.name)


async def get_pool(store: Datastore, name: str) -> IPPool | None:
    kv = await store.get(keys.resource_key(PLURAL, name))
    return IPPool.from_v3(kv.json()) if kv else None


def block_cidrs(kvs: Iterable[KeyValue]) -> list[IPNetwork]:
    """The CIDRs of block keys, from the keys alone (no block JSON to parse)."""
    return [keys.parse_cidr_segment(kv.key.rsplit("/", 1)[-1]) for kv in kvs]


def check_blocks_fit(pool: IPPool, existing: Iterable[IPNetwork]) -> None:
    """Refuse a new pool over blocks that are not of its blockSize (left by a deleted pool whose blocks still hold
    addresses): its own blocks would overlap them and hand out their addresses a second time."""
    misfits = blocks.misfits(pool, existing)
    if misfits:
        shown = ", ".join(map(str, misfits[:5])) + (f" and {len(misfits) - 5} more" if len(misfits) > 5 else "")
        raise InvalidResource("IPPool", pool.name, "spec.blockSize",
                              f"{pool.block_size} conflicts with existing blocks {shown}; "
                              "release their addresses first")


async def save_pool(store: Datastore, pool: IPPool, *, create: bool = True, replace: bool = True) -> None:
    """Write a pool after checking it against every other pool, atomically: the write only happens if no pool
    was added or changed since we read them, so two overlapping pools can never both land. A new pool is also
    checked against the existing blocks (:func:`check_blocks_fit`)."""
    key = keys.resource_key(PLURAL, pool.name)
    blocks_prefix = keys.blocks_prefix(pool.version)
    snapshot = await store.read(prefixes=[PREFIX, blocks_prefix])
    others = [IPPool.from_v3(kv.json()) for kv in snapshot.prefixes[PREFIX]]
    current = next((p for p in others if p.name == pool.name), None)
    if current is None and not create:
        raise ResourceNotFound(f"IPPool {pool.name!r} does not exist")
    if current is not None:
        if not replace:
            raise ResourceExists(f"IPPool {pool.name!r} already exists")
        for field, old, new in (("spec.cidr", current.cidr, pool.cidr),
                                ("spec.blockSize", current.block_size, pool.block_size)):
            if old != new:
                raise InvalidResource("IPPool", pool.name, field,
                                      f"cannot change {old} to {new} on an existing pool; create a new pool")
    check_overlap(pool, others)
    if current is None:
        check_blocks_fit(pool, block_cidrs(snapshot.prefixes[blocks_prefix]))
    result = await store.txn([PrefixUnchangedSince(PREFIX, snapshot.revision)], [Put.json(key, pool.to_v3())])
    if not result.succeeded:
        # Someone changed the pools meanwhile; checking again against what they wrote is the only safe answer.
        await save_pool(store, pool, create=create, replace=replace)


# ------------------------------------------------------------------ delete


@dataclass(frozen=True)
class BlockRemoval:
    """What deleting a pool does to one of its blocks, guarded by the revisions read."""

    cidr: IPNetwork
    conditions: tuple[Condition, ...]
    operations: tuple[Operation, ...]
    kept: bool  # still holds addresses: stays, affine to no node, so nothing new is allocated from it
    block_deleted: bool  # False for a kept block, and for affinities whose block no longer exists


@dataclass(frozen=True)
class PoolRemoval:
    """Everything deleting a pool writes, planned from one read."""

    pool: IPPool
    in_use: int
    blocks: tuple[BlockRemoval, ...]
    final_conditions: tuple[Condition, ...]  # the pool as read, and no block created since the read
    final_operations: tuple[Operation, ...]

    def as_one_transaction(self) -> tuple[list[Condition], list[Operation]]:
        conditions = [*self.final_conditions, *(c for b in self.blocks for c in b.conditions)]
        operations = [*self.final_operations, *(o for b in self.blocks for o in b.operations)]
        return conditions, operations

    @property
    def deleted_blocks(self) -> list[IPNetwork]:
        return [b.cidr for b in self.blocks if b.block_deleted]

    @property
    def kept_blocks(self) -> list[IPNetwork]:
        return [b.cidr for b in self.blocks if b.kept]

    def summary(self) -> str:
        """One line saying what the deletion took with it."""
        line = f"IPPool {self.pool.name!r} deleted"
        released, kept = len(self.deleted_blocks), self.kept_blocks
        if released:
            line += f", with {released} empty block{'s' if released != 1 else ''} and their affinities"
        if kept:
            line += (f"; {len(kept)} block{'s' if len(kept) != 1 else ''} still holding {self.in_use} addresses "
                     f"kept, affine to no node ({', '.join(map(str, kept))})")
        return line


def plan_removal(pool: IPPool, pool_revision: int, found_blocks: Mapping[IPNetwork, tuple[Block, int]],
                 affinities: Mapping[tuple[str, IPNetwork], int], revision: int, force: bool) -> PoolRemoval:
    """Delete the pool, its empty blocks and every affinity for a block in it (with or without its block); with
    ``force`` a block still holding addresses stays, with its affinity removed. ``found_blocks`` and
    ``affinities`` (node, cidr) map to mod revisions, all read at ``revision``.

    Raises :class:`PoolInUse` when blocks hold addresses and not ``force``."""
    def inside(cidr: IPNetwork) -> bool:
        return cidr.version == pool.version and cidr.subnet_of(pool.cidr)  # type: ignore[arg-type]

    in_use = sum(block.in_use for cidr, (block, _) in found_blocks.items() if inside(cidr))
    if in_use and not force:
        raise PoolInUse(f"IPPool {pool.name!r} still has {in_use} addresses allocated; release them, or use "
                        "--force to delete it anyway (their blocks stay, but no node allocates from them)")
    affinities_of: dict[IPNetwork, list[tuple[str, int]]] = {}
    for (node, cidr), affinity_revision in sorted(affinities.items(), key=lambda item: (item[0][1], item[0][0])):
        if inside(cidr):
            affinities_of.setdefault(cidr, []).append((node, affinity_revision))
    removals = []
    for cidr in sorted(set(affinities_of) | {c for c in found_blocks if inside(c)}):
        conditions: list[Condition] = []
        operations: list[Operation] = []
        kept = deleted = False
        if cidr in found_blocks:
            block, block_revision = found_blocks[cidr]
            kept = not block.is_empty
            deleted = not kept
            conditions.append(ModRevisionIs(keys.block_key(cidr), block_revision))
            operations.append(Put.json(keys.block_key(cidr), blocks.with_affinity(block, None).to_json()) if kept
                              else Delete(keys.block_key(cidr)))
        for node, affinity_revision in affinities_of.get(cidr, []):
            conditions.append(ModRevisionIs(keys.affinity_key(node, cidr), affinity_revision))
            operations.append(Delete(keys.affinity_key(node, cidr)))
        removals.append(BlockRemoval(cidr, tuple(conditions), tuple(operations), kept, deleted))
    pool_key = keys.resource_key(PLURAL, pool.name)
    return PoolRemoval(
        pool=pool, in_use=in_use, blocks=tuple(removals),
        final_conditions=(ModRevisionIs(pool_key, pool_revision),
                          PrefixUnchangedSince(keys.blocks_prefix(pool.version), revision)),
        final_operations=(Delete(pool_key),),
    )


def first_steps(removal: PoolRemoval, max_ops: int) -> list[BlockRemoval]:
    """As many block removals as fit in one transaction of ``max_ops``, from the start."""
    taken: list[BlockRemoval] = []
    size = 0
    for step in removal.blocks:
        size += max(len(step.conditions), len(step.operations))
        if taken and size > max_ops:
            break
        taken.append(step)
    return taken


async def _read_for_removal(store: Datastore, name: str, force: bool) -> tuple[KeyValue, PoolRemoval]:
    pool_key = keys.resource_key(PLURAL, name)
    snapshot = await store.read(keys=[pool_key], prefixes=[keys.blocks_prefix(4), keys.blocks_prefix(6), keys.HOSTS])
    kv = snapshot.keys[pool_key]
    if kv is None:
        raise ResourceNotFound(f"IPPool {name!r} does not exist")
    pool = IPPool.from_v3(kv.json())
    found_blocks = {}
    for block_kv in snapshot.prefixes[keys.blocks_prefix(4)] + snapshot.prefixes[keys.blocks_prefix(6)]:
        block = Block.from_json(block_kv.json())
        found_blocks[block.cidr] = (block, block_kv.mod_revision)
    affinities = {keys.parse_affinity_key(a.key): a.mod_revision
                  for a in snapshot.prefixes[keys.HOSTS] if "/block/" in a.key}
    return kv, plan_removal(pool, kv.mod_revision, found_blocks, affinities, snapshot.revision, force)


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, min(0.1, 0.002 * 2 ** attempt)))


async def delete_pool(store: Datastore, name: str, *, force: bool = False,
                      max_ops: int = MAX_TXN_OPS) -> PoolRemoval:
    """Delete a pool with its blocks and affinities (:func:`plan_removal`) in one transaction, re-read and
    re-planned when something changed meanwhile.

    A removal too large for one etcd transaction first disables the pool (a claim is guarded by its pool's
    revision, so none lands after that), then removes the blocks in transactions of ``max_ops``, and deletes the
    pool with the last of them. Refused without force (:class:`PoolInUse`) before anything is written; should
    addresses appear in the pool meanwhile, the pool is put back as it was."""
    for attempt in range(DELETE_ATTEMPTS):
        kv, removal = await _read_for_removal(store, name, force)
        conditions, operations = removal.as_one_transaction()
        if max(len(conditions), len(operations)) > max_ops:
            return await _delete_in_steps(store, kv, force, max_ops)
        if (await store.txn(conditions, operations)).succeeded:
            return removal
        await _backoff(attempt)
    raise ConflictRetriesExhausted(f"IPPool {name!r}: its blocks kept changing while it was being deleted; "
                                   "run the command again")


async def _delete_in_steps(store: Datastore, original: KeyValue, force: bool, max_ops: int) -> PoolRemoval:
    pool = IPPool.from_v3(original.json())
    disabled = {**pool.to_v3(), "spec": {**pool.to_v3()["spec"], "disabled": True}}
    disabling = await store.txn([ModRevisionIs(original.key, original.mod_revision)],
                                [Put.json(original.key, disabled)])
    if not disabling.succeeded:
        raise ConflictRetriesExhausted(f"IPPool {pool.name!r} changed while it was being deleted; "
                                       "run the command again")
    removed: list[BlockRemoval] = []
    failures = 0
    while failures < DELETE_ATTEMPTS:
        try:
            _, removal = await _read_for_removal(store, pool.name, force)
        except PoolInUse:
            # Put back as it was, unless someone changed it since it was disabled.
            await store.txn([ModRevisionIs(original.key, disabling.revision)], [Put(original.key, original.value)])
            raise
        conditions, operations = removal.as_one_transaction()
        if max(len(conditions), len(operations)) <= max_ops:
            if (await store.txn(conditions, operations)).succeeded:
                return _summary(removal, removed)
        else:
            steps = first_steps(removal, max_ops)
            step_conditions = [c for s in steps for c in s.conditions]
            if (await store.txn(step_conditions, [o for s in steps for o in s.operations])).succeeded:
                removed += steps
                continue
        failures += 1
        await _backoff(failures)
    raise ConflictRetriesExhausted(f"IPPool {pool.name!r}: its blocks kept changing while it was being deleted; "
                                   "it is disabled now; run the command again")


def _summary(last: PoolRemoval, earlier: Sequence[BlockRemoval]) -> PoolRemoval:
    return PoolRemoval(pool=last.pool, in_use=last.in_use, blocks=(*earlier, *last.blocks),
                       final_conditions=last.final_conditions, final_operations=last.final_operations)

