"""The node's BGP table, with no I/O and no clock: what each configured peer announced (Adj-RIB-In), its session,
graceful restart (RFC 4724: stale routes, End-of-RIB), the start-up rule after a daemon restart, the import filter
and what it refused, best path and ECMP, and what a route reflector re-advertises.

Events come decoded (:mod:`bgpd.speaker.exabgp_api`); times come from the caller (``now``: monotonic seconds,
``wall``: seconds since the epoch, for status only), so every rule here is a unit test away.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bgpd.speaker.peers import AS_PATH_TOO_LONG, BGPPath, PeerSpec, PoolFilter, looped, multipath, reflections

log = logging.getLogger("calico-py-node.bgp")
REJECTIONS_LOGGED = 20  # warnings per pass; a peer flooding bad routes gets one line for the rest
DEFAULT_RESTART_TIME = 120  # seconds: Calico's nodeMeshMaxRestartTime default

Routes = dict[str, tuple[str, ...]]  # prefix -> next hops of its best paths (none: withdrawn)
Accept = Callable[[str, str, BGPPath], bool]  # (peer, prefix, path) -> the path may be used


# ------------------------------------------------------------------ events from the speaker


@dataclass(frozen=True)
class SessionState:
    """The peer's session changed: ``connected`` (TCP up), ``up`` (Established) or ``down``."""

    peer: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Opened:
    """The peer's OPEN arrived; ``restart_time`` from its graceful-restart capability (0: it has none)."""

    peer: str
    restart_time: int


@dataclass(frozen=True)
class EndOfRib:
    peer: str


@dataclass(frozen=True)
class Update:
    """One UPDATE: paths announced (None: attributes malformed, treat as withdraw, RFC 7606) and prefixes
    withdrawn."""

    peer: str
    announced: tuple[tuple[str, BGPPath | None], ...] = ()
    withdrawn: tuple[str, ...] = ()


Event = SessionState | Opened | EndOfRib | Update


@dataclass
class Session:
    """A configured peer and its session, as ``calicoctl node status`` shows it."""

    spec: PeerSpec
    state: str = "start"  # "up" when Established
    since: float = 0.0  # wall clock of the last change
    info: str = "Active"
    downs: int = 0  # sessions lost since start, and why the last one was (the speaker's reason)
    last_down: str = ""


@dataclass(frozen=True)
class StartupPeer:
    """What the start-up rule knows of one configured peer since the daemon started."""

    opened: bool  # its OPEN arrived: whether it negotiated graceful restart is known
    restart_time: int = 0  # seconds it asked for in its graceful-restart capability; 0: no capability
    end_of_rib: bool = False  # it sent End-of-RIB at least once


def startup_routes_kept(peers: Mapping[str, StartupPeer] | None, elapsed: float, window: float) -> bool:
    """Whether the remote routes found in the kernel at start are still kept, ``elapsed`` seconds after it, with
    ``window`` our restart time (``nodeMeshMaxRestartTime``; 0: graceful restart off). ``peers`` is None while
    the datastore has not named them. A peer is waited for until it sends End-of-RIB or its own restart time
    ends; one that has not opened a session yet may still negotiate graceful restart; one that did not negotiate
    it sends no End-of-RIB (GoBGP without it) and is not waited for."""
    if elapsed >= window:
        return False
    if peers is None:
        return True
    return any(not p.end_of_rib and (not p.opened or elapsed < p.restart_time) for p in peers.values())


@dataclass
class _Startup:
    """The start-up rule's memory: our restart time as first configured (lowered later, never raised), and which
    peers opened a session and sent End-of-RIB since start."""

    started_at: float
    window: float | None = None
    opened: set[str] = field(default_factory=set)
    sent_eor: set[str] = field(default_factory=set)
    over: bool = False


class ImportPolicy:
    """What the import filter refuses of what peers announce (the pools: no default route, no node address, no
    part of another node's block), and the count of refusals, each once while the peer announces it."""

    def __init__(self) -> None:
        self.filter: PoolFilter | None = None  # None: everything is used (a table with no policy yet, in tests)
        self.rejected: dict[tuple[str, str], str] = {}  # (peer, prefix) -> why, while the peer announces it
        self.rejected_total: dict[tuple[str, str], int] = {}  # (peer, reason) -> paths refused since start

    def reason(self, prefix: str, path: BGPPath) -> str | None:
        """Why the import filter refuses the path (None: it is used)."""
        return None if self.filter is None else self.filter.reason(prefix, len(path.as_path))

    def judge(self, verdicts: dict[tuple[str, str], str]) -> Accept:
        reason_of = self.reason

        def judge(peer: str, prefix: str, path: BGPPath) -> bool:
            reason = reason_of(prefix, path)
            if reason is not None:
                verdicts[(peer, prefix)] = reason
            return reason is None
        return judge

    def account(self, verdicts: dict[tuple[str, str], str], tables: Mapping[str, Mapping[str, BGPPath]],
                looked_at: set[tuple[str, str]]) -> None:
        """Count and log each path refused once while the peer keeps announcing it: the filter runs on every
        pass, the announcement happened once. ``looked_at``: refused paths this pass judged again (those not
        refused any more were withdrawn or are accepted now)."""
        fresh = [(key, reason) for key, reason in verdicts.items() if self.rejected.get(key) != reason]
        for key in looked_at - set(verdicts):
            del self.rejected[key]
        self.rejected.update(verdicts)
        for (peer, _prefix), reason in fresh:
            self.rejected_total[(peer, reason)] = self.rejected_total.get((peer, reason), 0) + 1
        for (peer, prefix), reason in fresh[:REJECTIONS_LOGGED]:
            path = tables.get(peer, {}).get(prefix)
            log.warning("bgp route %s from peer %s rejected (%s)%s", prefix, peer, reason,
                        f": AS path of {len(path.as_path)} ASNs" if path and reason == AS_PATH_TOO_LONG else "")
        if len(fresh) > REJECTIONS_LOGGED:
            log.warning("bgp %d more routes rejected (see calico_py_bgp_routes_rejected_total)",
                        len(fresh) - REJECTIONS_LOGGED)

    def count(self, peer: str, reason: str) -> None:
        """A refusal the table never saw (the speaker reset the session over an UPDATE it could not parse)."""
        self.rejected_total[(peer, reason)] = self.rejected_total.get((peer, reason), 0) + 1


class Rib:
    def __init__(self, router_id: str, started_at: float) -> None:
        self.router_id = router_id
        self.sessions: dict[str, Session] = {}
        self.tables: dict[str, dict[str, BGPPath]] = {}  # peer -> prefix -> path
        self.touched: set[str] = set()  # prefixes whose paths changed since changes() last ran
        self.cluster_id: str | None = None  # set when this node is a route reflector
        self.graceful_restart = DEFAULT_RESTART_TIME  # our restart time; 0: off
        self.restart_times: dict[str, int] = {}  # peer -> restart time it advertised in its OPEN
        self.eor: set[str] = set()  # peers that sent End-of-RIB since their session came up
        self.stale: dict[str, tuple[float, set[str]]] = {}  # peer -> (deadline, prefixes not refreshed yet)
        self.malformed: dict[str, int] = {}  # peer -> routes dropped for malformed attributes (RFC 7606)
        self.policy = ImportPolicy()
        self.came_up: list[str] = []  # peers whose session just came up: the speaker sends them our routes
        self._startup = _Startup(started_at)
        self._peers_known = False

    # ------------------------------------------------------------------ configuration

    def set_peers(self, peers: Iterable[PeerSpec]) -> bool:
        """The configured peers; True when they changed. A peer no longer configured takes its routes along."""
        self._peers_known = True
        wanted = {p.address: p for p in peers}
        if wanted == {a: s.spec for a, s in self.sessions.items()}:
            return False
        for address in set(self.sessions) - set(wanted):
            del self.sessions[address]
            self.stale.pop(address, None)
            self.touched.update(self.tables.pop(address, {}))
        for address, spec in wanted.items():
            if address in self.sessions:
                # The session's state stays: a change the speaker does not see (the peer's type) leaves it up, and
                # one it does see (AS, password) makes it report the reset itself.
                self.sessions[address].spec = spec
            else:
                self.sessions[address] = Session(spec)
        return True

    def set_graceful_restart(self, seconds: int) -> bool:
        """Our restart time (``nodeMeshMaxRestartTime``); True when it changed."""
        window = self._startup.window
        self._startup.window = seconds if window is None else min(window, seconds)
        changed, self.graceful_restart = seconds != self.graceful_restart, seconds
        return changed

    def set_filter(self, pool_filter: PoolFilter | None) -> None:
        """What may be used of what peers announce; every prefix is judged again."""
        self.policy.filter = pool_filter
        self.touch_all()

    @property
    def rejected_total(self) -> dict[tuple[str, str], int]:
        return self.policy.rejected_total

    def touch_all(self) -> None:
        for table in self.tables.values():
            self.touched.update(table)

    # ------------------------------------------------------------------ events

    def apply(self, event: Event, now: float, wall: float = 0.0) -> bool:
        """Act on one event from the speaker; True when the routes changed."""
        if event.peer not in self.sessions:
            return False  # a peer we no longer configure (or never did): its words do not count
        if isinstance(event, SessionState):
            return self._session(event, now, wall)
        if isinstance(event, Opened):
            self.restart_times[event.peer] = event.restart_time
            self._startup.opened.add(event.peer)
            return False
        if isinstance(event, EndOfRib):
            self.eor.add(event.peer)
            self._startup.sent_eor.add(event.peer)
            stale = self.stale.get(event.peer)
            return bool(stale) and self._drop(event.peer, stale[1], "not re-announced before End-of-RIB")
        return self._update(event)

    def _session(self, event: SessionState, now: float, wall: float) -> bool:
        session = self.sessions[event.peer]
        session.state = "up" if event.state == "up" else "start" if event.state in ("down", "connected") \
            else event.state
        session.info = "Established" if event.state == "up" else f"Active ({event.reason or event.state})"
        session.since = wall
        if event.state == "connected":
            self.eor.discard(event.peer)  # a new session: its End-of-RIB is still to come
        if event.state == "up":
            self.came_up.append(event.peer)
        return self.session_lost(event.peer, event.reason, now, wall) if event.state == "down" else False

    def session_lost(self, peer: str, why: str, now: float, wall: float = 0.0) -> bool:
        """The peer's session went (a "down", or the speaker died): its routes stay for its restart time (RFC 4724)
        or go now. True when the routes changed."""
        session = self.sessions[peer]
        session.downs += 1
        session.last_down = why
        if session.state != "start":
            session.state, session.info, session.since = "start", f"Active ({why or 'down'})", wall
        self.eor.discard(peer)
        routes = set(self.tables.get(peer, {}))
        restart_time = min(self.restart_times.get(peer, 0), self.graceful_restart)
        if peer in self.stale:
            return False  # a failed reconnect while restarting: the restart timer runs from the first down
        if restart_time and routes:
            self.stale[peer] = (now + restart_time, routes)
            log.info("bgp keeping %d routes of %s for %ss (graceful restart)", len(routes), peer, restart_time)
            return False
        table = self.tables.pop(peer, {})
        self.touched.update(table)
        return bool(table)

    def speaker_gone(self, now: float, wall: float = 0.0) -> bool:
        """The speaker exited and every session went with it, unannounced: each peer's routes are kept as after a
        "down", so forwarding goes on while a new speaker relearns them and nothing withdrawn meanwhile stays."""
        changed = False
        for peer, session in self.sessions.items():
            if session.state != "start" or peer in self.tables:
                changed |= self.session_lost(peer, "exabgp exited", now, wall)
        return changed

    def expire(self, now: float) -> bool:
        """Drop the routes of peers that did not come back within their restart time; True when routes changed."""
        changed = False
        for peer, (deadline, prefixes) in list(self.stale.items()):
            if now >= deadline:
                changed |= self._drop(peer, prefixes, "graceful-restart time passed")
        return changed

    def _drop(self, peer: str, prefixes: set[str], why: str) -> bool:
        table = self.tables.get(peer, {})
        gone = [p for p in prefixes if table.pop(p, None) is not None]
        self.touched.update(gone)
        self.stale.pop(peer, None)
        if gone:
            log.info("bgp dropped %d stale routes of %s: %s", len(gone), peer, why)
        return bool(gone)

    def _update(self, update: Update) -> bool:
        """Apply one UPDATE to the peer's table; costs the size of the update only."""
        table = self.tables.setdefault(update.peer, {})
        spec = self.sessions[update.peer].spec
        stale = self.stale.get(update.peer)
        changed = False
        for prefix, path in update.announced:
            if path is not None and spec.peer_as != spec.local_as and path.local_pref != 100:
                # RFC 4271 5.1.5: LOCAL_PREF from an external peer is ignored; honoured, a rogue peer could
                # outrank a node's own block with it (tests/faults/test_rogue_peer.py).
                path = dataclasses.replace(path, local_pref=100)
            if path is None:
                # RFC 7606 treat-as-withdraw: the routes it came with are void, an earlier good path included.
                self.malformed[update.peer] = self.malformed.get(update.peer, 0) + 1
                log.warning("bgp route %s from %s dropped: malformed path attributes", prefix, update.peer)
            elif looped(path, self.router_id, self.cluster_id):
                log.info("bgp route %s from %s dropped: it looped (RFC 4456)", prefix, update.peer)
                path = None
            if path is None:
                if table.pop(prefix, None) is not None:
                    self.touched.add(prefix)
                    changed = True
                continue
            if table.get(prefix) != path:
                table[prefix] = path
                self.touched.add(prefix)
                changed = True
            if stale:
                stale[1].discard(prefix)
        for prefix in update.withdrawn:
            if table.pop(prefix, None) is not None:
                self.touched.add(prefix)
                changed = True
        return changed

    # ------------------------------------------------------------------ routes out

    def learned(self) -> Routes:
        """prefix -> next hops of its best paths (several: equal-cost multipath), over the whole table, as the
        import filter lets them through (a peer cannot inject a default route, a node address or part of another
        node's block)."""
        verdicts: dict[tuple[str, str], str] = {}
        accept = self.policy.judge(verdicts)
        by_prefix: dict[str, dict[str, BGPPath]] = {}
        for peer, table in self.tables.items():
            for prefix, path in table.items():
                if accept(peer, prefix, path):
                    by_prefix.setdefault(prefix, {})[peer] = path
        self.touched.clear()
        self.policy.account(verdicts, self.tables, looked_at=set(self.policy.rejected))
        return {prefix: multipath(paths) for prefix, paths in by_prefix.items()}

    def changes(self) -> Routes:
        """Like :meth:`learned`, for the prefixes touched since the last call only (no next hop: withdrawn), so a
        burst of updates costs what changed, not the size of the table."""
        verdicts: dict[tuple[str, str], str] = {}
        accept = self.policy.judge(verdicts)
        touched, self.touched = self.touched, set()
        routes = {prefix: multipath({peer: table[prefix] for peer, table in self.tables.items()
                                     if prefix in table and accept(peer, prefix, table[prefix])})
                  for prefix in touched}
        self.policy.account(verdicts, self.tables, looked_at={key for key in self.policy.rejected if key[1] in routes})
        return routes

    def reflections(self) -> dict[str, dict[str, BGPPath]]:
        """As a route reflector (a cluster id set): what each peer is re-advertised, of what the filter accepts."""
        if self.cluster_id is None:
            return {}
        return reflections(self.tables, [s.spec for s in self.sessions.values()], self.cluster_id, self.router_id,
                           lambda peer, prefix, path: self.policy.reason(prefix, path) is None)

    # ------------------------------------------------------------------ after a daemon restart

    def keeps_startup_routes(self, now: float) -> bool:
        """Whether a restarted daemon still keeps the remote routes it found in the kernel: until every configured
        peer that negotiated graceful restart sent End-of-RIB or its restart time ended, within our restart time
        since start (:func:`startup_routes_kept`). Once over, over for good: no configuration change reopens it."""
        startup = self._startup
        if not startup.over:
            peers = {address: StartupPeer(address in startup.opened, self.restart_times.get(address, 0),
                                          address in startup.sent_eor)
                     for address in self.sessions} if self._peers_known else None
            window = self.graceful_restart if startup.window is None else startup.window
            startup.over = not startup_routes_kept(peers, now - startup.started_at, window)
            if startup.over:
                log.info("bgp start-up over: remote routes found in the kernel are kept no longer")
        return not startup.over
