"""The controller's pure planning: which pods' addresses and which nodes go, and when."""

from __future__ import annotations

import ipaddress

import pytest

from bgpd.controllers.plan import (
    ControllerConfigError,
    EndpointRecord,
    Observed,
    PodAllocation,
    ReleasePod,
    RemoveNode,
    Settings,
    plan_actions,
    pod_allocations,
)
from bgpd.kube import KubePod
from bgpd.resources import WorkloadEndpoint
from ipam import blocks
from ipam.model import AllocationAttribute

GRACE = 300.0


def pod(namespace: str, name: str, node: str | None = "node-a", phase: str = "Running") -> KubePod:
    return KubePod(namespace=namespace, name=name, uid=f"uid-{name}", node=node, labels={}, annotations={},
                   phase=phase)


def allocation(name: str, node: str = "node-a", container: str | None = None, address: str = "10.244.0.1",
               namespace: str = "default") -> PodAllocation:
    return PodAllocation(f"k8s-pod-network.{container or 'c-' + name}", namespace, name, node,
                         addresses={ipaddress.ip_address(address): 7})


def endpoint(name: str, node: str, container: str, namespace: str = "default") -> EndpointRecord:
    wep = WorkloadEndpoint(namespace=namespace, name=f"{node}-k8s-{name}-eth0", node=node, container_id=container,
                           pod=name, endpoint="eth0", interface="cali0", ip_networks=("10.244.0.1/32",), mac="",
                           orchestrator="k8s")
    return EndpointRecord(wep.key, 42, wep)


def observed(pods: list[KubePod], allocations: list[PodAllocation], kube_nodes: set[str] | None = None,
             calico_nodes: set[str] | None = None, endpoints: tuple[EndpointRecord, ...] = ()) -> Observed:
    return Observed(pods={(p.namespace, p.name): p for p in pods},
                    kube_nodes=frozenset({"node-a"} if kube_nodes is None else kube_nodes),
                    calico_nodes=frozenset({"node-a"} if calico_nodes is None else calico_nodes),
                    allocations=tuple(allocations), endpoints=endpoints)


def test_a_pod_that_exists_keeps_its_addresses() -> None:
    plan = plan_actions(observed([pod("default", "web")], [allocation("web")]), {}, now=1000.0, grace=GRACE)
    assert plan.actions == [] and plan.missing_since == {}


def test_a_missing_pod_is_released_only_after_the_grace_period() -> None:
    seen = observed([], [allocation("web")])
    first = plan_actions(seen, {}, now=1000.0, grace=GRACE)
    assert first.actions == [] and first.missing_since == {"pod:k8s-pod-network.c-web": 1000.0}
    almost = plan_actions(seen, first.missing_since, now=1000.0 + GRACE - 0.001, grace=GRACE)
    assert almost.actions == []
    due = plan_actions(seen, almost.missing_since, now=1000.0 + GRACE, grace=GRACE)
    assert due.actions == [ReleasePod(allocation("web"), "pod-missing", GRACE)]
    assert due.missing_since == first.missing_since  # kept until the release is seen done (a failure retries)


def test_forgotten_times_restart_the_grace_period() -> None:
    """A restarted controller has no memory: it must wait the whole grace period again, never release early."""
    seen = observed([], [allocation("web")])
    restarted = plan_actions(seen, {}, now=1_000_000.0, grace=GRACE)
    assert restarted.actions == [] and restarted.missing_since == {"pod:k8s-pod-network.c-web": 1_000_000.0}


def test_a_pod_that_comes_back_clears_its_timer() -> None:
    plan = plan_actions(observed([pod("default", "web")], [allocation("web")]),
                        {"pod:k8s-pod-network.c-web": 0.0, "pod:gone-handle": 0.0}, now=1000.0, grace=GRACE)
    assert plan.actions == [] and plan.missing_since == {}


@pytest.mark.parametrize(("kube_pod", "reason"), [
    (pod("default", "web", node="node-b"), "pod-on-other-node"),
    (pod("default", "web", phase="Succeeded"), "pod-finished"),
    (pod("default", "web", phase="Failed"), "pod-finished"),
    (pod("other", "web"), "pod-missing"),  # same name, another namespace
])
def test_stale_reasons(kube_pod: KubePod, reason: str) -> None:
    seen = observed([kube_pod], [allocation("web")])
    plan = plan_actions(seen, {"pod:k8s-pod-network.c-web": 0.0}, now=GRACE, grace=GRACE)
    assert [(type(a), a.reason) for a in plan.actions] == [(ReleasePod, reason)]  # type: ignore[union-attr]


@pytest.mark.parametrize("kube_pod", [pod("default", "web", phase="Pending"), pod("default", "web", node=None)])
def test_pending_and_unscheduled_pods_keep_their_addresses(kube_pod: KubePod) -> None:
    assert plan_actions(observed([kube_pod], [allocation("web")]), {}, now=0.0, grace=0.0).actions == []


def test_only_the_released_sandboxs_endpoint_goes() -> None:
    old, new = endpoint("web", "node-a", "c-web"), endpoint("web", "node-a", "c-newer")
    other_namespace = endpoint("web", "node-a", "c-web", namespace="team")
    plan = plan_actions(observed([], [allocation("web")], endpoints=(old, new, other_namespace)), {}, now=0.0,
                        grace=0.0)
    [action] = plan.actions
    assert isinstance(action, ReleasePod) and action.endpoints == (old,)


def test_a_sandbox_replaced_without_a_del_is_released_and_its_successor_kept() -> None:
    """The pod was recreated under its name on the same node and the old sandbox's DEL never came: the endpoint
    now names the new container, so the old handle is stale; the new one is not."""
    old, new = allocation("web", container="c-old"), allocation("web", container="c-new", address="10.244.0.2")
    seen = observed([pod("default", "web")], [old, new], endpoints=(endpoint("web", "node-a", "c-new"),))
    first = plan_actions(seen, {}, now=0.0, grace=GRACE)
    assert first.actions == [] and first.missing_since == {"pod:k8s-pod-network.c-old": 0.0}
    due = plan_actions(seen, first.missing_since, now=GRACE, grace=GRACE)
    assert [(a.allocation.handle, a.reason) for a in due.actions  # type: ignore[union-attr]
            ] == [("k8s-pod-network.c-old", "pod-replaced")]


def test_a_pod_without_an_endpoint_is_not_judged_replaced() -> None:
    # The IPAM plugin used on its own writes no endpoint: no endpoint proves nothing about the sandbox.
    seen = observed([pod("default", "web")], [allocation("web", container="c-1"), allocation("web", container="c-2")])
    assert plan_actions(seen, {}, now=0.0, grace=0.0).actions == []


def test_a_node_gone_from_kubernetes_is_removed_after_the_grace_period_with_its_pods() -> None:
    seen = observed([pod("default", "web", node="node-b")],
                    [allocation("web", node="node-b"), allocation("db", node="node-a", address="10.244.0.2")],
                    kube_nodes={"node-a"}, calico_nodes={"node-a", "node-b"},
                    endpoints=(endpoint("web", "node-b", "c-web"),))
    first = plan_actions(seen, {}, now=10.0, grace=GRACE)
    assert first.actions == [] and set(first.missing_since) == {"node:node-b", "pod:k8s-pod-network.c-db"}
    due = plan_actions(seen, first.missing_since, now=10.0 + GRACE, grace=GRACE)
    # The node's removal releases its pods' addresses: no separate pod action for them.
    assert due.actions == [RemoveNode("node-b", GRACE, (endpoint("web", "node-b", "c-web"),)),
                           ReleasePod(allocation("db", node="node-a", address="10.244.0.2"), "pod-missing", GRACE)]


def test_an_empty_node_list_never_removes_nodes() -> None:
    seen = observed([], [], kube_nodes=set(), calico_nodes={"node-a", "node-b"})
    assert plan_actions(seen, {"node:node-a": 0.0}, now=10 * GRACE, grace=GRACE) == plan_actions(seen, {}, 0, GRACE)
    assert plan_actions(seen, {}, now=0.0, grace=0.0).actions == []


def test_pod_allocations_skip_tunnels_and_plain_cni_and_group_by_handle() -> None:
    block = blocks.new_block(ipaddress.ip_network("10.244.0.0/29"), "node-a", 1)
    for handle, secondary, count in [
        ("k8s-pod-network.c1", {"namespace": "default", "pod": "web", "node": "node-a"}, 2),
        ("vxlan-tunnel-addr-node-a", {"node": "node-a", "namespace": "x", "pod": "y"}, 1),
        ("cni-net.c2", {"node": "node-a"}, 1),
        ("k8s-pod-network.c3", {"namespace": "team", "pod": "db"}, 1),  # no node attribute: the block's node
    ]:
        block, _ = blocks.allocate(block, count, AllocationAttribute(handle, secondary))
    found = {a.handle: a for a in pod_allocations([block])}
    assert set(found) == {"k8s-pod-network.c1", "k8s-pod-network.c3"}
    web = found["k8s-pod-network.c1"]
    assert (web.namespace, web.pod, web.node, web.container_id) == ("default", "web", "node-a", "c1")
    assert len(web.addresses) == 2 and all(seq > 0 for seq in web.addresses.values())
    assert found["k8s-pod-network.c3"].node == "node-a"


def test_settings() -> None:
    assert Settings.from_env({}) == Settings(30.0, 300.0)
    assert Settings.from_env({"CONTROLLER_INTERVAL": "5", "CONTROLLER_GC_GRACE": "0"}) == Settings(5.0, 0.0)
    with pytest.raises(ControllerConfigError, match=r"CONTROLLER_INTERVAL='0': .* seconds from 0.1 to 86400"):
        Settings.from_env({"CONTROLLER_INTERVAL": "0"})
    with pytest.raises(ControllerConfigError, match=r"CONTROLLER_GC_GRACE='soon': .* from 0 to 604800"):
        Settings.from_env({"CONTROLLER_GC_GRACE": "soon"})
