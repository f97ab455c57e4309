"""calicoctl-py on a node of the lab: node status and diags against the running daemon, ipam show over etcd."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from tests.lab.bgp import CLI
from tests.lab.daemon import wait_ready
from tests.lab.handle import Deployer, LabHandle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)")


@pytest.fixture(scope="module")
def mesh(module_lab: Deployer) -> LabHandle:
    """One mesh3 for the module: the tests only read it."""
    handle = module_lab("mesh3.clab.yml")
    wait_ready(handle)
    return handle


def test_node_status_diags_and_ipam_show_on_a_lab_node(mesh: LabHandle, tmp_path: Path) -> None:
    handle = mesh
    status = handle.exec("node1", CLI, "node", "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "calico-py process is running."
    assert any(line.startswith("Node: node1   address: 10.0.0.11/24   ready: true") for line in lines)
    assert "IPv4 BGP status" in lines and "IPv6 BGP status" in lines

    diags = handle.exec("node1", CLI, "node", "diags", "--log-dir", str(tmp_path))
    assert diags.returncode == 0, diags.stderr
    [tarball] = tmp_path.glob("calico-py-diags-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"status.json", "ip-route.txt", "ip-addr.txt", "ip-neigh.txt"} <= names

    env = ["env", "ETCD_ENDPOINTS=http://172.20.20.2:2379"]
    shown = handle.exec("node1", *env, CLI, "ipam", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split()[:4] == ["IP", "Pool", "10.244.0.0/16", "65536"]
    pools = handle.exec("node1", *env, CLI, "get", "ippools", "-o", "wide").stdout.splitlines()
    assert pools[1].split()[:3] == ["default-ipv4-ippool", "10.244.0.0/16", "true"]  # NAT outgoing on by default


def test_node_status_without_daemon_in_a_bare_namespace(mesh: LabHandle) -> None:
    result = mesh.exec("etcd", CLI, "node", "status")  # the lab's etcd node runs no calico-py daemon
    assert result.returncode == 1 and result.stdout.strip() == "calico-py process is not running."
