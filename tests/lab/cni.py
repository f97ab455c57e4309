"""CNI in a lab: pods as network namespaces, a runtime that calls the installed plugins as a container runtime
does, and what a node's kernel and the datastore hold for them.

The constants describe the default mesh3 lab (node1 as the CNI node, etcd on the management network).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgpd.cni.install import Kind, install
from tests.lab.handle import LabHandle

PORTMAP = Path("/usr/lib/cni/portmap")
NODE = "node1"
NETWORK = "k8s-pod-network"
CONF: dict[str, Any] = {"cniVersion": "1.0.0", "name": NETWORK, "type": "calico-py",
                        "ipam": {"type": "calico-py-ipam"}}
ETCD = "http://172.20.20.2:2379"
POOL = ipaddress.ip_network("10.244.0.0/16")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Run inside a node: one snapshot of IPAM (the consistency check), the handles and the workload endpoints.
IPAM_STATE = """
import asyncio, json
from ipam import check, keys
from ipam.datastore import Datastore, EtcdConfig

async def main():
    async with Datastore(EtcdConfig.from_env()) as store:
        state = await check.load_state(store)
        weps = [kv.key for kv in await store.get_prefix(keys.resource_prefix("workloadendpoints"))]
    print(json.dumps({"report": check.check(state).to_json(), "handles": sorted(state.handles), "weps": weps}))

asyncio.run(main())
"""


def run(argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def in_ns(ns: str, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], timeout=timeout)


def ip_json(handle: LabHandle, *argv: str, node: str = NODE) -> Any:
    result = handle.exec(node, "ip", "-j", *argv)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "[]")


def cali_links(handle: LabHandle) -> set[str]:
    return {link["ifname"] for link in ip_json(handle, "link", "show") if link["ifname"].startswith("cali")}


def host_routes(handle: LabHandle) -> dict[str, str]:
    """The node's proto-80 routes to single addresses (pods), destination -> device. Blackholes excluded."""
    return {r["dst"]: r.get("dev", "") for r in ip_json(handle, "route", "show", "proto", "80")
            if r.get("type") != "blackhole" and "/" not in r["dst"]}


def ipam_state(handle: LabHandle) -> dict[str, Any]:
    result = run(["ip", "netns", "exec", handle.netns(NODE), sys.executable, "-c", IPAM_STATE], timeout=60,
                 env={"PATH": PATH, "ETCD_ENDPOINTS": ETCD})
    assert result.returncode == 0, f"ipam state snippet failed: {result.stderr}"
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def assert_nothing_left(handle: LabHandle, container_ids: list[str] | None = None) -> dict[str, Any]:
    """No cali veth, no proto-80 /32 route, no IPAM handle and no endpoint (of ``container_ids``, or at all)."""
    state = ipam_state(handle)
    if container_ids is None:
        assert cali_links(handle) == set()
        assert host_routes(handle) == {}
        assert state["handles"] == [], state["handles"]
        assert state["weps"] == [], state["weps"]
    else:
        handles = {f"{NETWORK}.{c}" for c in container_ids}
        assert not handles & set(state["handles"]), state["handles"]
    assert state["report"]["problems"] == [], state["report"]["problems"]
    return state


def cni_bin_dir(bin_dir: Path, kind: Kind = "c") -> Path:
    """A CNI_PATH directory as a node has it: calico-py and calico-py-ipam installed by bgpd.cni.install (the C
    shim unless told otherwise: InstallError if it cannot be built), and the reference plugins next to them."""
    install(bin_dir, kind=kind)
    if PORTMAP.exists():
        (bin_dir / "portmap").symlink_to(PORTMAP)
    return bin_dir


@dataclass
class Call:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"{self.argv[-1]} exit {self.rc}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Runtime:
    """Calls CNI plugins as a container runtime does: found on CNI_PATH by ``type``, run in the node's network
    namespace with the CNI_* environment, the configuration on stdin."""

    def __init__(self, handle: LabHandle, bin_dir: Path, node: str = NODE) -> None:
        self.handle = handle
        self.bin_dir = bin_dir
        self.node = node

    def call(self, command: str, config: dict[str, Any], container_id: str, netns: str | None, *,
             pod: str = "", namespace: str = "cnitest", ifname: str = "eth0", stdin: str | None = None,
             timeout: float = 120.0) -> Call:
        env = {"PATH": PATH, "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname,
               "CNI_PATH": str(self.bin_dir)}
        if netns is not None:
            env["CNI_NETNS"] = netns if netns.startswith("/") else f"/run/netns/{netns}"
        if pod:
            env["CNI_ARGS"] = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"
        argv = ["ip", "netns", "exec", self.handle.netns(self.node), str(self.bin_dir / config["type"])]
        result = run(argv, timeout=timeout, env=env, input=json.dumps(config) if stdin is None else stdin)
        return Call(argv, result.returncode, result.stdout, result.stderr)

    def add(self, container_id: str, netns: str, pod: str = "", **kw: Any) -> Call:
        return self.call("ADD", CONF, container_id, netns, pod=pod, **kw)

    def check(self, container_id: str, netns: str, prev: dict[str, Any], pod: str = "") -> Call:
        return self.call("CHECK", {**CONF, "prevResult": prev}, container_id, netns, pod=pod)

    def delete(self, container_id: str, netns: str | None, prev: dict[str, Any] | None = None,
               pod: str = "") -> Call:
        return self.call("DEL", {**CONF, **({"prevResult": prev} if prev else {})}, container_id, netns, pod=pod)


class Pods:
    """Pod network namespaces, named ``cnit<pid>-<name>``; every one is deleted at teardown."""

    def __init__(self) -> None:
        self.prefix = f"cnit{os.getpid()}-"
        self.created: list[str] = []

    def new(self, name: str) -> str:
        ns = f"{self.prefix}{name}"
        result = run(["ip", "netns", "add", ns])
        assert result.returncode == 0, result.stderr
        self.created.append(ns)
        assert run(["ip", "-n", ns, "link", "set", "lo", "up"]).returncode == 0
        return ns

    def cleanup(self) -> list[str]:
        errors = []
        for ns in reversed(self.created):
            # Only processes this test started live in its pods (ping, the greeter); a test that failed midway
            # may have left one.
            pids = run(["ip", "netns", "pids", ns]).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            result = run(["ip", "netns", "del", ns])
            if result.returncode != 0:
                errors.append(f"{ns}: {result.stderr.strip()}")
        self.created.clear()
        return errors
