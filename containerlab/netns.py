"""Thin adapter over iproute2 and /proc: namespaces, links, addresses, and processes we own by PID."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LabError(RuntimeError):
    """Something the lab could not do; the message says what and how to fix it."""


def run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} not found: install it (iproute2 provides ip)") from None
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def ip_json(*args: str, ns: str | None = None) -> Any:
    result = ip("-j", *args, ns=ns, check=False)
    return json.loads(result.stdout or "[]") if result.returncode == 0 else []


def namespaces() -> set[str]:
    return {entry["name"] for entry in ip_json("netns", "list")}


def create_namespace(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def delete_namespace(name: str) -> None:
    ip("netns", "del", name, check=False)


def links(ns: str) -> dict[str, dict[str, Any]]:
    return {entry["ifname"]: entry for entry in ip_json("addr", "show", ns=ns)}


def namespace_pids(ns: str) -> list[int]:
    result = ip("netns", "pids", ns, check=False)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


def ns_exec(ns: str, argv: Sequence[str], timeout: float = 60.0, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, *argv]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:g}s") from None
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(argv[4:])}` in {ns} failed (exit {result.returncode}): "
                       f"{(result.stderr or result.stdout).strip()}")
    return result


# ---------------------------------------------------------------------------------------------- processes


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie is as good as gone
        return None
    return int(fields[19])


@dataclass
class Process:
    """A process we started, identified by PID *and* start time so a recycled PID is never mistaken for it."""

    node: str
    daemon: str
    argv: list[str]
    pid: int
    started: int
    log: str

    def alive(self) -> bool:
        return start_time(self.pid) == self.started

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def spawn(node: str, daemon: str, ns: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> Process:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            child = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        except FileNotFoundError:
            raise LabError("ip not found: install iproute2") from None
    started = start_time(child.pid)
    if started is None:
        child.wait()
        raise LabError(f"{daemon} on {node} exited at once; see {log}")
    return Process(node, daemon, argv, child.pid, started, str(log))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_pids(pids: Sequence[tuple[int, int | None]], grace: float = 5.0) -> None:
    """SIGTERM each (pid, start time), wait up to ``grace`` seconds, SIGKILL what is left. A start time of None
    means "whatever runs under this PID now" (used for processes found inside our own namespaces)."""
    targets = [(pid, started if started is not None else start_time(pid)) for pid, started in pids]
    targets = [(pid, started) for pid, started in targets if started is not None and start_time(pid) == started]
    for pid, _ in targets:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid, _ in targets:
            _reap(pid)
        targets = [(pid, started) for pid, started in targets if start_time(pid) == started]
        if not targets:
            return
        time.sleep(0.02)
    for pid, _ in targets:
        log.warning("process %d (%s) still ran %gs after SIGTERM: killed", pid, _command(pid), grace)
        _signal(pid, signal.SIGKILL)
        _reap(pid)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "gone"


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
