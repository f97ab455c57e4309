"""IPAM on a 3-member etcd cluster losing a member mid-run: no duplicate, no lost allocation."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.datastore import Datastore, EtcdConfig
from tests.integration.ipamhelpers import (
    Outcome,
    add_pool,
    clients,
    close_clients,
    held_by_handle,
    run_workers,
    store_for,
)

pytestmark = pytest.mark.etcd


ALLOCATIONS = 800  # by 32 clients: after the kill at half, each of them still has requests to fail over


@pytest.mark.slow
async def test_member_killed_halfway_through_eight_hundred_allocations(etcd_cluster3) -> None:
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

        await asyncio.gather(run_workers(workers, ALLOCATIONS, outcome, progress=halfway,
                                         halfway=ALLOCATIONS // 2),
                             kill_at_halfway())
        assert not etcd_cluster3.members[0].is_running()
        assert all(ipam.store.failovers >= 1 for _, ipam in workers)  # every client moved on
        # ...after at least one failed attempt, and never gave a request up (the other members kept answering)
        assert all(ipam.store.request_errors >= 1 and ipam.store.unavailable == 0 for _, ipam in workers)

        addresses = outcome.addresses
        assert len(addresses) == len(set(addresses)), "duplicate address handed out"
        held = await held_by_handle(admin)
        # Every success the workers were told of is in etcd, under its handle, and nothing else is.
        assert {h: sorted(v) for h, v in held.items()} == {h: sorted(v) for h, v in outcome.allocated.items()}
        # A failure (none expected: the other members keep quorum) must leave nothing behind.
        assert all(h not in held for h in outcome.failed)
        assert len(outcome.allocated) + len(outcome.failed) == ALLOCATIONS
        assert len(outcome.failed) == 0, outcome.failed
        assert check(await load_state(admin)).ok

        handles = sorted(outcome.allocated)

        async def release(index: int, ipam: IPAM) -> None:
            for handle in handles[index::len(workers)]:
                await ipam.release_by_handle(handle)
        await asyncio.gather(*(release(i, ipam) for i, (_, ipam) in enumerate(workers)))
        state = await load_state(admin)
        assert state.handles == {} and check(state).ok
    finally:
        await close_clients(workers)
        await admin.close()


class LostResponseStore(Datastore):
    """A real etcd client whose next ``lose`` write transactions commit in etcd but whose answers are lost on
    the way back, as when the member dies right after applying them: the client sees UNAVAILABLE and retries."""

    lose = 0

    def _stub(self, index: int) -> object:
        real = super()._stub(index)
        store = self

        class Stub:
            async def Txn(self, request: object, timeout: float | None = None, metadata: object = None) -> object:
                response = await real.Txn(request, timeout=timeout, metadata=metadata)
                if store.lose and request.compare:  # only our CAS writes, never reads
                    store.lose -= 1
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "injected: response lost")
                return response
        return Stub()


async def test_a_commit_whose_answer_was_lost_is_recognised_not_repeated(etcd_endpoints: list[str]) -> None:
    async with LostResponseStore(EtcdConfig.parse(etcd_endpoints)) as store:
        await add_pool(store, "p", "10.60.0.0/16")
        ipam = IPAM(store)
        store.lose = 1  # the claim transaction (block + affinity + handle) lands, its answer does not
        [first] = (await ipam.auto_assign("h1", "node-a")).ipv4
        store.lose = 1  # an allocation in the now existing block
        [second] = (await ipam.auto_assign("h2", "node-a")).ipv4
        assert ipam.stats["ambiguous_commits_resolved"] == 2
        held = await held_by_handle(store)
        assert held == {"h1": [first], "h2": [second]}  # nothing allocated twice
        assert check(await load_state(store)).ok

        store.lose = 1  # a release
        assert await ipam.release_by_handle("h1") == [first]
        assert await held_by_handle(store) == {"h2": [second]}
        assert check(await load_state(store)).ok
