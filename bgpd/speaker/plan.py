"""The speaker's configuration, planned from the node's view (no I/O): peers (mesh, BGPPeers), announcements
(this node's blocks and borrowed addresses), the pools the import filter judges by, our graceful-restart time and
the route-reflector cluster id. The BGP sync applies a :class:`SpeakerPlan` through the speaker adapter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from bgpd.speaker.peers import MESH_PASSWORD, NodeInfo, PeerSpec, announcements, desired_peers, secret_ref
from bgpd.speaker.rib import DEFAULT_RESTART_TIME
from bgpd.view import NodeView
from ipam.model import IPPool


@dataclass(frozen=True)
class SpeakerPlan:
    peers: tuple[PeerSpec, ...]
    announcements: frozenset[str]
    pools: tuple[IPPool, ...]  # what the import filter accepts routes within
    graceful_restart: int  # seconds (nodeMeshMaxRestartTime); 0: off
    cluster_id: str | None  # this node is a route reflector of that cluster


def restart_seconds(duration: str | None, default: int = DEFAULT_RESTART_TIME) -> int:
    """A Go-style duration ("120s", "2m", "1m30s") in whole seconds; "0s" means graceful restart off."""
    if not duration:
        return default
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    if not parts:
        return default
    total = sum(float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit] for number, unit in parts)
    return round(total)  # 0 turns graceful restart off


def secret_refs(view: NodeView) -> dict[str, tuple[str, str]]:
    """The Secret (name, key) of each password the peering uses, by BGPPeer name (``MESH_PASSWORD``: the mesh)."""
    refs = {str((p.get("metadata") or {}).get("name", "")): secret_ref(p.get("spec") or {}, "password")
            for p in view.bgp_peers}
    refs[MESH_PASSWORD] = secret_ref((view.bgp_configuration or {}).get("spec") or {}, "nodeMeshPassword")
    return {name: ref for name, ref in refs.items() if ref is not None}


def plan_speaker(view: NodeView, passwords: Mapping[str, str]) -> SpeakerPlan | None:
    """What the speaker should run, or None while this node has no Node resource (nothing to peer as)."""
    nodes = [NodeInfo.from_v3(obj) for obj in view.nodes.values()]
    me = next((n for n in nodes if n.name == view.node), None)
    if me is None:
        return None
    config = view.bgp_configuration
    return SpeakerPlan(
        peers=tuple(desired_peers(me, nodes, config, view.bgp_peers, passwords)),
        announcements=frozenset(announcements(view.affinities, view.pools, view.borrowed)),
        pools=view.pools,
        graceful_restart=restart_seconds(((config or {}).get("spec") or {}).get("nodeMeshMaxRestartTime")),
        cluster_id=me.rr_cluster_id)
