"""The status socket `calicoctl-py node status` reads: abstract (this node's namespace), root callers only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from bgpd.unixsock import bind_abstract, peer_uid

SOCKET = "\0calico-py-status"


class StatusServer:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], address: str = SOCKET) -> None:
        self.snapshot = snapshot
        self.address = address
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = bind_abstract(self.address)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            body = self.snapshot() if peer_uid(sock) == 0 else {"error": "only root may read the calico-py status"}
            writer.write(json.dumps(body).encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
