"""CNI GC against a real etcd: addresses of attachments the runtime no longer has are released even when no
WorkloadEndpoint records them (the IPAM plugin's, or an ADD or DEL a crash cut short); valid attachments, other
networks, other nodes and tunnel addresses stay. Driven through the IPAM plugin, so no namespace is needed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from bgpd.cni.handler import CNIHandler
from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.datastore import Datastore, EtcdConfig
from tests.fakekernel import FakePodKernel
from tests.integration.ipamhelpers import add_pool

NET = "k8s-pod-network"


@pytest.fixture
async def store(etcd_endpoints: list[str]) -> AsyncIterator[Datastore]:
    async with Datastore(EtcdConfig.parse(etcd_endpoints)) as opened:
        await add_pool(opened, "default-ipv4-ippool", "10.244.0.0/16")
        yield opened


async def call(handler: CNIHandler, command: str, container_id: str, config: dict[str, object]) -> tuple[int, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": "/run/netns/unused",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    return await handler.handle("calico-py-ipam", env, json.dumps(config))


async def test_gc_releases_addresses_without_endpoint_of_attachments_the_runtime_lost(store: Datastore) -> None:
    ipam = IPAM(store)
    kernel = FakePodKernel()
    node1 = CNIHandler(ipam, "node1", kernel, lambda: 1500)
    node2 = CNIHandler(ipam, "node2", kernel, lambda: 1500)
    conf = {"cniVersion": "1.1.0", "name": NET, "type": "calico-py-ipam"}
    for container in ("kept", "lost-1", "lost-2"):
        assert (await call(node1, "ADD", container, conf))[0] == 0
    assert (await call(node2, "ADD", "on-node2", conf))[0] == 0
    assert (await call(node1, "ADD", "other-net", {**conf, "name": "other"}))[0] == 0
    await ipam.auto_assign("ipip-tunnel-addr-node1", "node1", use="Tunnel")

    valid = {**conf, "cni.dev/valid-attachments": [{"containerID": "kept", "ifname": "eth0"}]}
    code, out = await call(node1, "GC", "", valid)
    assert code == 0, out

    handles = set((await load_state(store)).handles)
    assert handles == {f"{NET}.kept", f"{NET}.on-node2", "other.other-net", "ipip-tunnel-addr-node1"}
    report = check(await load_state(store))
    assert report.ok, report.problems
    assert report.allocated == 4
    # GC again changes nothing: idempotent.
    assert (await call(node1, "GC", "", valid))[0] == 0
    assert set((await load_state(store)).handles) == handles
