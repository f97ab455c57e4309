"""Keeps the BGP speaker in step with the datastore: peers (mesh, BGPPeers), announcements (our blocks), and the
filter for what is accepted (the pools). One consistent read per sync: at start, whenever an etcd watch sees a
change under what it reads, when etcd answers again after an outage, and every ``resync_interval`` seconds as a
safety net; only what time alone changes (stale graceful-restart routes expiring, session resets to count) is
looked at every second, without reading etcd."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import (
    MALFORMED,
    MESH_PASSWORD,
    NodeInfo,
    PoolFilter,
    announcements,
    config_problem,
    desired_peers,
    node_problem,
    peer_problem,
    secret_ref,
)
from bgpd.speaker.rib import Routes, Session
from bgpd.watch import wake_on_change
from ipam import keys
from ipam.datastore import Datastore, WatchEvent
from ipam.errors import DatastoreUnavailable, InvalidResource
from ipam.model import BlockAffinity, IPPool

log = logging.getLogger("calico-py-node.bgp")
# A sync reads etcd when the watch reports a change; this often regardless, in case one slipped past the watch
# (and to pick up a password secret file changed on disk, which no watch sees).
RESYNC_SECONDS = 30.0
# ExaBGP's reason for a session it closed over a bad UPDATE: "notification sent (3,<subcode>) ..." (RFC 4271 6.3)
MALFORMED_NOTIFICATION = re.compile(r"notification sent \(3,|UPDATE message error", re.IGNORECASE)


def restart_seconds(duration: str | None, default: int = 120) -> int:
    """A Go-style duration ("120s", "2m", "1m30s") in whole seconds; "0s" means graceful restart off."""
    if not duration:
        return default
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    if not parts:
        return default
    total = sum(float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit] for number, unit in parts)
    return round(total)  # 0 turns graceful restart off


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
    def __init__(self, store: Datastore, speaker: ExaBGP, node: str, interval: float = 1.0,
                 secrets_dir: Path = Path("/etc/calico-py/secrets"), resync_interval: float = RESYNC_SECONDS) -> None:
        self.resync_interval = resync_interval
        self.secrets_dir = secrets_dir
        self._wake = asyncio.Event()
        self.store = store
        self.speaker = speaker
        self.node = node
        self.interval = interval
        self._pools: list[IPPool] = []
        self._downs_seen: dict[str, int] = {}  # peer -> its session losses already looked at
        self._problems_logged: set[str] = set()  # unusable resources already warned about (sync runs every second)
        self._affine_blocks: list[Any] = []  # this node's confirmed blocks at the last sync (see relevant())
        speaker.rib.set_filter(PoolFilter([]))  # nothing is accepted before the pools are read

    @property
    def pools(self) -> list[IPPool]:
        return self._pools

    @pools.setter
    def pools(self, pools: list[IPPool]) -> None:
        self._pools = pools
        # Built once per change (it judges every path of every burst); routes filtered out by the old pools may
        # be accepted now, and the reverse.
        self.speaker.rib.set_filter(PoolFilter(pools))
        self.speaker.on_routes()

    @property
    def rejected_total(self) -> dict[tuple[str, str], int]:
        """(peer, reason) -> paths refused since start."""
        return self.speaker.rib.rejected_total

    def learned(self) -> Routes:
        """Routes from peers (prefix -> next hops of the accepted paths), as the import filter lets them through
        (:class:`PoolFilter`): a peer cannot inject a default route, a node address or part of another node's
        block."""
        return self.speaker.learned()

    def learned_changes(self) -> Routes:
        """The same for the prefixes changed since the last call; a prefix no accepted path offers has no next
        hop (withdrawn)."""
        return self.speaker.learned_changes()

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
        nodes_prefix, peers_prefix = keys.resource_prefix("nodes"), keys.resource_prefix("bgppeers")
        pools_prefix = keys.resource_prefix("ippools")
        affinity_prefixes = [keys.affinities_prefix(self.node, version) for version in (4, 6)]
        config_key = keys.resource_key("bgpconfigurations", "default")
        weps_prefix = keys.resource_prefix("workloadendpoints")
        snapshot = await self.store.read(keys=[config_key], prefixes=[nodes_prefix, peers_prefix, pools_prefix,
                                                                      *affinity_prefixes, weps_prefix])
        problems: list[str] = []
        nodes = [NodeInfo.from_v3(obj) for obj in self._usable(snapshot.prefixes[nodes_prefix], node_problem,
                                                                problems)]
        pools = []
        for kv in snapshot.prefixes[pools_prefix]:
            try:
                pools.append(IPPool.from_v3(kv.json()))
            except (InvalidResource, ValueError) as exc:
                problems.append(f"{kv.key}: {exc}")
        config_kv = snapshot.keys[config_key]
        configs = self._usable([config_kv] if config_kv else [], config_problem, problems)
        config: dict[str, Any] | None = configs[0] if configs else None
        bgp_peers = self._usable(snapshot.prefixes[peers_prefix], peer_problem, problems)
        for problem in sorted(set(problems) - self._problems_logged):
            log.warning("bgp: resource %s; ignored until it is fixed", problem)
        self._problems_logged = set(problems)
        me = next((n for n in nodes if n.name == self.node), None)
        if me is None:
            return
        if pools != self.pools:
            self.pools = pools
        blocks = []
        for kv in (kv for prefix in affinity_prefixes for kv in snapshot.prefixes[prefix]):
            _, cidr = keys.parse_affinity_key(kv.key)
            if BlockAffinity.from_json(self.node, cidr, kv.json()).confirmed:
                blocks.append(cidr)
        self._affine_blocks = blocks
        self.speaker.rib.cluster_id = me.rr_cluster_id
        self.speaker.set_graceful_restart(restart_seconds((config or {}).get("spec", {}).get("nodeMeshMaxRestartTime")))
        self.speaker.expire_stale()
        self.note_malformed()
        passwords: dict[str, str] = {}
        references = [((p.get("metadata") or {}).get("name", ""), secret_ref(p.get("spec") or {}, "password"))
                      for p in bgp_peers]
        references.append((MESH_PASSWORD, secret_ref((config or {}).get("spec") or {}, "nodeMeshPassword")))
        for name, ref in references:
            if ref is not None:
                value = read_secret(self.secrets_dir, *ref)
                if value is None:
                    log.warning("bgp password secret %s/%s for %s not found in %s", *ref, name or "the mesh",
                                self.secrets_dir)
                    continue
                passwords[name] = value
        self.speaker.set_peers(desired_peers(me, nodes, config, bgp_peers, passwords))
        local = [ipaddress.ip_interface(n).ip for kv in snapshot.prefixes[weps_prefix]
                 if (spec := (kv.json() or {}).get("spec") or {}).get("node") == self.node
                 for n in spec.get("ipNetworks") or []]
        await self.speaker.set_announcements(announcements(blocks, self.pools, local))
        await self.speaker.reflect()

    @staticmethod
    def _usable(kvs: list[Any], problem: Callable[[Any], str | None], problems: list[str]) -> list[Any]:
        """The resources ``problem`` finds nothing wrong with; what is wrong with the others goes to ``problems``:
        one resource another tool wrote wrong must not stop the peering the others describe."""
        usable = []
        for kv in kvs:
            try:
                obj = kv.json()
            except ValueError:
                problems.append(f"{kv.key}: not JSON")
                continue
            if (reason := problem(obj)) is None:
                usable.append(obj)
            else:
                problems.append(f"{kv.key}: {reason}")
        return usable

    def wake(self) -> None:
        """Sync now: the watch saw a change (a new block to announce), or etcd is back after an outage."""
        self._wake.set()

    def watched_prefixes(self) -> list[str]:
        """Where everything :meth:`sync_once` reads lives: a change under any of these wakes a sync."""
        return [keys.resource_prefix(plural) for plural in ("nodes", "bgppeers", "ippools", "bgpconfigurations",
                                                            "workloadendpoints")] + [keys.host_prefix(self.node)]

    def relevant(self, event: WatchEvent) -> bool:
        """Whether a watched change can matter here. Every pod started anywhere writes a WorkloadEndpoint; only
        this node's with an address outside its blocks (borrowed: announced as a /32 or /128) changes what the
        node announces; any other change wakes the sync. A new block shows as an affinity change."""
        if not event.key.startswith(keys.resource_prefix("workloadendpoints")):
            return True
        values = [kv for kv in (event.kv, event.prev) if kv is not None and kv.value]
        if not values:
            return True  # a delete whose previous value etcd no longer had: cannot tell whose it was
        for kv in values:
            try:
                spec = (kv.json() or {}).get("spec") or {}
                if spec.get("node") == self.node and not all(
                        any(ipaddress.ip_interface(n).ip in block for block in self._affine_blocks)
                        for n in spec.get("ipNetworks") or []):
                    return True
            except (ValueError, AttributeError, TypeError):
                return True  # cannot tell: sync, and sync_once judges the resource
        return False

    async def run(self) -> None:
        """Sync at start, on every wake (the etcd watch, etcd answering again after an outage) and
        every ``resync_interval`` seconds; every ``interval`` seconds in between, only what time alone changes."""
        self.store.on_recovery(self.wake)
        watcher = asyncio.create_task(wake_on_change(self.store, self.watched_prefixes(), self.wake, self.relevant))
        next_sync = 0.0
        try:
            while True:
                if self._wake.is_set() or time.monotonic() >= next_sync:
                    self._wake.clear()  # a wake from here on means another sync
                    next_sync = time.monotonic() + self.resync_interval
                    try:
                        await self.sync_once()
                    except DatastoreUnavailable as exc:  # an outage: sessions and announcements stay as they are
                        log.warning("bgp sync postponed, peers and announcements kept: %s", exc)
                        next_sync = time.monotonic() + self.interval
                    except Exception:
                        log.exception("bgp sync failed")
                        next_sync = time.monotonic() + self.interval
                else:
                    self.speaker.expire_stale()
                    self.note_malformed()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           timeout=max(0.0, min(self.interval, next_sync - time.monotonic())))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

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
