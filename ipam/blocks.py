"""Pure block math: carving pools into blocks, choosing blocks, allocating and releasing ordinals.

No I/O here. Every mutation returns a new :class:`Block`; the allocator writes it back with a compare-and-swap.
The allocation order follows Calico's: ordinals are popped from the head of ``unallocated`` and freed ordinals go
to its tail, so the address that has been free longest is reused first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence

from ipam.errors import AddressInUse
from ipam.model import HOST_AFFINITY_PREFIX, AllocationAttribute, Block, IPAddress, IPNetwork, IPPool


def fnv1a_32(text: str) -> int:
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def block_count(pool: IPPool) -> int:
    return 1 << (pool.block_size - pool.cidr.prefixlen)


def block_at(pool: IPPool, index: int) -> IPNetwork:
    step = 1 << (pool.cidr.max_prefixlen - pool.block_size)
    return ipaddress.ip_network((int(pool.cidr.network_address) + index * step, pool.block_size))


def block_index(pool: IPPool, cidr: IPNetwork) -> int:
    return (int(cidr.network_address) - int(pool.cidr.network_address)) >> (pool.cidr.max_prefixlen - pool.block_size)


def block_containing(address: IPAddress, block_size: int) -> IPNetwork:
    return ipaddress.ip_network((address, block_size), strict=False)


def walk_start(pool: IPPool, node: str) -> int:
    """Where a node starts looking in a pool: a hash of its name, so nodes spread out and retries repeat."""
    return fnv1a_32(node) % block_count(pool)


def walk_order(pool: IPPool, node: str) -> Iterator[IPNetwork]:
    """Every block of the pool once, starting at the node's own point and wrapping around (lazy: a large IPv6
    pool has astronomically many blocks, and callers stop at the first usable one)."""
    count = block_count(pool)
    start = walk_start(pool, node)
    for step in range(count):
        yield block_at(pool, (start + step) % count)


def pool_of(cidr: IPNetwork, pools: Iterable[IPPool]) -> IPPool | None:
    for pool in pools:
        if cidr.version == pool.cidr.version and cidr.subnet_of(pool.cidr):  # type: ignore[arg-type]
            return pool
    return None


def pool_for_block(cidr: IPNetwork, pools: Iterable[IPPool]) -> IPPool | None:
    """The pool ``cidr`` is a block of: inside the pool and of its blockSize (a block left by a deleted pool of
    another blockSize lies inside the new pool but is none of its blocks)."""
    pool = pool_of(cidr, pools)
    return pool if pool is not None and cidr.prefixlen == pool.block_size else None


def misfits(pool: IPPool, existing: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Existing blocks in the pool's range that are not blocks of the pool: of another size, or reaching past its
    CIDR. Sorted; normally none (a pool cannot be created over them)."""
    return sorted(c for c in existing if c.version == pool.version and c.overlaps(pool.cidr)  # type: ignore[arg-type]
                  and (c.prefixlen != pool.block_size or not c.subnet_of(pool.cidr)))  # type: ignore[arg-type]


def overlapping(existing: Iterable[IPNetwork]) -> list[tuple[IPNetwork, IPNetwork]]:
    """(earlier, later) for every block that overlaps one before it in address order; a block that covers
    several others is named with each of them."""
    found: list[tuple[IPNetwork, IPNetwork]] = []
    for version in (4, 6):
        ordered = sorted((c for c in existing if c.version == version),
                         key=lambda c: (int(c.network_address), c.prefixlen))
        widest: IPNetwork | None = None  # the block reaching furthest so far
        for cidr in ordered:
            if widest is not None and int(cidr.network_address) <= int(widest.broadcast_address):
                found.append((widest, cidr))
            if widest is None or int(cidr.broadcast_address) > int(widest.broadcast_address):
                widest = cidr
    return found


def usable_blocks(pools: Sequence[IPPool], existing: Iterable[IPNetwork]) -> set[IPNetwork]:
    """The existing blocks an allocation may use: blocks of one of ``pools`` (inside it, of its blockSize) that
    overlap no other block. Any other block could hand out an address another block holds too."""
    cidrs = list(existing)
    clashing = {c for pair in overlapping(cidrs) for c in pair}
    return {c for c in cidrs if c not in clashing and pool_for_block(c, pools) is not None}


def choose_new_block(pools: Sequence[IPPool], existing: Mapping[IPNetwork, Block], node: str) -> IPNetwork | None:
    """The first block, in each pool's walk order for this node, that no one has created yet and that overlaps
    no existing block."""
    for pool in pools:
        taken = sum(1 for cidr in existing if pool_for_block(cidr, (pool,)))
        if taken >= block_count(pool):
            continue
        foreign = misfits(pool, existing)
        # Without misfits at most `taken + 1` steps: the walk visits distinct blocks and only `taken` of them exist.
        for cidr in walk_order(pool, node):
            if cidr not in existing and not any(cidr.overlaps(f) for f in foreign):  # type: ignore[arg-type]
                return cidr
    return None


def borrow_candidates(pools: Sequence[IPPool], existing: Mapping[IPNetwork, Block], node: str) -> list[Block]:
    """Usable blocks (:func:`usable_blocks`) with room that are not affine to ``node``, in each pool's walk order
    for the node."""
    usable = usable_blocks(pools, existing)
    candidates: list[Block] = []
    for pool in pools:
        count, start = block_count(pool), walk_start(pool, node)
        mine = [b for cidr, b in existing.items() if b.free and b.host != node and cidr in usable
                and pool_of(cidr, (pool,))]
        mine.sort(key=lambda b: (block_index(pool, b.cidr) - start) % count)
        candidates.extend(mine)
    return candidates


def new_block(cidr: IPNetwork, node: str | None, sequence_number: int, claim_time: str | None = None) -> Block:
    size = 1 << (cidr.max_prefixlen - cidr.prefixlen)
    return Block(
        cidr=cidr,
        affinity=f"{HOST_AFFINITY_PREFIX}{node}" if node else None,
        allocations=(None,) * size,
        unallocated=tuple(range(size)),
        attributes=(),
        # Starting at the creation time in ns means a re-created block never repeats sequence numbers.
        sequence_number=sequence_number,
        affinity_claim_time=claim_time,
    )


def _with_attribute(block: Block, attribute: AllocationAttribute) -> tuple[tuple[AllocationAttribute, ...], int]:
    for index, existing in enumerate(block.attributes):
        if existing == attribute:
            return block.attributes, index
    return (*block.attributes, attribute), len(block.attributes)


def _allocate(block: Block, ordinals: Sequence[int], attribute: AllocationAttribute) -> Block:
    attributes, index = _with_attribute(block, attribute)
    allocations = list(block.allocations)
    sequence = block.sequence_number + 1
    seqs = dict(block.sequence_number_for_allocation)
    for ordinal in ordinals:
        allocations[ordinal] = index
        seqs[ordinal] = sequence
    taken = set(ordinals)
    return Block(
        cidr=block.cidr, affinity=block.affinity, allocations=tuple(allocations),
        unallocated=tuple(o for o in block.unallocated if o not in taken), attributes=attributes,
        sequence_number=sequence, sequence_number_for_allocation=seqs,
        affinity_claim_time=block.affinity_claim_time, deleted=block.deleted,
    )


def allocate(block: Block, count: int, attribute: AllocationAttribute) -> tuple[Block, list[IPAddress]]:
    """Take up to ``count`` addresses from the head of the free list."""
    ordinals = list(block.unallocated[:count])
    if not ordinals:
        return block, []
    return _allocate(block, ordinals, attribute), [block.address(o) for o in ordinals]


def allocate_address(block: Block, address: IPAddress, attribute: AllocationAttribute) -> Block:
    ordinal = block.ordinal(address)
    if block.allocations[ordinal] is not None:
        holder = block.attributes[block.allocations[ordinal]]  # type: ignore[index]
        raise AddressInUse(f"{address} is already assigned (handle {holder.handle_id})")
    return _allocate(block, [ordinal], attribute)


def release(block: Block, addresses: Iterable[IPAddress],
            sequence_numbers: Mapping[IPAddress, int] | None = None) -> tuple[Block, list[IPAddress]]:
    """Free the given addresses; returns the new block and the addresses actually freed.

    An address whose recorded allocation sequence differs from the one given is kept: it was re-given to someone
    else since the caller looked (the ABA case a GC or a stale report would otherwise hit).
    """
    freed: list[int] = []
    for address in addresses:
        ordinal = block.ordinal(address)
        if block.allocations[ordinal] is None or ordinal in freed:
            continue
        expected = (sequence_numbers or {}).get(address)
        if expected is not None and block.sequence_number_for_allocation.get(ordinal) != expected:
            continue
        freed.append(ordinal)
    if not freed:
        return block, []
    allocations = list(block.allocations)
    seqs = dict(block.sequence_number_for_allocation)
    for ordinal in freed:
        allocations[ordinal] = None
        seqs.pop(ordinal, None)
    allocations, attributes = _prune_attributes(allocations, block.attributes)
    new = Block(
        cidr=block.cidr, affinity=block.affinity, allocations=tuple(allocations),
        unallocated=(*block.unallocated, *freed), attributes=attributes,
        sequence_number=block.sequence_number + 1, sequence_number_for_allocation=seqs,
        affinity_claim_time=block.affinity_claim_time, deleted=block.deleted,
    )
    return new, [block.address(o) for o in freed]


def _prune_attributes(allocations: list[int | None], attributes: Sequence[AllocationAttribute]
                      ) -> tuple[list[int | None], tuple[AllocationAttribute, ...]]:
    """Drop attribute entries no allocation points to, and renumber the indexes."""
    used = sorted({i for i in allocations if i is not None})
    renumber = {old: new for new, old in enumerate(used)}
    return [None if i is None else renumber[i] for i in allocations], tuple(attributes[i] for i in used)


def addresses_of_handle(block: Block, handle_id: str) -> list[IPAddress]:
    indexes = {i for i, a in enumerate(block.attributes) if a.handle_id == handle_id}
    return [block.address(o) for o, i in enumerate(block.allocations) if i in indexes]


def with_affinity(block: Block, node: str | None) -> Block:
    return Block(
        cidr=block.cidr, affinity=f"{HOST_AFFINITY_PREFIX}{node}" if node else None,
        allocations=block.allocations, unallocated=block.unallocated, attributes=block.attributes,
        sequence_number=block.sequence_number + 1,
        sequence_number_for_allocation=block.sequence_number_for_allocation,
        affinity_claim_time=block.affinity_claim_time if node else None, deleted=block.deleted,
    )


def eligible_pools(pools: Iterable[IPPool], version: int, labels: Mapping[str, str],
                   requested: Sequence[str] | None = None, use: str = "Workload") -> list[IPPool]:
    """Pools a node may take blocks from: enabled, right family and use, nodeSelector matching the node's labels;
    narrowed to ``requested`` (pool names or CIDRs) when given. Ordered by CIDR, so every node agrees."""
    usable = [p for p in pools if p.version == version and not p.disabled and use in p.allowed_uses]
    if requested:
        wanted = set(requested)
        usable = [p for p in usable if p.name in wanted or str(p.cidr) in wanted]
    return sorted((p for p in usable if p.matches_node(labels)), key=lambda p: p.cidr)
