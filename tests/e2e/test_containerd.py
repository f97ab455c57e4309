"""containerd runs pods on the calico-py network: ``ctr run --cni`` on two nodes of a mesh3 lab.

ctr 1.6 hands CNI plugins ``CNI_NETNS=/proc/<pid>/ns/net`` of the container's process, a path the node daemon
(with most capabilities dropped) may not open: the kernel refuses it to a process whose permitted capabilities are
not a superset of the container's. The shim opens it with the runtime's privileges and passes the descriptor.

Each node gets its own containerd (Debian's, with runc), started by PID inside the node's network namespace and a
private mount namespace, with its own root, state directory, socket and configuration in a temporary directory.
ctr reads its CNI configuration from /etc/cni/net.d and plugins from /opt/cni/bin and caches results in
/var/lib/cni, and containerd's shims and runc keep state under /run/containerd: the host has none of these, so in
the private mount namespace /etc, /opt, /var/lib and /run are overlays whose upper layers are temporary
directories (a bind mount would need a mount point the host does not have). There the conflist of deploy/ and the
plugins as bgpd.cni.install installs them appear where ctr looks. The rootfs is Debian's static busybox. Nothing is
written to the host's directories; every process, overlay, cgroup and directory made here is gone at teardown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab.cni import NETWORK, POOL, assert_nothing_left, cni_bin_dir
from tests.lab.daemon import wait_ready
from tests.lab.handle import Deployer, LabHandle

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "calico-py.yaml"
CONFLIST = "10-calico-py.conflist"  # the name deploy/'s install-cni gives it
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "ping")
BINARIES = {name: shutil.which(name) for name in ("containerd", "ctr", "runc", "nsenter", "unshare")}
NODES = ("node1", "node2")
# The host directories ctr, containerd, its shims and runc write to (see the module docstring).
SHADOWED = ("/etc", "/opt", "/var/lib", "/run")
CGROUPS = Path("/sys/fs/cgroup")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network and mount namespaces)"),
    pytest.mark.skipif(not all(BINARIES.values()) or not BUSYBOX.exists(),
                       reason="needs containerd, runc, util-linux and busybox-static (make deps)"),
    pytest.mark.slow,
]

# Run by ``unshare --mount --propagation private``: the overlays, then containerd in place of this process (so
# the PID the test started is containerd's).
LAUNCH = """
import json, os, subprocess, sys
plan = json.loads(sys.argv[1])
for target, upper, work in plan["overlays"]:
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={target},upperdir={upper},workdir={work}",
                    target], check=True)
os.execv(plan["argv"][0], plan["argv"])
"""

CONFIG = """\
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs"]
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


def deploy_conflist() -> dict[str, Any]:
    """The CNI network configuration deploy/'s install-cni writes to /etc/cni/net.d."""
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc and doc.get("kind") == "ConfigMap" and "cni_network_config" in doc.get("data", {}):
            return json.loads(doc["data"]["cni_network_config"])  # type: ignore[no-any-return]
    raise AssertionError(f"no cni_network_config in {MANIFEST}")


def run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def mount_namespace(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/mnt")
    return None


def processes_in(namespace: str) -> list[int]:
    """Every process in the mount namespace ``namespace`` (``mnt:[inode]``): only what a Runtime started lives
    in the one it made."""
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and mount_namespace(int(entry.name)) == namespace]


class Runtime:
    """One node's containerd and the pods ctr runs on it."""

    def __init__(self, handle: LabHandle, node: str) -> None:
        self.handle = handle
        self.node = node
        self.work = Path(tempfile.mkdtemp(prefix=f"calico-py-containerd-{node}-"))
        self.namespace = f"cpyt{os.getpid()}{node}"  # containerd's namespace: also its cgroups' parent name
        self.address = self.work / "containerd.sock"
        self.rootfs = self.work / "rootfs"
        self.process: subprocess.Popen[bytes] | None = None
        self.mounts_namespace = ""
        self.pods: dict[str, subprocess.Popen[str]] = {}

    def upper(self, target: str) -> Path:
        return self.work / "overlay" / target.strip("/").replace("/", "-") / "upper"

    def prepare(self) -> None:
        (self.rootfs / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, self.rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (self.rootfs / "bin" / applet).symlink_to("busybox")
        for target in SHADOWED:
            self.upper(target).mkdir(parents=True)
            (self.upper(target).parent / "work").mkdir()
        net_d = self.upper("/etc") / "cni" / "net.d"
        net_d.mkdir(parents=True)
        (net_d / CONFLIST).write_text(json.dumps(deploy_conflist()) + "\n")
        cni_bin_dir(self.upper("/opt") / "cni" / "bin")
        (self.work / "config.toml").write_text(CONFIG.format(opt=self.work / "opt"))

    def start(self) -> None:
        self.prepare()
        plan = {"overlays": [(t, str(self.upper(t)), str(self.upper(t).parent / "work")) for t in SHADOWED],
                "argv": [BINARIES["containerd"], "--config", str(self.work / "config.toml"), "--root",
                         str(self.work / "root"), "--state", str(self.work / "state"), "--address", str(self.address)]}
        with open(self.work / "containerd.log", "wb") as log:
            self.process = subprocess.Popen(
                [BINARIES["nsenter"], f"--net=/run/netns/{self.handle.netns(self.node)}", BINARIES["unshare"],
                 "--mount", "--propagation", "private", "--", sys.executable, "-I", "-c", LAUNCH, json.dumps(plan)],
                stdout=log, stderr=subprocess.STDOUT)
        self.handle.wait_for(lambda: self._exec_is_containerd() or self._exited(), 20, f"containerd on {self.node}")
        self.mounts_namespace = mount_namespace(self.process.pid) or ""
        self.handle.wait_for(lambda: self.ctr("version").returncode == 0 or self._exited(), 20,
                             f"containerd on {self.node} to answer on {self.address}")
        assert not self._exited(), f"containerd on {self.node} exited: {self.log()}"

    def _exec_is_containerd(self) -> bool:
        assert self.process is not None
        with contextlib.suppress(OSError):
            return Path(f"/proc/{self.process.pid}/exe").resolve() == Path(BINARIES["containerd"] or "").resolve()
        return False

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        return (self.work / "containerd.log").read_text(errors="replace")[-3000:]

    def _ctr_argv(self, *argv: str) -> list[str]:
        assert self.process is not None
        return [BINARIES["nsenter"], "-t", str(self.process.pid), "-m", "-n", BINARIES["ctr"] or "ctr", "--address",
                str(self.address), "--namespace", self.namespace, *argv]

    def ctr(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """ctr in containerd's mount and network namespaces: the node's network, the overlays' CNI directories."""
        return run(self._ctr_argv(*argv), timeout=timeout)

    def task_pid(self, name: str) -> int | None:
        """The pid of the running task ``name`` (None while it is not running)."""
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3 and fields[0] == name and fields[2] == "RUNNING":
                return int(fields[1])
        return None

    def run_pod(self, name: str) -> int:
        """``ctr run --rm --cni`` in the foreground, as a user runs it: the CNI ADD before the task starts, the DEL
        (and the container's removal) after it ends. Returns the task's pid once it runs."""
        pod = subprocess.Popen(self._ctr_argv("run", "--rm", "--cni", "--null-io", "--rootfs", str(self.rootfs), name,
                                              "/bin/sleep", "600"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pods[name] = pod
        self.handle.wait_for(lambda: pod.poll() is not None or self.task_pid(name) is not None, 30,
                             f"pod {name} on {self.node} to run")
        if pod.poll() is not None:
            raise AssertionError(f"ctr run {name} on {self.node} failed (exit {pod.returncode}): "
                                 f"{pod.communicate()[1].strip()}")
        pid = self.task_pid(name)
        assert pid is not None
        return pid

    def pod_address(self, pid: int) -> ipaddress.IPv4Address:
        out = run(["nsenter", "-t", str(pid), "-n", "ip", "-j", "-4", "addr", "show", "dev", "eth0"])
        assert out.returncode == 0, out.stderr
        return ipaddress.IPv4Address(json.loads(out.stdout)[0]["addr_info"][0]["local"])

    def ping(self, name: str, target: ipaddress.IPv4Address, attempt: int) -> bool:
        """One echo from inside the pod (``ctr task exec``) to ``target``."""
        return self.ctr("task", "exec", "--exec-id", f"ping{attempt}", name, "/bin/ping", "-c1", "-W1",
                        str(target)).returncode == 0

    def remove_pod(self, name: str) -> None:
        """Kill the task: the foreground ctr run then calls DEL and deletes the container."""
        killed = self.ctr("task", "kill", "--signal", "SIGKILL", name)
        assert killed.returncode == 0, killed.stderr
        pod = self.pods.pop(name)
        _, err = pod.communicate(timeout=30)
        assert self.ctr("container", "ls", "--quiet").stdout.split() == [], err
        assert "failed" not in err.lower() and "error" not in err.lower(), err

    def cgroups(self) -> list[Path]:
        """The cgroups runc made for this containerd namespace's containers (per controller with cgroup v1) and
        their parent, which runc leaves behind."""
        tops = {top.resolve() for top in [CGROUPS / self.namespace, *CGROUPS.glob(f"*/{self.namespace}")]}
        return [path for top in tops if top.is_dir() for path in (top, *top.rglob("*/"))]

    def leftovers(self) -> set[int]:
        """What this containerd started and is still running: processes in its mount namespace (containerd, its
        shims) and in its containers' cgroups (a container has a mount namespace of its own)."""
        found = set(processes_in(self.mounts_namespace)) if self.mounts_namespace else set()
        for cgroup in self.cgroups():
            with contextlib.suppress(FileNotFoundError):
                found |= {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
        return found

    def stop(self) -> list[str]:
        """containerd and everything it left (by PID, in its own mount namespace), its cgroups, the temporary
        directory; what could not be removed, for the caller to report."""
        problems = []
        for pod in self.pods.values():
            with contextlib.suppress(ProcessLookupError):
                pod.kill()
            pod.communicate(timeout=10)
        self.pods.clear()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.handle.wait_for(lambda: not self.leftovers(), 10, f"every process {self.node}'s containerd left to exit")
        for cgroup in sorted(self.cgroups(), key=lambda path: -len(path.parts)):  # the containers' before their parent
            try:
                cgroup.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cgroup {cgroup}: {exc.strerror}")
        shutil.rmtree(self.work, ignore_errors=True)
        if self.work.exists():
            problems.append(f"{self.work} could not be removed")
        return problems


@pytest.fixture
def runtimes(lab: Deployer) -> Iterator[dict[str, Runtime]]:
    handle = lab("mesh3.clab.yml")
    made: dict[str, Runtime] = {}
    try:
        for node in NODES:
            wait_ready(handle, node)
            made[node] = Runtime(handle, node)
            made[node].start()
        yield made
    finally:
        problems = [p for runtime in made.values() for p in runtime.stop()]
        assert not problems, problems


def cali_links(handle: LabHandle, node: str) -> list[str]:
    links = json.loads(handle.exec(node, "ip", "-j", "link", "show").stdout or "[]")
    return [link["ifname"] for link in links if link["ifname"].startswith("cali")]


def test_ctr_run_cni_pods_on_two_nodes_reach_each_other_and_leave_nothing(runtimes: dict[str, Runtime]) -> None:
    handle = runtimes["node1"].handle
    pids = {node: runtime.run_pod(f"pod-{node}") for node, runtime in runtimes.items()}
    addresses = {node: runtimes[node].pod_address(pid) for node, pid in pids.items()}
    assert all(a in POOL for a in addresses.values()), addresses
    assert len(set(addresses.values())) == 2, addresses
    for node, peer in (("node1", "node2"), ("node2", "node1")):
        attempts = iter(range(1000))
        handle.wait_for(lambda node=node, peer=peer, attempts=attempts: runtimes[node].ping(
            f"pod-{node}", addresses[peer], next(attempts)), 30, f"pod-{node} to ping pod-{peer} at {addresses[peer]}")

    for node, runtime in runtimes.items():
        runtime.remove_pod(f"pod-{node}")
        assert cali_links(handle, node) == [], f"a cali veth is left on {node}"
    state = assert_nothing_left(handle)  # no handle (address) and no endpoint of the network in etcd
    assert not any(h.startswith(f"{NETWORK}.") for h in state["handles"])

    for node, runtime in runtimes.items():
        namespace, work = runtime.mounts_namespace, runtime.work
        assert runtime.stop() == []
        assert processes_in(namespace) == [], f"processes left in {node}'s containerd mount namespace"
        assert runtime.cgroups() == []
        assert not work.exists()
        assert str(work) not in Path("/proc/self/mountinfo").read_text()  # the overlays never reached the host
