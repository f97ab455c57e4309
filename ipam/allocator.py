"""The IPAM client: auto_assign / assign_ip / release, deciding with :mod:`ipam.blocks` and writing through
:mod:`ipam.blockstore` and :mod:`ipam.release`, every write a compare-and-swap (:mod:`ipam.cas`).

Each write is one etcd transaction that changes the block, the handle's counts and (for a claim) the affinity
together, guarded by the mod_revision of every key it touches (and for a claim, of the block's pool). Calico
writes them one by one (its Kubernetes backend has no multi-key transactions) and so can leave a pending affinity
or an over-counted handle behind after a crash; on etcd we need not. On a failed comparison the operation
re-reads and redoes its step, with jittered backoff, at most ``max_retries`` times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ipam import blocks, keys
from ipam.blockstore import BlockStore, Extra, NodeView
from ipam.cas import CasWriter
from ipam.datastore import Datastore, KeyValue, ModRevisionIs, Put
from ipam.errors import AddressInUse, AddressNotInPool, IPAMError, NoEligiblePool, PoolExhausted
from ipam.model import AllocationAttribute, Block, IPAddress, IPAMConfig, IPNetwork, IPPool
from ipam.release import Releaser

__all__ = ["IPAM", "AssignResult", "Extra"]


@dataclass(frozen=True)
class AssignResult:
    ipv4: list[IPAddress] = field(default_factory=list)
    ipv6: list[IPAddress] = field(default_factory=list)
    also_written: bool = False  # the caller's extra keys went into the allocation's transaction

    @property
    def addresses(self) -> list[IPAddress]:
        return [*self.ipv4, *self.ipv6]


@dataclass(frozen=True)
class _Want:
    """One allocation step's request: ``wanted`` addresses for ``handle_id`` on ``node``."""

    handle_id: str
    node: str
    wanted: int
    attribute: AllocationAttribute
    extra: Extra | None


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _pool_names(pools: Sequence[IPPool]) -> str:
    return "pool " + ", ".join(f"{p.name} ({p.cidr})" for p in pools)


def _no_pool_reason(pools: list[IPPool], version: int, node: str, requested: Sequence[str] | None) -> str:
    family = [p for p in pools if p.version == version]
    if not family:
        return f"no IPv{version} pool exists; create one (e.g. calicoctl-py apply -f pool.yaml)"
    if requested:
        return (f"requested pools {', '.join(requested)} are not enabled IPv{version} pools usable by node "
                f"{node} (known: {', '.join(p.name for p in family)})")
    return (f"no enabled IPv{version} pool selects node {node} "
            f"(check the pools' nodeSelector and disabled fields)")


class IPAM:
    """The IPAM client a node daemon, the CNI server and the CLI share."""

    def __init__(self, store: Datastore, *, max_retries: int = 100, clock_ns: Callable[[], int] = time.time_ns):
        self.store = store
        self._clock_ns = clock_ns
        # Counters for metrics and benchmarks: allocations, releases, conflicts, ambiguous commits resolved.
        self.stats: Counter[str] = Counter()
        self.cas = CasWriter(store, self.stats, max_retries=max_retries)
        self.block_store = BlockStore(self.cas)
        self.releaser = Releaser(self.cas, self.block_store)
        # Requests for one node through one client go one at a time (Calico's CNI plugin takes a per-host
        # flock for the same reason): they would only collide on the node's block and retry. Correctness never
        # rests on this lock; other clients and other nodes are kept apart by compare-and-swap alone.
        self._node_locks: dict[str, asyncio.Lock] = {}
        # The blocks each (node, IP version) owned at its last allocation: read with the node's view, they save
        # a round trip per allocation; when the affinities say otherwise, the blocks are read again.
        self._affine_hint: dict[tuple[str, int], list[IPNetwork]] = {}

    def _new_block(self, cidr: IPNetwork, node: str) -> Block:
        return blocks.new_block(cidr, node, self._clock_ns(), _now_rfc3339())

    async def _node_view(self, node: str, version: int, handle_id: str) -> NodeView:
        return await self.block_store.node_view(node, version, handle_id, self._affine_hint.get((node, version), ()))

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
                        want = _Want(handle_id, node, count - len(got[version]), attribute, extra)
                        got[version] += await self._assign_step(want, version, pools, use)
                    await self.cas.retry(step)
        except BaseException:
            taken = got[4] + got[6]
            if taken:  # all or nothing: give back what this request took
                await self.release_ips(taken, handle_id=handle_id)
            raise
        return AssignResult(ipv4=got[4], ipv6=got[6])

    async def _assign_step(self, want: _Want, version: int, requested: Sequence[str] | None,
                           use: str) -> list[IPAddress]:
        """The node's own blocks first, then a new block, then another node's block."""
        node = want.node
        view = await self._node_view(node, version, want.handle_id)
        pools = blocks.eligible_pools(view.pools, version, view.labels, requested, use)
        if not pools:
            raise NoEligiblePool(_no_pool_reason(view.pools, version, node, requested))

        # 1. The node's own confirmed blocks: blocks of an eligible pool (inside it, of its blockSize).
        affine = sorted(c for c, (a, _) in view.affinities.items() if a.confirmed and blocks.pool_for_block(c, pools))
        existing: dict[IPNetwork, tuple[Block, KeyValue]] | None = None
        if affine:
            found = view.blocks
            if any(keys.block_key(c) not in found for c in affine):
                # New affine blocks are checked against every block once; a hinted block passed that check, and
                # no block can appear over it since (pools refuse misfit blocks; claims are guarded by the pool).
                existing = await self.block_store.blocks(version)
                affine = [c for c in affine if not any(c.overlaps(e) for e in existing if e != c)]  # type: ignore[arg-type]
                found = {keys.block_key(c): existing[c][1] if c in existing else None for c in affine}
                self._affine_hint[(node, version)] = affine
            addresses = await self._from_affine_blocks(affine, found, view, want)
            if addresses is not None:
                return addresses
        if existing is None:
            existing = await self.block_store.blocks(version)
        return await self._from_new_or_borrowed_block(pools, existing, len(affine), view, want)

    async def _from_affine_blocks(self, affine: list[IPNetwork], found: dict[str, KeyValue | None], view: NodeView,
                                  want: _Want) -> list[IPAddress] | None:
        """Allocate in the first of the node's ``affine`` blocks with room; None when none has."""
        for cidr in affine:
            kv = found[keys.block_key(cidr)]
            if kv is None:  # an affinity without its block (left by Calico mid-claim): re-create the block
                return await self._claim(cidr, view, want)
            block = Block.from_json(kv.json())
            if block.host == want.node and block.free:
                after, addresses = blocks.allocate(block, want.wanted, want.attribute)
                await self.block_store.write_allocation(kv, after, addresses, view, want.handle_id, extra=want.extra)
                return addresses
        return None

    async def _from_new_or_borrowed_block(self, pools: list[IPPool], existing: dict[IPNetwork, tuple[Block, KeyValue]],
                                          affine_count: int, view: NodeView, want: _Want) -> list[IPAddress]:
        """Claim a new block for the node (within maxBlocksPerHost), else borrow from another node's block."""
        node = want.node
        existing_blocks = {c: b for c, (b, _) in existing.items()}
        cap = view.config.max_blocks_per_host
        if view.config.auto_allocate_blocks and (cap == 0 or affine_count < cap):
            cidr = blocks.choose_new_block(pools, existing_blocks, node)
            if cidr is not None:
                return await self._claim(cidr, view, want)
        if view.config.strict_affinity:
            raise PoolExhausted(
                f"no free block for node {node} in {_pool_names(pools)} and strictAffinity forbids "
                "borrowing; add a pool or release addresses")
        for block in blocks.borrow_candidates(pools, existing_blocks, node):
            after, addresses = blocks.allocate(block, want.wanted, want.attribute)
            await self.block_store.write_allocation(existing[block.cidr][1], after, addresses, view, want.handle_id,
                                                    extra=want.extra)
            self.stats["borrowed"] += len(addresses)
            return addresses
        raise PoolExhausted(f"{_pool_names(pools)} exhausted: no free address for node {node}; "
                            "add a pool or release addresses")

    async def _claim(self, cidr: IPNetwork, view: NodeView, want: _Want) -> list[IPAddress]:
        after, addresses = blocks.allocate(self._new_block(cidr, want.node), want.wanted, want.attribute)
        await self.block_store.write_allocation(None, after, addresses, view, want.handle_id, claim_for=want.node,
                                                extra=want.extra)
        return addresses

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
            existing = await self.block_store.blocks(address.version)
            cidr = blocks.block_containing(address, pool.block_size)
            clashing = sorted(c for c in existing if c != cidr and c.overlaps(cidr))  # type: ignore[arg-type]
            if clashing:
                raise AddressInUse(
                    f"{address}: block {cidr} of pool {pool.name!r} overlaps block {', '.join(map(str, clashing))} "
                    "of another blockSize; release that block's addresses first")
            if cidr not in existing:
                after = blocks.allocate_address(self._new_block(cidr, node), address, attribute)
                await self.block_store.write_allocation(None, after, [address], view, handle_id, claim_for=node)
                return
            block, kv = existing[cidr]
            if view.config.strict_affinity and block.host != node:
                raise AddressInUse(f"{address} lies in block {cidr} of node {block.host} and strictAffinity "
                                   "forbids borrowing it")
            after = blocks.allocate_address(block, address, attribute)
            await self.block_store.write_allocation(kv, after, [address], view, handle_id)

        async with self._node_locks.setdefault(node, asyncio.Lock()):
            await self.cas.retry(step)

    # ------------------------------------------------------------------ release

    async def release_ips(self, addresses: Iterable[IPAddress], handle_id: str | None = None,
                          sequence_numbers: Mapping[IPAddress, int] | None = None) -> list[IPAddress]:
        """Free addresses (only those held by ``handle_id`` when given; only at the given allocation sequence
        numbers when given). Returns the addresses that were not freed because they were not so allocated."""
        return await self.releaser.release_ips(addresses, handle_id, sequence_numbers)

    async def release_by_handle(self, handle_id: str) -> list[IPAddress]:
        """Free everything ``handle_id`` holds; a missing handle is success (idempotent DEL)."""
        return await self.releaser.release_by_handle(handle_id)

    # ------------------------------------------------------------------ configuration

    async def get_config(self) -> IPAMConfig:
        kv = await self.store.get(keys.IPAM_CONFIG)
        return IPAMConfig.from_json(kv.json() if kv else None)

    async def set_config(self, config: IPAMConfig) -> None:
        if not config.auto_allocate_blocks and not config.strict_affinity:
            raise IPAMError("autoAllocateBlocks=false needs strictAffinity=true (otherwise nodes borrow freely)")

        async def step() -> None:
            kv = await self.store.get(keys.IPAM_CONFIG)
            await self.cas.commit([ModRevisionIs(keys.IPAM_CONFIG, kv.mod_revision if kv else 0)],
                                  [Put.json(keys.IPAM_CONFIG, config.to_json())])
        await self.cas.retry(step)
