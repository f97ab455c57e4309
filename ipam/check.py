"""Consistency check (pure, over one snapshot of all IPAM keys) and garbage collection of leaked addresses."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from ipam import blocks, keys
from ipam.allocator import IPAM
from ipam.datastore import Datastore, Delete, ModRevisionIs
from ipam.model import Block, BlockAffinity, Handle, IPAddress, IPNetwork, IPPool

TUNNEL_HANDLE_PREFIXES = ("ipip-tunnel-addr-", "vxlan-tunnel-addr-", "vxlan-v6-tunnel-addr-",
                          "wireguard-tunnel-addr-", "wireguard-v6-tunnel-addr-")


def is_tunnel_handle(handle_id: str) -> bool:
    return handle_id.startswith(TUNNEL_HANDLE_PREFIXES)


@dataclass(frozen=True)
class IPAMState:
    """Every block, handle, affinity, pool and Node name, read at one revision."""

    revision: int
    blocks: dict[IPNetwork, tuple[Block, int]]
    handles: dict[str, tuple[Handle, int]]
    affinities: list[tuple[BlockAffinity, int]]
    pools: list[IPPool]
    nodes: set[str]


async def load_state(store: Datastore) -> IPAMState:
    prefixes = [keys.blocks_prefix(4), keys.blocks_prefix(6), keys.HANDLES, keys.HOSTS,
                keys.resource_prefix("ippools"), keys.resource_prefix("nodes")]
    snap = await store.read(prefixes=prefixes)
    found_blocks = {}
    for kv in snap.prefixes[prefixes[0]] + snap.prefixes[prefixes[1]]:
        block = Block.from_json(kv.json())
        found_blocks[block.cidr] = (block, kv.mod_revision)
    handles = {}
    for kv in snap.prefixes[keys.HANDLES]:
        handle_id = keys.handle_id_of(kv.key)
        handles[handle_id] = (Handle.from_json(handle_id, kv.json()), kv.mod_revision)
    affinities = []
    for kv in snap.prefixes[keys.HOSTS]:
        if "/block/" in kv.key:
            node, cidr = keys.parse_affinity_key(kv.key)
            affinities.append((BlockAffinity.from_json(node, cidr, kv.json()), kv.mod_revision))
    return IPAMState(
        revision=snap.revision, blocks=found_blocks, handles=handles, affinities=affinities,
        pools=[IPPool.from_v3(kv.json()) for kv in snap.prefixes[prefixes[4]]],
        nodes={kv.key.rsplit("/", 1)[-1] for kv in snap.prefixes[prefixes[5]]},
    )


@dataclass(frozen=True)
class Problem:
    kind: str
    message: str
    block: str | None = None
    ip: str | None = None
    handle: str | None = None
    node: str | None = None


@dataclass
class Report:
    revision: int
    problems: list[Problem] = field(default_factory=list)
    blocks: int = 0
    allocated: int = 0
    handles: int = 0
    affinities: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def to_json(self) -> dict[str, object]:
        return {"revision": self.revision, "blocks": self.blocks, "allocated": self.allocated,
                "handles": self.handles, "affinities": self.affinities,
                "problems": [asdict(p) for p in self.problems]}


def _network_key(cidr: IPNetwork) -> tuple[int, IPNetwork]:
    return cidr.version, cidr


def _block_shape_problems(block: Block) -> list[Problem]:
    cidr = str(block.cidr)
    problems = []
    free = [o for o, index in enumerate(block.allocations) if index is None]
    if sorted(block.unallocated) != free:
        problems.append(Problem("block-corrupt", f"block {cidr}: free list disagrees with the allocations",
                                block=cidr))
    if any(i is not None and not 0 <= i < len(block.attributes) for i in block.allocations):
        problems.append(Problem("block-corrupt", f"block {cidr}: allocation points past its attributes",
                                block=cidr))
    return problems


def _held(block: Block) -> Iterator[tuple[int, str]]:
    """(ordinal, handle id) of each allocated address; a corrupt index is skipped (block-corrupt reports it)."""
    for ordinal, index in enumerate(block.allocations):
        if index is not None and index < len(block.attributes):
            yield ordinal, block.attributes[index].handle_id


def _pool_problems(block: Block, pools: list[IPPool]) -> list[Problem]:
    cidr = block.cidr
    pool = blocks.pool_of(cidr, pools)
    if pool is None:
        return [Problem("block-outside-pools", f"block {cidr} lies in no IP pool", block=str(cidr))]
    if cidr.prefixlen != pool.block_size:
        return [Problem("block-wrong-size", f"block {cidr} is no block of pool {pool.name!r}, whose blockSize is "
                        f"{pool.block_size}: no address is allocated from it", block=str(cidr))]
    return []


def _address_problems(block: Block, handles: Container[str], live: set[IPAddress] | None,
                      held: dict[str, Counter[str]]) -> list[Problem]:
    """Addresses with no handle, or a missing one, and (with ``live``) leaked ones; counts into ``held``."""
    cidr = str(block.cidr)
    problems = []
    for ordinal, handle_id in _held(block):
        address = block.address(ordinal)
        ip = str(address)
        if not handle_id:
            problems.append(Problem("ip-without-handle", f"{ip} is allocated with no handle", block=cidr, ip=ip))
            continue
        held[handle_id][cidr] += 1
        if live is not None and not is_tunnel_handle(handle_id) and address not in live:
            problems.append(Problem("leaked-ip", f"{ip} is allocated to {handle_id} but no workload uses it",
                                    block=cidr, ip=ip, handle=handle_id))
        if handle_id not in handles:
            problems.append(Problem("ip-without-handle", f"{ip} is held by handle {handle_id}, which does "
                                    "not exist", block=cidr, ip=ip, handle=handle_id))
    return problems


def _block_host_problems(block: Block, affinities: list[tuple[BlockAffinity, int]],
                         nodes: set[str] | None) -> list[Problem]:
    cidr, host = block.cidr, block.host
    if host is None:
        return []
    problems = []
    if not any(a.node == host and a.cidr == cidr for a, _ in affinities):
        problems.append(Problem("block-without-affinity", f"block {cidr} names node {host} but that "
                                "node has no affinity for it", block=str(cidr), node=host))
    if nodes is not None and host not in nodes:
        problems.append(Problem("block-affine-to-missing-node", f"block {cidr} is affine to node {host}, "
                                "which no longer exists", block=str(cidr), node=host))
    return problems


def _handle_problems(handles: dict[str, tuple[Handle, int]], held: dict[str, Counter[str]]) -> list[Problem]:
    problems = []
    for handle_id, (handle, _) in sorted(handles.items()):
        actual = held.get(handle_id, Counter())
        if not actual:
            problems.append(Problem("handle-without-ips", f"handle {handle_id} holds no address",
                                    handle=handle_id))
        elif dict(actual) != dict(handle.blocks):
            problems.append(Problem("handle-count-mismatch", f"handle {handle_id} counts {dict(handle.blocks)} "
                                    f"but the blocks hold {dict(actual)}", handle=handle_id))
    return problems


def _affinity_problems(state: IPAMState, nodes: set[str] | None) -> list[Problem]:
    problems = []
    for affinity, _ in state.affinities:
        cidr = str(affinity.cidr)
        block = state.blocks.get(affinity.cidr)
        if block is None:
            problems.append(Problem("affinity-without-block", f"node {affinity.node} has an affinity for block "
                                    f"{cidr}, which does not exist", block=cidr, node=affinity.node))
        elif block[0].host != affinity.node:
            problems.append(Problem("affinity-mismatch", f"node {affinity.node} has an affinity for block {cidr}, "
                                    f"but the block is affine to {block[0].host}", block=cidr, node=affinity.node))
        elif not affinity.confirmed:
            problems.append(Problem("affinity-not-confirmed", f"affinity of node {affinity.node} for block {cidr} "
                                    f"is stuck in state {affinity.state}", block=cidr, node=affinity.node))
        if nodes is not None and affinity.node not in nodes:
            problems.append(Problem("affinity-of-missing-node", f"node {affinity.node} no longer exists but has "
                                    f"an affinity for block {cidr}", block=cidr, node=affinity.node))
    return problems


def check(state: IPAMState, known_nodes: Iterable[str] | None = None,
          live_addresses: Iterable[IPAddress] | None = None) -> Report:
    """Every inconsistency between blocks, handles and affinities. ``known_nodes``, when given, is the set of
    nodes that exist (Calico Node resources, or the Kubernetes node list): blocks affine to others are reported.
    ``live_addresses``, when given, is every address a workload uses (WorkloadEndpoints): any other allocation
    that is not a tunnel address is reported as leaked."""
    live = set(live_addresses) if live_addresses is not None else None
    report = Report(state.revision, blocks=len(state.blocks), handles=len(state.handles),
                    affinities=len(state.affinities))
    problems = report.problems
    nodes = set(known_nodes) if known_nodes is not None else None
    held: dict[str, Counter[str]] = defaultdict(Counter)  # handle -> block cidr -> addresses held

    for _, (block, _) in sorted(state.blocks.items(), key=lambda item: _network_key(item[0])):
        report.allocated += sum(1 for _ in _held(block))
        problems += _block_shape_problems(block)
        problems += _pool_problems(block, state.pools)
        problems += _address_problems(block, state.handles, live, held)
        problems += _block_host_problems(block, state.affinities, nodes)
    for first, second in blocks.overlapping(state.blocks):
        problems.append(Problem("overlapping-blocks", f"blocks {first} and {second} overlap: an address "
                                "could be allocated twice", block=str(second)))
    problems += _handle_problems(state.handles, held)
    problems += _affinity_problems(state, nodes)
    return report


@dataclass
class GCResult:
    released: list[IPAddress] = field(default_factory=list)
    handles_deleted: list[str] = field(default_factory=list)
    affinities_deleted: list[str] = field(default_factory=list)


async def gc(ipam: IPAM, live_handles: Iterable[str], keep: Callable[[str], bool] = is_tunnel_handle,
             dry_run: bool = False) -> GCResult:
    """Release every address whose handle is not live (nor kept, e.g. tunnel addresses), delete handles that
    hold nothing and affinities whose block is gone. Each address is released at the allocation sequence number
    seen here, so an address handed to someone new since the scan is left alone."""
    live = set(live_handles)
    state = await load_state(ipam.store)
    result = GCResult()
    leaked: dict[str | None, dict[IPAddress, int]] = defaultdict(dict)
    for block, _ in state.blocks.values():
        for ordinal, handle_id in _held(block):
            if handle_id in live or (handle_id and keep(handle_id)):
                continue
            leaked[handle_id][block.address(ordinal)] = block.sequence_number_for_allocation.get(ordinal, 0)
    for handle_id, addresses in leaked.items():
        if dry_run:
            result.released += list(addresses)
            continue
        seqs = {a: s for a, s in addresses.items() if s}
        kept = await ipam.release_ips(list(addresses), handle_id=handle_id, sequence_numbers=seqs)
        result.released += [a for a in addresses if a not in set(kept)]

    holding = {a.handle_id for b, _ in state.blocks.values() for a in b.attributes}
    for handle_id, (_, revision) in state.handles.items():
        if handle_id not in holding and handle_id not in live and not keep(handle_id):
            result.handles_deleted.append(handle_id)
            if not dry_run:
                key = keys.handle_key(handle_id)
                await ipam.store.txn([ModRevisionIs(key, revision)], [Delete(key)])
    for affinity, revision in state.affinities:
        if affinity.cidr not in state.blocks:
            key = keys.affinity_key(affinity.node, affinity.cidr)
            result.affinities_deleted.append(key)
            if not dry_run:
                await ipam.store.txn([ModRevisionIs(key, revision)], [Delete(key)])
    return result

