"""node status / node diags: ask the local node daemon over its status socket, collect state for bug reports."""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from calicoctl_py.commands.resources import UserError
from calicoctl_py.output import table

STATUS_SOCKET = "\0calico-py-status"  # abstract: the daemon of this network namespace (this node)
PEER_HEADERS = ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]


def query_status(timeout: float = 5.0) -> dict[str, Any] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(STATUS_SOCKET)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    try:
        return json.loads(b"".join(chunks))  # type: ignore[no-any-return]
    except ValueError:
        return None


def print_status(status: dict[str, Any] | None) -> int:
    if status is None:
        print("calico-py process is not running.")
        return 1
    print("calico-py process is running.")
    print()
    address6 = f"   IPv6: {status['address6']}" if status.get("address6") else ""
    print(f"Node: {status.get('node')}   address: {status.get('address') or '-'}{address6}   "
          f"ready: {str(status.get('ready')).lower()}   uptime: {status.get('uptime_seconds', 0):.0f}s")
    rec = status.get("reconcile") or {}
    print(f"Routes: {rec.get('routes', 0)} owned, last reconcile {rec.get('last_seconds', 0) * 1000:.1f} ms, "
          f"{rec.get('runs', 0)} runs, {rec.get('errors', 0)} errors; workloads: {status.get('workloads', 0)}")
    for family in ("IPv4", "IPv6"):
        print()
        print(f"{family} BGP status")
        peers = [p for p in status.get("peers") or [] if p.get("family", "IPv4") == family]
        if peers:
            table(PEER_HEADERS, [[p.get("address"), p.get("type"), p.get("state"), p.get("since"), p.get("info")]
                                 for p in peers])
        else:
            print(f"No {family} peers found." + ("" if status.get("bgp") else " (no BGP speaker in this version)"))
    return 0


DIAG_COMMANDS = {
    "ip-addr.txt": ["ip", "-d", "addr"],
    "ip-link.txt": ["ip", "-d", "-s", "link"],
    "ip-route.txt": ["ip", "route", "show", "table", "all"],
    "ip6-route.txt": ["ip", "-6", "route", "show", "table", "all"],
    "ip-rule.txt": ["ip", "rule"],
    "ip-neigh.txt": ["ip", "neigh"],
    "sysctl-net.txt": ["sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.all.proxy_arp"],
    "nft.txt": ["nft", "list", "ruleset"],
}


def diags(log_dir: Path, extra_logs: list[Path] | None = None) -> Path:
    """A tarball of the daemon's state and the node's network state, for a bug report."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = log_dir / f"calico-py-diags-{stamp}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"diags-{stamp}/{name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))

        add("status.json", json.dumps(query_status(), indent=2).encode())
        for name, argv in DIAG_COMMANDS.items():
            try:
                result = subprocess.run(argv, capture_output=True, timeout=10, check=False)
                add(name, result.stdout + result.stderr)
            except (OSError, subprocess.TimeoutExpired) as exc:
                add(name, f"{' '.join(argv)}: {exc}\n".encode())
        for log in extra_logs or []:
            if log.exists():
                tar.add(str(log), arcname=f"diags-{stamp}/logs/{log.name}")
    return path


async def run(args: argparse.Namespace) -> int:
    if args.node_command == "status":
        return print_status(query_status())
    if not args.log_dir.is_dir():
        raise UserError(f"--log-dir {args.log_dir} is not a directory")
    status = query_status() or {}
    logs = [Path(p) for p in status.get("logs") or []]
    path = diags(args.log_dir, logs)
    print(f"Diagnostics written to {path}")
    return 0
