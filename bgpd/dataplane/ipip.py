"""The IPIP device ``tunl0`` (the kernel's fallback IPIP device: it appears in every network namespace once the
ipip module is loaded), with pyroute2: MTU underlay - 20, up, the node's IPIP tunnel address as a /32.

Kernels without the ipip module cannot have it: :class:`IPIPUnavailable` says so, once, instead of a route into
nowhere (the overlay then installs no IPIP routes)."""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bgpd.dataplane.kernel import if_index
from bgpd.encap import IPIP_DEVICE, Tunnel


class IPIPUnavailable(Exception):
    """The kernel has no ipip module."""


def link_request(tunnel: Tunnel) -> dict[str, object]:
    """What ``tunl0`` is set to (pure: unit-tested where the kernel has no ipip)."""
    return {"ifname": IPIP_DEVICE, "mtu": tunnel.mtu, "state": "up"}


def ensure(ipr: IPRoute, tunnel: Tunnel) -> None:
    index = if_index(IPIP_DEVICE)
    if index is None:
        try:
            ipr.link("add", ifname=IPIP_DEVICE, kind="ipip")
        except NetlinkError as exc:
            if exc.code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
                raise IPIPUnavailable(f"this kernel has no ipip module ({exc}): IPIP pools cannot work on this node; "
                                      "load ipip or use vxlanMode") from None
            raise
        index = if_index(IPIP_DEVICE)
        assert index is not None
    request = link_request(tunnel)
    ipr.link("set", index=index, mtu=request["mtu"], state=request["state"])
    have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, index=index)}
    for stale in have - {tunnel.address}:
        ipr.addr("del", index=index, address=stale, prefixlen=32)
    if tunnel.address not in have:
        ipr.addr("add", index=index, address=tunnel.address, prefixlen=32)
