"""Fixtures for tests that need a real etcd (see tests/etcdserver.py); the lab fixtures come from tests/lab/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcdserver import EtcdCluster, etcd_available, wipe_all_keys

pytest_plugins = ["tests.lab.plugin"]

ETCD_MISSING = "etcd-server not installed: run `make test`, which installs it"


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One single-member etcd for the whole session; use ``etcd_endpoints`` to get it empty."""
    if not etcd_available():
        pytest.skip(ETCD_MISSING)
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd-server")) as cluster:
        yield cluster


@pytest.fixture
def etcd_endpoints(etcd_server: EtcdCluster) -> list[str]:
    """The client URLs of the session's etcd, with every key deleted before the test."""
    endpoints = etcd_server.endpoints
    wipe_all_keys(endpoints)
    return endpoints


@pytest.fixture
def etcd_cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster for this test alone, stopped afterwards."""
    if not etcd_available():
        pytest.skip(ETCD_MISSING)
    with EtcdCluster(3, tmp_path / "etcd-cluster3") as cluster:
        yield cluster
