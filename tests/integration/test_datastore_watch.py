"""Datastore.watch against a real etcd: events in order, resumed without loss or repeat across a restart of etcd
and a failover to another member, and a re-list when the revision to resume from was compacted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ipam.datastore import Datastore, Delete, EtcdConfig, Put, WatchUpdate
from tests.etcdserver import EtcdCluster, etcd_available, etcdctl

PODS, NODES, OTHER = "/test/watch/pods/", "/test/watch/nodes/", "/test/watch/other/"
DEADLINE = 60.0  # seconds for what should take well under one: the machine may be loaded


class Collector:
    """Runs a watch in a task and keeps every update; :meth:`state` applies them as a consumer would."""

    def __init__(self, store: Datastore, prefixes: list[str], start_revision: int | None = None) -> None:
        self.updates: list[WatchUpdate] = []
        self._task = asyncio.create_task(self._run(store, prefixes, start_revision))

    async def _run(self, store: Datastore, prefixes: list[str], start_revision: int | None) -> None:
        async for update in store.watch(prefixes, start_revision, prev_kv=True):
            self.updates.append(update)

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate():
            if self._task.done():
                self._task.result()  # the watch ended: show why
                raise AssertionError(f"the watch ended before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {DEADLINE:g}s waiting for {what}; got {self.updates}")
            await asyncio.sleep(0.02)

    async def until_revision(self, revision: int) -> None:
        await self.wait_for(lambda: bool(self.updates) and self.updates[-1].revision >= revision,
                            f"revision {revision}")

    def event_revisions(self) -> list[int]:
        return [event.revision for update in self.updates for event in update.events]

    def state(self) -> dict[str, bytes]:
        state: dict[str, bytes] = {}
        for update in self.updates:
            if update.resync is not None:
                state = {kv.key: kv.value for kvs in update.resync.prefixes.values() for kv in kvs}
            for event in update.events:
                if event.deleted:
                    del state[event.key]  # a delete of a key we never saw would fail here
                else:
                    state[event.key] = event.kv.value
        return state

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def collecting(store: Datastore, prefixes: list[str], start_revision: int | None = None
                     ) -> AsyncIterator[Collector]:
    collector = Collector(store, prefixes, start_revision)
    try:
        yield collector
    finally:
        await collector.stop()


def config(endpoints: list[str]) -> EtcdConfig:
    return EtcdConfig.parse(endpoints, request_timeout=2.0, failover_timeout=DEADLINE)


async def current_state(store: Datastore, prefixes: list[str]) -> dict[str, bytes]:
    snapshot = await store.read(prefixes=prefixes)
    return {kv.key: kv.value for kvs in snapshot.prefixes.values() for kv in kvs}


@pytest.fixture
def etcd_single(tmp_path: Path) -> EtcdCluster:
    """A one-member etcd of this test's own: it gets restarted."""
    if not etcd_available():
        pytest.skip("etcd-server not installed: run `make test`, which installs it")
    with EtcdCluster(1, tmp_path / "etcd") as cluster:
        yield cluster


async def test_events_arrive_in_order_after_the_listing(etcd_endpoints: list[str]) -> None:
    async with Datastore(config(etcd_endpoints)) as store:
        await store.put(PODS + "a", b"1")
        await store.put(OTHER + "x", b"not watched")
        async with collecting(store, [PODS, NODES]) as watch:
            await watch.wait_for(lambda: bool(watch.updates), "the listing")
            listing = watch.updates[0]
            assert listing.resync is not None and not listing.events
            assert [kv.key for kv in listing.resync.prefixes[PODS]] == [PODS + "a"]
            assert listing.resync.prefixes[NODES] == []
            written = [await store.put(PODS + "b", b"2"), await store.put(NODES + "n1", b"node")]
            both = await store.txn([], [Put(PODS + "a", b"3"), Delete(PODS + "b"), Put(OTHER + "y", b"-")])
            written.append(both.revision)
            written.append(await store.put(PODS + "a", b"4"))
            await watch.until_revision(written[-1])
            events = [event for update in watch.updates for event in update.events]
            assert sorted({event.revision for event in events}) == written  # each write seen, nothing else
            pods = [(e.key, e.deleted, e.kv.value) for e in events if e.key.startswith(PODS)]
            assert pods == [(PODS + "b", False, b"2"), (PODS + "a", False, b"3"), (PODS + "b", True, b""),
                            (PODS + "a", False, b"4")]  # in revision order; the txn's two events together
            deleted = next(e for e in events if e.deleted)
            assert deleted.prev is not None and deleted.prev.value == b"2"  # what was deleted (prev_kv)
            assert all(not e.key.startswith(OTHER) for e in events)
            assert watch.state() == await current_state(store, [PODS, NODES])


async def test_a_watch_from_a_revision_starts_there(etcd_endpoints: list[str]) -> None:
    async with Datastore(config(etcd_endpoints)) as store:
        first = await store.put(PODS + "a", b"1")
        second = await store.put(PODS + "a", b"2")
        async with collecting(store, [PODS], start_revision=second) as watch:
            await watch.until_revision(second)
            assert watch.updates[0].resync is None
            assert watch.event_revisions() == [second]  # not the earlier write at `first`
            assert first < second


async def test_a_restart_of_etcd_loses_nothing(etcd_single: EtcdCluster) -> None:
    """The only member goes down between writes and comes back on its data: the watch resumes after the last
    revision it delivered; every write arrives exactly once, in order. A client that only watches tells its
    recovery listeners (the daemon's full reconcile repairs drift from the outage) once it watches again."""
    recoveries: list[int] = []
    async with Datastore(config(etcd_single.endpoints)) as writer, \
            Datastore(config(etcd_single.endpoints)) as reader, collecting(reader, [PODS]) as watch:
        reader.on_recovery(lambda: recoveries.append(len(watch.updates)))
        await watch.wait_for(lambda: bool(watch.updates), "the listing")
        written = [await writer.put(f"{PODS}{i % 5}", str(i).encode()) for i in range(20)]
        await watch.until_revision(written[-1])
        # Down before the watch could see the next writes: those are written once it is back, while the
        # watch is still reconnecting (its retries back off) or just after.
        await asyncio.to_thread(etcd_single.restart_member, 0)
        written += [await writer.put(f"{PODS}{i % 5}", str(i).encode()) for i in range(20, 40)]
        written.append((await writer.txn([], [Delete(PODS + "3")])).revision)
        await watch.until_revision(written[-1])
        assert watch.event_revisions() == written
        assert [u.resync is not None for u in watch.updates].count(True) == 1  # the first listing only
        await watch.wait_for(lambda: bool(recoveries), "the recovery listener")
        assert len(recoveries) == 1
        assert watch.state() == await current_state(writer, [PODS])


async def test_a_failover_to_another_member_loses_nothing(etcd_cluster3: EtcdCluster) -> None:
    async with Datastore(config(etcd_cluster3.endpoints)) as writer, \
            Datastore(config(etcd_cluster3.endpoints)) as reader, collecting(reader, [PODS, NODES]) as watch:
        await watch.wait_for(lambda: bool(watch.updates), "the listing")
        written = [await writer.put(f"{PODS}{i}", b"x") for i in range(10)]
        await watch.until_revision(written[-1])
        watched = reader.config.endpoints.index(reader.endpoint)
        etcd_cluster3.kill(watched)
        written += [await writer.put(f"{NODES}{i}", b"y") for i in range(10)]
        written += [await writer.put(f"{PODS}{i}", b"z") for i in range(10)]
        await watch.wait_for(lambda: set(watch.event_revisions()) >= set(written), "every write")
        assert reader.endpoint != etcd_cluster3.endpoints[watched]
        revisions = watch.event_revisions()
        assert sorted(revisions) == written  # each once
        for prefix in (PODS, NODES):  # in order per prefix
            mine = [e.revision for u in watch.updates for e in u.events if e.key.startswith(prefix)]
            assert mine == sorted(mine)
        assert watch.state() == await current_state(writer, [PODS, NODES])


async def test_a_compacted_revision_leads_to_a_new_listing(etcd_endpoints: list[str]) -> None:
    async with Datastore(config(etcd_endpoints)) as store:
        old = await store.put(PODS + "gone", b"1")
        await store.delete_prefix(PODS)
        await store.put(PODS + "kept", b"2")
        compacted = await store.put(PODS + "kept", b"3")
        etcdctl(etcd_endpoints, "compact", str(compacted))
        async with collecting(store, [PODS], start_revision=old) as watch:
            await watch.wait_for(lambda: bool(watch.updates), "the new listing")
            listing = watch.updates[0]
            assert listing.resync is not None and listing.revision >= compacted
            assert [(kv.key, kv.value) for kv in listing.resync.prefixes[PODS]] == [(PODS + "kept", b"3")]
            after = await store.put(PODS + "new", b"4")
            await watch.until_revision(after)
            assert watch.event_revisions() == [after]  # the watch goes on after the listing's revision
            assert watch.state() == {PODS + "kept": b"3", PODS + "new": b"4"}


@pytest.mark.parametrize("compact", [False, True], ids=["kept", "compacted"])
async def test_writes_during_an_outage_of_the_watched_member(etcd_cluster3: EtcdCluster, compact: bool) -> None:
    """The watcher's only member is down while the others write: when it returns, the watch resumes after the
    last revision it delivered and gets what it missed as events; when that revision was compacted meanwhile,
    it lists again instead of missing what happened."""
    watched, others = etcd_cluster3.endpoints[:1], etcd_cluster3.endpoints[1:]
    async with Datastore(config(others)) as writer, Datastore(config(watched)) as reader, \
            collecting(reader, [PODS]) as watch:
        await watch.wait_for(lambda: bool(watch.updates), "the listing")
        seen = await writer.put(PODS + "a", b"1")
        await watch.until_revision(seen)
        etcd_cluster3.stop_member(0)
        missed = [await writer.put(PODS + "a", b"2"), await writer.put(PODS + "b", b"3"),
                  (await writer.txn([], [Delete(PODS + "a")])).revision]
        if compact:
            etcdctl(others, "compact", str(missed[-1]))
        await asyncio.to_thread(etcd_cluster3.restart_member, 0)
        if compact:
            await watch.wait_for(lambda: sum(u.resync is not None for u in watch.updates) == 2, "the new listing")
            relisted = next(u for u in watch.updates[1:] if u.resync is not None)
            assert relisted.revision >= missed[-1]
            assert [kv.key for kv in relisted.resync.prefixes[PODS]] == [PODS + "b"]
        else:
            await watch.until_revision(missed[-1])
            assert watch.event_revisions() == [seen, *missed]
            assert sum(u.resync is not None for u in watch.updates) == 1
        after = await writer.put(PODS + "c", b"4")
        await watch.until_revision(after)
        assert watch.event_revisions()[-1] == after
        assert watch.state() == await current_state(writer, [PODS])
