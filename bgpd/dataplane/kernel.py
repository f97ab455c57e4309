"""The node's kernel, one seam: the thread that owns the netlink socket, and what every dataplane module shares
(our route protocol, scopes, flags, interface lookups). Only this package speaks to the kernel."""

from __future__ import annotations

import asyncio
import socket
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
