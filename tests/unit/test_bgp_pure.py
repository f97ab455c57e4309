"""BGP pure logic: peers from Calico resources, announcements, the import filter, ExaBGP config, ExaBGP JSON."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from bgpd.dataplane.routes import ip_command
from bgpd.desired import RouteSpec, desired_routes, remote_routes
from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import (
    DEFAULT_ROUTE,
    GLOBAL,
    MALFORMED,
    MESH,
    MORE_SPECIFIC,
    NODE_SPECIFIC,
    OUTSIDE_POOLS,
    WHOLE_POOL,
    BGPPath,
    NodeInfo,
    PeerSpec,
    PoolFilter,
    accepted,
    announcements,
    best_path,
    canonical_prefix,
    desired_peers,
    looped,
    multipath,
    node_problem,
    peer_problem,
    reflections,
    render_exabgp,
    router_id_for,
)
from bgpd.speaker.process import reload_outcome
from ipam.model import IPPool
from tests.eventually import eventually_async


def node(name: str, ip: str | None, as_number: int | None = None, **labels: str) -> NodeInfo:
    return NodeInfo(name, ipaddress.IPv4Interface(ip) if ip else None, as_number, labels)


NODES = [node("n1", "10.0.0.11/24", rack="r1"), node("n2", "10.0.0.12/24", 65002, rack="r1"),
         node("n3", "10.0.0.13/24", rack="r2", rr="true"), node("n4", None)]


def test_full_mesh_by_default() -> None:
    peers = desired_peers(NODES[0], NODES, None, [])
    assert [(p.address, p.peer_as, p.local_as, p.kind) for p in peers] == [
        ("10.0.0.12", 65002, 64512, MESH), ("10.0.0.13", 64512, 64512, MESH)]
    assert desired_peers(node("x", None), NODES, None, []) == []  # no address: no BGP


def test_bgp_peers_global_node_specific_selectors() -> None:
    config = {"spec": {"nodeToNodeMeshEnabled": False, "asNumber": 65000}}
    resources = [
        {"metadata": {"name": "tor"}, "spec": {"peerIP": "10.0.0.1", "asNumber": 65100}},
        {"metadata": {"name": "n1-only"}, "spec": {"node": "n1", "peerIP": "10.0.0.2:179", "asNumber": 65101}},
        {"metadata": {"name": "not-me"}, "spec": {"node": "n2", "peerIP": "10.0.0.3", "asNumber": 1}},
        {"metadata": {"name": "rack2"}, "spec": {"nodeSelector": "rack == 'r2'", "peerIP": "10.0.0.4", "asNumber": 1}},
        {"metadata": {"name": "to-rr"}, "spec": {"nodeSelector": "all()", "peerSelector": "has(rr)"}},
    ]
    peers = {p.address: p for p in desired_peers(NODES[0], NODES, config, resources)}
    assert set(peers) == {"10.0.0.1", "10.0.0.2", "10.0.0.13"}
    assert peers["10.0.0.1"].kind == GLOBAL and peers["10.0.0.1"].local_as == 65000
    assert peers["10.0.0.2"].kind == NODE_SPECIFIC and peers["10.0.0.2"].peer_as == 65101
    assert peers["10.0.0.13"].peer_as == 65000  # a selected node: its AS, else the global one


def test_announcements_and_import_filter() -> None:
    pools = [IPPool("p", ipaddress.ip_network("10.244.0.0/16"), 26),
             IPPool("quiet", ipaddress.ip_network("10.245.0.0/16"), 26, disable_bgp_export=True)]
    blocks = [ipaddress.ip_network(b) for b in ("10.244.1.0/26", "10.245.0.0/26", "10.9.0.0/26")]
    assert announcements(blocks, pools) == {"10.244.1.0/26"}
    assert accepted(ipaddress.ip_network("10.244.7.0/26"), pools)
    assert accepted(ipaddress.ip_network("10.244.7.9/32"), pools)  # a borrowed address
    for outside in ("0.0.0.0/0", "10.0.0.12/32", "10.244.0.0/16", "10.0.0.0/8"):
        assert not accepted(ipaddress.ip_network(outside), pools), outside


def test_remote_routes_need_a_reachable_next_hop_and_never_shadow_our_blocks() -> None:
    connected = [("eth1", ipaddress.IPv4Interface("10.0.0.11/24")), ("eth0", ipaddress.IPv4Interface("172.20.20.3/24"))]
    learned = {"10.244.2.0/26": ("10.0.0.12",), "10.244.1.0/26": ("10.0.0.13",), "10.244.3.0/26": ("192.0.2.1",),
               "10.244.4.0/26": ("10.0.0.13", "192.0.2.1", "10.0.0.12")}
    routes = remote_routes(learned, connected, [ipaddress.ip_network("10.244.1.0/26")])
    assert routes == {RouteSpec("10.244.2.0/26", device="eth1", gateway="10.0.0.12"),
                      # equal-cost paths: one multipath route over the reachable next hops
                      RouteSpec("10.244.4.0/26", nexthops=(("10.0.0.12", "eth1"), ("10.0.0.13", "eth1")))}


def test_exabgp_config_has_one_neighbor_per_peer() -> None:
    peers = desired_peers(NODES[0], NODES, None, [])
    text = render_exabgp("10.0.0.11", peers, ["/usr/bin/python3", "relay.py"])
    assert "run /usr/bin/python3 relay.py;" in text and "encoder json;" in text
    assert text.count("neighbor ") == 2 and "peer-as 65002;" in text and "local-address 10.0.0.11;" in text
    assert "graceful-restart 120" in text


def test_exabgp_json_updates_and_untrusted_input(tmp_path: Path) -> None:
    woken: list[int] = []
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: woken.append(1))
    speaker.set_peers(desired_peers(NODES[0], NODES, None, []))

    def update(peer: str, announce: dict | None = None, withdraw: list | None = None) -> bytes:
        body = {"announce": {"ipv4 unicast": announce}} if announce else {}
        if withdraw:
            body["withdraw"] = {"ipv4 unicast": withdraw}
        return json.dumps({"type": "update", "neighbor": {"address": {"peer": peer, "local": "10.0.0.11"},
                                                         "message": {"update": body}}}).encode()
    speaker._handle(update("10.0.0.12", {"10.0.0.12": [{"nlri": "10.244.2.0/26"}, {"nlri": "bogus"}]}))
    assert speaker.learned() == {"10.244.2.0/26": ("10.0.0.12",)} and woken
    speaker._handle(update("10.0.0.99", {"10.0.0.99": [{"nlri": "10.244.9.0/26"}]}))  # not a peer of ours
    for garbage in (b"done", b"[1,2]", b"{", b'{"type": "update", "neighbor": 5}'):
        speaker._handle(garbage)
    assert speaker.learned() == {"10.244.2.0/26": ("10.0.0.12",)}
    speaker._handle(update("10.0.0.12", withdraw=[{"nlri": "10.244.2.0/26"}]))
    assert speaker.learned() == {}
    state = {"type": "state", "neighbor": {"address": {"peer": "10.0.0.13"}, "state": "up"}}
    speaker._handle(json.dumps(state).encode())
    assert speaker.peers["10.0.0.13"].info == "Established"


def test_reflectors_peer_back_with_their_clients_and_mark_them() -> None:
    rr1 = NodeInfo("rr1", ipaddress.IPv4Interface("10.0.1.1/24"), None, {"route-reflector": "true"}, "224.0.0.1")
    rr2 = NodeInfo("rr2", ipaddress.IPv4Interface("10.0.1.2/24"), None, {"route-reflector": "true"}, "224.0.0.1")
    clients = [node(f"c{i}", f"10.0.1.1{i}/24") for i in range(1, 4)]
    config = {"spec": {"nodeToNodeMeshEnabled": False}}
    resources = [{"metadata": {"name": "to-rr"},
                  "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}}]
    everyone = [rr1, rr2, *clients]
    from_rr = {p.address: p for p in desired_peers(rr1, everyone, config, resources)}
    assert set(from_rr) == {"10.0.1.2", "10.0.1.11", "10.0.1.12", "10.0.1.13"}
    assert not from_rr["10.0.1.2"].rr_client and all(from_rr[f"10.0.1.1{i}"].rr_client for i in range(1, 4))
    from_client = desired_peers(clients[0], everyone, config, resources)
    assert [p.address for p in from_client] == ["10.0.1.1", "10.0.1.2"]  # clients peer with reflectors only


def test_reflection_follows_rfc4456() -> None:
    peers = [PeerSpec("10.0.1.2", 64512, 64512, "10.0.1.1", GLOBAL, "rr2", rr_client=False),
             PeerSpec("10.0.1.11", 64512, 64512, "10.0.1.1", GLOBAL, "c1", rr_client=True),
             PeerSpec("10.0.1.12", 64512, 64512, "10.0.1.1", GLOBAL, "c2", rr_client=True),
             PeerSpec("10.9.9.9", 65000, 64512, "10.0.1.1", GLOBAL, "tor")]  # eBGP: never reflected to
    rib = {"10.0.1.11": {"10.244.1.0/26": BGPPath("10.0.1.11")},
           "10.0.1.2": {"10.244.2.0/26": BGPPath("10.0.1.12", "10.0.1.12", ("224.0.0.1",))}}
    out = reflections(rib, peers, "224.0.0.1", "10.0.1.1")
    # From a client: to the other client and to the non-client reflector, ORIGINATOR_ID set, our cluster first.
    assert out["10.0.1.12"]["10.244.1.0/26"] == BGPPath("10.0.1.11", "10.0.1.11", ("224.0.0.1",))
    assert out["10.0.1.2"]["10.244.1.0/26"].originator_id == "10.0.1.11"
    assert "10.244.1.0/26" not in out["10.0.1.11"]  # never back to where it came from
    # From a non-client: to clients only, originator kept, cluster list grows.
    assert out["10.0.1.11"]["10.244.2.0/26"].cluster_list == ("224.0.0.1", "224.0.0.1")
    assert "10.244.2.0/26" not in out["10.0.1.2"] and "10.9.9.9" not in out


def test_loops_are_dropped_on_receive() -> None:
    assert looped(BGPPath("10.0.1.11", "10.0.1.1"), "10.0.1.1", None)  # our own route came back
    assert looped(BGPPath("10.0.1.11", "10.0.1.11", ("224.0.0.1",)), "10.0.1.1", "224.0.0.1")
    assert not looped(BGPPath("10.0.1.11", "10.0.1.11", ("224.0.0.2",)), "10.0.1.1", "224.0.0.1")


def test_graceful_restart_keeps_a_peers_routes_then_drops_them(tmp_path: Path) -> None:
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
    speaker.set_peers(desired_peers(NODES[0], NODES, None, []))
    peer = {"address": {"local": "10.0.0.11", "peer": "10.0.0.12"}}

    def send(kind: str, **fields: object) -> None:
        speaker._handle(json.dumps({"type": kind, "neighbor": {**peer, **fields}}).encode())
    send("open", direction="receive", open={"capabilities": {"64": {"name": "graceful restart", "time": 30}}})
    send("state", state="up")
    send("update", message={"update": {"announce": {"ipv4 unicast": {"10.0.0.12": [{"nlri": "10.244.2.0/26"}]}}}})
    send("update", message={"eor": {"afi": "ipv4", "safi": "unicast"}})
    assert speaker.rib.restart_times == {"10.0.0.12": 30} and "10.0.0.12" in speaker.rib.eor
    send("state", state="down", reason="peer reset")
    assert speaker.learned() == {"10.244.2.0/26": ("10.0.0.12",)}  # kept while the peer restarts
    assert speaker.rib.stale["10.0.0.12"][1] == {"10.244.2.0/26"}
    send("state", state="connected")
    send("state", state="up")
    send("update", message={"eor": {"afi": "ipv4", "safi": "unicast"}})  # back, without that route
    assert speaker.learned() == {} and not speaker.rib.stale
    speaker.rib.restart_times.clear()  # a peer without the capability: its routes go at once
    send("update", message={"update": {"announce": {"ipv4 unicast": {"10.0.0.12": [{"nlri": "10.244.2.0/26"}]}}}})
    send("state", state="down")
    assert speaker.learned() == {}


def test_md5_passwords_reach_the_right_peers_and_the_config(tmp_path: Path) -> None:
    from bgpd.speaker.sync import read_secret
    resources = [{"metadata": {"name": "tor"}, "spec": {"peerIP": "10.0.0.1", "asNumber": 65100,
                                                         "password": {"secretKeyRef": {"name": "s", "key": "k"}}}}]
    peers = {p.address: p for p in desired_peers(NODES[0], NODES, None, resources, {"tor": "pw", "": "mesh"})}
    assert peers["10.0.0.1"].password == "pw" and peers["10.0.0.12"].password == "mesh"
    assert "pw" not in repr(peers["10.0.0.1"])  # never in logs
    text = render_exabgp("10.0.0.11", list(peers.values()), ["relay"])
    assert 'md5-password "pw";' in text and text.count("md5-password") == 3
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "k").write_text("pw\n")
    assert read_secret(tmp_path, "s", "k") == "pw"
    (tmp_path / "s" / "bad").write_text('p"w')
    assert read_secret(tmp_path, "s", "bad") is None and read_secret(tmp_path, "s", "missing") is None


def test_borrowed_addresses_are_announced_as_host_routes() -> None:
    pools = [IPPool("p", ipaddress.ip_network("10.244.0.0/16"), 26)]
    own = [ipaddress.ip_network("10.244.1.0/26")]
    local = [ipaddress.ip_address(a) for a in ("10.244.1.5", "10.244.9.7", "192.0.2.1")]
    assert announcements(own, pools, local) == {"10.244.1.0/26", "10.244.9.7/32"}


def test_best_path_and_equal_cost_multipath() -> None:
    short = BGPPath("10.0.0.12", as_path=(65001,))
    also_short = BGPPath("10.0.0.13", as_path=(65002,))
    longer = BGPPath("10.0.0.14", as_path=(65003, 65004))
    assert multipath({"10.0.0.2": short, "10.0.0.3": also_short, "10.0.0.4": longer}) == ("10.0.0.12", "10.0.0.13")
    preferred = BGPPath("10.0.0.15", as_path=(1, 2), local_pref=200)
    assert multipath({"10.0.0.4": longer, "10.0.0.5": preferred}) == ("10.0.0.15",)
    assert multipath({"10.0.0.2": short, "10.0.0.3": BGPPath("10.0.0.13", as_path=(65002,), med=10)}) == ("10.0.0.12",)
    same_hop = BGPPath("10.0.0.12", as_path=(65009,))
    assert multipath({"10.0.0.2": short, "10.0.0.3": same_hop}) == ("10.0.0.12",)  # one next hop, once
    assert multipath({}) == ()
    assert best_path({"10.0.0.9": short, "10.0.0.1": also_short})[0] == "10.0.0.1"  # tie: lowest peer


def test_learned_changes_cost_only_what_changed_and_carry_attributes(tmp_path: Path) -> None:
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
    speaker.set_peers(desired_peers(NODES[0], NODES, None, []))

    def announce(peer: str, prefixes: list[str], as_path: list[int]) -> None:
        attribute = {"origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": as_path}}}
        speaker._handle(json.dumps({"type": "update", "neighbor": {
            "address": {"peer": peer, "local": "10.0.0.11"},
            "message": {"update": {"attribute": attribute,
                                   "announce": {"ipv4 unicast": {peer: [{"nlri": p} for p in prefixes]}}}}}}).encode())
    announce("10.0.0.12", ["10.244.2.0/26", "10.244.9.0/26"], [65002])
    assert speaker.rib.tables["10.0.0.12"]["10.244.2.0/26"].as_path == (65002,)
    assert speaker.learned_changes() == {"10.244.2.0/26": ("10.0.0.12",), "10.244.9.0/26": ("10.0.0.12",)}
    assert speaker.learned_changes() == {}  # taken
    announce("10.0.0.12", ["10.244.2.0/26"], [65002])  # the same path again: nothing changed
    assert speaker.learned_changes() == {}
    announce("10.0.0.13", ["10.244.9.0/26"], [65003])  # an equal path from another peer: ECMP
    assert speaker.learned_changes() == {"10.244.9.0/26": ("10.0.0.12", "10.0.0.13")}
    speaker._handle(json.dumps({"type": "state", "neighbor": {"address": {"peer": "10.0.0.13"},
                                                              "state": "down"}}).encode())
    assert speaker.learned_changes() == {"10.244.9.0/26": ("10.0.0.12",)}


def test_prefix_parsing_is_strict_and_canonical() -> None:
    assert canonical_prefix("10.244.1.0/26") == "10.244.1.0/26"
    assert canonical_prefix("10.244.1.7/32") == "10.244.1.7/32"
    for bad in ("10.244.1.1/26", "10.244.1.0/33", "10.244.1.0/-1", "bogus", "10.244.1/24", "", "10.0.0.0/x"):
        assert canonical_prefix(bad) is None, bad
    pools = [IPPool("v6", ipaddress.ip_network("fd00:10::/48"), 122),
             IPPool("single", ipaddress.ip_network("10.96.0.0/26"), 26)]
    assert accepted(ipaddress.ip_network("fd00:10::40/122"), pools)
    assert not accepted(ipaddress.ip_network("fd00:11::/122"), pools)
    assert accepted(ipaddress.ip_network("10.96.0.0/26"), pools)  # a one-block pool's own CIDR


# ExaBGP's own log lines around a SIGUSR1 (ExaBGP 5.0.15, exabgp.log.destination stdout).
RECEIVED = "reactor         SIGUSR1 received\nreactor         scheduling reload\n"
PERFORMED = "configuration   performing reload of exabgp 5.0.15\n"
LOADED = "reactor         loaded new configuration successfully\n"
PENDING = ("processes       route added to neighbor 10.0.0.13 local-ip 10.0.0.11 local-as 64512 peer-as 64512"
           " router-id 10.0.0.11 family-allowed in-open : 10.244.29.0/26 next-hop self\n")


def test_a_reload_counts_only_when_exabgp_performs_it_after_our_signal() -> None:
    assert reload_outcome(RECEIVED + PERFORMED + LOADED) == "loaded"
    # Dropped without a word: a peer not yet Established still had our route queued (the mesh3 flake, as logged
    # by the node that never configured its third peer).
    assert reload_outcome(PENDING + RECEIVED + "reactor         connected to peer-1 with incoming-3\n") is None
    assert reload_outcome("") is None and reload_outcome(RECEIVED) is None  # not acted on yet
    # Our signal arrived while an earlier reload ran: that one read the old file; ours is still to come.
    assert reload_outcome(PERFORMED + RECEIVED + LOADED) is None
    assert reload_outcome(PERFORMED + RECEIVED + LOADED + PERFORMED + LOADED) == "loaded"
    # Ignored because one was already scheduled: the scheduled one starts later and reads our file.
    ignored = "reactor         SIGUSR1 received\nreactor         ignoring - still handling previous signal\n"
    assert reload_outcome(ignored + PERFORMED + LOADED) == "loaded"
    failed = PERFORMED + "configuration   could not load/reload configuration\n"
    assert reload_outcome(RECEIVED + failed) == "failed"  # acted on: sending it again would not help


def test_exabgp_exiting_keeps_every_peers_routes_as_stale_until_relearned(tmp_path: Path) -> None:
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
    speaker.set_peers(desired_peers(NODES[0], NODES, None, []))
    for peer, prefix in (("10.0.0.12", "10.244.2.0/26"), ("10.0.0.13", "10.244.3.0/26")):
        neighbor = {"address": {"local": "10.0.0.11", "peer": peer}}
        speaker._handle(json.dumps({"type": "open", "neighbor": {**neighbor, "direction": "receive", "open": {
            "capabilities": {"64": {"name": "graceful restart", "time": 120}}}}}).encode())
        speaker._handle(json.dumps({"type": "state", "neighbor": {**neighbor, "state": "up"}}).encode())
        speaker._handle(json.dumps({"type": "update", "neighbor": {**neighbor, "message": {"update": {
            "announce": {"ipv4 unicast": {peer: [prefix]}}}}}}).encode())
    speaker._process_gone()  # killed: no "down" reaches the API
    assert speaker.learned() == {"10.244.2.0/26": ("10.0.0.12",), "10.244.3.0/26": ("10.0.0.13",)}
    assert {p: s.state for p, s in speaker.peers.items()} == {"10.0.0.12": "start", "10.0.0.13": "start"}
    assert set(speaker.rib.stale) == {"10.0.0.12", "10.0.0.13"}
    # The new ExaBGP's session to 10.0.0.13 brings End-of-RIB without the route: withdrawn while we were away.
    neighbor = {"address": {"local": "10.0.0.11", "peer": "10.0.0.13"}}
    speaker._handle(json.dumps({"type": "state", "neighbor": {**neighbor, "state": "up"}}).encode())
    eor = {"eor": {"afi": "ipv4", "safi": "unicast"}}
    speaker._handle(json.dumps({"type": "update", "neighbor": {**neighbor, "message": eor}}).encode())
    assert speaker.learned() == {"10.244.2.0/26": ("10.0.0.12",)}


def test_end_of_rib_goes_to_a_peer_after_our_routes(tmp_path: Path) -> None:
    """ExaBGP runs with manual-eor: a restarted one would send End-of-RIB before the daemon gave it our routes,
    and the peer would drop the routes of ours it kept for the restart (a gap in forwarding)."""
    assert "manual-eor true;" in render_exabgp("10.0.0.11", desired_peers(NODES[0], NODES, None, []), ["relay"])

    async def session() -> list[str]:
        speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
        speaker.set_peers(desired_peers(NODES[0], NODES, None, []))
        speaker.wanted = {"10.244.1.0/26"}
        daemon_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=daemon_end)
        up = {"type": "state", "neighbor": {"address": {"peer": "10.0.0.12"}, "state": "up"}}
        relay_end.sendall(json.dumps(up).encode() + b"\n")
        relay_end.shutdown(socket.SHUT_WR)  # ExaBGP goes after this one event
        await speaker._api(reader, writer)
        await writer.wait_closed()  # what the daemon wrote is in the socket once its end is closed
        relay_end.settimeout(10)
        with relay_end, relay_end.makefile("rb") as commands:
            return commands.read().decode().splitlines()

    lines = asyncio.run(session())
    assert lines == ["announce route 10.244.1.0/26 next-hop self",  # the new API connection: everything, to all
                     "neighbor 10.0.0.12 announce route 10.244.1.0/26 next-hop self",  # the peer that came up
                     "neighbor 10.0.0.12 announce eor ipv4 unicast"]


# A stand-in for ExaBGP where only its reload handshake matters: it connects to the daemon's API socket as the relay
# would, and on SIGUSR1 logs what ExaBGP 5.0.15 logs, performing the reload or (DEAF) dropping it as ExaBGP does
# while a down peer has routes queued. The real ExaBGP cannot be made to drop reloads at will outside a lab.
STAND_IN = '''
import os, signal, socket, sys, time
api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
api.connect("\\0" + os.environ["STAND_IN_API"])
def reload(signum, frame):
    print("reactor         SIGUSR1 received", flush=True)
    if not os.environ.get("STAND_IN_DEAF"):
        print("configuration   performing reload of exabgp 5.0.15", flush=True)
        print("reactor         loaded new configuration successfully", flush=True)
signal.signal(signal.SIGUSR1, reload)
while True:
    time.sleep(1)
'''


def test_supervisor_resends_a_dropped_reload_then_restarts_exabgp(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import bgpd.speaker.exabgp as module
    import bgpd.speaker.process as process
    api = f"calico-py-test-{os.getpid()}-{tmp_path.name}"  # not the node daemon's socket name: no clash
    monkeypatch.setattr(module, "API_SOCKET", "\0" + api)
    monkeypatch.setattr(process, "RELOAD_CONFIRM_TIMEOUT", 0.5)
    monkeypatch.setenv("STAND_IN_API", api)
    stand_in = tmp_path / "exabgp"
    stand_in.write_text(f"#!{sys.executable}\n{STAND_IN}")
    stand_in.chmod(0o755)
    mesh = desired_peers(NODES[0], NODES, None, [])

    async def scenario(deaf: bool) -> ExaBGP:
        if deaf:
            monkeypatch.setenv("STAND_IN_DEAF", "1")
        speaker = ExaBGP(tmp_path / ("deaf" if deaf else "hearing"), "10.0.0.11", on_routes=lambda: None,
                         exabgp=str(stand_in))
        await speaker.start()
        supervisor = speaker.process
        try:
            speaker.set_peers(mesh[:1])
            await eventually_async(supervisor.api_ready.is_set, 20, "the stand-in to connect")
            first = supervisor._process
            speaker.set_peers(mesh)  # a peer more: a reload
            if deaf:
                await eventually_async(lambda: supervisor.restarts == 1, 20,
                                       "ExaBGP to restart after unanswered reloads")
                assert supervisor._process is not first and supervisor.reloads_unanswered == process.RELOAD_ATTEMPTS
                # The new one starts from the file, which has every peer.
                assert (speaker.state_dir / "exabgp.conf").read_text().count("neighbor ") == len(mesh)
            else:
                await eventually_async(lambda: supervisor.reloads == 1 and "loaded new" in
                                       (speaker.state_dir / "exabgp.log").read_text(), 20, "the reload")
                assert supervisor.restarts == 0 and supervisor.reloads_unanswered == 0 and supervisor._process is first
        finally:
            await speaker.stop()
        return speaker

    asyncio.run(scenario(deaf=False))
    asyncio.run(scenario(deaf=True))


# ---------------------------------------------------------------------------------------------- IPv6 (dual stack)


def dual(name: str, ip4: str | None, ip6: str | None, as_number: int | None = None, **labels: str) -> NodeInfo:
    return NodeInfo(name, ipaddress.IPv4Interface(ip4) if ip4 else None, as_number, labels,
                    ipv6=ipaddress.IPv6Interface(ip6) if ip6 else None)


DUAL = [dual("d1", "10.0.0.11/24", "fd00:7::11/64"), dual("d2", "10.0.0.12/24", "fd00:7::12/64", 65002),
        dual("d3", "10.0.0.13/24", None), dual("d4", None, "fd00:7::14/64", rr="true")]
POOLS6 = [IPPool("v4", ipaddress.ip_network("10.244.0.0/16"), 26),
          IPPool("v6", ipaddress.ip_network("fd00:10:244::/64"), 122)]


def test_the_mesh_runs_an_ipv6_session_wherever_both_nodes_have_an_ipv6_address() -> None:
    peers = desired_peers(DUAL[0], DUAL, None, [])
    assert [(p.address, p.local_address, p.peer_as, p.version, p.name) for p in peers] == [
        ("10.0.0.12", "10.0.0.11", 65002, 4, "d2"), ("10.0.0.13", "10.0.0.11", 64512, 4, "d3"),
        ("fd00:7::12", "fd00:7::11", 65002, 6, "d2"), ("fd00:7::14", "fd00:7::11", 64512, 6, "d4")]
    # An IPv6-only node peers over IPv6 only; an IPv4-only one over IPv4 only.
    assert [p.address for p in desired_peers(DUAL[3], DUAL, None, [])] == ["fd00:7::11", "fd00:7::12"]
    assert [p.address for p in desired_peers(DUAL[2], DUAL, None, [])] == ["10.0.0.11", "10.0.0.12"]
    # A node with neither address has no BGP; one whose IPv6 is "none" (the default) keeps its IPv4 mesh as before.
    assert desired_peers(dual("x", None, None), DUAL, None, []) == []


def test_bgp_peers_with_ipv6_addresses_and_ports() -> None:
    resources = [
        {"metadata": {"name": "tor6"}, "spec": {"peerIP": "fd00:7::1", "asNumber": 65100}},
        {"metadata": {"name": "tor6-port"}, "spec": {"peerIP": "[FD00:7::2]:179", "asNumber": 65101}},
        {"metadata": {"name": "tor4-port"}, "spec": {"peerIP": "10.0.0.1:179", "asNumber": 65102}},
        {"metadata": {"name": "racks"}, "spec": {"peerSelector": "rr == 'true'"}},
    ]
    config = {"spec": {"nodeToNodeMeshEnabled": False}}
    peers = {p.address: p for p in desired_peers(DUAL[0], DUAL, config, resources)}
    assert set(peers) == {"fd00:7::1", "fd00:7::2", "10.0.0.1", "fd00:7::14"}  # canonical, ports dropped
    assert peers["fd00:7::2"].local_address == "fd00:7::11" and peers["10.0.0.1"].local_address == "10.0.0.11"
    # An IPv6 peerIP on a node without an IPv6 address: no session (it could not be sourced).
    assert {p.address for p in desired_peers(DUAL[2], DUAL, config, resources)} == {"10.0.0.1"}
    assert node_problem({"metadata": {"name": "n"}, "spec": {"bgp": {"ipv6Address": "10.0.0.1/24"}}})
    assert node_problem({"metadata": {"name": "n"}, "spec": {"bgp": {"ipv6Address": "fd00::1/64"}}}) is None
    assert peer_problem({"metadata": {"name": "p"}, "spec": {"peerIP": "[fd00::1]:179", "asNumber": 1}}) is None
    assert peer_problem({"metadata": {"name": "p"}, "spec": {"peerIP": "[fd00::zz]:179", "asNumber": 1}})


def test_exabgp_config_carries_one_family_per_session_and_the_ipv4_router_id() -> None:
    peers = desired_peers(DUAL[0], DUAL, None, [])
    text = render_exabgp("10.0.0.11", peers, ["relay"])
    blocks = {block.split(" {", 1)[0]: block for block in text.split("neighbor ")[1:]}
    assert "family { ipv6 unicast; }" in blocks["fd00:7::12"] and "ipv4" not in blocks["fd00:7::12"]
    assert "local-address fd00:7::11;" in blocks["fd00:7::12"] and "router-id 10.0.0.11;" in blocks["fd00:7::12"]
    assert "family { ipv4 unicast; }" in blocks["10.0.0.12"] and "ipv6" not in blocks["10.0.0.12"]
    # An IPv6-only node derives a 32-bit router id from its name: stable, and not one of another node's.
    assert router_id_for("10.0.0.11", "d1") == "10.0.0.11"
    derived = router_id_for(None, "d4")
    assert derived == router_id_for(None, "d4") != router_id_for(None, "d5")
    assert ipaddress.IPv4Address(derived)


def test_ipv6_announcements_and_the_ipv6_import_filter() -> None:
    blocks = [ipaddress.ip_network(b) for b in ("10.244.1.0/26", "fd00:10:244::40/122", "fd00:99::/122")]
    local = [ipaddress.ip_address("fd00:10:244::1:5"), ipaddress.ip_address("fd00:10:244::45")]
    # Our IPv6 block, and a /128 for an address borrowed from another node's block; nothing outside the pools.
    assert announcements(blocks, POOLS6, local) == {"10.244.1.0/26", "fd00:10:244::40/122",
                                                    "fd00:10:244::1:5/128"}
    verdicts = PoolFilter(POOLS6)
    assert verdicts.reason("fd00:10:244::80/122") is None  # a block
    assert verdicts.reason("fd00:10:244::1:5/128") is None  # a borrowed address
    assert verdicts.reason("fd00:10:244::/120") is None  # an aggregate of blocks
    assert verdicts.reason("::/0") == DEFAULT_ROUTE
    assert verdicts.reason("fd00:99::/64") == OUTSIDE_POOLS
    assert verdicts.reason("fd00:7::12/128") == OUTSIDE_POOLS  # a node's address
    assert verdicts.reason("fd00:10:244::/64") == WHOLE_POOL
    assert verdicts.reason("fd00:10:244::80/124") == MORE_SPECIFIC  # between the block size and /128
    assert verdicts.reason("fd00:10:244::81/122") == MALFORMED  # host bits set
    assert verdicts.reason("10.244.0.0/26") is None and verdicts.reason("fd00:10:245::/122") == OUTSIDE_POOLS
    assert canonical_prefix("FD00:10:244:0::80/122", 6) == "fd00:10:244::80/122"
    assert canonical_prefix("fd00:10:244::80/122") is None  # not an IPv4 network
    assert canonical_prefix("10.244.0.0/26", 6) is None


def test_exabgp_ipv6_updates_are_validated_like_ipv4(tmp_path: Path) -> None:
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
    speaker.set_peers(desired_peers(DUAL[0], DUAL, None, []))

    def update(peer: str, family: str, announce: dict | None = None, withdraw: list | None = None,
               attribute: object = None) -> bytes:
        body: dict = {"announce": {family: announce}} if announce else {}
        if withdraw:
            body["withdraw"] = {family: withdraw}
        body["attribute"] = {"origin": "igp"} if attribute is None else attribute
        return json.dumps({"type": "update", "neighbor": {"address": {"peer": peer}, "message": {"update": body}}}
                          ).encode()

    speaker._handle(update("fd00:7::12", "ipv6 unicast", {"fd00:7::12": [
        "FD00:10:244:0:0:0:0:80/122",  # canonicalised
        "10.244.5.0/26",  # an IPv4 prefix under ipv6 unicast: not ours to guess
        "fd00:10:244::c1/122", "bogus"]}))  # host bits set, not a prefix
    assert speaker.learned() == {"fd00:10:244::80/122": ("fd00:7::12",)}
    # Next hops that name nowhere a route could go are ignored: link-local (no interface), loopback, unspecified,
    # multicast, IPv4-mapped, and an IPv4 address under ipv6 unicast.
    for bad in ("fe80::1", "::1", "::", "ff02::1", "::ffff:10.0.0.12", "10.0.0.12", "nonsense"):
        speaker._handle(update("fd00:7::14", "ipv6 unicast", {bad: ["fd00:10:244::100/122"]}))
    assert "fd00:10:244::100/122" not in speaker.learned()
    # An IPv6 prefix under ipv4 unicast is not taken either.
    speaker._handle(update("10.0.0.12", "ipv4 unicast", {"10.0.0.12": ["fd00:10:244::140/122"]}))
    assert "fd00:10:244::140/122" not in speaker.learned()
    # Equal paths from two IPv6 peers: both next hops (ECMP).
    speaker._handle(update("fd00:7::14", "ipv6 unicast", {"fd00:7::14": ["fd00:10:244::80/122"]}))
    assert speaker.learned()["fd00:10:244::80/122"] == ("fd00:7::12", "fd00:7::14")
    # A malformed attribute withdraws the routes it came with (RFC 7606), as for IPv4.
    speaker._handle(update("fd00:7::14", "ipv6 unicast", {"fd00:7::14": ["fd00:10:244::80/122"]},
                           attribute={"local-preference": -1}))
    assert speaker.learned()["fd00:10:244::80/122"] == ("fd00:7::12",)
    speaker._handle(update("fd00:7::12", "ipv6 unicast", withdraw=["fd00:10:244::80/122"]))
    assert speaker.learned() == {}


def test_ipv6_routes_go_via_the_peers_ipv6_address_on_its_segment() -> None:
    connected = [("eth1", ipaddress.IPv4Interface("10.0.0.11/24")), ("eth1", ipaddress.IPv6Interface("fd00:7::11/64")),
                 ("eth0", ipaddress.IPv4Interface("172.20.20.3/24"))]
    learned = {"fd00:10:244::80/122": ("fd00:7::12",), "fd00:10:244::c0/122": ("fd00:7::13", "fd00:7::12"),
               "fd00:10:244::100/122": ("fd00:99::1",), "fd00:10:244::40/122": ("fd00:7::13",)}
    routes = remote_routes(learned, connected, [ipaddress.ip_network("fd00:10:244::40/122")])
    assert routes == {RouteSpec("fd00:10:244::80/122", device="eth1", gateway="fd00:7::12"),
                      RouteSpec("fd00:10:244::c0/122", nexthops=(("fd00:7::12", "eth1"), ("fd00:7::13", "eth1")))}
    # Our own IPv6 block is blackholed, as the IPv4 ones are.
    assert RouteSpec("fd00:10:244::40/122", kind="blackhole") in desired_routes(
        [], [ipaddress.ip_network("fd00:10:244::40/122")], set())
    # A line of `ip -batch` takes no "-6" (ip refuses the whole line): the destination tells ip the family.
    assert ip_command("replace", RouteSpec("fd00:10:244::80/122", device="eth1", gateway="fd00:7::12")) == (
        "route replace fd00:10:244::80/122 via fd00:7::12 dev eth1 proto 80 onlink")
    assert ip_command("del", RouteSpec("fd00:10:244::40/122", kind="blackhole")) == (
        "route del blackhole fd00:10:244::40/122 proto 80")


def test_reflection_keeps_each_family_on_its_own_sessions() -> None:
    peers = [PeerSpec("10.0.0.12", 64512, 64512, "10.0.0.11", MESH, "c1", rr_client=True),
             PeerSpec("fd00:7::12", 64512, 64512, "fd00:7::11", MESH, "c1", rr_client=True),
             PeerSpec("fd00:7::13", 64512, 64512, "fd00:7::11", MESH, "c2", rr_client=True)]
    rib = {"fd00:7::12": {"fd00:10:244::80/122": BGPPath("fd00:7::12")},
           "10.0.0.12": {"10.244.1.0/26": BGPPath("10.0.0.12")}}
    out = reflections(rib, peers, "224.0.0.1", "10.0.0.11")
    assert set(out["fd00:7::13"]) == {"fd00:10:244::80/122"}  # the IPv4 block is not offered over IPv6
    assert out["10.0.0.12"] == {} and out["fd00:7::12"] == {}


# ------------------------------------------------------------------ the start-up rule (routes kept after a restart)


def test_startup_rule_waits_only_for_peers_that_negotiated_graceful_restart() -> None:
    from bgpd.speaker.rib import StartupPeer, startup_routes_kept
    gr, no_gr = StartupPeer(opened=True, restart_time=120), StartupPeer(opened=True)
    assert startup_routes_kept(None, 1, 120)  # peers not read from the datastore yet
    assert startup_routes_kept({"frr": gr, "gobgp": no_gr}, 1, 120)  # FRR's End-of-RIB still to come
    assert not startup_routes_kept({"frr": StartupPeer(True, 120, end_of_rib=True), "gobgp": no_gr}, 1, 120)
    assert not startup_routes_kept({"gobgp": no_gr}, 1, 120)  # sends no End-of-RIB: not waited for
    assert startup_routes_kept({"frr": StartupPeer(opened=False)}, 1, 120)  # may still negotiate it
    assert not startup_routes_kept({"frr": StartupPeer(True, restart_time=5)}, 6, 120)  # its own time ended
    assert not startup_routes_kept({"frr": gr}, 30, 30) and not startup_routes_kept({"frr": gr}, 0, 0)


def test_only_routes_found_at_start_are_kept_and_only_until_bgp_speaks_of_them() -> None:
    from bgpd.desired import found_at_start, still_retained
    kept, relearned, local = (RouteSpec("10.244.2.0/26", gateway="10.0.0.12"),
                              RouteSpec("10.244.3.0/26", gateway="10.0.0.13"), RouteSpec("10.244.1.0/26", "blackhole"))
    have = {kept, relearned, local}
    retained = found_at_start(have, want={local, relearned})
    assert retained == {"10.244.2.0/26": kept}
    assert still_retained(retained, have, want={local, relearned}) == retained
    assert still_retained(retained, have - {kept}, want=set()) == {}  # removed from the kernel by someone
    assert still_retained(retained, have, want={RouteSpec("10.244.2.0/26", gateway="10.0.0.14")}) == {}
