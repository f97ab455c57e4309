"""Abstract unix sockets: scoped to the network namespace that binds them, with the caller's uid checkable."""

from __future__ import annotations

import socket
import struct


def bind_abstract(address: str) -> socket.socket:
    """A listening-ready socket on the abstract ``address`` (leading NUL); a clear error if it is taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on @{address.lstrip(chr(0))}: {exc.strerror} "
                           "(is another calico-py-node running in this network namespace?)") from None
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED)."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
