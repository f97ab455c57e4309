"""The node's ExaBGP: configuration, supervision (restart with backoff), and its process API.

ExaBGP runs our relay (:mod:`bgpd.speaker.relay`) as its API process; the relay connects to the abstract socket
``@calico-py-exabgp`` served here. Lines from ExaBGP are JSON (validated before use: it is input from the
network); lines to ExaBGP are ``announce``/``withdraw`` commands. ExaBGP keeps no FIB: the routes it learns are
kept here per peer and installed by the route reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgpd.speaker.peers import PeerSpec, render_exabgp
from bgpd.unixsock import bind_abstract

log = logging.getLogger("calico-py-node.bgp")
API_SOCKET = "\0calico-py-exabgp"


@dataclass
class PeerStatus:
    spec: PeerSpec
    state: str = "start"
    since: float = field(default_factory=time.time)
    info: str = "Active"


class ExaBGP:
    def __init__(self, state_dir: Path, router_id: str, on_routes: Callable[[], None],
                 exabgp: str | None = None) -> None:
        self.state_dir = state_dir
        self.router_id = router_id
        self.on_routes = on_routes
        self.exabgp = exabgp or str(Path(sys.executable).parent / "exabgp")
        self.peers: dict[str, PeerStatus] = {}
        self.rib: dict[str, dict[str, str]] = {}  # peer address -> prefix -> next hop
        self.announced: set[str] = set()  # what ExaBGP was told, on the current API connection
        self.wanted: set[str] = set()
        self.restarts = 0
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._config_changed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._api, sock=bind_abstract(API_SOCKET))
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._terminate()
        if self._server:
            self._server.close()

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            if not self.peers:
                self._config_changed.clear()
                await self._config_changed.wait()
                continue
            config = self.state_dir / "exabgp.conf"
            config.write_text(render_exabgp(self.router_id, [p.spec for p in self.peers.values()],
                                            [sys.executable, "-I", "-S", str(Path(__file__).with_name("relay.py"))]))
            env = {**os.environ, "exabgp_daemon_user": "root", "exabgp_daemon_daemonize": "false",
                   "exabgp_api_ack": "false", "exabgp_api_cli": "false", "exabgp_log_destination": "stdout",
                   "exabgp_tcp_bind": self.router_id, "exabgp_tcp_port": "179"}
            started = time.monotonic()
            with open(self.state_dir / "exabgp.log", "ab") as out:
                self._process = await asyncio.create_subprocess_exec(
                    self.exabgp, "server", str(config), stdout=out, stderr=asyncio.subprocess.STDOUT, env=env)
            self._config_changed.clear()
            waiter = asyncio.create_task(self._process.wait())
            changed = asyncio.create_task(self._config_changed.wait())
            done, _ = await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if changed in done:
                log.info("bgp peers changed: restarting exabgp")
                await self._terminate()
                waiter.cancel()
                continue
            self.restarts += 1
            code = self._process.returncode if self._process else None
            log.warning("exabgp exited (code %s); restarting in %.1fs", code, backoff)
            await asyncio.sleep(backoff)  # backoff between restarts of a crashing child, not synchronisation
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 30)

    # ------------------------------------------------------------------ desired state in

    def set_peers(self, peers: list[PeerSpec]) -> None:
        wanted = {p.address: p for p in peers}
        current = {a: s.spec for a, s in self.peers.items()}
        if wanted == current:
            return
        for address in set(self.peers) - set(wanted):
            self.peers.pop(address)
            if self.rib.pop(address, None):
                self.on_routes()
        for address, spec in wanted.items():
            if address not in self.peers or self.peers[address].spec != spec:
                self.peers[address] = PeerStatus(spec)
        self._config_changed.set()

    async def set_announcements(self, prefixes: set[str]) -> None:
        self.wanted = set(prefixes)
        if self._writer is None:
            return  # sent in full when the API process connects
        for prefix in sorted(prefixes - self.announced):
            self._writer.write(f"announce route {prefix} next-hop self\n".encode())
            log.info("bgp announce %s", prefix)
        for prefix in sorted(self.announced - prefixes):
            self._writer.write(f"withdraw route {prefix} next-hop self\n".encode())
            log.info("bgp withdraw %s", prefix)
        self.announced = set(prefixes)
        await self._writer.drain()

    # ------------------------------------------------------------------ learned state out

    def learned(self) -> dict[str, str]:
        """prefix -> next hop, from established peers (first peer's path wins; ECMP later)."""
        routes: dict[str, str] = {}
        for address in sorted(self.rib):
            for prefix, next_hop in self.rib[address].items():
                routes.setdefault(prefix, next_hop)
        return routes

    # ------------------------------------------------------------------ the API connection

    async def _api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.announced = set()  # a new ExaBGP knows nothing yet
        await self.set_announcements(self.wanted)
        try:
            while line := await reader.readline():
                self._handle(line)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return  # not JSON (e.g. an ack): nothing to act on
        if not isinstance(message, dict):
            return
        neighbor = message.get("neighbor") or {}
        peer = ((neighbor.get("address") or {}).get("peer")) if isinstance(neighbor, dict) else None
        if not isinstance(peer, str) or peer not in self.peers:
            return
        if message.get("type") == "state":
            state = str(neighbor.get("state", ""))
            status = self.peers[peer]
            status.state = {"up": "up", "down": "start", "connected": "start"}.get(state, state)
            status.info = "Established" if state == "up" else f"Active ({neighbor.get('reason', state)})"
            status.since = time.time()
            log.info("bgp peer %s %s", peer, state)
            if state == "down" and self.rib.pop(peer, None):
                self.on_routes()
        elif message.get("type") == "update":
            update = ((neighbor.get("message") or {}).get("update") or {})
            changed = self._apply_update(peer, update)
            if changed:
                self.on_routes()

    def _apply_update(self, peer: str, update: dict[str, Any]) -> bool:
        table = self.rib.setdefault(peer, {})
        before = dict(table)
        for next_hop, entries in ((update.get("announce") or {}).get("ipv4 unicast") or {}).items():
            for entry in entries if isinstance(entries, list) else []:
                prefix = _prefix(entry)
                if prefix and _address(next_hop):
                    table[prefix] = next_hop
        for entry in (update.get("withdraw") or {}).get("ipv4 unicast") or []:
            prefix = _prefix(entry)
            if prefix:
                table.pop(prefix, None)
        return table != before


def _prefix(entry: Any) -> str | None:
    nlri = entry.get("nlri") if isinstance(entry, dict) else None
    try:
        return str(ipaddress.IPv4Network(nlri))
    except (ValueError, TypeError):
        return None


def _address(text: Any) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except (ValueError, TypeError):
        return False
    return True
