"""The route table (bgpd/dataplane/route_table.py) against a fake kernel (tests/fakekernel.py): sources and the
route that wins a prefix, full resync and delta, the routes kept over a restart, a refused change; and the
netlink applier's choice between one request per route and one ``ip -batch`` (a recording IPRoute and ``ip``)."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

from bgpd.dataplane import routes
from bgpd.dataplane.route_table import (
    BGP_ROUTES,
    BLOCK_ROUTES,
    KEPT_ROUTES,
    OVERLAY_ROUTES,
    WORKLOAD_ROUTES,
    RouteTable,
)
from bgpd.desired import RouteDiff, RouteSpec
from tests.fakekernel import FakeKernel

POD = RouteSpec("10.244.1.1/32", device="cali1")
BLOCK = RouteSpec("10.244.1.0/26", kind="blackhole")
LEARNED = RouteSpec("10.244.2.0/26", device="eth0", gateway="10.0.0.12")
TUNNELLED = RouteSpec("10.244.2.0/26", device="vxlan.calico", gateway="10.244.2.0")


def applied(table: RouteTable, actual: set[RouteSpec] | None = None) -> RouteDiff:
    return asyncio.run(table.apply(actual)).diff


def test_a_full_resync_makes_the_kernel_equal_the_table_and_removes_only_what_no_source_wants() -> None:
    stray = RouteSpec("10.244.9.0/26", device="eth0", gateway="10.0.0.19")
    kernel = FakeKernel(routes={stray, POD})
    table = RouteTable(kernel)
    table.set_routes(WORKLOAD_ROUTES, [POD])
    table.set_routes(BLOCK_ROUTES, [BLOCK])
    table.set_routes(BGP_ROUTES, [LEARNED])
    assert applied(table) == RouteDiff(add=(BLOCK, LEARNED), remove=(stray,))  # a resync is due at first
    assert kernel.routes == {POD, BLOCK, LEARNED} and kernel.reads == 1
    assert applied(table).empty and kernel.reads == 1  # nothing changed: no read, no write


def test_a_delta_writes_only_the_prefixes_whose_winner_changed_and_replaces_in_place() -> None:
    kernel = FakeKernel()
    table = RouteTable(kernel)
    table.set_routes(BGP_ROUTES, [LEARNED])
    applied(table)
    table.set_routes(BGP_ROUTES, [LEARNED])  # restated as it was: nothing to do
    assert applied(table).empty
    moved = RouteSpec("10.244.2.0/26", device="eth0", gateway="10.0.0.22")
    table.set_route(BGP_ROUTES, LEARNED.dst, moved)
    result = asyncio.run(table.apply())
    assert result.diff == RouteDiff(add=(moved,), remove=()) and result.replaced == (LEARNED,)
    table.set_route(BGP_ROUTES, LEARNED.dst, None)
    assert applied(table) == RouteDiff(add=(), remove=(moved,))
    assert kernel.routes == set() and kernel.reads == 1  # deltas read nothing back


def test_the_overlay_wins_over_bgp_and_bgp_takes_over_when_the_overlay_lets_go() -> None:
    kernel = FakeKernel()
    table = RouteTable(kernel)
    table.set_routes(BGP_ROUTES, [LEARNED])
    table.set_routes(OVERLAY_ROUTES, [TUNNELLED])
    applied(table)
    assert kernel.routes == {TUNNELLED}
    table.set_routes(OVERLAY_ROUTES, [])
    assert applied(table) == RouteDiff(add=(LEARNED,), remove=())
    assert kernel.routes == {LEARNED}


def test_a_kept_route_yields_to_any_other_source_and_goes_when_no_longer_kept() -> None:
    left = RouteSpec("10.244.2.0/26", device="eth0", gateway="10.0.0.99")  # by the daemon before a restart
    kernel = FakeKernel(routes={left})
    table = RouteTable(kernel)
    table.set_routes(KEPT_ROUTES, [left])
    assert applied(table).empty and kernel.routes == {left}
    table.set_route(BGP_ROUTES, LEARNED.dst, LEARNED)  # relearned over BGP: BGP's route wins
    applied(table)
    assert kernel.routes == {LEARNED}
    table.set_route(BGP_ROUTES, LEARNED.dst, None)  # withdrawn: the kept route is what remains wanted
    applied(table)
    assert kernel.routes == {left}
    table.set_routes(KEPT_ROUTES, [])  # End-of-RIB: no longer kept
    applied(table)
    assert kernel.routes == set()


def test_a_refused_change_makes_the_next_apply_read_the_kernel_again() -> None:
    kernel = FakeKernel(refuse={LEARNED.dst})
    table = RouteTable(kernel)
    table.set_routes(BGP_ROUTES, [LEARNED])
    result = asyncio.run(table.apply())
    assert [spec for spec, _ in result.errors] == [LEARNED] and table.resync_due
    kernel.refuse.clear()
    applied(table)
    assert kernel.reads == 2 and kernel.routes == {LEARNED}


@dataclass
class RecordingIPRoute:
    """Records the netlink route requests a real IPRoute would send."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def route(self, verb: str, **request: Any) -> None:
        self.requests.append((verb, request))


def changes(count: int) -> RouteDiff:
    return RouteDiff(add=tuple(RouteSpec(f"10.244.{i // 64}.{i % 64}/32", device="cali1") for i in range(count)),
                     remove=(RouteSpec("10.244.200.0/26", device="gone0", gateway="10.0.0.9"),))


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``ip -batch`` input the applier would run (fakes the ``ip`` command); the node has lo, eth0, cali1."""
    sent: list[str] = []

    def ip(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv == ["ip", "-force", "-batch", "-"]
        sent.append(kwargs["input"])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(routes.subprocess, "run", ip)
    monkeypatch.setattr(routes, "interfaces", lambda ipr=None: {1: "lo", 2: "eth0", 3: "cali1"})
    return sent


def test_up_to_the_batch_threshold_each_route_is_one_netlink_request(batches: list[str]) -> None:
    ipr = RecordingIPRoute()
    assert routes.apply(ipr, changes(routes.BATCH_THRESHOLD - 1)) == []  # type: ignore[arg-type]
    assert batches == [] and len(ipr.requests) == routes.BATCH_THRESHOLD - 1  # the removal's device is gone
    assert {verb for verb, _ in ipr.requests} == {"replace"}
    assert ipr.requests[0][1]["oif"] == 3 and ipr.requests[0][1]["dst"] == "10.244.0.0/32"


def test_beyond_the_batch_threshold_the_changes_go_as_one_ip_batch(batches: list[str]) -> None:
    ipr = RecordingIPRoute()
    routes.apply(ipr, changes(routes.BATCH_THRESHOLD + 1))  # type: ignore[arg-type]
    assert ipr.requests == [] and len(batches) == 1
    lines = batches[0].splitlines()
    assert len(lines) == routes.BATCH_THRESHOLD + 1  # no line for the route whose device is gone
    assert lines[0] == f"route replace 10.244.0.0/32 dev cali1 proto {routes.ROUTE_PROTO} scope link"
