"""bgpd.kube against the fake API server (tests/kubefake.py), and the controller against it plus a real etcd."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bgpd.controllers.kube_controllers import Controller
from bgpd.kube import Kube, KubeError
from bgpd.resources import WorkloadEndpoint, wep_name
from bgpd.store import save_wep
from ipam import keys
from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.datastore import Datastore, encode
from ipam.model import Block, IPAddress
from ipam.nodes import remove_node
from tests.etcdserver import free_port
from tests.integration.ipamhelpers import add_pool, store_for
from tests.kubefake import FakeKube


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def kube(fake: FakeKube) -> Iterator[Kube]:
    client = Kube.from_env({"KUBECONFIG": fake.kubeconfig})
    assert client is not None
    with client:
        yield client


# ---------------------------------------------------------------------- the adapter


def test_pods_get_and_list_across_namespaces(fake: FakeKube, kube: Kube) -> None:
    fake.add_pod("default", "web-0", node="node-a", labels={"app": "web"}, annotations={"note": "x"}, uid="u-1")
    fake.add_pod("kube-system", "dns-0", node="node-b", phase="Succeeded")
    fake.add_pod("default", "pending-0")

    pod = kube.get_pod("default", "web-0")
    assert pod is not None
    assert (pod.namespace, pod.name, pod.uid, pod.node, pod.phase) == ("default", "web-0", "u-1", "node-a", "Running")
    assert pod.labels == {"app": "web"} and pod.annotations == {"note": "x"}
    assert kube.get_pod("default", "gone") is None
    listed = {(p.namespace, p.name): p for p in kube.list_pods()}
    assert set(listed) == {("default", "web-0"), ("kube-system", "dns-0"), ("default", "pending-0")}
    assert listed[("kube-system", "dns-0")].phase == "Succeeded"
    assert listed[("default", "pending-0")].node is None and listed[("default", "pending-0")].phase == "Pending"
    # Lists are paged by the adapter (limit) even though the fake answers in one page.
    assert any(path == "/api/v1/pods" for method, path, _ in fake.requests if method == "GET")


def test_nodes_and_namespaces(fake: FakeKube, kube: Kube) -> None:
    fake.add_node("node-a", labels={"zone": "z1"}, annotations={"a": "1"}, internal_ip="10.0.0.1",
                  external_ip="203.0.113.1")
    fake.add_node("node-b")
    fake.add_namespace("team", annotations={"cni.projectcalico.org/ipv4pools": '["blue"]'})

    node = kube.get_node("node-a")
    assert node is not None
    assert node.labels == {"kubernetes.io/hostname": "node-a", "zone": "z1"} and node.annotations == {"a": "1"}
    assert (node.internal_ip, node.external_ip) == ("10.0.0.1", "203.0.113.1")
    assert kube.get_node("node-z") is None
    assert [n.name for n in kube.list_nodes()] == ["node-a", "node-b"]
    assert kube.list_nodes()[1].internal_ip is None
    assert kube.namespace_annotations("team") == {"cni.projectcalico.org/ipv4pools": '["blue"]'}
    assert kube.namespace_annotations("nobody") == {}
    fake.delete_node("node-b")
    assert kube.get_node("node-b") is None


def test_network_unavailable_condition_is_merged_by_type(fake: FakeKube, kube: Kube) -> None:
    fake.add_node("node-a")
    kube.set_network_unavailable("node-a", False, "CalicoIsUp", "Calico is running on this node")
    conditions = fake.node_status("node-a")
    assert conditions["NetworkUnavailable"]["status"] == "False"
    assert conditions["NetworkUnavailable"]["reason"] == "CalicoIsUp"
    assert conditions["Ready"]["status"] == "True"  # the kubelet's condition stays

    kube.set_network_unavailable("node-a", True, "CalicoIsDown", "Calico is shutting down on this node")
    conditions = fake.node_status("node-a")
    assert conditions["NetworkUnavailable"]["status"] == "True"
    assert list(conditions) == ["Ready", "NetworkUnavailable"]
    assert fake.requests[-1] == ("PATCH", "/api/v1/nodes/node-a/status", "application/strategic-merge-patch+json")

    with pytest.raises(KubeError, match=r"PATCH node node-z status failed with HTTP 404: nodes \"node-z\" not found"):
        kube.set_network_unavailable("node-z", False, "CalicoIsUp", "up")


def test_errors_are_one_line_kube_errors(fake: FakeKube, kube: Kube, tmp_path: Path) -> None:
    fake.fail_requests(403)
    with pytest.raises(KubeError, match=r"LIST pods failed with HTTP 403.*RBAC") as forbidden:
        kube.list_pods()
    assert "\n" not in str(forbidden.value)
    fake.fail_requests(500)
    with pytest.raises(KubeError, match="GET pod default/web-0 failed with HTTP 500"):
        kube.get_pod("default", "web-0")  # a 500 is not a 404: never "the pod is gone"
    fake.fail_requests(None)
    assert kube.list_pods() == []

    nobody = json.loads(Path(fake.kubeconfig).read_text())
    nobody["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(nobody))
    unreachable = Kube.from_env({"KUBECONFIG": str(path)})
    assert unreachable is not None
    with unreachable, pytest.raises(KubeError, match=r"LIST nodes failed: .*Connection refused; check that the API"):
        unreachable.list_nodes()


def test_configuration_from_env() -> None:
    assert Kube.from_env({}) is None
    with pytest.raises(KubeError, match="KUBECONFIG=/nonexistent/kubeconfig: no such file"):
        Kube.from_env({"KUBECONFIG": "/nonexistent/kubeconfig"})
    with pytest.raises(KubeError, match="in-cluster service account"):
        Kube.from_env({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})


def test_two_clients_coexist_and_the_fake_cleans_up() -> None:
    before = set(threading.enumerate())
    with FakeKube() as first, FakeKube() as second:
        first.add_pod("default", "only-in-first", node="n")
        one, two = Kube.from_env({"KUBECONFIG": first.kubeconfig}), Kube.from_env({"KUBECONFIG": second.kubeconfig})
        assert one is not None and two is not None
        with one, two:
            assert [p.name for p in one.list_pods()] == ["only-in-first"]
            assert two.list_pods() == []
        kubeconfig_dir = Path(first.kubeconfig).parent
    assert not kubeconfig_dir.exists()
    assert set(threading.enumerate()) <= before


# ---------------------------------------------------------------------- the controller, with a real etcd

POD_NETWORK = "k8s-pod-network"
GRACE = 2.0


@pytest.fixture
async def store(etcd_endpoints: list[str]) -> AsyncIterator[Datastore]:
    async with store_for(etcd_endpoints) as datastore:
        yield datastore


async def start_pod(ipam: IPAM, fake: FakeKube, name: str, node: str, container: str) -> IPAddress:
    """What a CNI ADD leaves behind: the Pod in the API, an address with its attributes, the endpoint record."""
    fake.add_pod("default", name, node=node)
    [address] = (await ipam.auto_assign(f"{POD_NETWORK}.{container}", node,
                                        attrs={"namespace": "default", "pod": name})).ipv4
    wep = WorkloadEndpoint(namespace="default", name=wep_name(node, "k8s", name, "eth0"), node=node,
                           container_id=container, pod=name, endpoint="eth0", interface=f"cali{container}",
                           ip_networks=(f"{address}/32",), mac="ee:ee:ee:ee:ee:ee", orchestrator="k8s")
    await save_wep(ipam.store, wep)
    return address


async def holder(store: Datastore, address: IPAddress) -> str | None:
    """The handle holding ``address`` now, or None."""
    state = await load_state(store)
    for block, _ in state.blocks.values():
        if address in block.cidr:
            attribute = block.attribute_of(block.ordinal(address))
            return attribute.handle_id if attribute else None
    return None


async def endpoints(store: Datastore) -> set[str]:
    return {WorkloadEndpoint.from_v3(kv.json()).pod
            for kv in await store.get_prefix(keys.resource_prefix("workloadendpoints"))}


async def test_a_deleted_pod_loses_its_address_after_the_grace_period_not_before(fake: FakeKube, kube: Kube,
                                                                                 store: Datastore) -> None:
    await add_pool(store, "default-ipv4-ippool", "10.244.0.0/24")
    fake.add_node("node-a")
    ipam = IPAM(store)
    web = await start_pod(ipam, fake, "web-0", "node-a", "c-web")
    db = await start_pod(ipam, fake, "db-0", "node-a", "c-db")
    [tunnel] = (await ipam.auto_assign("vxlan-tunnel-addr-node-a", "node-a", use="Tunnel")).ipv4
    controller = Controller(kube, ipam, gc_grace=GRACE)

    await controller.run_once(now=0.0)
    fake.delete_pod("default", "web-0")
    await controller.run_once(now=1.0)  # first seen missing
    await controller.run_once(now=1.0 + GRACE - 0.01)
    assert await holder(store, web) == f"{POD_NETWORK}.c-web"
    assert controller.stats["pod_ips_released"] == 0

    await controller.run_once(now=1.0 + GRACE)
    assert await holder(store, web) is None
    assert await store.get(keys.handle_key(f"{POD_NETWORK}.c-web")) is None
    assert await endpoints(store) == {"db-0"}
    assert await holder(store, db) == f"{POD_NETWORK}.c-db"  # a pod that exists keeps its address
    assert await holder(store, tunnel) == "vxlan-tunnel-addr-node-a"  # never a pod's
    assert controller.stats["pod_ips_released"] == 1 and controller.stats["endpoints_deleted"] == 1
    await controller.run_once(now=100.0)  # the next round sees the release done and forgets the handle
    assert controller.missing_since == {} and check(await load_state(store)).ok


async def test_a_restarted_controller_never_releases_early(fake: FakeKube, kube: Kube, store: Datastore) -> None:
    await add_pool(store, "default-ipv4-ippool", "10.244.0.0/24")
    fake.add_node("node-a")
    ipam = IPAM(store)
    web = await start_pod(ipam, fake, "web-0", "node-a", "c-web")
    db = await start_pod(ipam, fake, "db-0", "node-a", "c-db")
    fake.delete_pod("default", "web-0")
    first = Controller(kube, ipam, gc_grace=GRACE)
    await first.run_once(now=0.0)
    await first.run_once(now=GRACE - 0.5)

    restarted = Controller(kube, ipam, gc_grace=GRACE)  # memory lost: the grace period starts again
    await restarted.run_once(now=GRACE + 10.0)
    assert await holder(store, web) == f"{POD_NETWORK}.c-web"
    await restarted.run_once(now=2 * GRACE + 9.99)
    assert await holder(store, web) == f"{POD_NETWORK}.c-web"
    await restarted.run_once(now=2 * GRACE + 10.0)
    assert await holder(store, web) is None
    assert await holder(store, db) == f"{POD_NETWORK}.c-db"  # still there, through both controllers


async def test_a_failing_api_releases_nothing(fake: FakeKube, kube: Kube, store: Datastore) -> None:
    await add_pool(store, "default-ipv4-ippool", "10.244.0.0/24")
    fake.add_node("node-a")
    ipam = IPAM(store)
    web = await start_pod(ipam, fake, "web-0", "node-a", "c-web")
    controller = Controller(kube, ipam, gc_grace=0.0)
    fake.fail_requests(500)
    with pytest.raises(KubeError, match="HTTP 500"):
        await controller.run_once(now=0.0)
    fake.fail_requests(None)
    assert await holder(store, web) == f"{POD_NETWORK}.c-web" and controller.missing_since == {}


async def test_a_deleted_node_frees_its_blocks_for_the_next_node(fake: FakeKube, kube: Kube,
                                                                store: Datastore) -> None:
    # Two blocks of 16: node-a takes one, node-b the other; then node-a goes away.
    await add_pool(store, "default-ipv4-ippool", "10.244.0.0/27", block_size=28)
    for node in ("node-a", "node-b"):
        fake.add_node(node)
        await store.put(keys.resource_key("nodes", node), encode(
            {"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": node}, "spec": {}}))
    ipam = IPAM(store)
    web = await start_pod(ipam, fake, "web-0", "node-a", "c-web")
    [tunnel] = (await ipam.auto_assign("vxlan-tunnel-addr-node-a", "node-a", use="Tunnel")).ipv4
    await start_pod(ipam, fake, "db-0", "node-b", "c-db")
    block_a = next(a.cidr for a, _ in (await load_state(store)).affinities if a.node == "node-a")

    fake.delete_node("node-a")
    fake.delete_pod("default", "web-0")
    controller = Controller(kube, ipam, gc_grace=GRACE)
    await controller.run_once(now=0.0)
    assert await store.get(keys.affinity_key("node-a", block_a)) is not None  # within the grace period
    await controller.run_once(now=GRACE)

    assert await holder(store, web) is None and await holder(store, tunnel) is None
    assert await store.get_prefix(keys.host_prefix("node-a")) == []
    assert await store.get(keys.block_key(block_a)) is None
    assert await store.get(keys.resource_key("nodes", "node-a")) is None
    assert await endpoints(store) == {"db-0"}
    assert controller.stats["nodes_removed"] == 1 and controller.stats["pod_handles_released"] == 0

    # The pool has no other block: node-c's first allocation claims the one node-a had.
    [address] = (await ipam.auto_assign(f"{POD_NETWORK}.c-new", "node-c")).ipv4
    assert address in block_a
    assert await store.get(keys.affinity_key("node-c", block_a)) is not None
    fake.add_node("node-c")
    await controller.run_once(now=10 * GRACE)
    assert controller.stats["nodes_removed"] == 1  # nothing more to remove
    assert check(await load_state(store)).ok


async def test_a_removed_nodes_block_that_others_borrow_from_stays_without_affinity(store: Datastore) -> None:
    await add_pool(store, "default-ipv4-ippool", "10.244.0.0/27", block_size=28)
    ipam = IPAM(store)
    [own] = (await ipam.auto_assign(f"{POD_NETWORK}.a", "node-a")).ipv4
    await ipam.auto_assign(f"{POD_NETWORK}.b-many", "node-b", num_v4=16)  # node-b's block is full
    [borrowed] = (await ipam.auto_assign(f"{POD_NETWORK}.b-one", "node-b")).ipv4
    block_a = ipaddress.ip_network(f"{own}/28", strict=False)
    assert borrowed in block_a

    removal = await remove_node(ipam, "node-a")
    assert removal.released == [own] and removal.blocks_unaffined == [block_a] and not removal.blocks_deleted
    assert await holder(store, borrowed) == f"{POD_NETWORK}.b-one"
    assert Block.from_json((await store.get(keys.block_key(block_a))).json()).host is None
    assert check(await load_state(store)).ok
    assert (await remove_node(ipam, "node-a")).released == []  # again: nothing left

    await ipam.release_by_handle(f"{POD_NETWORK}.b-one")  # the last address: the ownerless block goes
    assert await store.get(keys.block_key(block_a)) is None
