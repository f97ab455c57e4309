"""The CNI IPAM path with Kubernetes annotations: real etcd, the real `kubernetes` client (through bgpd.kube)
against the small fake API server of tests/kubefake.py. Driven through the IPAM plugin (`calico-py-ipam`), which
allocates without plumbing, so no namespace is needed."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator

import pytest

from bgpd.cni.handler import CNIHandler
from bgpd.kube import Kube
from ipam.allocator import IPAM
from ipam.datastore import Datastore, EtcdConfig
from tests.integration.ipamhelpers import add_pool
from tests.kubefake import FakeKube

CONF = json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py-ipam"})


@pytest.fixture
async def store(etcd_endpoints: list[str]) -> AsyncIterator[Datastore]:
    async with Datastore(EtcdConfig.parse(etcd_endpoints)) as opened:
        await add_pool(opened, "default-ipv4-ippool", "10.244.0.0/16")
        await add_pool(opened, "blue", "10.250.0.0/16")
        yield opened


async def add(handler: CNIHandler, pod: str, namespace: str = "shop") -> tuple[int, dict]:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"c-{pod}", "CNI_NETNS": "/run/netns/unused",
           "CNI_IFNAME": "eth0", "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}", "CNI_PATH": "/x"}
    code, out = await handler.handle("calico-py-ipam", env, CONF)
    return code, json.loads(out)


def address(result: dict) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Interface(result["ips"][0]["address"]).ip


async def test_pool_and_fixed_address_annotations_choose_the_address(store: Datastore) -> None:
    with FakeKube() as fake:
        fake.add_namespace("shop")
        fake.add_namespace("blue-team", annotations={"cni.projectcalico.org/ipv4pools": '["blue"]'})
        fake.add_pod("shop", "plain", node="node1")
        fake.add_pod("shop", "in-blue", node="node1", labels={"app": "web"},
                     annotations={"cni.projectcalico.org/ipv4pools": '["10.250.0.0/16"]'})
        fake.add_pod("blue-team", "by-namespace", node="node1")
        fake.add_pod("shop", "fixed", node="node1", annotations={"cni.projectcalico.org/ipAddrs": '["10.244.77.7"]'})
        fake.add_pod("shop", "nowhere", node="node1", annotations={"cni.projectcalico.org/ipv4pools": '["gone"]'})
        kube = Kube.from_env({"KUBECONFIG": str(fake.kubeconfig)})
        assert kube is not None
        handler = CNIHandler(IPAM(store), "node1", kernel=None, default_mtu=lambda: 1500,  # type: ignore[arg-type]
                             pods=kube)

        code, plain = await add(handler, "plain")
        assert code == 0 and address(plain) in ipaddress.ip_network("10.244.0.0/16")
        code, blue = await add(handler, "in-blue")
        assert code == 0 and address(blue) in ipaddress.ip_network("10.250.0.0/16")
        code, by_namespace = await add(handler, "by-namespace", namespace="blue-team")
        assert code == 0 and address(by_namespace) in ipaddress.ip_network("10.250.0.0/16")
        code, fixed = await add(handler, "fixed")
        assert code == 0 and address(fixed) == ipaddress.ip_address("10.244.77.7")
        code, nowhere = await add(handler, "nowhere")
        assert code == 1 and nowhere["code"] == 7 and "gone" in nowhere["msg"], nowhere

        held = await store.get_prefix("/calico/ipam/v2/assignment/ipv4/block/")
        attributes = [a for kv in held for a in kv.json()["attributes"]]
        assert {"app": "web"} in [json.loads(a["secondary"]["labels"]) for a in attributes
                                  if (a.get("secondary") or {}).get("labels")]
        assert not await store.get("/calico/ipam/v2/handle/k8s-pod-network.c-nowhere")  # nothing taken
