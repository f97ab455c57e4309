"""auto_assign / assign_ip / release: the pure block functions of :mod:`ipam.blocks` wrapped in etcd CAS.

Each write is one etcd transaction that changes the block, the handle's counts and (for a claim) the affinity
together, guarded by the mod_revision of every key it touches (and for a claim, of the block's pool). Calico
writes them one by one (its Kubernetes backend has no multi-key transactions) and so can leave a pending affinity
or an over-counted handle behind after a crash; on etcd we need not. On a failed comparison the operation
re-reads and redoes its step, with jittered backoff, at most ``max_retries`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ipam import blocks, keys
from ipam.datastore import Condition, Datastore, Delete, KeyValue, ModRevisionIs, Operation, Put, Snapshot
from ipam.errors import (
    AddressInUse,
    AddressNotInPool,
    ConflictRetriesExhausted,
    IPAMError,
    NoEligiblePool,
    PoolExhausted,
)
from ipam.model import (
    AllocationAttribute,
    Block,
    BlockAffinity,
    Handle,
    IPAddress,
    IPAMConfig,
    IPNetwork,
    IPPool,
)

POOLS = "ippools"
NODES = "nodes"


class _Conflict(Exception):
    """A compare-and-swap lost a race: re-read and redo."""


@dataclass(frozen=True)
class AssignResult:
    ipv4: list[IPAddress] = field(default_factory=list)
    ipv6: list[IPAddress] = field(default_factory=list)
    also_written: bool = False  # the caller's extra keys went into the allocation's transaction

    @property
    def addresses(self) -> list[IPAddress]:
        return [*self.ipv4, *self.ipv6]


Extra = Callable[[list[IPAddress]], Sequence[Put]]  # more keys for an allocation's transaction, given its addresses


@dataclass(frozen=True)
class _NodeView:
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


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class IPAM:
    """The IPAM client a node daemon, the CNI server and the CLI share."""

    def __init__(self, store: Datastore, *, max_retries: int = 100, clock_ns: Callable[[], int] = time.time_ns):
        self.store = store
        self.max_retries = max_retries
        self._clock_ns = clock_ns
        # Counters for metrics and benchmarks: allocations, releases, conflicts, ambiguous commits resolved.
        self.stats: Counter[str] = Counter()
        # Requests for one node through one client go one at a time (Calico's CNI plugin takes a per-host
        # flock for the same reason): they would only collide on the node's block and retry. Correctness never
        # rests on this lock; other clients and other nodes are kept apart by compare-and-swap alone.
        self._node_locks: dict[str, asyncio.Lock] = {}
        # The blocks each (node, IP version) owned at its last allocation: read with the node's view, they save
        # a round trip per allocation; when the affinities say otherwise, the blocks are read again.
        self._affine_hint: dict[tuple[str, int], list[IPNetwork]] = {}

    # ------------------------------------------------------------------ plumbing

    async def _retry(self, step: Callable[[], object]) -> None:
        # The first attempt runs bare: it nearly always succeeds, and tenacity's machinery costs about half a
        # millisecond a call, a tenth of a CNI ADD. Only a conflict brings in the jittered retries.
        try:
            await step()  # type: ignore[misc]
            return
        except _Conflict:
            if self.max_retries > 1:
                retrying = AsyncRetrying(stop=stop_after_attempt(self.max_retries - 1),
                                         wait=wait_random_exponential(multiplier=0.002, max=0.1),
                                         retry=retry_if_exception_type(_Conflict), reraise=True)
                with contextlib.suppress(_Conflict):
                    async for attempt in retrying:
                        with attempt:
                            await step()  # type: ignore[misc]
                    return
        raise ConflictRetriesExhausted(
            f"gave up after {self.max_retries} conflicting concurrent IPAM writes; retry the request")

    async def _cas(self, conditions: list[Condition], operations: list[Operation],
                   landed: Callable[[], object] | None = None) -> None:
        """Commit or raise _Conflict. After an ambiguous failure, ``landed()`` says whether our earlier attempt
        did commit (the datastore retried across a broken connection)."""
        result = await self.store.txn(conditions, operations)
        if result.succeeded:
            return
        if result.ambiguous and landed is not None and await landed():  # type: ignore[misc]
            self.stats["ambiguous_commits_resolved"] += 1
            return
        self.stats["conflicts"] += 1
        raise _Conflict

    async def _node_view(self, node: str, version: int, handle_id: str) -> _NodeView:
        affinity_prefix = keys.affinities_prefix(node, version)
        block_keys = [keys.block_key(c) for c in self._affine_hint.get((node, version), ())]
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
        return _NodeView(
            config=IPAMConfig.from_json(config_kv.json() if config_kv else None),
            pools=_pools(snapshot),
            pool_revisions=_pool_revisions(snapshot),
            labels=labels,
            affinities=affinities,
            handle=snapshot.keys[keys.handle_key(handle_id)],
            blocks={k: snapshot.keys[k] for k in block_keys},
        )

    async def _blocks(self, version: int) -> dict[IPNetwork, tuple[Block, KeyValue]]:
        found = {}
        for kv in await self.store.get_prefix(keys.blocks_prefix(version)):
            block = Block.from_json(kv.json())
            found[block.cidr] = (block, kv)
        return found

    async def _holds(self, cidr: IPNetwork, handle_id: str, addresses: Iterable[IPAddress]) -> bool:
        kv = await self.store.get(keys.block_key(cidr))
        if kv is None:
            return False
        block = Block.from_json(kv.json())
        return all((a := block.attribute_of(block.ordinal(ip))) is not None and a.handle_id == handle_id
                   for ip in addresses)

    async def _write_allocation(self, before: KeyValue | None, after: Block, addresses: list[IPAddress],
                                view: _NodeView, handle_id: str, claim_for: str | None = None,
                                extra: Extra | None = None) -> None:
        """One transaction: the block (created when ``before`` is None), the handle, and for a claim the
        confirmed affinity of ``claim_for``."""
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
            affinity_key = keys.affinity_key(claim_for, after.cidr)
            existing = view.affinities.get(after.cidr)
            conditions.append(ModRevisionIs(affinity_key, existing[1].mod_revision if existing else 0))
            operations.append(Put.json(affinity_key, BlockAffinity(claim_for, after.cidr).to_json()))
            # The pool as read: a pool deleted (and maybe re-created with another blockSize) since gets no block
            # of its old shape.
            pool = blocks.pool_for_block(after.cidr, view.pools)
            assert pool is not None, f"claim of {after.cidr}, which is a block of no pool"
            conditions.append(ModRevisionIs(keys.resource_key(POOLS, pool.name), view.pool_revisions[pool.name]))
        if extra is not None:
            operations += extra(addresses)
        await self._cas(conditions, operations, landed=lambda: self._holds(after.cidr, handle_id, addresses))
        self.stats["allocations"] += len(addresses)
        if claim_for is not None:
            self.stats["blocks_claimed"] += 1

    def _new_block(self, cidr: IPNetwork, node: str) -> Block:
        return blocks.new_block(cidr, node, self._clock_ns(), _now_rfc3339())

    # ------------------------------------------------------------------ auto-assign

    async def auto_assign(self, handle_id: str, node: str, num_v4: int = 1, num_v6: int = 0,
                          pools: Sequence[str] | None = None, attrs: Mapping[str, str] | None = None,
                          use: str = "Workload", also: Extra | None = None) -> AssignResult:
        """Allocate ``num_v4`` + ``num_v6`` addresses for ``handle_id`` on ``node``; all or nothing.

        ``also(addresses)`` gives more keys to write in the allocation's own transaction (a CNI ADD's endpoint
        record: one round trip less, and never an address without its record). Only a single-address request is
        one transaction; otherwise ``also`` is not used, and ``AssignResult.also_written`` is False."""
        secondary = {**(attrs or {}), "node": node, "timestamp": _now_rfc3339()}
        attribute = AllocationAttribute(handle_id, secondary)
        got: dict[int, list[IPAddress]] = {4: [], 6: []}
        extra = also if num_v4 + num_v6 == 1 else None
        lock = self._node_locks.setdefault(node, asyncio.Lock())
        async with lock:
            result = await self._auto_assign_locked(handle_id, node, {4: num_v4, 6: num_v6}, attribute, pools, use,
                                                    got, extra)
        return dataclasses.replace(result, also_written=extra is not None)

    async def _auto_assign_locked(self, handle_id: str, node: str, counts: dict[int, int],
                                  attribute: AllocationAttribute, pools: Sequence[str] | None, use: str,
                                  got: dict[int, list[IPAddress]], extra: Extra | None) -> AssignResult:
        try:
            for version, count in counts.items():
                while len(got[version]) < count:
                    async def step(version: int = version, count: int = count) -> None:
                        got[version] += await self._assign_step(
                            handle_id, node, version, count - len(got[version]), attribute, pools, use, extra)
                    await self._retry(step)
        except BaseException:
            taken = got[4] + got[6]
            if taken:  # all or nothing: give back what this request took
                await self.release_ips(taken, handle_id=handle_id)
            raise
        return AssignResult(ipv4=got[4], ipv6=got[6])

    async def _assign_step(self, handle_id: str, node: str, version: int, wanted: int,
                           attribute: AllocationAttribute, requested: Sequence[str] | None,
                           use: str, extra: Extra | None = None) -> list[IPAddress]:
        view = await self._node_view(node, version, handle_id)
        pools = blocks.eligible_pools(view.pools, version, view.labels, requested, use)
        if not pools:
            raise NoEligiblePool(self._no_pool_reason(view.pools, version, node, requested))

        # 1. The node's own confirmed blocks: blocks of an eligible pool (inside it, of its blockSize).
        affine = sorted(c for c, (a, _) in view.affinities.items() if a.confirmed and blocks.pool_for_block(c, pools))
        existing: dict[IPNetwork, tuple[Block, KeyValue]] | None = None
        if affine:
            found = view.blocks
            if any(keys.block_key(c) not in found for c in affine):
                # New affine blocks are checked against every block once; a hinted block passed that check, and
                # no block can appear over it since (pools refuse misfit blocks; claims are guarded by the pool).
                existing = await self._blocks(version)
                affine = [c for c in affine if not any(c.overlaps(e) for e in existing if e != c)]  # type: ignore[arg-type]
                found = {keys.block_key(c): existing[c][1] if c in existing else None for c in affine}
                self._affine_hint[(node, version)] = affine
            for cidr in affine:
                kv = found[keys.block_key(cidr)]
                if kv is None:  # an affinity without its block (left by Calico mid-claim): re-create the block
                    return await self._claim(cidr, node, view, wanted, attribute, handle_id, extra)
                block = Block.from_json(kv.json())
                if block.host == node and block.free:
                    after, addresses = blocks.allocate(block, wanted, attribute)
                    await self._write_allocation(kv, after, addresses, view, handle_id, extra=extra)
                    return addresses

        # 2. A new block.
        if existing is None:
            existing = await self._blocks(version)
        cap = view.config.max_blocks_per_host
        if view.config.auto_allocate_blocks and (cap == 0 or len(affine) < cap):
            cidr = blocks.choose_new_block(pools, {c: b for c, (b, _) in existing.items()}, node)
            if cidr is not None:
                return await self._claim(cidr, node, view, wanted, attribute, handle_id, extra)

        # 3. Borrow from another node's block.
        if view.config.strict_affinity:
            raise PoolExhausted(
                f"no free block for node {node} in {self._pool_names(pools)} and strictAffinity forbids "
                "borrowing; add a pool or release addresses")
        for block in blocks.borrow_candidates(pools, {c: b for c, (b, _) in existing.items()}, node):
            after, addresses = blocks.allocate(block, wanted, attribute)
            await self._write_allocation(existing[block.cidr][1], after, addresses, view, handle_id,
                                         extra=extra)
            self.stats["borrowed"] += len(addresses)
            return addresses
        raise PoolExhausted(f"{self._pool_names(pools)} exhausted: no free address for node {node}; "
                            "add a pool or release addresses")

    async def _claim(self, cidr: IPNetwork, node: str, view: _NodeView, wanted: int,
                     attribute: AllocationAttribute, handle_id: str, extra: Extra | None = None) -> list[IPAddress]:
        after, addresses = blocks.allocate(self._new_block(cidr, node), wanted, attribute)
        await self._write_allocation(None, after, addresses, view, handle_id, claim_for=node, extra=extra)
        return addresses

    @staticmethod
    def _pool_names(pools: Sequence[IPPool]) -> str:
        return "pool " + ", ".join(f"{p.name} ({p.cidr})" for p in pools)

    @staticmethod
    def _no_pool_reason(pools: list[IPPool], version: int, node: str, requested: Sequence[str] | None) -> str:
        family = [p for p in pools if p.version == version]
        if not family:
            return f"no IPv{version} pool exists; create one (e.g. calicoctl-py apply -f pool.yaml)"
        if requested:
            return (f"requested pools {', '.join(requested)} are not enabled IPv{version} pools usable by node "
                    f"{node} (known: {', '.join(p.name for p in family)})")
        return (f"no enabled IPv{version} pool selects node {node} "
                f"(check the pools' nodeSelector and disabled fields)")

    # ------------------------------------------------------------------ a specific address

    async def assign_ip(self, address: IPAddress, handle_id: str, node: str,
                        attrs: Mapping[str, str] | None = None) -> None:
        """Allocate exactly ``address`` (e.g. a pod's fixed-IP annotation)."""
        attribute = AllocationAttribute(handle_id, {**(attrs or {}), "node": node, "timestamp": _now_rfc3339()})

        async def step() -> None:
            view = await self._node_view(node, address.version, handle_id)
            pool = next((p for p in view.pools if not p.disabled and address in p.cidr), None)
            if pool is None:
                raise AddressNotInPool(f"{address} is not in any enabled IP pool")
            existing = await self._blocks(address.version)
            cidr = blocks.block_containing(address, pool.block_size)
            clashing = sorted(c for c in existing if c != cidr and c.overlaps(cidr))  # type: ignore[arg-type]
            if clashing:
                raise AddressInUse(
                    f"{address}: block {cidr} of pool {pool.name!r} overlaps block {', '.join(map(str, clashing))} "
                    "of another blockSize; release that block's addresses first")
            if cidr not in existing:
                after = blocks.allocate_address(self._new_block(cidr, node), address, attribute)
                await self._write_allocation(None, after, [address], view, handle_id, claim_for=node)
                return
            block, kv = existing[cidr]
            if view.config.strict_affinity and block.host != node:
                raise AddressInUse(f"{address} lies in block {cidr} of node {block.host} and strictAffinity "
                                   "forbids borrowing it")
            after = blocks.allocate_address(block, address, attribute)
            await self._write_allocation(kv, after, [address], view, handle_id)

        async with self._node_locks.setdefault(node, asyncio.Lock()):
            await self._retry(step)

    # ------------------------------------------------------------------ release

    async def release_ips(self, addresses: Iterable[IPAddress], handle_id: str | None = None,
                          sequence_numbers: Mapping[IPAddress, int] | None = None) -> list[IPAddress]:
        """Free addresses (only those held by ``handle_id`` when given; only at the given allocation sequence
        numbers when given). Returns the addresses that were not freed because they were not so allocated."""
        wanted = list(dict.fromkeys(addresses))
        by_block: dict[IPNetwork, list[IPAddress]] = {}
        for version in sorted({a.version for a in wanted}):
            cidrs = list(await self._blocks(version))
            for address in (a for a in wanted if a.version == version):
                cidr = next((c for c in cidrs if address in c), None)
                if cidr is not None:
                    by_block.setdefault(cidr, []).append(address)
        freed: list[IPAddress] = []
        for cidr, group in by_block.items():
            def select(block: Block, group: list[IPAddress] = group) -> list[IPAddress]:
                return [a for a in group if (attr := block.attribute_of(block.ordinal(a))) is not None
                        and (handle_id is None or attr.handle_id == handle_id)]
            freed += await self._release_in_block(cidr, select, sequence_numbers)
        done = set(freed)
        return [a for a in wanted if a not in done]

    async def release_by_handle(self, handle_id: str) -> list[IPAddress]:
        """Free everything ``handle_id`` holds; a missing handle is success (idempotent DEL)."""
        kv = await self.store.get(keys.handle_key(handle_id))
        if kv is None:
            return []
        freed: list[IPAddress] = []
        for cidr_text in Handle.from_json(handle_id, kv.json()).blocks:
            freed += await self._release_in_block(
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
            await self._cas([ModRevisionIs(kv.key, kv.mod_revision)], [Delete(kv.key)])
        await self._retry(step)

    async def _release_in_block(self, cidr: IPNetwork, select: Callable[[Block], list[IPAddress]],
                                sequence_numbers: Mapping[IPAddress, int] | None) -> list[IPAddress]:
        freed: list[IPAddress] = []

        async def step() -> None:
            block_key = keys.block_key(cidr)
            kv = await self.store.get(block_key)
            if kv is None:
                return
            block = Block.from_json(kv.json())
            after, released = blocks.release(block, select(block), sequence_numbers)
            if not released:
                return
            per_handle = Counter(block.attribute_of(block.ordinal(a)).handle_id for a in released)  # type: ignore[union-attr]
            handle_ids = [h for h in per_handle if h is not None]
            affinity_key = keys.affinity_key(block.host, cidr) if block.host else None
            snapshot = await self.store.read(keys=[keys.handle_key(h) for h in handle_ids]
                                             + ([affinity_key] if affinity_key else []))
            conditions: list[Condition] = [ModRevisionIs(block_key, kv.mod_revision)]
            operations: list[Operation] = []
            affinity_kv = snapshot.keys.get(affinity_key) if affinity_key else None
            owned = affinity_kv is not None and BlockAffinity.from_json(
                block.host or "", cidr, affinity_kv.json()).confirmed
            if affinity_key:
                conditions.append(ModRevisionIs(affinity_key, affinity_kv.mod_revision if affinity_kv else 0))
            # An empty block nobody owns goes; an empty affine block stays with its node.
            operations.append(Delete(block_key) if after.is_empty and not owned
                              else Put.json(block_key, after.to_json()))
            for handle_id in handle_ids:
                handle_kv = snapshot.keys[keys.handle_key(handle_id)]
                conditions.append(ModRevisionIs(keys.handle_key(handle_id), handle_kv.mod_revision if handle_kv else 0))
                if handle_kv is None:
                    continue
                handle = Handle.from_json(handle_id, handle_kv.json()).adjusted(cidr, -per_handle[handle_id])
                operations.append(Put.json(handle_kv.key, handle.to_json()) if handle.total
                                  else Delete(handle_kv.key))

            async def landed() -> bool:
                now = await self.store.get(block_key)
                if now is None:
                    return True
                current = Block.from_json(now.json())
                return all(current.allocations[current.ordinal(a)] is None for a in released)

            await self._cas(conditions, operations, landed)
            freed[:] = released
            self.stats["releases"] += len(released)

        await self._retry(step)
        return freed

    # ------------------------------------------------------------------ configuration

    async def get_config(self) -> IPAMConfig:
        kv = await self.store.get(keys.IPAM_CONFIG)
        return IPAMConfig.from_json(kv.json() if kv else None)

    async def set_config(self, config: IPAMConfig) -> None:
        if not config.auto_allocate_blocks and not config.strict_affinity:
            raise IPAMError("autoAllocateBlocks=false needs strictAffinity=true (otherwise nodes borrow freely)")

        async def step() -> None:
            kv = await self.store.get(keys.IPAM_CONFIG)
            await self._cas([ModRevisionIs(keys.IPAM_CONFIG, kv.mod_revision if kv else 0)],
                            [Put.json(keys.IPAM_CONFIG, config.to_json())])
        await self._retry(step)

