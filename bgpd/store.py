"""This node's resources in etcd: its Node (written with compare-and-swap) and WorkloadEndpoints."""

from __future__ import annotations

from typing import Any

from bgpd.resources import WorkloadEndpoint, wep_key
from ipam import keys
from ipam.datastore import Datastore, Delete, ModRevisionIs, Put


async def register_node(store: Datastore, resource: dict[str, Any]) -> int:
    """Store this node's Node resource as given; the revision it is stored at."""
    key = keys.resource_key(keys.NODES, resource["metadata"]["name"])
    while True:
        kv = await store.get(key)
        if kv is not None and kv.json() == resource:
            return kv.mod_revision
        result = await store.txn([ModRevisionIs(key, kv.mod_revision if kv else 0)], [Put.json(key, resource)])
        if result.succeeded:
            return result.revision


async def list_weps(store: Datastore) -> list[WorkloadEndpoint]:
    kvs = await store.get_prefix(keys.resource_prefix(keys.WORKLOAD_ENDPOINTS))
    return [WorkloadEndpoint.from_v3(kv.json()) for kv in kvs]


async def list_node_weps(store: Datastore, node: str) -> list[WorkloadEndpoint]:
    return [w for w in await list_weps(store) if w.node == node]


async def save_wep(store: Datastore, wep: WorkloadEndpoint) -> None:
    await store.txn([], [Put.json(wep.key, wep.to_v3())])


async def delete_wep(store: Datastore, namespace: str, name: str) -> None:
    await store.txn([], [Delete(wep_key(namespace, name))])
