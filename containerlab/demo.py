"""`calico-py-lab demo`: show a deployed lab's fabric working — pods on every calico-py node through the CNI
plugin, each node's `node status`, and the pod-to-pod ping matrix.

Pods are network namespaces named ``clab-<lab>-pod-<node>-<n>``; `destroy` removes them with the lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bgpd.cni.install import install
from containerlab import netns
from containerlab.images import spec_for
from containerlab.lab import Lab
from containerlab.netns import LabError

CLI = Path(sys.executable).parent / "calicoctl-py"
CONF = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py", "ipam": {"type": "calico-py-ipam"}}


def calico_nodes(lab: Lab) -> list[str]:
    return [n.name for n in lab.topology.nodes.values()
            if n.kind == "linux" and (spec := spec_for(n.image)) is not None and spec.name == "calico-py-node"]


def wait_ready(lab: Lab, nodes: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for node in nodes:
        log = lab.run_dir / node / "calico-py-node.log"
        while not (log.exists() and " ready " in log.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise LabError(f"calico-py-node on {node} is not ready after {timeout:g}s; see {log}")
            time.sleep(0.1)


def wait_sessions(lab: Lab, nodes: list[str], timeout: float = 60.0) -> list[str]:
    """Until every node's BGP peers are Established (a node with no peers has nothing to wait for). Returns the
    sessions that are not, one line each naming the node, the peer and the logs that say why."""
    deadline = time.monotonic() + timeout
    down: list[str] = []
    for node in nodes:
        while True:
            out = netns.ns_exec(lab.netns(node), [str(CLI), "node", "status"]).stdout
            peers = [line for line in out.splitlines() if line[:1].isdigit()]
            stuck = [line for line in peers if not line.rstrip().endswith("Established")]
            if not stuck:
                break
            if time.monotonic() > deadline:
                logs = f"{lab.run_dir / node / 'exabgp.log'} and calico-py-node.log beside it"
                down += [f"{node}: BGP session to {line.split()[0]} not Established after {timeout:g}s"
                         f" ({' '.join(line.split()[3:])}); see {logs}" for line in stuck]
                break
            time.sleep(0.2)  # polling node status, with the deadline above
    return down


def add_pod(lab: Lab, bin_dir: Path, node: str, index: int) -> tuple[str, str]:
    """Create pod ``index`` on ``node`` through the CNI plugin, as a runtime would; returns (netns, address)."""
    pod_ns = f"{lab.mgmt_ns}-pod-{node}-{index}"
    if pod_ns not in netns.namespaces():
        netns.create_namespace(pod_ns)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"demo-{node}-{index}",
           "CNI_NETNS": f"/run/netns/{pod_ns}", "CNI_IFNAME": "eth0", "CNI_PATH": str(bin_dir),
           "CNI_ARGS": f"K8S_POD_NAMESPACE=demo;K8S_POD_NAME={node}-{index}"}
    result = subprocess.run(["ip", "netns", "exec", lab.netns(node), str(bin_dir / "calico-py")], env=env,
                            input=json.dumps(CONF), capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise LabError(f"CNI ADD of pod {index} on {node} failed: {result.stdout.strip() or result.stderr.strip()}")
    return pod_ns, json.loads(result.stdout)["ips"][0]["address"].split("/")[0]


def ping(pod_ns: str, address: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if netns.ns_exec(pod_ns, ["ping", "-c1", "-W1", address]).returncode == 0:
            return True
    return False


def run(lab: Lab, pods_per_node: int = 2) -> int:
    nodes = calico_nodes(lab)
    if not nodes:
        raise LabError("this lab has no calico-py nodes")
    wait_ready(lab, nodes)
    with tempfile.TemporaryDirectory(prefix="calico-py-demo-") as tmp:
        bin_dir = Path(tmp)
        plugin = install(bin_dir)
        pods = [(node, *add_pod(lab, bin_dir, node, i)) for node in nodes for i in range(1, pods_per_node + 1)]
    down = wait_sessions(lab, nodes)
    for line in down:
        print(f"warning: {line}")
    print(f"\n{len(pods)} pods created through the CNI plugin, the {plugin}:")
    for node, pod_ns, address in pods:
        print(f"  {pod_ns:32} on {node:8} {address}")
    for node in nodes:
        print(f"\n== {node}: calicoctl-py node status")
        sys.stdout.write(netns.ns_exec(lab.netns(node), [str(CLI), "node", "status"]).stdout)
    print("\nPod-to-pod ping matrix (rows ping columns):")
    width = max(len(a) for _, _, a in pods) + 2
    print(" " * width + "".join(a.ljust(width) for _, _, a in pods))
    failures = 0
    for _, pod_ns, source in pods:
        cells = []
        for _, _, target in pods:
            ok = target == source or ping(pod_ns, target)
            failures += not ok
            cells.append(("-" if target == source else "ok" if ok else "FAIL").ljust(width))
        print(source.ljust(width) + "".join(cells))
    print(f"\n{'all pods reach each other' if not failures else f'{failures} pairs FAILED'}")
    if down:
        print(f"{len(down)} BGP sessions are not Established (see the warnings above)")
    return 1 if failures or down else 0
