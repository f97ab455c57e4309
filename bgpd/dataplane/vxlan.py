"""The VXLAN device and its static neighbour / FDB entries, with pyroute2 (read back with ``ip``/``bridge -json``).

``vxlan.calico``: VNI 4096, UDP 4789, learning off (every entry is programmed: nothing is flooded or learned),
local address the node's underlay address, MAC the node's VTEP MAC, MTU underlay - 50, the VTEP address as a
/32. Entries other than ours on other devices are never touched.
"""

from __future__ import annotations

import json
import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bgpd.dataplane.kernel import IFF_UP, if_index
from bgpd.encap import VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI, EncapState, Forwarding, Neighbor, Vtep

NUD_PERMANENT = 0x80
NTF_SELF = 0x02


def _json(argv: list[str]) -> list[dict]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return json.loads(result.stdout or "[]") if result.returncode == 0 else []


def device_matches(vtep: Vtep) -> bool:
    """The device exists with our VNI, port, local address, MAC, MTU and no learning."""
    links = _json(["ip", "-json", "-details", "link", "show", "dev", VXLAN_DEVICE])
    if not links:
        return False
    link, info = links[0], (links[0].get("linkinfo") or {}).get("info_data") or {}
    addresses = {a.get("local") for entry in _json(["ip", "-json", "-4", "addr", "show", "dev", VXLAN_DEVICE])
                 for a in entry.get("addr_info") or []}
    return (info.get("id") == VXLAN_VNI and info.get("port") == VXLAN_PORT and info.get("local") == vtep.local
            and not info.get("learning", True) and link.get("address") == vtep.mac and link.get("mtu") == vtep.mtu
            and "UP" in (link.get("flags") or []) and addresses == {vtep.address})


def ensure_device(ipr: IPRoute, vtep: Vtep) -> bool:
    """Create (or re-create, when anything differs) the VXLAN device; True if it had to change."""
    if device_matches(vtep):
        return False
    if if_index(VXLAN_DEVICE) is not None:
        ipr.link("del", ifname=VXLAN_DEVICE)
    ipr.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_port=VXLAN_PORT,
             vxlan_local=vtep.local, vxlan_learning=0, address=vtep.mac, mtu=vtep.mtu, flags=IFF_UP, change=IFF_UP)
    index = if_index(VXLAN_DEVICE)
    assert index is not None
    ipr.addr("add", index=index, address=vtep.address, prefixlen=32)
    return True


def remove_device(ipr: IPRoute) -> bool:
    if if_index(VXLAN_DEVICE) is None:
        return False
    ipr.link("del", ifname=VXLAN_DEVICE)
    return True


def actual_entries() -> tuple[set[Neighbor], set[Forwarding]]:
    """The permanent neighbour and FDB entries on the VXLAN device."""
    neighbors = {Neighbor(n["dst"], n["lladdr"]) for n in _json(["ip", "-json", "neigh", "show", "dev", VXLAN_DEVICE])
                 if "PERMANENT" in (n.get("state") or []) and n.get("lladdr")}
    forwarding = {Forwarding(f["mac"], f["dst"]) for f in _json(["bridge", "-json", "fdb", "show", "dev", VXLAN_DEVICE])
                  if f.get("dst") and "self" in (f.get("flags") or [])}
    return neighbors, forwarding


def apply_entries(ipr: IPRoute, want: EncapState) -> list[str]:
    """Make the device's neighbour and FDB entries exactly ``want``'s; returns error messages."""
    index = if_index(VXLAN_DEVICE)
    if index is None:
        return [f"{VXLAN_DEVICE} is missing"] if want.neighbors or want.forwarding else []
    have_neighbors, have_forwarding = actual_entries()
    errors = []
    changes = [
        *(("neigh", "del", n) for n in have_neighbors - want.neighbors),
        *(("fdb", "del", f) for f in have_forwarding - want.forwarding),
        *(("neigh", "replace", n) for n in want.neighbors - have_neighbors),
        *(("fdb", "replace", f) for f in want.forwarding - have_forwarding),
    ]
    for table, verb, entry in changes:
        try:
            if isinstance(entry, Neighbor):
                ipr.neigh(verb, dst=entry.address, lladdr=entry.mac, ifindex=index, state=NUD_PERMANENT)
            else:
                ipr.fdb(verb, ifindex=index, lladdr=entry.mac, dst=entry.destination, state=NUD_PERMANENT,
                        flags=NTF_SELF)
        except NetlinkError as exc:
            errors.append(f"{table} {verb} {entry}: {exc}")
    return errors
