"""Keeps the BGP speaker in step with the datastore: peers (mesh, BGPPeers), announcements (our blocks), and the
filter for what is accepted (the pools). Polls one consistent read every second; a watch comes later."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from typing import Any

from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import NodeInfo, accepted, announcements, desired_peers
from ipam import keys
from ipam.datastore import Datastore
from ipam.model import BlockAffinity, IPPool

log = logging.getLogger("calico-py-node.bgp")


def restart_seconds(duration: str | None, default: int = 120) -> int:
    """A Go-style duration ("120s", "2m", "1m30s") in whole seconds; "0s" means graceful restart off."""
    if not duration:
        return default
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    if not parts:
        return default
    total = sum(float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit] for number, unit in parts)
    return round(total)  # 0 turns graceful restart off


class BGPSync:
    def __init__(self, store: Datastore, speaker: ExaBGP, node: str, interval: float = 1.0) -> None:
        self.store = store
        self.speaker = speaker
        self.node = node
        self.interval = interval
        self.pools: list[IPPool] = []

    def learned(self) -> dict[str, str]:
        """Routes from peers, only those inside a pool (a peer cannot inject a default or a node address)."""
        routes = {}
        for prefix, next_hop in self.speaker.learned().items():
            network = ipaddress.ip_network(prefix)
            if accepted(network, self.pools):
                routes[prefix] = next_hop
            else:
                log.debug("bgp route %s from %s outside every pool: ignored", prefix, next_hop)
        return routes

    async def sync_once(self) -> None:
        nodes_prefix, peers_prefix = keys.resource_prefix("nodes"), keys.resource_prefix("bgppeers")
        pools_prefix, affinity_prefix = keys.resource_prefix("ippools"), keys.affinities_prefix(self.node, 4)
        config_key = keys.resource_key("bgpconfigurations", "default")
        snapshot = await self.store.read(keys=[config_key],
                                         prefixes=[nodes_prefix, peers_prefix, pools_prefix, affinity_prefix])
        nodes = [NodeInfo.from_v3(kv.json()) for kv in snapshot.prefixes[nodes_prefix]]
        me = next((n for n in nodes if n.name == self.node), None)
        if me is None:
            return
        config: dict[str, Any] | None = snapshot.keys[config_key].json() if snapshot.keys[config_key] else None
        self.pools = [IPPool.from_v3(kv.json()) for kv in snapshot.prefixes[pools_prefix]]
        blocks = []
        for kv in snapshot.prefixes[affinity_prefix]:
            _, cidr = keys.parse_affinity_key(kv.key)
            if BlockAffinity.from_json(self.node, cidr, kv.json()).confirmed:
                blocks.append(cidr)
        self.speaker.cluster_id = me.rr_cluster_id
        self.speaker.set_graceful_restart(restart_seconds((config or {}).get("spec", {}).get("nodeMeshMaxRestartTime")))
        self.speaker.expire_stale()
        self.speaker.set_peers(desired_peers(me, nodes, config, [kv.json() for kv in snapshot.prefixes[peers_prefix]]))
        await self.speaker.set_announcements(announcements(blocks, self.pools))
        await self.speaker.reflect()

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:
                log.exception("bgp sync failed")
            await asyncio.sleep(self.interval)  # the poll period, not synchronisation

    def status(self) -> list[dict[str, Any]]:
        return [{"address": address, "family": "IPv4", "type": peer.spec.kind, "state": peer.state,
                 "since": time.strftime("%H:%M:%S", time.localtime(peer.since)), "info": peer.info}
                for address, peer in sorted(self.speaker.peers.items())]
