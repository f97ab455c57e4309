"""IPPool resources in etcd: validated, overlap-free, written with compare-and-swap."""

from __future__ import annotations

from ipam import keys
from ipam.datastore import Datastore, Delete, ModRevisionIs, PrefixUnchangedSince, Put
from ipam.errors import InvalidResource, ResourceExists, ResourceNotFound
from ipam.model import IPPool, check_overlap

PLURAL = "ippools"
PREFIX = keys.resource_prefix(PLURAL)


async def list_pools(store: Datastore) -> list[IPPool]:
    return sorted((IPPool.from_v3(kv.json()) for kv in await store.get_prefix(PREFIX)), key=lambda p: p.name)


async def get_pool(store: Datastore, name: str) -> IPPool | None:
    kv = await store.get(keys.resource_key(PLURAL, name))
    return IPPool.from_v3(kv.json()) if kv else None


async def save_pool(store: Datastore, pool: IPPool, *, create: bool = True, replace: bool = True) -> None:
    """Write a pool after checking it against every other pool, atomically: the write only happens if no pool
    was added or changed since we read them, so two overlapping pools can never both land."""
    key = keys.resource_key(PLURAL, pool.name)
    snapshot = await store.read(prefixes=[PREFIX])
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
    result = await store.txn([PrefixUnchangedSince(PREFIX, snapshot.revision)], [Put.json(key, pool.to_v3())])
    if not result.succeeded:
        # Someone changed the pools meanwhile; checking again against what they wrote is the only safe answer.
        await save_pool(store, pool, create=create, replace=replace)


async def delete_pool(store: Datastore, name: str) -> None:
    key = keys.resource_key(PLURAL, name)
    kv = await store.get(key)
    if kv is None:
        raise ResourceNotFound(f"IPPool {name!r} does not exist")
    await store.txn([ModRevisionIs(key, kv.mod_revision)], [Delete(key)])
