"""The route reconciler against a fake kernel (tests/fakekernel.py) and a node view: full runs, the fast path
for BGP changes, and the routes kept after a restart. No root, no etcd."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

from bgpd.desired import RouteDiff, RouteSpec
from bgpd.reconciler import RouteReconciler
from bgpd.resources import WorkloadEndpoint
from bgpd.view import NodeView
from tests.fakekernel import FakeKernel

BLOCK = ipaddress.ip_network("10.244.1.0/26")
POD = WorkloadEndpoint("ns", "node1-k8s-a-eth0", "node1", "c1", "a", "eth0", "cali1", ("10.244.1.1/32",), "", "k8s")
VIEW = NodeView("node1", affinities=(BLOCK,), endpoints=(POD,))
UNDERLAY = [("eth0", ipaddress.ip_interface("10.0.0.11/24"))]
OWN = {RouteSpec("10.244.1.0/26", kind="blackhole"), RouteSpec("10.244.1.1/32", device="cali1")}


class Peers:
    """A route feed as the node's BGP table gives it: the whole table, and the changes since the last call."""

    def __init__(self) -> None:
        self.table: dict[str, tuple[str, ...]] = {}
        self.changed: dict[str, tuple[str, ...]] = {}
        self.keep = False

    def set(self, prefix: str, *next_hops: str) -> None:
        self.table[prefix] = next_hops
        if not next_hops:
            del self.table[prefix]
        self.changed[prefix] = next_hops

    def learned(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def changes(self) -> dict[str, tuple[str, ...]]:
        changed, self.changed = self.changed, {}
        return changed

    def keeps_startup_routes(self, now: float) -> bool:
        return self.keep


def reconciler(kernel: FakeKernel, peers: Peers, view: NodeView = VIEW) -> RouteReconciler:
    kernel.interfaces |= {"cali1"}
    kernel.connected = list(UNDERLAY)
    return RouteReconciler(lambda: view, kernel, "node1", 60.0, feed=peers)


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_full_run_installs_what_the_view_and_bgp_want_and_then_changes_nothing() -> None:
    kernel, peers = FakeKernel(), Peers()
    peers.set("10.244.2.0/26", "10.0.0.12")
    routes = reconciler(kernel, peers)
    assert run(routes.reconcile_once()) == 3
    assert kernel.routes == OWN | {RouteSpec("10.244.2.0/26", device="eth0", gateway="10.0.0.12")}
    assert run(routes.reconcile_once()) == 0 and len(kernel.applied) == 1
    assert routes.stats.by_type == {"blackhole": 1, "workload": 1, "remote": 1}


def test_the_fast_path_applies_only_what_bgp_changed() -> None:
    kernel, peers = FakeKernel(), Peers()
    routes = reconciler(kernel, peers)
    run(routes.reconcile_once())
    peers.set("10.244.2.0/26", "10.0.0.12")
    peers.set("10.244.3.0/26", "10.0.0.13")
    run(routes.apply_route_changes())
    assert kernel.applied[-1].remove == () and len(kernel.applied[-1].add) == 2
    peers.set("10.244.2.0/26")  # withdrawn
    run(routes.apply_route_changes())
    assert kernel.applied[-1] == RouteDiff(add=(), remove=(RouteSpec("10.244.2.0/26", device="eth0",
                                                                     gateway="10.0.0.12"),))
    assert kernel.reads == 1  # the fast path reads nothing back


def test_after_a_restart_only_routes_found_at_start_are_kept_and_a_withdrawal_goes_at_once() -> None:
    left = RouteSpec("10.244.4.0/26", device="eth0", gateway="10.0.0.14")  # by the daemon before the restart
    kernel, peers = FakeKernel(routes={left}), Peers()
    peers.keep = True  # graceful-restart peers have not all sent End-of-RIB
    routes = reconciler(kernel, peers)
    run(routes.step())  # the first pass is a full run
    assert left in kernel.routes and kernel.reads == 1  # kept while BGP relearns it
    peers.set("10.244.2.0/26", "10.0.0.12")
    run(routes.step())
    peers.set("10.244.2.0/26")  # a live peer withdraws a route this daemon installed: it goes at once
    run(routes.step())
    assert not any(r.dst == "10.244.2.0/26" for r in kernel.routes) and kernel.reads == 1  # deltas only
    run(routes.step())
    assert left in kernel.routes and kernel.reads == 1  # still kept: no full run while it is
    peers.keep = False  # End-of-RIB: the next pass is a full run, and what was not relearned goes
    run(routes.step())
    assert left not in kernel.routes and kernel.routes == OWN and kernel.reads == 2


def test_a_pod_gone_from_the_view_loses_its_route() -> None:
    kernel = FakeKernel()
    view = {"now": VIEW}
    routes = RouteReconciler(lambda: view["now"], kernel, "node1", 60.0)
    kernel.interfaces |= {"cali1"}
    run(routes.reconcile_once())
    view["now"] = replace(VIEW, endpoints=())
    run(routes.reconcile_once())
    assert kernel.routes == {RouteSpec("10.244.1.0/26", kind="blackhole")}
