"""The node's ExaBGP: configuration, supervision (restart with backoff), and its process API.

ExaBGP runs our relay (:mod:`bgpd.speaker.relay`) as its API process; the relay connects to the abstract socket
``@calico-py-exabgp`` served here. Lines from ExaBGP are JSON (validated before use: it is input from the
network); lines to ExaBGP are ``announce``/``withdraw`` commands. ExaBGP keeps no FIB: the routes it learns are
kept in the node's table (:class:`bgpd.speaker.rib.Rib`, pure) and installed by the route reconciler; this
module is the process and its socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bgpd.speaker import exabgp_api
from bgpd.speaker.peers import DEFAULT_HOLD_TIME, BGPPath, PeerSpec, prefix_version, render_exabgp
from bgpd.speaker.process import ExaBGPProcess
from bgpd.speaker.rib import Rib, Routes, Session, SessionState, Update
from bgpd.unixsock import bind_abstract, peer_uid

log = logging.getLogger("calico-py-node.bgp")
API_SOCKET = "\0calico-py-exabgp"


class ExaBGP:
    """The speaker adapter: runs ExaBGP, tells it our peers (its configuration) and announcements (API commands),
    and feeds what it says into :attr:`rib`. ``on_routes`` is called when the routes to install changed."""

    def __init__(self, state_dir: Path, router_id: str, on_routes: Callable[[], None],
                 exabgp: str | None = None, listen: tuple[str, ...] = (), hold_time: int = DEFAULT_HOLD_TIME) -> None:
        self.state_dir = state_dir
        self.router_id = router_id
        # Addresses ExaBGP accepts sessions on (the node's IPv4 and IPv6 addresses); default: the router id.
        self.listen = listen or (router_id,)
        self.on_routes = on_routes
        self.hold_time = hold_time
        self.rib = Rib(router_id, started_at=time.monotonic())
        self.last_update_at = 0.0  # wall clock of the last UPDATE ExaBGP passed on (benchmarks: ExaBGP's share)
        self.reflected: dict[str, dict[str, BGPPath]] = {}  # what ExaBGP was told to reflect, per peer
        self.announced: set[str] = set()  # what ExaBGP was told, on the current API connection
        self.wanted: set[str] = set()
        self.process = ExaBGPProcess(state_dir, exabgp or str(Path(sys.executable).parent / "exabgp"), self.listen,
                                     self._config_text, has_peers=lambda: bool(self.rib.sessions),
                                     on_exit=self._process_gone)
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._startup_seen_over = False

    @property
    def peers(self) -> dict[str, Session]:
        return self.rib.sessions

    @property
    def graceful_restart(self) -> int:
        return self.rib.graceful_restart

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._api, sock=bind_abstract(API_SOCKET))
        await self.process.start()

    async def stop(self) -> None:
        await self.process.stop()
        if self._server:
            self._server.close()

    @property
    def alive(self) -> bool:
        return self.process.alive

    def _config_text(self) -> str:
        return render_exabgp(self.router_id, [s.spec for s in self.rib.sessions.values()],
                             [sys.executable, "-I", "-S", str(Path(__file__).with_name("relay.py"))],
                             self.rib.graceful_restart, self.hold_time)

    def _process_gone(self) -> None:
        """ExaBGP exited: every session went with it, without a word on the API (see :meth:`Rib.speaker_gone`)."""
        self._routes_changed(self.rib.speaker_gone(time.monotonic(), time.time()))

    # ------------------------------------------------------------------ desired state in

    def set_peers(self, peers: list[PeerSpec]) -> None:
        changed = self.rib.set_peers(peers)
        if changed:
            self.process.changed()
        self._routes_changed(changed)  # a peer no longer configured took its routes, and is not waited for

    def set_graceful_restart(self, seconds: int) -> None:
        if self.rib.set_graceful_restart(seconds):
            self.process.changed()  # the capability is in ExaBGP's configuration
        self._routes_changed(False)

    async def set_announcements(self, prefixes: set[str]) -> None:
        self.wanted = set(prefixes)
        if self._writer is None:
            return  # sent in full when the API process connects
        for prefix in sorted(prefixes - self.announced):
            self._writer.write(exabgp_api.announce(prefix))
            log.info("bgp announce %s", prefix)
        for prefix in sorted(self.announced - prefixes):
            self._writer.write(exabgp_api.withdraw(prefix))
            log.info("bgp withdraw %s", prefix)
        self.announced = set(prefixes)
        await self._writer.drain()

    # ------------------------------------------------------------------ learned state out

    def learned(self) -> Routes:
        return self.rib.learned()

    def learned_changes(self) -> Routes:
        return self.rib.changes()

    def expire_stale(self) -> None:
        """Drop routes of peers that did not come back within the graceful-restart time (and end the start-up
        rule when its time is up)."""
        self._routes_changed(self.rib.expire(time.monotonic()))

    def _routes_changed(self, changed: bool) -> None:
        """Wake the reconciler when the routes changed, or the start-up rule has just ended (what BGP did not
        relearn goes)."""
        startup_ended = self.rib.keeps_startup_routes(time.monotonic()) is False and not self._startup_seen_over
        self._startup_seen_over |= startup_ended
        if changed or startup_ended:
            self.on_routes()

    async def _refresh(self, peers: list[str]) -> None:
        """Send our announcements to peers whose session just came up. ExaBGP gives API-announced routes only to
        the neighbors configured when they were announced: a neighbor added later by a reload would never get
        them. Re-announcing to an up-to-date peer is harmless."""
        if self._writer is None:
            return
        for peer in peers:
            version = self.peers[peer].spec.version if peer in self.peers else prefix_version(peer)
            for prefix in sorted(p for p in self.wanted if prefix_version(p) == version):
                self._writer.write(exabgp_api.announce(prefix, peer))
            self.reflected.pop(peer, None)  # and what we reflect to it, on the next reflect()
        await self._writer.drain()

    async def _end_of_rib(self, peers: list[str]) -> None:
        """End-of-RIB to peers whose session just came up, after our routes (ExaBGP runs with ``manual-eor``).
        ExaBGP's own would go out as soon as the session is up: from a just restarted ExaBGP that is before the
        daemon gave it any route, and a peer would drop our routes it kept (graceful restart) until they come."""
        if self._writer is None:
            return
        for peer in peers:
            version = self.peers[peer].spec.version if peer in self.peers else prefix_version(peer)
            self._writer.write(exabgp_api.end_of_rib(peer, version))
        await self._writer.drain()

    async def reflect(self) -> None:
        """As a route reflector, tell ExaBGP what to re-advertise to each peer (only the difference)."""
        if self.rib.cluster_id is None or self._writer is None:
            return
        wanted = self.rib.reflections()
        for peer in sorted(set(wanted) | set(self.reflected)):
            now, before = wanted.get(peer, {}), self.reflected.get(peer, {})
            for prefix in sorted(set(before) - set(now)):
                self._writer.write(exabgp_api.unreflect(peer, prefix, before[prefix]))
            for prefix, path in sorted(now.items()):
                if before.get(prefix) != path:
                    self._writer.write(exabgp_api.reflect(peer, prefix, path))
        self.reflected = wanted
        await self._writer.drain()

    # ------------------------------------------------------------------ the API connection

    async def _api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The socket is abstract: any process in the node's network namespace can connect. Only ExaBGP's relay
        # (our child, our uid) may: anyone else could feed us routes or take over ExaBGP's command channel.
        caller = peer_uid(writer.get_extra_info("socket"))
        if caller != os.geteuid():
            log.warning("refused a connection to the ExaBGP API socket from uid %d: only ExaBGP may use it", caller)
            writer.close()
            return
        self._writer = writer
        self.process.api_ready.set()
        self.announced = set()  # a new ExaBGP knows nothing yet
        self.reflected = {}
        await self.set_announcements(self.wanted)
        try:
            while line := await reader.readline():
                changed = self._handle(line)
                came_up, self.rib.came_up = self.rib.came_up, []
                if came_up:
                    await self._refresh(came_up)
                    changed = True
                if changed:
                    await self.reflect()
                if came_up:
                    await self._end_of_rib(came_up)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    def _handle(self, line: bytes) -> bool:
        """Act on one line from ExaBGP; True when the table changed."""
        event = exabgp_api.decode(line)
        if event is None:
            return False
        if isinstance(event, Update):
            self.last_update_at = time.time()
        elif isinstance(event, SessionState) and event.peer in self.rib.sessions:
            log.info("bgp peer %s %s", event.peer, event.state)  # operators (and the fault tests) follow these
        changed = self.rib.apply(event, time.monotonic(), time.time())
        self._routes_changed(changed)
        return changed
