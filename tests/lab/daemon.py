"""The node daemon in a lab: its recorded process, its log, and stopping or restarting it by PID."""

from __future__ import annotations

import contextlib
import os
import signal

from containerlab.netns import Process
from tests.lab.cni import NODE
from tests.lab.handle import LabHandle

DAEMON = "calico-py-node"
READY_SECONDS = 60.0


def daemon_process(handle: LabHandle, node: str = NODE) -> Process:
    found = [p for p in handle.processes() if p.node == node and p.daemon == DAEMON]
    assert found, f"no {DAEMON} recorded for {node} in {handle.lab.state_file}"
    return found[-1]


def daemon_log(handle: LabHandle, node: str = NODE) -> str:
    log = handle.lab.run_dir / node / f"{DAEMON}.log"
    return log.read_text(errors="replace") if log.exists() else ""


def ready_count(handle: LabHandle, node: str = NODE) -> int:
    return daemon_log(handle, node).count(f"INFO {DAEMON} ready ")


def wait_ready(handle: LabHandle, node: str = NODE, timeout: float = READY_SECONDS) -> None:
    handle.wait_for(lambda: ready_count(handle, node) >= 1, timeout, f"{DAEMON} on {node} to log 'ready'")


def route_log(handle: LabHandle, node: str = NODE) -> str:
    """The daemon's own account of its route changes, for failure messages."""
    return "\n".join(line for line in daemon_log(handle, node).splitlines() if " route " in line)


def stop_daemon(handle: LabHandle, sig: signal.Signals, node: str = NODE) -> None:
    """Signal the node's daemon by the PID the lab recorded (checked against its start time) and wait for it."""
    process = daemon_process(handle, node)
    assert process.alive(), f"{DAEMON} on {node} is not running before the test stops it"
    os.kill(process.pid, sig)
    handle.wait_for(lambda: not process.alive(), 10, f"{DAEMON} (pid {process.pid}) to exit")
    with contextlib.suppress(ChildProcessError):  # the lab started it from this process: reap the zombie
        os.waitpid(process.pid, os.WNOHANG)


def restart_daemon(handle: LabHandle, node: str = NODE, timeout: float = 30.0) -> None:
    """The lab starts the missing daemon again; returns once it logged 'ready' (its CNI socket is open)."""
    before = ready_count(handle, node)
    report = handle.lab.deploy()
    assert f"{node}/{DAEMON}" in report.started, report
    handle.wait_for(lambda: ready_count(handle, node) > before, timeout, f"the restarted {DAEMON} to log 'ready'")
