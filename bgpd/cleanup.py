"""What a crashed or forgetful CNI path leaves behind, and taking it back.

A daemon killed in the middle of an ADD can leave a host veth with no WorkloadEndpoint (killed after the veth
was made, before IPAM committed the address and its endpoint in one transaction). A runtime that lost track of a
sandbox never sends its DEL, so its endpoint and address stay. Two sweeps take these back:

- at start-up, before the CNI socket opens (so no ADD of ours is in flight), every ``cali*`` interface that no
  WorkloadEndpoint names is deleted (its routes go with it);
- CNI GC (the runtime's list of valid attachments) releases every address this network holds on this node for
  an attachment not in the list, endpoint or not.

The decisions are pure functions; the two adapters below only read, call them and apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from pyroute2 import IPRoute

from bgpd.dataplane import workloads
from bgpd.resources import WorkloadEndpoint
from bgpd.store import list_weps
from ipam.allocator import IPAM
from ipam.check import load_state
from ipam.datastore import Datastore

log = logging.getLogger("calico-py-node.cleanup")
T = TypeVar("T")


class NetlinkRunner(Protocol):
    """bgpd.cni.handler.Netlink: the thread that owns the node's netlink socket."""

    async def run(self, work: Callable[[IPRoute], T]) -> T: ...


def orphan_interfaces(interfaces: Iterable[str], endpoints: Iterable[WorkloadEndpoint]) -> list[str]:
    """The workload interfaces (``cali*``) that no endpoint names, sorted. ``endpoints`` are every node's: an
    interface named by another node's endpoint is kept, because a renamed node (a changed NODENAME) would
    otherwise find none of its endpoints and cut every running pod off."""
    named = {e.interface for e in endpoints}
    return sorted(i for i in set(interfaces) if i.startswith(workloads.IFACE_PREFIX) and i not in named)


def named_by_other_nodes(interfaces: Iterable[str], endpoints: Iterable[WorkloadEndpoint], node: str) -> list[str]:
    """The workload interfaces here that only other nodes' endpoints name, sorted: kept, but worth a warning."""
    mine = {e.interface for e in endpoints if e.node == node}
    others = {e.interface for e in endpoints if e.node != node}
    return sorted(i for i in set(interfaces) if i in others and i not in mine)


def unattached_handles(network: str, valid_handles: Iterable[str], handle_nodes: Mapping[str, Iterable[str]],
                       node: str) -> list[str]:
    """The IPAM handles of ``network`` (``<network>.<container id>``) holding addresses for ``node`` whose
    attachment is not among ``valid_handles``, sorted. ``handle_nodes``: handle -> the nodes its addresses were
    allocated for. Other networks' handles, other nodes' and tunnel addresses are never chosen."""
    valid = set(valid_handles)
    prefix = f"{network}."
    return sorted(h for h, nodes in handle_nodes.items()
                  if h.startswith(prefix) and h not in valid and node in set(nodes))


async def sweep_orphan_interfaces(store: Datastore, netlink: NetlinkRunner, node: str) -> list[str]:
    """Delete the node's ``cali*`` interfaces without an endpoint. Only safe while no ADD is in flight here: an
    ADD makes its veth before its endpoint exists."""
    endpoints = await list_weps(store)
    present = await netlink.run(lambda ipr: workloads.host_interfaces())
    elsewhere = named_by_other_nodes(present, endpoints, node)
    if elsewhere:
        log.warning("kept %s: endpoints of other nodes name them, none of node %s does (was NODENAME changed?)",
                    ",".join(elsewhere), node)
    removed = []
    for name in orphan_interfaces(present, endpoints):
        if await netlink.run(lambda ipr, name=name: workloads.remove(ipr, name)):
            log.info("removed %s: no workload endpoint names it (left by an ADD that did not finish)", name)
            removed.append(name)
    return removed


async def release_unattached(ipam: IPAM, node: str, network: str, valid_handles: Iterable[str]) -> list[str]:
    """CNI GC's IPAM half: release the addresses ``network`` holds on ``node`` for attachments the runtime no
    longer has (an address with no endpoint, as a DEL cut short by a crash leaves, included)."""
    state = await load_state(ipam.store)
    handle_nodes: dict[str, set[str]] = {}
    for block, _ in state.blocks.values():
        for attribute in block.attributes:
            if attribute.handle_id:
                handle_nodes.setdefault(attribute.handle_id, set()).add(
                    dict(attribute.secondary).get("node") or block.host or "")
    released = unattached_handles(network, valid_handles, handle_nodes, node)
    for handle_id in released:
        freed = await ipam.release_by_handle(handle_id)
        log.info("cni GC released %s (%s): the runtime no longer has this attachment", handle_id,
                 ",".join(str(a) for a in freed))
    return released
