"""The daemon's health and metrics endpoints in a running mesh3 lab: /metrics shows the sessions, routes and CNI
requests the lab implies; /readiness turns false while etcd is stopped and true again once it is back."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from containerlab import netns
from tests.e2e.test_bgp import mesh3, place_pods  # noqa: F401 - mesh3 is a fixture
from tests.e2e.test_cni import Pods
from tests.labfixture import LabHandle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")
FETCH = ("import sys, urllib.request, urllib.error\n"
         "try:\n"
         "    answer = urllib.request.urlopen('http://127.0.0.1:9099' + sys.argv[1], timeout=10)\n"
         "    print(answer.status); print(answer.read().decode())\n"
         "except urllib.error.HTTPError as error:\n"
         "    print(error.code); print(error.read().decode())\n")


def get(handle: LabHandle, node: str, path: str) -> tuple[int, str]:
    out = handle.exec(node, sys.executable, "-c", FETCH, path).stdout
    status, _, body = out.partition("\n")
    return int(status or 0), body


def sample(metrics: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_metrics_show_what_the_lab_implies(mesh3: LabHandle, pods: Pods, tmp_path: Path) -> None:  # noqa: F811
    place_pods(mesh3, pods, tmp_path, ("node1", "node2", "node3"), "hm")

    def settled() -> bool:
        status, metrics = get(mesh3, "node1", "/metrics")
        return status == 200 and sample(metrics, "calico_py_kernel_routes", type="remote") == 2.0
    mesh3.wait_for(settled, timeout=30, what="node1's metrics to show the other two nodes' blocks")
    _, metrics = get(mesh3, "node1", "/metrics")
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
    assert get(mesh3, "node1", "/liveness")[0] == 200


def test_readiness_follows_the_datastore(mesh3: LabHandle) -> None:  # noqa: F811
    mesh3.wait_for(lambda: get(mesh3, "node1", "/readiness")[0] == 200, timeout=30, what="node1 to be ready")
    netns.stop_pids([(pid, None) for pid in netns.namespace_pids(mesh3.netns("etcd"))])
    mesh3.wait_for(lambda: get(mesh3, "node1", "/readiness")[0] == 503, timeout=30,
                   what="node1 to be not ready with etcd stopped")
    assert "datastore" in get(mesh3, "node1", "/readiness")[1]
    assert get(mesh3, "node1", "/liveness")[0] == 200  # not ready, but alive: nothing to restart
    mesh3.lab.deploy()  # starts etcd again, on its data
    mesh3.wait_for(lambda: get(mesh3, "node1", "/readiness")[0] == 200, timeout=60,
                   what="node1 to be ready again once etcd is back")
