"""The CNI handler's ADD / DEL / CHECK on a real etcd against a fake pod kernel (tests/fakekernel.py): what is
written, what is plumbed, in which order, and what a failed ADD leaves (nothing). The namespace descriptor is
this process's own (the fake kernel never enters it)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest

from bgpd.cni import spec
from bgpd.cni.handler import CNIHandler
from bgpd.resources import WorkloadEndpoint
from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.datastore import Datastore, EtcdConfig
from tests.fakekernel import FakePodKernel
from tests.integration.ipamhelpers import add_pool

CONFIG = json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py",
                     "ipam": {"type": "calico-py-ipam"}})


@pytest.fixture
async def store(etcd_endpoints: list[str]) -> AsyncIterator[Datastore]:
    async with Datastore(EtcdConfig.parse(etcd_endpoints)) as opened:
        await add_pool(opened, "default-ipv4-ippool", "10.244.0.0/16")
        yield opened


def env(command: str, container: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": "/proc/self/ns/net",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={container}"}


class Handler:
    """A handler on node1 with the fake kernel, recording what it tells the node's view, and when."""

    def __init__(self, store: Datastore, kernel: FakePodKernel) -> None:
        self.kernel = kernel
        self.told: list[tuple[str, bool, list[str]]] = []  # (key, written, kernel calls so far)
        self.handler = CNIHandler(IPAM(store), "node1", kernel, lambda: 1450, on_endpoint=self.endpoint)

    def endpoint(self, key: str, endpoint: WorkloadEndpoint | None) -> None:
        self.told.append((key, endpoint is not None, list(self.kernel.calls)))

    async def __call__(self, command: str, container: str) -> tuple[int, dict]:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            code, out = await self.handler.handle("calico-py", env(command, container), CONFIG,
                                                  spec.Netns("/proc/self/ns/net", fd, 0))
        finally:
            os.close(fd)
        return code, json.loads(out) if out else {}


async def test_add_writes_the_endpoint_before_the_route_and_del_takes_everything_back(store: Datastore) -> None:
    kernel = FakePodKernel()
    handler = Handler(store, kernel)
    code, result = await handler("ADD", "pod-a")
    assert code == 0, result
    assert result["ips"][0]["address"].startswith("10.244.") and kernel.veths
    assert kernel.calls == ["create_link", "configure_pod", "route_to_pod"]
    (key, written, calls_then), = handler.told
    assert written and "route_to_pod" not in calls_then  # the view knew the endpoint before the route existed
    assert (await handler("CHECK", "pod-a"))[0] == 0
    state = await load_state(store)
    assert len(state.handles) == 1 and check(state).ok
    assert (await handler("DEL", "pod-a"))[0] == 0 and (await handler("DEL", "pod-a"))[0] == 0  # idempotent
    assert not kernel.veths and handler.told[-1][:2] == (key, False)
    assert (await load_state(store)).handles == {}
    assert (await store.get(key)) is None


async def test_a_failed_add_leaves_nothing_behind(store: Datastore) -> None:
    kernel = FakePodKernel(fail="route_to_pod")
    handler = Handler(store, kernel)
    code, error = await handler("ADD", "pod-b")
    assert code == 1 and error["code"] == spec.IO_FAILURE and "refused by the fake kernel" in error["msg"]
    assert not kernel.veths and kernel.calls[-1] == "remove"
    assert (await load_state(store)).handles == {}
    assert handler.told[-1][1] is False  # the view forgot the endpoint it was told of
