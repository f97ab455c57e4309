"""IPAM on a 3-member etcd cluster losing a member mid-run: no duplicate, no lost allocation."""

from __future__ import annotations

import asyncio

import pytest

from ipam.allocator import IPAM
from ipam.check import check, load_state
from tests.integration.ipamhelpers import (
    Outcome,
    add_pool,
    clients,
    close_clients,
    held_by_handle,
    run_workers,
    store_for,
)

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


async def test_member_killed_halfway_through_two_thousand_allocations(etcd_cluster3) -> None:
    endpoints = etcd_cluster3.endpoints
    nodes = [f"node-{i}" for i in range(8)]
    # Every client starts on the first endpoint, so the member killed is the one they all talk to.
    workers = clients(nodes, 4, endpoints)
    admin = store_for(endpoints[1:])
    try:
        await add_pool(admin, "default-ipv4-ippool", "10.244.0.0/20")
        halfway = asyncio.Event()
        outcome = Outcome()

        async def kill_at_halfway() -> None:
            await halfway.wait()
            etcd_cluster3.kill(0)

        await asyncio.gather(run_workers(workers, 2000, outcome, progress=halfway, halfway=1000),
                             kill_at_halfway())
        assert not etcd_cluster3.members[0].is_running()
        assert all(ipam.store.failovers >= 1 for _, ipam in workers)  # every client moved on

        addresses = outcome.addresses
        assert len(addresses) == len(set(addresses)), "duplicate address handed out"
        held = await held_by_handle(admin)
        # Every success the workers were told of is in etcd, under its handle, and nothing else is.
        assert {h: sorted(v) for h, v in held.items()} == {h: sorted(v) for h, v in outcome.allocated.items()}
        # A failure (none expected: the other members keep quorum) must leave nothing behind.
        assert all(h not in held for h in outcome.failed)
        assert len(outcome.allocated) + len(outcome.failed) == 2000
        assert len(outcome.failed) == 0, outcome.failed
        assert check(await load_state(admin)).ok

        ipam = IPAM(admin)
        for handle in outcome.allocated:
            await ipam.release_by_handle(handle)
        state = await load_state(admin)
        assert state.handles == {} and check(state).ok
    finally:
        await close_clients(workers)
        await admin.close()
