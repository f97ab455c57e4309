"""The node's kernel, one seam: the thread that owns the netlink socket, and what every dataplane module shares
(our route protocol, scopes, flags, interface lookups). Only this package speaks to the kernel."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pyroute2 import IPRoute

ROUTE_PROTO = 80  # the protocol number of every route we own (Felix's); others are never touched
SCOPE_UNIVERSE, SCOPE_LINK = 0, 253
IFF_UP = 0x1

T = TypeVar("T")


class Netlink:
    """One thread owns the node's netlink socket; every kernel change is queued to it (no locking needed)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: IPRoute | None = None

    def _get(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    async def run(self, work: Callable[[IPRoute], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: work(self._get()))

    def close(self) -> None:
        self._executor.submit(lambda: self._ipr.close() if self._ipr else None).result()
        self._executor.shutdown()


def if_index(name: str) -> int | None:
    """The index of ``name`` in the calling thread's namespace: an ioctl, cheaper than a netlink lookup."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def interface_mtu(address: ipaddress.IPv4Interface | None) -> int:
    """The MTU of the interface holding the node's address (the underlay), 1500 when unknown."""
    if address is None:
        return 1500
    result = subprocess.run(["ip", "-json", "-4", "addr", "show"], capture_output=True, text=True, timeout=30,
                            check=False)
    for link in json.loads(result.stdout or "[]") if result.returncode == 0 else []:
        if any(a.get("local") == str(address.ip) for a in link.get("addr_info") or []):
            return int(link.get("mtu") or 1500)
    return 1500
