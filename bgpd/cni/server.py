"""The unix socket the CNI shim talks to: abstract (so scoped to this network namespace), root callers only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from bgpd.cni import spec
from bgpd.cni.shim import SOCKET, decode_request, encode_response
from bgpd.unixsock import bind_abstract, peer_uid

log = logging.getLogger("calico-py-node.cni")
MAX_REQUEST = 4 * 1024 * 1024
REFUSED_READ_TIMEOUT = 5.0  # seconds a refused caller has to finish sending before it is cut off
Handler = Callable[[str, dict[str, str], str], Awaitable[tuple[int, str]]]


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """The request, up to the shim's half-close; None once it grows beyond MAX_REQUEST (memory stays bounded)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await reader.read(64 * 1024):
        size += len(chunk)
        if size > MAX_REQUEST:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class CNIServer:
    def __init__(self, handler: Handler, address: str = SOCKET) -> None:
        self.handler = handler
        self.address = address
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = bind_abstract(self.address)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if peer_uid(sock) != 0:
                # Take in (and throw away) what it sent: closing on unread data would reset the connection, and
                # the caller would never see why it was refused.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(read_request(reader), REFUSED_READ_TIMEOUT)
                code, out = 1, json.dumps(spec.CNIError(spec.INVALID_ENVIRONMENT, "only root may call the "
                                                        "calico-py CNI socket").to_json()) + "\n"
            elif (raw := await read_request(reader)) is None:
                code, out = 1, json.dumps(spec.CNIError(spec.DECODE_FAILURE, f"request larger than {MAX_REQUEST} "
                                                        "bytes").to_json()) + "\n"
            else:
                try:
                    plugin, env, stdin = decode_request(raw)
                except ValueError:
                    code, out = 1, json.dumps(spec.CNIError(spec.DECODE_FAILURE, "malformed request from the "
                                                            "calico-py shim").to_json()) + "\n"
                else:
                    code, out = await self.handler(plugin, env, stdin)
            writer.write(encode_response(code, out))
            await writer.drain()
        except ConnectionError:
            log.warning("cni caller went away before the answer")
        finally:
            writer.close()
