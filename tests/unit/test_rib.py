"""The node's BGP table (bgpd/speaker/rib.py) through its public API, and ExaBGP's JSON decoded into its events:
graceful restart, the start-up rule, the import filter, reflection. No process, no socket, no clock."""

from __future__ import annotations

import json

from bgpd.speaker import exabgp_api
from bgpd.speaker.peers import GLOBAL, MESH, OUTSIDE_POOLS, BGPPath, PeerSpec, PoolFilter
from bgpd.speaker.rib import EndOfRib, Opened, Rib, SessionState, Update
from ipam.model import IPPool

ME = "10.0.0.11"
FRR, GOBGP, EBGP = "10.0.0.12", "10.0.0.13", "10.0.0.66"
PEERS = [PeerSpec(FRR, 64512, 64512, ME, MESH, "frr"), PeerSpec(GOBGP, 64512, 64512, ME, MESH, "gobgp")]
POOL = IPPool.from_v3({"metadata": {"name": "p"}, "spec": {"cidr": "10.244.0.0/16"}})


def table(*peers: PeerSpec, restart: int = 120) -> Rib:
    rib = Rib(ME, started_at=0.0)
    rib.set_graceful_restart(restart)
    rib.set_peers(peers or PEERS)
    return rib


def up(rib: Rib, peer: str, restart_time: int, now: float = 1.0) -> None:
    rib.apply(Opened(peer, restart_time), now)
    rib.apply(SessionState(peer, "up"), now)


def announce(peer: str, *prefixes: str, path: BGPPath | None = None) -> Update:
    return Update(peer, tuple((p, path or BGPPath(peer)) for p in prefixes))


def test_the_start_up_rule_waits_for_graceful_restart_peers_only_and_never_reopens() -> None:
    rib = table()
    assert rib.keeps_startup_routes(now=1.0)
    up(rib, FRR, 120)
    up(rib, GOBGP, 0)  # no graceful restart: sends no End-of-RIB, not waited for
    assert rib.keeps_startup_routes(now=2.0)
    rib.apply(EndOfRib(FRR), 3.0)
    assert not rib.keeps_startup_routes(now=3.0)
    rib.set_peers([*PEERS, PeerSpec("10.0.0.1", 65100, 64512, ME, GLOBAL, "tor")])
    assert not rib.keeps_startup_routes(now=4.0)  # a new peer does not bring it back


def test_the_start_up_rule_ends_with_the_peers_restart_time_or_ours() -> None:
    rib = table()
    up(rib, FRR, 5)
    up(rib, GOBGP, 0)
    assert rib.keeps_startup_routes(now=4.0) and not rib.keeps_startup_routes(now=5.0)
    ours = table(restart=30)
    assert ours.keeps_startup_routes(now=29.0) and not ours.keeps_startup_routes(now=30.0)
    lowered = table()
    up(lowered, FRR, 120)
    lowered.set_graceful_restart(0)
    assert not lowered.keeps_startup_routes(now=1.0)
    dropped = table()
    up(dropped, FRR, 120)
    up(dropped, GOBGP, 0)
    assert dropped.keeps_startup_routes(now=1.0)
    dropped.set_peers(PEERS[1:])  # the only peer waited for is no longer configured
    assert not dropped.keeps_startup_routes(now=1.0)


def test_a_withdrawal_from_an_established_peer_leaves_at_once_even_while_start_up_routes_are_kept() -> None:
    rib = table()
    up(rib, FRR, 120)
    rib.apply(announce(FRR, "10.244.1.0/26", "10.244.2.0/26"), 1.0)
    assert rib.changes() == {"10.244.1.0/26": (FRR,), "10.244.2.0/26": (FRR,)}
    assert rib.apply(Update(FRR, withdrawn=("10.244.1.0/26",)), 2.0)
    assert rib.keeps_startup_routes(now=2.0)  # FRR's End-of-RIB still to come
    assert rib.changes() == {"10.244.1.0/26": ()}  # gone: the route table removes it now


def test_graceful_restart_keeps_a_peers_routes_until_end_of_rib_or_its_time() -> None:
    rib = table()
    up(rib, FRR, 30)
    rib.apply(announce(FRR, "10.244.1.0/26", "10.244.2.0/26"), 1.0)
    assert not rib.apply(SessionState(FRR, "down", "peer reset"), 10.0)  # kept, stale
    assert set(rib.learned()) == {"10.244.1.0/26", "10.244.2.0/26"}
    rib.apply(SessionState(FRR, "connected"), 11.0)
    up(rib, FRR, 30, now=11.0)
    rib.apply(announce(FRR, "10.244.1.0/26"), 12.0)
    assert rib.apply(EndOfRib(FRR), 12.0)  # 10.244.2.0/26 was not re-announced
    assert set(rib.learned()) == {"10.244.1.0/26"}
    rib.apply(SessionState(FRR, "down"), 20.0)
    assert not rib.expire(now=49.0) and rib.expire(now=50.0)  # 30 s after the down
    assert rib.learned() == {}


def test_a_peer_without_graceful_restart_loses_its_routes_at_once_and_so_does_one_dropped() -> None:
    rib = table()
    up(rib, GOBGP, 0)
    rib.apply(announce(GOBGP, "10.244.3.0/26"), 1.0)
    assert rib.apply(SessionState(GOBGP, "down"), 2.0) and rib.learned() == {}
    up(rib, FRR, 120)
    rib.apply(announce(FRR, "10.244.1.0/26"), 3.0)
    rib.changes()
    assert rib.set_peers(PEERS[1:])
    assert rib.changes() == {"10.244.1.0/26": ()}


def test_the_speaker_dying_makes_every_graceful_peers_routes_stale() -> None:
    rib = table()
    for peer, prefix in ((FRR, "10.244.1.0/26"), (GOBGP, "10.244.3.0/26")):
        up(rib, peer, 120)
        rib.apply(announce(peer, prefix), 1.0)
    rib.speaker_gone(now=5.0)
    assert set(rib.stale) == {FRR, GOBGP} and len(rib.learned()) == 2
    assert {s.state for s in rib.sessions.values()} == {"start"}


def test_the_import_filter_counts_each_refusal_once_and_an_external_local_pref_is_ignored() -> None:
    rib = table(PeerSpec(EBGP, 65066, 64512, ME, GLOBAL, "rogue"))
    rib.set_filter(PoolFilter([POOL]))
    up(rib, EBGP, 0)
    rib.apply(announce(EBGP, "10.244.9.0/26", "192.0.2.0/24", path=BGPPath(EBGP, local_pref=500)), 1.0)
    assert rib.learned() == {"10.244.9.0/26": (EBGP,)} and rib.learned() == {"10.244.9.0/26": (EBGP,)}
    assert rib.rejected_total == {(EBGP, OUTSIDE_POOLS): 1}
    assert rib.tables[EBGP]["10.244.9.0/26"].local_pref == 100


def test_a_reflector_reflects_what_the_filter_accepts_only() -> None:
    client, rogue = (PeerSpec(a, 64512, 64512, ME, GLOBAL, a, rr_client=True) for a in (FRR, EBGP))
    rib = table(client, rogue)
    rib.cluster_id = "224.0.0.1"
    rib.set_filter(PoolFilter([POOL]))
    up(rib, EBGP, 0)
    rib.apply(announce(EBGP, "10.244.9.0/26", "0.0.0.0/0"), 1.0)
    assert set(rib.reflections()[FRR]) == {"10.244.9.0/26"}


def test_exabgp_json_becomes_events() -> None:
    neighbor = {"address": {"local": ME, "peer": FRR}}

    def line(kind: str, **fields: object) -> bytes:
        return json.dumps({"type": kind, "neighbor": {**neighbor, **fields}}).encode()
    assert exabgp_api.decode(line("state", state="down", reason="hold timer")) == SessionState(FRR, "down",
                                                                                                 "hold timer")
    gr = {"capabilities": {"64": {"name": "graceful restart", "time": 90}}}
    assert exabgp_api.decode(line("open", direction="receive", open=gr)) == Opened(FRR, 90)
    assert exabgp_api.decode(line("open", direction="receive", open={"capabilities": {}})) == Opened(FRR, 0)
    assert exabgp_api.decode(line("open", direction="send", open=gr)) is None
    assert exabgp_api.decode(line("update", message={"eor": {"afi": "ipv4"}})) == EndOfRib(FRR)
    update = {"update": {"announce": {"ipv4 unicast": {FRR: ["10.244.1.0/26", {"nlri": "10.244.2.0/26"}],
                                                       "127.0.0.1": ["10.244.3.0/26"]}},
                         "withdraw": {"ipv4 unicast": ["10.244.4.0/26", "nonsense"]}}}
    decoded = exabgp_api.decode(line("update", message=update))
    assert decoded == Update(FRR, (("10.244.1.0/26", BGPPath(FRR)), ("10.244.2.0/26", BGPPath(FRR))),
                             ("10.244.4.0/26",))
    bad = {"update": {"attribute": {"med": -1}, "announce": {"ipv4 unicast": {FRR: ["10.244.1.0/26"]}}}}
    assert exabgp_api.decode(line("update", message=bad)) == Update(FRR, (("10.244.1.0/26", None),))
    assert exabgp_api.decode(b"not json") is None and exabgp_api.decode(b"[1]") is None
