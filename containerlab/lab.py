"""Deploy, inspect and destroy a containerlab topology in network namespaces.

Layout of a deployed lab ``L``:
- namespace ``clab-L`` holds the management bridge ``mgmt0`` (gateway address of ``mgmt.ipv4-subnet``);
- namespace ``clab-L-<node>`` per node; its ``eth0`` is a veth whose peer is a port of ``mgmt0``;
- each link is a veth pair created directly between the two node namespaces (nothing is ever created in the
  host's own namespace); a ``kind: bridge`` node is a namespace with a bridge that enslaves its link ends;
- daemons (from :mod:`containerlab.images`) run inside their node's namespace, tracked by PID and start time in
  ``<run dir>/state.json``; logs and daemon state in ``<run dir>/<node>/``.

Deploy is idempotent (what exists is kept, what is missing is made; ``exec:`` runs when a node's namespace is
created), so after ``destroy_node`` it brings that one node back. Destroy works from the topology file alone, so it
also cleans up after a runner that crashed.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from containerlab import netns
from containerlab.images import ImageSpec, spec_for
from containerlab.netns import LabError, Process
from containerlab.topology import Node, Topology

DEFAULT_RUN_ROOT = Path("/run/calico-py-lab")
MGMT_BRIDGE = "mgmt0"
STARTUP_WATCH = 0.5  # seconds a fresh daemon is watched for an immediate exit


def run_root() -> Path:
    return Path(os.environ.get("CALICO_PY_LAB_RUN_DIR", DEFAULT_RUN_ROOT))


@dataclass
class NodeStatus:
    node: str
    kind: str
    image: str
    netns: str
    mgmt_ipv4: str
    addresses: dict[str, list[str]]
    processes: list[str]
    state: str


@dataclass
class DeployReport:
    created_nodes: list[str] = field(default_factory=list)
    created_links: int = 0
    started: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Lab:
    def __init__(self, topology: Topology, root: Path | None = None) -> None:
        self.topology = topology
        self.run_dir = (root or run_root()) / topology.name
        self.mgmt_ns = f"clab-{topology.name}"

    # ------------------------------------------------------------------ names and state

    def netns(self, node: str) -> str:
        if node not in self.topology.nodes:
            raise LabError(f"no node {node!r} in lab {self.topology.name} "
                           f"(nodes: {', '.join(self.topology.nodes)})")
        return f"clab-{self.topology.name}-{node}"

    def all_namespaces(self) -> list[str]:
        return [self.mgmt_ns, *(self.netns(n) for n in self.topology.nodes)]

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def _load_processes(self) -> list[Process]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        return [Process(**p) for p in state.get("processes", [])]

    def _save(self, processes: list[Process]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"lab": self.topology.name, "topology": str(self.topology.path),
                                   "namespaces": self.all_namespaces(),
                                   "processes": [p.to_json() for p in processes]}, indent=1))
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One runner at a time per lab: a second deploy or destroy waits for the first."""
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir.parent / f".{self.topology.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # ------------------------------------------------------------------ deploy

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces); run with sudo")
        missing = []
        for node in self.topology.nodes.values():
            spec = self._spec(node)
            for daemon in spec.daemons if spec else ():
                if self._binary(daemon.argv[0]) is None:
                    missing.append(f"{daemon.argv[0]} for node {node.name} (Debian package {daemon.package})")
            for target in spec.required_binds if spec else ():
                if node.bind_for(target) is None:
                    raise LabError(f"{self.topology.path}:{node.line}: node {node.name} (image {node.image}) "
                                   f"needs binds: [\"<config file>:{target}\"]")
        if missing:
            raise LabError("missing programs: " + "; ".join(missing))

    def _spec(self, node: Node) -> ImageSpec | None:
        return spec_for(node.image) if node.kind == "linux" else None

    @staticmethod
    def _binary(name: str) -> str | None:
        if "/" in name:
            return name if os.access(name, os.X_OK) else None
        beside = Path(sys.executable).parent / name  # our own console scripts, from the venv
        return str(beside) if beside.exists() else shutil.which(name)

    def deploy(self) -> DeployReport:
        started_at = time.monotonic()
        report = DeployReport(warnings=list(self.topology.warnings))
        self.preflight()
        with self._locked():
            existing = netns.namespaces()
            self._ensure_mgmt(existing)
            for node in self.topology.nodes.values():
                if self._ensure_node(node, existing):
                    report.created_nodes.append(node.name)
            report.created_links = self._ensure_links()
            self._wait_links_up()
            for name in report.created_nodes:
                self._run_exec(self.topology.nodes[name])
            processes = self._ensure_daemons(report)
        for node in self.topology.nodes.values():
            if node.kind == "linux" and self._spec(node) is None:
                report.warnings.append(f"node {node.name}: no local equivalent for image {node.image!r}; "
                                       "it runs no daemon (exec: commands only)")
        self._check_started(processes, report)
        report.seconds = time.monotonic() - started_at
        return report

    def _ensure_mgmt(self, existing: set[str]) -> None:
        ns = self.mgmt_ns
        if ns not in existing:
            netns.create_namespace(ns)
        if MGMT_BRIDGE not in netns.links(ns):
            netns.ip("link", "add", MGMT_BRIDGE, "type", "bridge", ns=ns)
            netns.ip("addr", "add", str(self.topology.mgmt_gateway), "dev", MGMT_BRIDGE, ns=ns)
            netns.ip("link", "set", MGMT_BRIDGE, "up", ns=ns)

    def _ensure_node(self, node: Node, existing: set[str]) -> bool:
        ns = self.netns(node.name)
        created = ns not in existing
        if created:
            netns.create_namespace(ns)
        present = netns.links(ns)
        if node.kind == "bridge":
            if self._bridge_name(node) not in present:
                netns.ip("link", "add", self._bridge_name(node), "type", "bridge", ns=ns)
                netns.ip("link", "set", self._bridge_name(node), "up", ns=ns)
            return created
        if "eth0" not in present:
            index = list(self.topology.nodes).index(node.name)
            port = f"m{index}"
            netns.ip("link", "del", port, ns=self.mgmt_ns, check=False)  # a stale half of an earlier pair
            netns.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.mgmt_ns)
            netns.ip("link", "set", port, "master", MGMT_BRIDGE, "up", ns=self.mgmt_ns)
            address = self.topology.mgmt_addresses()[node.name]
            netns.ip("addr", "add", str(address), "dev", "eth0", ns=ns)
            netns.ip("link", "set", "eth0", "up", ns=ns)
        return created

    @staticmethod
    def _bridge_name(node: Node) -> str:
        return node.name if len(node.name) <= 15 else "br0"

    def _ensure_links(self) -> int:
        created = 0
        present = {n: netns.links(self.netns(n)) for n in self.topology.nodes}
        for link in self.topology.links:
            a_ns, b_ns = self.netns(link.a.node), self.netns(link.b.node)
            a_there = link.a.interface in present[link.a.node]
            b_there = link.b.interface in present[link.b.node]
            if a_there and b_there:
                continue
            for end, ns, there in ((link.a, a_ns, a_there), (link.b, b_ns, b_there)):
                if there:  # half a pair (a runner died between the two steps): start over
                    netns.ip("link", "del", end.interface, ns=ns, check=False)
            netns.ip("link", "add", link.a.interface, "type", "veth", "peer", "name", link.b.interface,
                     "netns", b_ns, ns=a_ns)
            for end, ns in ((link.a, a_ns), (link.b, b_ns)):
                node = self.topology.nodes[end.node]
                if node.kind == "bridge":
                    netns.ip("link", "set", end.interface, "master", self._bridge_name(node), ns=ns)
                netns.ip("link", "set", end.interface, "up", ns=ns)
            created += 1
        return created

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        """The kernel turns a new veth's carrier on asynchronously (link watch, up to a second), and a bridge
        drops frames on a port without carrier: wait until every interface of the lab is operationally up."""
        wanted = {n: {"eth0"} if self.topology.nodes[n].kind == "linux" else set() for n in self.topology.nodes}
        for link in self.topology.links:
            for end in (link.a, link.b):
                wanted[end.node].add(end.interface)
        deadline = time.monotonic() + timeout
        while True:
            down = [f"{n}:{i}" for n, names in wanted.items() if names
                    for i, entry in netns.links(self.netns(n)).items()
                    if i in names and entry.get("operstate") != "UP"]
            if not down:
                return
            if time.monotonic() > deadline:
                raise LabError(f"interfaces still down after {timeout:g}s: {', '.join(down)}")
            time.sleep(0.02)

    def _run_exec(self, node: Node) -> None:
        for command in node.exec if node.kind == "linux" else ():
            result = netns.ns_exec(self.netns(node.name), ["sh", "-c", command])
            if result.returncode != 0:
                raise LabError(f"node {node.name}: exec `{command}` failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}")

    def _node_dir(self, node: str) -> Path:
        path = self.run_dir / node
        if not path.exists():
            path.mkdir(parents=True)
            self.run_dir.chmod(0o755)  # daemons that drop root (FRR) must reach their own directory
            spec = self._spec(self.topology.nodes[node]) if node in self.topology.nodes else None
            if spec and spec.state_owner:
                shutil.chown(path, spec.state_owner, spec.state_owner)
        return path

    def _values(self, node: Node) -> dict[str, str]:
        return {"node": node.name, "state": str(self._node_dir(node.name)), "ns": self.netns(node.name),
                "mgmt_ip": str(self.topology.mgmt_addresses()[node.name].ip)}

    def _argv(self, node: Node, template: tuple[str, ...]) -> list[str]:
        values = self._values(node)
        argv = []
        for item in template:
            if item.startswith("{bind:"):
                bind = node.bind_for(item[len("{bind:"):-1])
                assert bind is not None  # preflight checked
                argv.append(str(bind.source))
            else:
                argv.append(item.format(**values))
        argv[0] = self._binary(argv[0]) or argv[0]
        return argv

    def _ensure_daemons(self, report: DeployReport) -> list[Process]:
        processes = [p for p in self._load_processes() if p.alive()]
        running = {(p.node, p.daemon) for p in processes}
        for node in self.topology.nodes.values():
            spec = self._spec(node)
            for daemon in spec.daemons if spec else ():
                name = Path(daemon.argv[0]).name
                if (node.name, name) in running:
                    continue
                env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root",
                       "LANG": "C.UTF-8", **{k: v.format(**self._values(node)) for k, v in spec.env}, **node.env}
                process = netns.spawn(node.name, name, self.netns(node.name), self._argv(node, daemon.argv), env,
                                      self._node_dir(node.name) / f"{name}.log", self._node_dir(node.name))
                processes.append(process)
                report.started.append(f"{node.name}/{name}")
                self._save(processes)
        self._save(processes)
        return processes

    def _check_started(self, processes: list[Process], report: DeployReport) -> None:
        fresh = [p for p in processes if f"{p.node}/{p.daemon}" in report.started]
        deadline = time.monotonic() + STARTUP_WATCH
        while fresh and time.monotonic() < deadline:
            dead = [p for p in fresh if not p.alive()]
            if dead:
                p = dead[0]
                tail = Path(p.log).read_text(errors="replace").strip().splitlines()[-5:]
                raise LabError(f"{p.daemon} on node {p.node} exited right after start; last lines of {p.log}:\n"
                               + "\n".join(tail))
            time.sleep(0.05)

    # ------------------------------------------------------------------ destroy

    def destroy(self) -> float:
        started_at = time.monotonic()
        with self._locked():
            netns.stop_pids([(p.pid, p.started) for p in self._load_processes()])
            existing = netns.namespaces()
            # Pods made in the lab (calico-py-lab demo, tests) go with it; they are named clab-<lab>-pod-*.
            pods = sorted(ns for ns in existing if ns.startswith(f"{self.mgmt_ns}-pod-"))
            ours = pods + [ns for ns in self.all_namespaces() if ns in existing]
            # Anything else still running inside our namespaces (started by exec: or by hand) is the lab's too.
            netns.stop_pids([(pid, None) for ns in ours for pid in netns.namespace_pids(ns)], grace=2.0)
            for ns in ours:
                netns.delete_namespace(ns)
            left = [ns for ns in ours if ns in netns.namespaces()]
            if left:
                raise LabError(f"could not delete namespaces {', '.join(left)}")
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return time.monotonic() - started_at

    def destroy_node(self, name: str) -> float:
        """Take one node out of a running lab, as a host or container that dies: its processes and anything else
        running in its namespace stop, the namespace goes and with it the node's ends of its links (a veth's peer
        goes with it, in the neighbour or bridge) and its disk (the state directory; logs are kept). The rest of
        the lab keeps running; ``deploy`` makes the node again (namespace, links, ``exec:``, daemons)."""
        ns = self.netns(name)
        started_at = time.monotonic()
        with self._locked():
            processes = self._load_processes()
            netns.stop_pids([(p.pid, p.started) for p in processes if p.node == name])
            netns.stop_pids([(pid, None) for pid in netns.namespace_pids(ns)], grace=2.0)
            netns.delete_namespace(ns)
            if ns in netns.namespaces():
                raise LabError(f"could not delete namespace {ns} of node {name}")
            node_dir = self.run_dir / name
            for entry in node_dir.iterdir() if node_dir.is_dir() else ():
                if entry.suffix != ".log":
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            self._save([p for p in processes if p.node != name])
        return time.monotonic() - started_at

    # ------------------------------------------------------------------ inspect and exec

    def inspect(self) -> list[NodeStatus]:
        existing = netns.namespaces()
        processes = self._load_processes()
        mgmt = self.topology.mgmt_addresses()
        rows = []
        for node in self.topology.nodes.values():
            ns = self.netns(node.name)
            up = ns in existing
            addresses: dict[str, list[str]] = {}
            if up:
                for ifname, entry in netns.links(ns).items():
                    if ifname == "lo":
                        continue
                    addresses[ifname] = [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])
                                         if a.get("scope") != "link"]
            mine = [p for p in processes if p.node == node.name]
            procs = [f"{p.daemon}[{p.pid}]" + ("" if p.alive() else " exited") for p in mine]
            if not up:
                state = "absent"
            elif any(not p.alive() for p in mine):
                state = "degraded"
            else:
                state = "running"
            rows.append(NodeStatus(node.name, node.kind, node.image or "-", ns,
                                   str(mgmt[node.name]) if node.name in mgmt else "-", addresses, procs, state))
        return rows

    def exec(self, node: str, argv: list[str], timeout: float = 60.0) -> Any:
        return netns.ns_exec(self.netns(node), argv, timeout=timeout)

    def address(self, node: str, interface: str = "eth1") -> ipaddress.IPv4Interface:
        """The first IPv4 address of a node's interface."""
        for entry in netns.links(self.netns(node)).get(interface, {}).get("addr_info", []):
            if entry.get("family") == "inet":
                return ipaddress.IPv4Interface(f"{entry['local']}/{entry['prefixlen']}")
        raise LabError(f"node {node} has no IPv4 address on {interface}")
