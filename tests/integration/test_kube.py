"""bgpd.kube against the fake API server (tests/kubefake.py), and the controller against it plus a real etcd."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgpd.kube import Kube, KubeError
from tests.etcdserver import free_port
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
