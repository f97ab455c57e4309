"""The node's ExaBGP: configuration, supervision (restart with backoff), and its process API.

ExaBGP runs our relay (:mod:`bgpd.speaker.relay`) as its API process; the relay connects to the abstract socket
``@calico-py-exabgp`` served here. Lines from ExaBGP are JSON (validated before use: it is input from the
network); lines to ExaBGP are ``announce``/``withdraw`` commands. ExaBGP keeps no FIB: the routes it learns are
kept here per peer and installed by the route reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgpd.desired import StartupPeer, startup_routes_kept
from bgpd.speaker.peers import (
    ORIGINS,
    BGPPath,
    PeerSpec,
    canonical_prefix,
    looped,
    multipath,
    prefix_version,
    reflections,
    render_exabgp,
)
from bgpd.unixsock import bind_abstract, peer_uid

log = logging.getLogger("calico-py-node.bgp")
API_SOCKET = "\0calico-py-exabgp"
API_READY_TIMEOUT = 10.0  # seconds a reload waits for a starting ExaBGP before signalling it anyway
RELOAD_CONFIRM_TIMEOUT = 3.0  # seconds ExaBGP has to start acting on a SIGUSR1 before it is sent again
# SIGUSR1s per configuration change before ExaBGP is restarted instead: a peer that stays down keeps routes queued
# for it, and every reload dropped, so a restart (cheap: graceful restart both ways) must come soon.
RELOAD_ATTEMPTS = 3
U32_MAX = 2**32 - 1  # AS numbers, LOCAL_PREF and MED are four-octet fields
RESTART_TIME_MAX = 4095  # the graceful-restart capability's restart time is 12 bits (RFC 4724)


def reload_outcome(log_since_signal: str) -> str | None:
    """What ExaBGP did with our SIGUSR1, from what it logged since just before it was sent: ``"loaded"``,
    ``"failed"`` (it read the configuration and refused it), or None (not acted on yet, or never will).

    ExaBGP 5.0 drops a reload without a word when any configured peer still has routes waiting to be sent (its
    adj-rib-out is pending, which it stays while that peer is not Established), and ignores a SIGUSR1 that arrives
    while an earlier one waits to be handled. A reload that starts after our signal reads the file we wrote before
    it; "performing reload" logged before our signal belongs to an earlier reload, which may have read the old one.
    """
    received = log_since_signal.find("SIGUSR1 received")
    if received < 0:
        return None
    started = log_since_signal.find("performing reload", received)
    if started < 0:
        return None
    after = log_since_signal[started:]
    if "could not load/reload configuration" in after:
        return "failed"
    return "loaded" if "loaded new configuration successfully" in after else None


Accept = Callable[[str, str, BGPPath], bool]  # (peer, prefix, path) -> use the path


def _accept_all(peer: str, prefix: str, path: BGPPath) -> bool:
    return True


@dataclass
class PeerStatus:
    spec: PeerSpec
    state: str = "start"
    since: float = field(default_factory=time.time)
    info: str = "Active"
    downs: int = 0  # sessions lost since start, and why the last one was (ExaBGP's reason, e.g. a NOTIFICATION)
    last_down: str = ""


class ExaBGP:
    def __init__(self, state_dir: Path, router_id: str, on_routes: Callable[[], None],
                 exabgp: str | None = None, listen: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.router_id = router_id
        # Addresses ExaBGP accepts sessions on (the node's IPv4 and IPv6 addresses); default: the router id.
        self.listen = listen or (router_id,)
        self.on_routes = on_routes
        self.exabgp = exabgp or str(Path(sys.executable).parent / "exabgp")
        self.peers: dict[str, PeerStatus] = {}
        self.rib: dict[str, dict[str, BGPPath]] = {}  # peer address -> prefix -> path
        self.touched: set[str] = set()  # prefixes whose paths changed since learned_changes() last ran
        self.last_update_at = 0.0  # wall clock of the last UPDATE ExaBGP passed on (benchmarks: ExaBGP's share)
        self.cluster_id: str | None = None  # set when this node is a route reflector
        self.reflect_accept: Accept = _accept_all  # what may be reflected: the daemon sets its import filter
        self.reflected: dict[str, dict[str, BGPPath]] = {}  # what ExaBGP was told to reflect, per peer
        self.announced: set[str] = set()  # what ExaBGP was told, on the current API connection
        self.wanted: set[str] = set()
        self.restarts = 0
        self.reloads = 0
        self.reloads_unanswered = 0  # SIGUSR1s ExaBGP dropped (see reload_outcome), each sent again
        self.malformed: dict[str, int] = {}  # peer -> routes dropped for malformed attributes (RFC 7606)
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._config_changed = asyncio.Event()
        self._api_ready = asyncio.Event()  # the running ExaBGP has connected to our API socket
        self._server: asyncio.AbstractServer | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.graceful_restart = 120  # seconds a peer's routes outlive its session (RFC 4724)
        self.stale: dict[str, tuple[float, set[str]]] = {}  # peer -> (deadline, prefixes not refreshed yet)
        self.gr_peers: dict[str, int] = {}  # peer -> restart time it advertised in its OPEN (RFC 4724)
        self.eor: set[str] = set()  # peers that sent End-of-RIB since their session came up
        self.started_at = time.monotonic()
        # The start-up rule (see keeps_startup_routes): our restart time as first configured (None: not read yet),
        # lowered by later changes but never raised; which peers sent an OPEN and an End-of-RIB since start; and
        # whether it is over.
        self.startup_window: float | None = None
        self._opened: set[str] = set()
        self._sent_eor: set[str] = set()
        self._startup_over = False
        self._peers_known = False
        self._came_up: list[str] = []  # peers whose session just came up: they get our routes again

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._stop_leftover()
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

    async def _stop_leftover(self) -> None:
        """An ExaBGP left running by a daemon that was killed holds port 179: stop it (by the PID we recorded,
        after checking it is that ExaBGP). Its peers keep our routes meanwhile (graceful restart)."""
        pid_file = self.state_dir / "exabgp.pid"
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"exabgp" not in cmdline or str(self.state_dir).encode() not in cmdline:
            return
        log.info("stopping exabgp %s left by an earlier run", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling for the old process to exit, with a deadline
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except TimeoutError:
                process.kill()
                await process.wait()

    def _write_config(self) -> Path:
        config = self.state_dir / "exabgp.conf"
        tmp = config.with_suffix(".tmp")
        tmp.write_text(render_exabgp(self.router_id, [p.spec for p in self.peers.values()],
                                     [sys.executable, "-I", "-S", str(Path(__file__).with_name("relay.py"))],
                                     self.graceful_restart))
        tmp.replace(config)
        return config

    async def _supervise(self) -> None:
        """Run ExaBGP; on a configuration change ask it to reload (SIGUSR1: sessions whose neighbor did not
        change stay up); restart it with backoff when it dies."""
        backoff = 0.5
        while not self._stopping:
            if not self.peers:
                self._config_changed.clear()
                await self._config_changed.wait()
                continue
            self._config_changed.clear()  # what changed until now is in the file ExaBGP starts with
            config = self._write_config()
            env = {**os.environ, "exabgp_daemon_user": "root", "exabgp_daemon_daemonize": "false",
                   "exabgp_api_ack": "false", "exabgp_api_cli": "false", "exabgp_log_destination": "stdout",
                   # Reloads are confirmed from ExaBGP's signal and reload lines (see reload_outcome).
                   "exabgp_log_enable": "true", "exabgp_log_level": "INFO", "exabgp_log_reactor": "true",
                   "exabgp_log_configuration": "true",
                   # Unicast NLRI as plain strings, not {"nlri": ...} objects: less to encode and to parse.
                   "exabgp_api_compact": "true",
                   "exabgp_tcp_bind": " ".join(self.listen), "exabgp_tcp_port": "179"}
            started = time.monotonic()
            self._api_ready.clear()
            with open(self.state_dir / "exabgp.log", "ab") as out:
                self._process = await asyncio.create_subprocess_exec(
                    self.exabgp, "server", str(config), stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
                    start_new_session=True)
            (self.state_dir / "exabgp.pid").write_text(str(self._process.pid))
            waiter = asyncio.create_task(self._process.wait())
            while True:
                changed = asyncio.create_task(self._config_changed.wait())
                done, _ = await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    changed.cancel()
                    break
                # A SIGUSR1 that reaches ExaBGP while it is still starting is lost (its reactor is not running
                # yet), and the peer added by it would never be configured: wait until ExaBGP has started our
                # API process, which it does from its running reactor.
                ready = asyncio.create_task(self._api_ready.wait())
                await asyncio.wait({waiter, ready}, timeout=API_READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if waiter.done() or not await self._reload(waiter):
                    break
            await asyncio.wait({waiter})
            self._process_gone()
            self.restarts += 1
            code = waiter.result()
            log.warning("exabgp exited (code %s); restarting in %.1fs", code, backoff)
            await asyncio.sleep(backoff)  # backoff between restarts of a crashing child, not synchronisation
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 30)

    async def _reload(self, exited: asyncio.Task[int]) -> bool:
        """Make the running ExaBGP read the current configuration: SIGUSR1, confirmed from its log and sent again
        while it is not acted on (see :func:`reload_outcome`); after ``RELOAD_ATTEMPTS`` unanswered signals
        ExaBGP is restarted, which reads the whole file (peers keep our routes meanwhile: graceful restart).
        False when ExaBGP exited (or was stopped here): the supervisor starts it again."""
        exabgp_log = self.state_dir / "exabgp.log"
        for attempt in range(1, RELOAD_ATTEMPTS + 1):
            offset = _size(exabgp_log)
            self._config_changed.clear()  # a change from here on is written by a later reload
            self._write_config()
            self.reloads += 1
            log.info("bgp peers changed: exabgp reloads its configuration%s",
                     f" (attempt {attempt})" if attempt > 1 else "")
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + RELOAD_CONFIRM_TIMEOUT
            while (outcome := reload_outcome(_read_from(exabgp_log, offset))) is None:
                if exited.done():
                    return False
                if time.monotonic() > deadline:
                    break
                # polling ExaBGP's log for its answer, with a deadline; wakes at once if ExaBGP exits
                await asyncio.wait({exited}, timeout=0.1)
            if outcome == "failed":
                log.error("exabgp refused the new configuration; see %s", exabgp_log)
            if outcome is not None:
                return True
            self.reloads_unanswered += 1
            log.warning("exabgp did not act on reload signal %d of %d (a peer's routes still wait to be sent)",
                        attempt, RELOAD_ATTEMPTS)
        log.error("exabgp ignored %d reload signals: restarting it to apply the configuration", RELOAD_ATTEMPTS)
        await self._terminate()
        return False

    def _process_gone(self) -> None:
        """ExaBGP exited: every session went with it, without a word on the API. Each peer's routes are kept as
        after a "down" (graceful restart: stale until its End-of-RIB, or dropped after the restart time), so the
        kernel keeps forwarding while the new ExaBGP relearns them and nothing withdrawn meanwhile stays."""
        for peer, status in self.peers.items():
            if status.state != "start" or peer in self.rib:
                self._peer_down(peer, "exabgp exited")

    # ------------------------------------------------------------------ desired state in

    def set_peers(self, peers: list[PeerSpec]) -> None:
        self._peers_known = True
        wanted = {p.address: p for p in peers}
        current = {a: s.spec for a, s in self.peers.items()}
        if wanted == current:
            return
        for address in set(self.peers) - set(wanted):
            self.peers.pop(address)
            self.stale.pop(address, None)
            if table := self.rib.pop(address, None):
                self.touched.update(table)  # the fast path removes what only that peer offered
                self.on_routes()
        for address, spec in wanted.items():
            if address not in self.peers:
                self.peers[address] = PeerStatus(spec)
            else:
                # Keep the session's state: a change ExaBGP does not see (the peer's type) leaves the session up,
                # and one it does see (AS, password) makes it report the reset itself.
                self.peers[address].spec = spec
        self._config_changed.set()
        self._note_startup_over()  # a peer no longer configured is not waited for

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

    def learned(self, accept: Accept = _accept_all) -> dict[str, tuple[str, ...]]:
        """prefix -> next hops of its best paths (several: equal-cost multipath), over the whole RIB; only the
        paths ``accept(peer, prefix, path)`` lets through take part (the import filter)."""
        by_prefix: dict[str, dict[str, BGPPath]] = {}
        for address, table in self.rib.items():
            for prefix, path in table.items():
                if accept(address, prefix, path):
                    by_prefix.setdefault(prefix, {})[address] = path
        self.touched.clear()
        return {prefix: multipath(paths) for prefix, paths in by_prefix.items()}

    def learned_changes(self, accept: Accept = _accept_all) -> dict[str, tuple[str, ...]]:
        """Like :meth:`learned`, for the prefixes touched since the last call only (no next hop: gone), so a
        burst of updates costs what changed, not the size of the RIB."""
        touched, self.touched = self.touched, set()
        return {prefix: multipath({peer: table[prefix] for peer, table in self.rib.items()
                                   if prefix in table and accept(peer, prefix, table[prefix])})
                for prefix in touched}

    def touch_all(self) -> None:
        """Mark every prefix changed (what is accepted changed, e.g. the pools)."""
        for table in self.rib.values():
            self.touched.update(table)

    @property
    def alive(self) -> bool:
        """ExaBGP runs, or its supervisor is restarting it."""
        return self._supervisor is not None and not self._supervisor.done()

    def set_graceful_restart(self, seconds: int) -> None:
        if seconds != self.graceful_restart:
            self.graceful_restart = seconds
            self._config_changed.set()  # the capability is in ExaBGP's configuration
        self.startup_window = seconds if self.startup_window is None else min(self.startup_window, seconds)

    def keeps_startup_routes(self) -> bool:
        """Whether a restarted daemon still keeps the remote routes it found in the kernel: until every configured
        peer that negotiated graceful restart sent End-of-RIB or its restart time ended, within our restart time
        since start (:func:`bgpd.desired.startup_routes_kept`). Once over, over for good: no configuration change
        reopens it."""
        if not self._startup_over:
            peers = {address: StartupPeer(address in self._opened, self.gr_peers.get(address, 0),
                                          address in self._sent_eor)
                     for address in self.peers} if self._peers_known else None
            window = self.graceful_restart if self.startup_window is None else self.startup_window
            self._startup_over = not startup_routes_kept(peers, time.monotonic() - self.started_at, window)
            if self._startup_over:
                log.info("bgp start-up over: remote routes found in the kernel are kept no longer")
        return not self._startup_over

    def _note_startup_over(self) -> None:
        """Wake the reconciler when the start-up rule has just ended: what BGP did not relearn goes."""
        if not self._startup_over and not self.keeps_startup_routes():
            self.on_routes()

    def expire_stale(self) -> None:
        """Drop routes of peers that did not come back within the graceful-restart time (and end the start-up
        rule when its time is up)."""
        now = time.monotonic()
        for peer, (deadline, prefixes) in list(self.stale.items()):
            if now >= deadline:
                self._drop(peer, prefixes, "graceful-restart time passed")
        self._note_startup_over()

    def _drop(self, peer: str, prefixes: set[str], why: str) -> None:
        table = self.rib.get(peer, {})
        gone = [p for p in prefixes if table.pop(p, None) is not None]
        self.touched.update(gone)
        self.stale.pop(peer, None)
        if gone:
            log.info("bgp dropped %d stale routes of %s: %s", len(gone), peer, why)
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
                self._writer.write(f"neighbor {peer} announce route {prefix} next-hop self\n".encode())
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
            self._writer.write(f"neighbor {peer} announce eor ipv{version} unicast\n".encode())
        await self._writer.drain()

    async def reflect(self) -> None:
        """As a route reflector, tell ExaBGP what to re-advertise to each peer (only the difference)."""
        if self.cluster_id is None or self._writer is None:
            return
        wanted = reflections(self.rib, [s.spec for s in self.peers.values()], self.cluster_id, self.router_id,
                             self.reflect_accept)
        for peer in sorted(set(wanted) | set(self.reflected)):
            now, before = wanted.get(peer, {}), self.reflected.get(peer, {})
            for prefix in sorted(set(before) - set(now)):
                self._writer.write(f"neighbor {peer} withdraw route {prefix} next-hop {before[prefix].next_hop}\n"
                                   .encode())
            for prefix, path in sorted(now.items()):
                if before.get(prefix) != path:
                    self._writer.write((f"neighbor {peer} announce route {prefix} next-hop {path.next_hop} "
                                        f"{path.exabgp_attributes()} originator-id {path.originator_id} "
                                        f"cluster-list [ {' '.join(path.cluster_list)} ]\n").encode())
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
        self._api_ready.set()
        self.announced = set()  # a new ExaBGP knows nothing yet
        self.reflected = {}
        await self.set_announcements(self.wanted)
        try:
            while line := await reader.readline():
                changed = self._handle(line)
                came_up, self._came_up = self._came_up, []
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
        """Act on one line from ExaBGP; True when the RIB changed."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return False  # not JSON (e.g. an ack), or nested deeper than Python parses: nothing to act on
        neighbor = _dict(_dict(message).get("neighbor"))
        peer = _dict(neighbor.get("address")).get("peer")
        if not isinstance(peer, str) or peer not in self.peers:
            return False
        if message.get("type") == "state":
            state = str(neighbor.get("state", ""))
            status = self.peers[peer]
            status.state = {"up": "up", "down": "start", "connected": "start"}.get(state, state)
            status.info = "Established" if state == "up" else f"Active ({neighbor.get('reason', state)})"
            status.since = time.time()
            log.info("bgp peer %s %s", peer, state)
            if state == "connected":
                self.eor.discard(peer)  # a new session: its End-of-RIB is still to come
            if state == "up":
                self._came_up.append(peer)
            if state == "down":
                return self._peer_down(peer, str(neighbor.get("reason", "")))
        elif message.get("type") == "open" and neighbor.get("direction") == "receive":
            capabilities = _dict(_dict(neighbor.get("open")).get("capabilities"))
            restart = [c.get("time") for c in capabilities.values() if isinstance(c, dict)
                       and str(c.get("name", "")).replace("-", " ") == "graceful restart"]
            if restart and _uint(restart[0], RESTART_TIME_MAX):
                self.gr_peers[peer] = restart[0]
            else:
                self.gr_peers.pop(peer, None)
            self._opened.add(peer)
            self._note_startup_over()  # a peer without graceful restart sends no End-of-RIB: not waited for
        elif message.get("type") == "update":
            body = _dict(neighbor.get("message"))
            if body.get("eor"):
                self.eor.add(peer)
                self._sent_eor.add(peer)
                self._note_startup_over()
                stale = self.stale.get(peer)
                if stale:
                    self._drop(peer, stale[1], "not re-announced before End-of-RIB")
                    return True
                return False
            self.last_update_at = time.time()
            if self._apply_update(peer, _dict(body.get("update"))):
                self.on_routes()
                return True
        return False

    def _peer_down(self, peer: str, why: str) -> bool:
        """The peer's session went: keep its routes for its restart time (RFC 4724), or drop them now. True when
        the RIB changed."""
        status = self.peers[peer]
        status.downs += 1
        status.last_down = why
        if status.state != "start":
            status.state, status.info, status.since = "start", f"Active ({why or 'down'})", time.time()
        self.eor.discard(peer)
        routes = set(self.rib.get(peer, {}))
        restart_time = min(self.gr_peers.get(peer, 0), self.graceful_restart)
        if peer in self.stale:
            pass  # a failed reconnect while restarting: the restart timer keeps running from the first down
        elif restart_time and routes:
            # RFC 4724: keep forwarding on the peer's routes while it restarts, for the time it asked.
            self.stale[peer] = (time.monotonic() + restart_time, routes)
            log.info("bgp keeping %d routes of %s for %ss (graceful restart)", len(routes), peer, restart_time)
        elif table := self.rib.pop(peer, None):
            self.touched.update(table)
            self.on_routes()
            return True
        return False

    def _apply_update(self, peer: str, update: dict[str, Any]) -> bool:
        """Apply one UPDATE to the peer's table; True when a path changed. Costs the size of the update only."""
        table = self.rib.setdefault(peer, {})
        changed = False
        attributes = update.get("attribute", {})
        spec = self.peers[peer].spec
        for version in (4, 6):
            family = f"ipv{version} unicast"
            for next_hop, entries in _dict(_dict(update.get("announce")).get(family)).items():
                if not _next_hop(next_hop, version):
                    continue
                path = _path(next_hop, attributes)
                if path is not None and spec.peer_as != spec.local_as and path.local_pref != 100:
                    # RFC 4271 5.1.5: LOCAL_PREF from an external peer is ignored; honoured, a rogue peer could
                    # outrank a node's own block with it (tests/faults/test_rogue_peer.py).
                    path = dataclasses.replace(path, local_pref=100)
                for entry in entries if isinstance(entries, list) else []:
                    prefix = _prefix(entry, version)
                    if not prefix:
                        continue
                    if path is None:
                        # RFC 7606 treat-as-withdraw: an attribute we cannot trust voids the routes it came with,
                        # including an earlier good path for them (the peer replaced it).
                        self.malformed[peer] = self.malformed.get(peer, 0) + 1
                        log.warning("bgp route %s from %s dropped: malformed path attributes", prefix, peer)
                        if table.pop(prefix, None) is not None:
                            self.touched.add(prefix)
                            changed = True
                        continue
                    if looped(path, self.router_id, self.cluster_id):
                        log.info("bgp route %s from %s dropped: it looped (RFC 4456)", prefix, peer)
                        if table.pop(prefix, None) is not None:
                            self.touched.add(prefix)
                            changed = True
                        continue
                    if table.get(prefix) != path:
                        table[prefix] = path
                        self.touched.add(prefix)
                        changed = True
                    if peer in self.stale:
                        self.stale[peer][1].discard(prefix)
            withdrawn = _dict(update.get("withdraw")).get(family)
            for entry in withdrawn if isinstance(withdrawn, list) else []:
                prefix = _prefix(entry, version)
                if prefix and table.pop(prefix, None) is not None:
                    self.touched.add(prefix)
                    changed = True
        return changed


def _path(next_hop: str, attributes: Any) -> BGPPath | None:
    """The path an UPDATE's attributes describe (ExaBGP's JSON), or None when one is malformed: of the wrong
    type or out of its range. An attribute that is absent takes its default."""
    if not isinstance(attributes, dict):
        return None
    originator = attributes.get("originator-id")
    clusters = attributes.get("cluster-list", [])
    as_path = _as_path(attributes.get("as-path", []))
    local_pref, med = attributes.get("local-preference", 100), attributes.get("med", 0)
    origin = attributes.get("origin", "igp")
    if ((originator is not None and not _address(originator))
            or not (isinstance(clusters, list) and all(_address(c) for c in clusters))
            or as_path is None or not _uint(local_pref, U32_MAX) or not _uint(med, U32_MAX)
            or not (isinstance(origin, str) and origin in ORIGINS)):
        return None
    return BGPPath(next_hop, originator_id=originator, cluster_list=tuple(clusters), as_path=as_path,
                   local_pref=local_pref, med=med, origin=origin)


def _as_path(value: Any) -> tuple[int, ...] | None:
    """ExaBGP 5 gives ``{"0": {"element": "as-sequence", "value": [65001, ...]}, ...}`` (older ones a plain
    list). An AS_SET counts as one AS (RFC 4271 9.1.2.2), kept as its first member. None when malformed."""
    if isinstance(value, list):
        segments: list[Any] = [{"element": "as-sequence", "value": value}]
    elif isinstance(value, dict):
        segments = list(value.values())
    else:
        return None
    path: list[int] = []
    for segment in segments:
        if not isinstance(segment, dict):
            return None
        element, members = segment.get("element"), segment.get("value")
        if (element not in ("as-sequence", "as-set") or not isinstance(members, list)
                or not all(_uint(a, U32_MAX) for a in members)):
            return None
        path += members[:1] if element == "as-set" else members
    return tuple(path)


def _prefix(entry: Any, version: int = 4) -> str | None:
    """An NLRI as ExaBGP gives it: a plain string (``exabgp.api.compact``) or ``{"nlri": ...}``, canonical; None
    unless it is a network of the family it came under."""
    nlri = entry.get("nlri") if isinstance(entry, dict) else entry
    return canonical_prefix(nlri, version) if isinstance(nlri, str) else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one: a field of the wrong type is as good as absent."""
    return value if isinstance(value, dict) else {}


def _uint(value: Any, maximum: int) -> bool:
    """An integer in 0..maximum (JSON's true and false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def _address(text: Any) -> bool:
    """A dotted-quad IPv4 address as text (an integer would pass ``IPv4Address`` too)."""
    if not isinstance(text, str):
        return False
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _next_hop(text: Any, version: int = 4) -> bool:
    """An address of the route's IP version a route can point at: not unspecified (0.0.0.0, ::), a loopback,
    multicast, the broadcast address, or (IPv6) link-local: a link-local next hop names no interface, and
    calico-py routes via the peer's global address on the shared segment."""
    if version == 4:
        if not _address(text):
            return False
        address = ipaddress.IPv4Address(text)
        return not (address.is_unspecified or address.is_loopback or address.is_multicast
                    or address == ipaddress.IPv4Address("255.255.255.255"))
    if not isinstance(text, str):
        return False
    try:
        address6 = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return not (address6.is_unspecified or address6.is_loopback or address6.is_multicast or address6.is_link_local
                or address6.ipv4_mapped is not None)
