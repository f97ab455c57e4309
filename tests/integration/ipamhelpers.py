"""Shared pieces of the IPAM integration tests and the IPAM benchmark: pools, concurrent node workers, and
reading back what etcd holds."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from ipam.allocator import IPAM
from ipam.check import load_state
from ipam.datastore import Datastore, EtcdConfig
from ipam.errors import IPAMError
from ipam.model import IPAddress, IPPool
from ipam.pools import save_pool


def make_pool(name: str, cidr: str, block_size: int | None = None, **spec: object) -> IPPool:
    doc = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
           "spec": {"cidr": cidr, **({"blockSize": block_size} if block_size else {}), **spec}}
    return IPPool.from_v3(doc)


def store_for(endpoints: Sequence[str], **kwargs: float) -> Datastore:
    return Datastore(EtcdConfig.parse(list(endpoints), **kwargs))


async def add_pool(store: Datastore, name: str, cidr: str, block_size: int | None = None, **spec: object) -> IPPool:
    pool = make_pool(name, cidr, block_size, **spec)
    await save_pool(store, pool)
    return pool


@dataclass
class Outcome:
    """What the workers were told: successes per handle, failures per handle."""

    allocated: dict[str, list[IPAddress]] = field(default_factory=dict)
    node_of: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def addresses(self) -> list[IPAddress]:
        return [ip for ips in self.allocated.values() for ip in ips]


def clients(nodes: Sequence[str], workers_per_node: int, endpoints: Sequence[str],
            shared_per_node: bool = False) -> list[tuple[str, IPAM]]:
    """One (node, IPAM) per worker. Independent clients (the default) race each other through etcd alone, as
    separate processes would; ``shared_per_node`` gives a node's workers one client, as one daemon would."""
    result = []
    for node in nodes:
        shared = IPAM(store_for(endpoints))
        result += [(node, shared if shared_per_node else IPAM(store_for(endpoints))) for _ in range(workers_per_node)]
    return result


async def close_clients(workers: list[tuple[str, IPAM]]) -> None:
    for store in {id(ipam.store): ipam.store for _, ipam in workers}.values():
        await store.close()


async def run_workers(workers: list[tuple[str, IPAM]], total: int, outcome: Outcome,
                      progress: asyncio.Event | None = None, halfway: int | None = None,
                      prefix: str = "k8s-pod-network.c") -> None:
    """Each worker takes handle numbers from one counter until ``total`` requests were made, asking for one
    IPv4 address each. ``progress`` is set once ``halfway`` requests completed."""
    counter = iter(range(total))
    done = 0

    async def worker(node: str, ipam: IPAM) -> None:
        nonlocal done
        for number in counter:
            handle = f"{prefix}{number:06d}"
            outcome.node_of[handle] = node
            try:
                result = await ipam.auto_assign(handle, node, num_v4=1,
                                                attrs={"namespace": "default", "pod": f"pod-{number}"})
                outcome.allocated[handle] = result.ipv4
            except IPAMError as exc:
                outcome.failed[handle] = f"{type(exc).__name__}: {exc}"
            done += 1
            if progress is not None and halfway is not None and done >= halfway:
                progress.set()

    await asyncio.gather(*(worker(node, ipam) for node, ipam in workers))


async def held_by_handle(store: Datastore) -> dict[str, list[IPAddress]]:
    """Every allocation in etcd, grouped by handle."""
    state = await load_state(store)
    held: dict[str, list[IPAddress]] = {}
    for block, _ in state.blocks.values():
        for ordinal, index in enumerate(block.allocations):
            if index is not None:
                held.setdefault(block.attributes[index].handle_id or "", []).append(block.address(ordinal))
    return held


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)
