"""The unix socket the CNI shim talks to: abstract (so scoped to this network namespace), root callers only.

The shim passes the descriptor of CNI_NETNS along with its request (SCM_RIGHTS, docs/cni.md "The wire format"):
asyncio's stream transports read with plain ``recv``, which would drop it, so connections are read here with
``recvmsg`` on the event loop's readiness callbacks.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from bgpd.cni import spec
from bgpd.cni.shim import SOCKET, decode_request, encode_response
from bgpd.unixsock import bind_abstract, peer_uid

log = logging.getLogger("calico-py-node.cni")
MAX_REQUEST = 4 * 1024 * 1024
MAX_DESCRIPTORS = 4  # room for more than the one a shim sends, so a surplus is seen (and refused), not cut off
READ_SIZE = 64 * 1024
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_DESCRIPTORS * array.array("i").itemsize)
REFUSED_READ_TIMEOUT = 5.0  # seconds a refused caller has to finish sending before it is cut off
Handler = Callable[[str, dict[str, str], str, spec.Netns], Awaitable[tuple[int, str]]]


class Received:
    """What one connection sent: its bytes and the descriptors that came with them (owned: ``close`` them)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.descriptors: list[int] = []
        self.descriptors_cut = False  # more came than MAX_DESCRIPTORS: the kernel closed the rest
        self.too_large = False

    @property
    def descriptor_count(self) -> int:
        """At least how many descriptors the caller sent."""
        return len(self.descriptors) + self.descriptors_cut

    def close(self) -> None:
        for fd in self.descriptors:
            os.close(fd)
        self.descriptors.clear()


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def read_request(sock: socket.socket, into: Received) -> None:
    """The request, up to the shim's half-close, with every descriptor sent along (close-on-exec: the daemon's
    children never inherit one). Beyond MAX_REQUEST the rest is read and dropped (memory stays bounded)."""
    while True:
        try:
            # recvmsg itself: socket.recv_fds of Python 3.11 drops its flags (so no MSG_CMSG_CLOEXEC)
            chunk, ancillary, flags, _ = sock.recvmsg(READ_SIZE, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await _readable(sock)
            continue
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                into.descriptors.extend(fds)
        into.descriptors_cut |= bool(flags & socket.MSG_CTRUNC)
        if not chunk:
            return
        if len(into.data) + len(chunk) > MAX_REQUEST:
            into.too_large = True
        if not into.too_large:
            into.data += chunk


def _error(code: int, msg: str, details: str = "") -> tuple[int, str]:
    return 1, json.dumps(spec.CNIError(code, msg, details).to_json()) + "\n"


class CNIServer:
    def __init__(self, handler: Handler, address: str = SOCKET) -> None:
        self.handler = handler
        self.address = address
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = bind_abstract(self.address)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept())

    async def stop(self) -> None:
        """Stop accepting; the requests in progress get their answers."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        request = Received()
        try:
            with conn:
                conn.setblocking(False)
                if peer_uid(conn) != 0:
                    # Take in (and throw away) what it sent: closing on unread data would reset the connection,
                    # and the caller would never see why it was refused.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(read_request(conn, request), REFUSED_READ_TIMEOUT)
                    code, out = _error(spec.INVALID_ENVIRONMENT, "only root may call the calico-py CNI socket")
                else:
                    await read_request(conn, request)
                    code, out = await self._answer(request)
                await asyncio.get_running_loop().sock_sendall(conn, encode_response(code, out))
        except ConnectionError:
            log.warning("cni caller went away before the answer")
        finally:
            request.close()

    async def _answer(self, request: Received) -> tuple[int, str]:
        if request.too_large:
            return _error(spec.DECODE_FAILURE, f"request larger than {MAX_REQUEST} bytes")
        try:
            plugin, env, stdin, netns_errno = decode_request(bytes(request.data), request.descriptor_count)
        except ValueError as exc:
            return _error(spec.DECODE_FAILURE, "malformed request from the calico-py shim", str(exc))
        netns = spec.Netns(env.get("CNI_NETNS", ""), request.descriptors[0] if netns_errno == 0 else None,
                           netns_errno or 0)
        return await self.handler(plugin, env, stdin, netns)
