"""The daemon's health and metrics endpoints in a running mesh3 lab: /metrics shows the sessions, routes and CNI
requests the lab implies; /readiness turns false while etcd is stopped and true again once it is back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from containerlab import netns
from tests.lab.bgp import mesh3, place_pods
from tests.lab.cni import Pods
from tests.lab.handle import Deployer, LabHandle
from tests.lab.health import get, sample

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")


@pytest.fixture(scope="module")
def mesh(module_lab: Deployer) -> LabHandle:
    """One mesh3 for both tests, in this order: the metrics test counts from a fresh daemon (its pods stay), the
    readiness test stops etcd and starts it again."""
    return mesh3(module_lab)


def test_metrics_show_what_the_lab_implies(mesh: LabHandle, pods: Pods, tmp_path: Path) -> None:
    place_pods(mesh, pods, tmp_path, ("node1", "node2", "node3"), "hm")

    def settled() -> bool:
        status, metrics = get(mesh, "node1", "/metrics")
        return status == 200 and sample(metrics, "calico_py_kernel_routes", type="remote") == 2.0
    mesh.wait_for(settled, timeout=30, what="node1's metrics to show the other two nodes' blocks")
    _, metrics = get(mesh, "node1", "/metrics")
    assert sample(metrics, "calico_py_bgp_sessions", state="established") == 2.0
    assert sample(metrics, "calico_py_bgp_peer_up", peer="10.0.0.12", type="node-to-node mesh") == 1.0
    assert sample(metrics, "calico_py_bgp_routes_learned", peer="10.0.0.13") == 1.0
    assert sample(metrics, "calico_py_bgp_routes_advertised") == 1.0
    assert sample(metrics, "calico_py_kernel_routes", type="blackhole") == 1.0
    assert sample(metrics, "calico_py_kernel_routes", type="workload") == 1.0
    assert sample(metrics, "calico_py_workloads") == 1.0
    assert sample(metrics, "calico_py_cni_request_duration_seconds_count", command="ADD", result="ok") == 1.0
    assert sample(metrics, "calico_py_cni_requests_total", command="ADD", result="ok") == 1.0
    assert sample(metrics, "calico_py_ipam_allocations_total") == 1.0
    assert (sample(metrics, "calico_py_reconcile_runs_total", kind="full") or 0) >= 1
    assert get(mesh, "node1", "/liveness")[0] == 200


def test_readiness_follows_the_datastore(mesh: LabHandle) -> None:
    mesh.wait_for(lambda: get(mesh, "node1", "/readiness")[0] == 200, timeout=30, what="node1 to be ready")
    netns.stop_pids([(pid, None) for pid in netns.namespace_pids(mesh.netns("etcd"))])
    mesh.wait_for(lambda: get(mesh, "node1", "/readiness")[0] == 503, timeout=30,
                  what="node1 to be not ready with etcd stopped")
    assert "datastore" in get(mesh, "node1", "/readiness")[1]
    assert get(mesh, "node1", "/liveness")[0] == 200  # not ready, but alive: nothing to restart
    mesh.lab.deploy()  # starts etcd again, on its data
    mesh.wait_for(lambda: get(mesh, "node1", "/readiness")[0] == 200, timeout=60,
                  what="node1 to be ready again once etcd is back")
