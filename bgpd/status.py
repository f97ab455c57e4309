"""The status socket `calicoctl-py node status` reads: abstract (this node's namespace), root callers only."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

SOCKET = "\0calico-py-status"


class StatusServer:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], address: str = SOCKET) -> None:
        self.snapshot = snapshot
        self.address = address
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
            body = self.snapshot() if uid == 0 else {"error": "only root may read the calico-py status"}
            writer.write(json.dumps(body).encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
