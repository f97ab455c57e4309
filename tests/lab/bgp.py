"""BGP in a lab: resources applied with calicoctl-py, pods placed on nodes, sessions and routes read back."""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.lab.cni import CONF, Pods, Runtime, cni_bin_dir
from tests.lab.daemon import wait_ready
from tests.lab.handle import LabHandle

CLI = str(Path(sys.executable).parent / "calicoctl-py")
MESH3_NODES = ("node1", "node2", "node3")
MESH3_ETCD = "172.20.20.2"
SESSION_SECONDS = 60.0


def place_pods(handle: LabHandle, pods: Pods, tmp_path: Path, nodes: tuple[str, ...], tag: str,
               config: dict[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """One pod per node through the CNI shim installed as a runtime has it; node -> (pod netns, address)."""
    bin_dir = tmp_path / "cni-bin"
    if not bin_dir.exists():
        cni_bin_dir(bin_dir)
    placed = {}
    for node in nodes:
        ns = pods.new(f"{tag}-{node}")
        added = Runtime(handle, bin_dir, node).call("ADD", config or CONF, f"{tag}{node}", ns, pod=f"{tag}-{node}")
        assert added.rc == 0, added
        placed[node] = (ns, added.json["ips"][0]["address"].split("/")[0])
    return placed


def remove_pods(handle: LabHandle, tmp_path: Path, placed: dict[str, tuple[str, str]], tag: str,
                config: dict[str, Any] | None = None) -> None:
    """CNI DEL of what :func:`place_pods` made, as the runtime sends it when the pods go."""
    for node, (ns, _) in placed.items():
        deleted = Runtime(handle, tmp_path / "cni-bin", node).call("DEL", config or CONF, f"{tag}{node}", ns,
                                                                   pod=f"{tag}-{node}")
        assert deleted.rc == 0, deleted


def apply_resources(handle: LabHandle, etcd: str, path: Path) -> None:
    applied = handle.exec("node1", "env", f"ETCD_ENDPOINTS=http://{etcd}:2379", CLI, "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr


def delete_resources(handle: LabHandle, etcd: str, path: Path) -> None:
    deleted = handle.exec("node1", "env", f"ETCD_ENDPOINTS=http://{etcd}:2379", CLI, "delete", "-f", str(path))
    assert deleted.returncode == 0, deleted.stderr


def sessions(handle: LabHandle, node: str) -> list[str]:
    return [line.split()[0] for line in handle.exec(node, CLI, "node", "status").stdout.splitlines()
            if line[:1].isdigit() and line.rstrip().endswith("Established")]


def peer_rows(handle: LabHandle, node: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in handle.exec(node, CLI, "node", "status").stdout.splitlines()
            if line[:1].isdigit()}


def has_route(handle: LabHandle, node: str, address: str) -> bool:
    return "via" in handle.exec(node, "ip", "route", "show", "proto", "80", "match", address).stdout


def sessions_of(handle: LabHandle, nodes: tuple[str, ...]) -> dict[str, list[str]]:
    """:func:`sessions` of every node, asked side by side (each answer is a calicoctl-py run)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        return dict(zip(nodes, pool.map(lambda node: sessions(handle, node), nodes), strict=True))


def wait_mesh(handle: LabHandle, nodes: tuple[str, ...] = MESH3_NODES, timeout: float = SESSION_SECONDS) -> None:
    """Every node has Established sessions to every other (a full mesh)."""
    handle.wait_for(lambda: all(len(peers) == len(nodes) - 1 for peers in sessions_of(handle, nodes).values()),
                    timeout, f"each of {', '.join(nodes)} to have Established sessions to the other nodes")


def mesh3(deploy: Callable[..., LabHandle]) -> LabHandle:
    """A mesh3 lab with every mesh session Established."""
    handle = deploy("mesh3.clab.yml")
    wait_mesh(handle)
    return handle


def set_restart_time(handle: LabHandle, tmp_path: Path, restart_time: str) -> None:
    """nodeMeshMaxRestartTime of the default BGPConfiguration; returns once the mesh is Established again."""
    config = tmp_path / "bgp-restart-time.yaml"
    config.write_text("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n"
                      f"spec: {{nodeMeshMaxRestartTime: {restart_time}}}\n")
    apply_resources(handle, MESH3_ETCD, config)
    wait_mesh(handle)


def mesh_with(deploy: Callable[..., LabHandle], tmp_path: Path, restart_time: str,
              node_env: dict[str, str] | None = None) -> LabHandle:
    """A mesh3 lab whose mesh has this graceful-restart time (and its daemons ``node_env``), every session
    Established."""
    handle = deploy("mesh3.clab.yml", node_env)
    wait_ready(handle)
    set_restart_time(handle, tmp_path, restart_time)
    return handle
