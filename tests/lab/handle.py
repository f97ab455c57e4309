"""A deployed lab (``LabHandle``) and ``Deployer``, which deploys topologies under unique names and destroys them."""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from containerlab.lab import Lab
from containerlab.netns import Process
from containerlab.topology import load
from tests.eventually import eventually, within

TOPOLOGIES = Path(__file__).resolve().parents[2] / "containerlab" / "topologies"
LAB_POLL_SECONDS = 0.1  # each probe of a lab is a process run in a namespace: no need to poll faster
_serial = itertools.count()


class LabHandle:
    """A deployed lab: run commands in nodes, read addresses, ping and wait with a deadline."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.topology = lab.topology
        self.deploy_seconds = 0.0

    def netns(self, node: str) -> str:
        return self.lab.netns(node)

    def exec(self, node: str, *argv: str, timeout: float = 60.0) -> Any:
        return self.lab.exec(node, list(argv), timeout=timeout)

    def address(self, node: str, interface: str = "eth1") -> ipaddress.IPv4Interface:
        return self.lab.address(node, interface)

    def processes(self) -> list[Process]:
        """The daemons the lab started, as its state file records them (PID and start time)."""
        return self.lab._load_processes()

    def ping(self, node: str, target: str | ipaddress.IPv4Address, timeout: float = 10.0) -> bool:
        """True once one echo from ``node`` to ``target`` comes back, polling until ``timeout``."""
        return within(lambda: self.exec(node, "ping", "-c1", "-W1", str(target)).returncode == 0, timeout,
                      LAB_POLL_SECONDS)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        """:func:`tests.eventually.eventually` at the lab's polling period."""
        eventually(predicate, timeout, what, LAB_POLL_SECONDS)


class Deployer:
    """Deploys topology files (from containerlab/topologies unless a path is given) under a lab name unique to
    this test run, so it never meets a lab a developer left running; ``destroy_all`` takes every one down."""

    def __init__(self) -> None:
        self.deployed: list[Lab] = []

    def __call__(self, topology_file: str | Path, node_env: Mapping[str, str] | None = None) -> LabHandle:
        """Deploy the file; ``node_env`` is added to the environment of every calico-py node (those with a
        NODENAME), as a DaemonSet's env would be."""
        path = Path(topology_file)
        if not path.is_absolute():
            path = TOPOLOGIES / path
        base = load(path)
        topology = load(path, name_override=f"{base.name}-t{os.getpid() % 100000}{next(_serial)}")
        for node in topology.nodes.values():
            if "NODENAME" in node.env:
                node.env.update(node_env or {})
        handle = LabHandle(Lab(topology))  # the default run root: daemons that drop root can reach it
        self.deployed.append(handle.lab)
        handle.deploy_seconds = handle.lab.deploy().seconds
        return handle

    def destroy_all(self) -> None:
        errors = []
        for lab in reversed(self.deployed):
            try:
                lab.destroy()
            except Exception as exc:  # keep destroying the others; report at the end
                errors.append(f"{lab.topology.name}: {exc}")
        self.deployed.clear()
        if errors:
            raise RuntimeError("lab teardown failed: " + "; ".join(errors))
