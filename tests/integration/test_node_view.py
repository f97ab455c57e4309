"""The node's view on a real etcd: one listing, then events; what changes it (and wakes the route reconciler and
the BGP sync) and what does not; and a steady-state full reconcile and BGP sync that make no etcd request."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path

from bgpd.reconciler import RouteReconciler
from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.sync import BGPSync
from bgpd.view import ENDPOINTS, NodeView
from bgpd.viewsync import ViewKeeper
from ipam import keys
from ipam.datastore import Datastore, Delete, EtcdConfig
from tests.eventually import eventually_async
from tests.fakekernel import FakeKernel

BLOCK = ipaddress.ip_network("10.244.1.0/26")
DEADLINE = 30.0


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


def endpoint(node: str, name: str, address: str) -> bytes:
    return encode({"metadata": {"namespace": "ns", "name": name},
                   "spec": {"node": node, "interfaceName": f"cali{name}", "ipNetworks": [f"{address}/32"]}})


@contextlib.asynccontextmanager
async def kept(store: Datastore) -> AsyncIterator[tuple[ViewKeeper, list[set[str]]]]:
    keeper = ViewKeeper(store, "node1")
    heard: list[set[str]] = []
    keeper.subscribe(heard.append)
    task = asyncio.create_task(keeper.run())
    try:
        await asyncio.wait_for(keeper.ready(), DEADLINE)
        yield keeper, heard
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def seed(store: Datastore) -> None:
    await store.put(keys.resource_key("ippools", "p"), encode({"metadata": {"name": "p"},
                                                               "spec": {"cidr": "10.244.0.0/16"}}))
    for name, address in (("node1", "10.0.0.11/24"), ("node2", "10.0.0.12/24")):
        await store.put(keys.resource_key("nodes", name), encode({"metadata": {"name": name},
                                                                  "spec": {"bgp": {"ipv4Address": address}}}))
    await store.put(keys.affinity_key("node1", BLOCK), b'{"state":"confirmed"}')
    await store.put(keys.resource_key("workloadendpoints", "ns/a"), endpoint("node1", "a", "10.244.1.1"))


async def test_the_view_changes_with_this_nodes_resources_only(etcd_endpoints: list[str]) -> None:
    async with Datastore(EtcdConfig.parse(etcd_endpoints)) as store:
        await seed(store)
        async with kept(store) as (keeper, heard):
            view = keeper.view()
            assert set(view.nodes) == {"node1", "node2"} and view.affinities == (BLOCK,)
            assert [e.name for e in view.endpoints] == ["a"] and keeper.lists == 1
            heard.clear()  # the listing itself was heard
            # Another node's endpoint and affinity, and a block: nothing this node decides from.
            await store.put(keys.resource_key("workloadendpoints", "ns/b"), endpoint("node2", "b", "10.244.2.1"))
            await store.put(keys.affinity_key("node2", ipaddress.ip_network("10.244.2.0/26")), b"{}")
            await store.put(keys.block_key(BLOCK), b"{}")
            last = await store.put(keys.resource_key("workloadendpoints", "ns/c"),
                                   endpoint("node1", "c", "10.244.1.2"))
            await eventually_async(lambda: keeper.view().revision >= last, DEADLINE, "the last write in the view")
            assert heard == [{ENDPOINTS}] and [e.name for e in keeper.view().endpoints] == ["a", "c"]
            deleted = (await store.txn([], [Delete(keys.resource_key("workloadendpoints", "ns/c"))])).revision
            await eventually_async(lambda: keeper.view().revision >= deleted, DEADLINE, "the delete in the view")
            assert [e.name for e in keeper.view().endpoints] == ["a"] and len(heard) == 2
            # What the peering and the routes are decided from: each change is heard.
            for key in (keys.resource_key("bgppeers", "tor"), keys.resource_key("bgpconfigurations", "default"),
                        keys.resource_key("nodes", "node3"), keys.resource_key("ippools", "q")):
                name = key.rsplit("/", 1)[-1]
                spec = {"cidr": "10.99.0.0/16"} if "ippools" in key else {}
                revision = await store.put(key, encode({"metadata": {"name": name}, "spec": spec}))
                await eventually_async(lambda revision=revision: keeper.view().revision >= revision, DEADLINE,
                                       f"{key} in the view")
            assert [prefix.rsplit("/", 2)[-2] for changed in heard[2:] for prefix in changed] == [
                "bgppeers", "bgpconfigurations", "nodes", "ippools"]


async def test_a_steady_state_full_reconcile_and_bgp_sync_make_no_etcd_request(etcd_endpoints: list[str],
                                                                              tmp_path: Path) -> None:
    async with Datastore(EtcdConfig.parse(etcd_endpoints)) as store:
        await seed(store)
        before = store.requests
        async with kept(store) as (keeper, _):
            assert store.requests - before == 1 and keeper.lists == 1  # the listing: one request
            kernel = FakeKernel(interfaces={"lo", "eth0", "calia"}, connected=[
                ("eth0", ipaddress.ip_interface("10.0.0.11/24"))])
            routes = RouteReconciler(keeper.view, kernel, "node1", 60.0)
            sync = BGPSync(keeper.view, ExaBGP(tmp_path, "10.0.0.11", on_routes=routes.wake_routes))
            listed = store.requests
            for _ in range(3):
                await routes.reconcile_once()
                await sync.sync_once()
            assert store.requests == listed, "a steady-state run asked etcd"
            assert set(sync.speaker.rib.sessions) == {"10.0.0.12"}
            assert sync.speaker.wanted == {str(BLOCK)} and kernel.reads == 3
            assert isinstance(keeper.view(), NodeView)


async def test_stopping_the_view_tells_no_listener_of_a_change(etcd_endpoints: list[str]) -> None:
    """Cancelling the watch (the daemon stopping) is no change to decide on: a listener woken then would take
    the VXLAN routes out of the kernel on the way down."""
    async with Datastore(EtcdConfig.parse(etcd_endpoints)) as store:
        await seed(store)
        keeper = ViewKeeper(store, "node1", wants_blocks=lambda view: True)
        heard: list[set[str]] = []
        keeper.subscribe(heard.append)
        task = asyncio.create_task(keeper.run())
        view = await asyncio.wait_for(keeper.ready(), DEADLINE)
        assert view.blocks is not None  # the blocks are watched
        heard.clear()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert heard == [] and keeper.view().blocks is not None
