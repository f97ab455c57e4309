"""The ``lab`` fixture: deploy a containerlab topology in namespaces, hand out a handle, always destroy."""

from __future__ import annotations

import ipaddress
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from containerlab.lab import Lab
from containerlab.topology import load

TOPOLOGIES = Path(__file__).resolve().parent.parent / "containerlab" / "topologies"
_serial = itertools.count()


class LabHandle:
    """A deployed lab: run commands in nodes, read addresses, ping with a deadline."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.topology = lab.topology
        self.deploy_seconds = 0.0

    def netns(self, node: str) -> str:
        return self.lab.netns(node)

    def exec(self, node: str, *argv: str, timeout: float = 60.0):
        return self.lab.exec(node, list(argv), timeout=timeout)

    def address(self, node: str, interface: str = "eth1") -> ipaddress.IPv4Interface:
        return self.lab.address(node, interface)

    def ping(self, node: str, target: str | ipaddress.IPv4Address, timeout: float = 10.0) -> bool:
        """True once one echo from ``node`` to ``target`` comes back, polling until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exec(node, "ping", "-c1", "-W1", str(target)).returncode == 0:
                return True
            if time.monotonic() > deadline:
                return False

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.1)


@pytest.fixture
def lab() -> Iterator[Callable[..., LabHandle]]:
    """``lab("mesh3.clab.yml")`` deploys that topology (from containerlab/topologies unless a path is given)
    under a lab name unique to this test run, so it never meets a lab a developer left running."""
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    deployed: list[Lab] = []

    def deploy(topology_file: str | Path) -> LabHandle:
        path = Path(topology_file)
        if not path.is_absolute():
            path = TOPOLOGIES / path
        base = load(path)
        topology = load(path, name_override=f"{base.name}-t{os.getpid() % 100000}{next(_serial)}")
        handle = LabHandle(Lab(topology))  # the default run root: daemons that drop root can reach it
        deployed.append(handle.lab)
        handle.deploy_seconds = handle.lab.deploy().seconds
        return handle

    yield deploy
    errors = []
    for lab_ in reversed(deployed):
        try:
            lab_.destroy()
        except Exception as exc:  # keep destroying the others; report at the end
            errors.append(f"{lab_.topology.name}: {exc}")
    if errors:
        raise RuntimeError("lab teardown failed: " + "; ".join(errors))
