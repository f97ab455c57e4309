"""The datastore's recovery listeners against a real etcd stopped and started again on its data."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from ipam.datastore import Datastore, EtcdConfig
from ipam.errors import DatastoreUnavailable
from tests.conftest import ETCD_MISSING
from tests.etcdserver import EtcdCluster, etcd_available

pytestmark = pytest.mark.etcd


async def test_listeners_run_once_when_etcd_answers_again_after_an_outage(tmp_path: Path) -> None:
    if not etcd_available():
        pytest.skip(ETCD_MISSING)
    with EtcdCluster(1, tmp_path / "etcd") as cluster:
        # Longer than gRPC's reconnect backoff (2 s at most), so the first request after the restart gets through.
        config = dataclasses.replace(EtcdConfig.parse(cluster.endpoints), failover_timeout=3.0)
        recovered: list[str] = []
        async with Datastore(config) as store:
            store.on_recovery(lambda: recovered.append(store.endpoint))
            await store.put("/recovery/key", b"kept")
            assert recovered == []  # answering all along is not a recovery

            cluster.stop_member(0)
            with pytest.raises(DatastoreUnavailable):
                await store.get("/recovery/key")
            with pytest.raises(DatastoreUnavailable):  # a second failed request: still one outage
                await store.get("/recovery/key")
            assert recovered == []
            assert store.unavailable == 2 and store.request_errors >= 2  # what /metrics reports

            await asyncio.to_thread(cluster.restart_member, 0)
            found = await store.get("/recovery/key")
            assert found is not None and found.value == b"kept"
            assert recovered == cluster.endpoints
            await store.get("/recovery/key")
            assert recovered == cluster.endpoints  # once per outage, not per request
