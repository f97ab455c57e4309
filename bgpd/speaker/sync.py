"""Keeps the BGP speaker in step with the node's view (:mod:`bgpd.view`): peers (mesh, BGPPeers), announcements
(our blocks), the import filter (the pools), graceful restart and the cluster id, as :func:`plan_speaker` plans
them. A sync reads no etcd: it runs at start, whenever the view changes, and every ``resync_interval`` seconds
(a password Secret file changed on disk is seen by no watch); what time alone changes (stale graceful-restart
routes expiring, session resets to count) is looked at every ``interval`` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bgpd.loops import Backoff, guarded
from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import MALFORMED, PoolFilter
from bgpd.speaker.plan import plan_speaker, secret_refs
from bgpd.speaker.rib import Session
from bgpd.view import BLOCKS, ENDPOINTS, NodeView

log = logging.getLogger("calico-py-node.bgp")
# Besides every change of the view, a sync this often: a password Secret file changed on disk is seen by no watch.
RESYNC_SECONDS = 30.0
# ExaBGP's reason for a session it closed over a bad UPDATE: "notification sent (3,<subcode>) ..." (RFC 4271 6.3)
MALFORMED_NOTIFICATION = re.compile(r"notification sent \(3,|UPDATE message error", re.IGNORECASE)


def read_secret(directory: Path, name: str, key: str) -> str | None:
    """A secret as Kubernetes mounts it (``<dir>/<secret name>/<key>``), or None when absent or unusable."""
    try:
        value = (directory / name / key).read_text().strip()
    except OSError:
        return None
    if not value or any(c in value for c in '"\n\r\\'):
        log.warning("bgp password secret %s/%s is empty or holds quotes, backslashes or newlines: not used",
                    name, key)
        return None
    return value


class BGPSync:
    def __init__(self, view: Callable[[], NodeView], speaker: ExaBGP, interval: float = 1.0,
                 secrets_dir: Path = Path("/etc/calico-py/secrets"), resync_interval: float = RESYNC_SECONDS) -> None:
        self.view = view
        self.resync_interval = resync_interval
        self.secrets_dir = secrets_dir
        self._wake = asyncio.Event()
        self.speaker = speaker
        self.interval = interval
        self._pools: tuple[Any, ...] | None = None  # the pools the import filter was last built from
        self._downs_seen: dict[str, int] = {}  # peer -> its session losses already looked at
        self._borrowed: frozenset[Any] = frozenset()  # this node's borrowed addresses, as the last wake saw them
        speaker.rib.set_filter(PoolFilter([]))  # nothing is accepted before the pools are read

    @property
    def rejected_total(self) -> dict[tuple[str, str], int]:
        """(peer, reason) -> paths refused since start."""
        return self.speaker.rib.rejected_total

    def note_malformed(self) -> None:
        """Count sessions ExaBGP closed because the peer sent an UPDATE it could not parse (its NOTIFICATION says
        UPDATE Message Error, RFC 4271 6.3): the routes in it never reached us, the reset is what there is to
        count. Attribute errors RFC 7606 handles as treat-as-withdraw keep the session and are not seen here."""
        for address, peer in self.speaker.peers.items():
            if peer.downs == self._downs_seen.get(address, 0):
                continue
            self._downs_seen[address] = peer.downs
            if MALFORMED_NOTIFICATION.search(peer.last_down):
                self.speaker.rib.policy.count(address, MALFORMED)
                log.warning("bgp peer %s sent a malformed UPDATE: session reset (%s)", address, peer.last_down)

    async def sync_once(self) -> None:
        view = self.view()
        plan = plan_speaker(view, self._passwords(view))
        if plan is None:
            return  # this node has no Node resource yet
        if plan.pools != self._pools:
            self._pools = plan.pools
            # Built once per change (it judges every path of every burst); routes filtered out by the old pools
            # may be accepted now, and the reverse.
            self.speaker.rib.set_filter(PoolFilter(plan.pools))
            self.speaker.on_routes()
        self.speaker.rib.cluster_id = plan.cluster_id
        self.speaker.set_graceful_restart(plan.graceful_restart)
        self.speaker.expire_stale()
        self.note_malformed()
        self.speaker.set_peers(list(plan.peers))
        await self.speaker.set_announcements(set(plan.announcements))
        await self.speaker.reflect()

    def _passwords(self, view: NodeView) -> dict[str, str]:
        """The TCP-MD5 passwords the peering uses, from the Secret files mounted in ``secrets_dir``."""
        passwords = {}
        for name, ref in secret_refs(view).items():
            value = read_secret(self.secrets_dir, *ref)
            if value is None:
                log.warning("bgp password secret %s/%s for %s not found in %s", *ref, name or "the mesh",
                            self.secrets_dir)
                continue
            passwords[name] = value
        return passwords

    def wake(self) -> None:
        """Sync now: the watch saw a change (a new block to announce), or etcd is back after an outage."""
        self._wake.set()

    def on_view_change(self, changed: set[str]) -> None:
        """The view changed: every watched prefix but the IPAM blocks (which the overlay reads) can change what the
        speaker runs. Of this node's endpoints (every pod it starts writes one) only a borrowed address changes
        what it announces."""
        changed = changed - {BLOCKS}
        if changed == {ENDPOINTS}:
            borrowed = self.view().borrowed
            if borrowed == self._borrowed:
                return
            self._borrowed = borrowed
        if changed:
            self.wake()

    async def run(self) -> None:
        """Sync at start, on every wake (the view changed) and every ``resync_interval`` seconds; every ``interval``
        seconds in between, only what time alone changes."""
        next_sync = 0.0
        backoff = Backoff(self.interval, self.interval)
        while True:
            if self._wake.is_set() or time.monotonic() >= next_sync:
                self._wake.clear()  # a wake from here on means another sync
                retry_in = await guarded(self.sync_once, log, "bgp sync", "peers and announcements kept", backoff)
                next_sync = time.monotonic() + (self.resync_interval if retry_in is None else retry_in)
            else:
                self.speaker.expire_stale()
                self.note_malformed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=max(0.0, min(self.interval, next_sync - time.monotonic())))

    def status(self) -> list[dict[str, Any]]:
        return [{"address": address, "family": f"IPv{peer.spec.version}", "type": peer.spec.kind, "state": peer.state,
                 "since": time.strftime("%H:%M:%S", time.localtime(peer.since)), "info": self._info(peer),
                 "learned": len(self.speaker.rib.tables.get(address, {})),
                 "rejected": {reason: count for (peer_address, reason), count in sorted(self.rejected_total.items())
                              if peer_address == address}}
                for address, peer in sorted(self.speaker.peers.items())]

    @staticmethod
    def _info(peer: Session) -> str:
        if peer.spec.password and peer.state != "up":
            # With TCP-MD5 the kernel drops segments whose signature is wrong: a mismatch shows as silence.
            return f"{peer.info}; TCP-MD5 on: no answer means the passwords differ (or the peer is down)"
        return peer.info
