"""The kernel as the overlay applier sees it: the VXLAN device and its entries, ``tunl0``, and our NAT table. A
fake in the unit tests records what the applier asks for."""

from __future__ import annotations

from typing import Protocol

from bgpd.dataplane import ipip, nat, vxlan
from bgpd.dataplane.kernel import Netlink
from bgpd.encap import EncapState, Tunnel, Vtep


class OverlayKernel(Protocol):
    async def ensure_vtep(self, vtep: Vtep) -> bool: ...  # True when the device had to change

    async def remove_vtep(self) -> bool: ...  # True when there was one

    async def ensure_tunnel(self, tunnel: Tunnel) -> None: ...  # raises ipip.IPIPUnavailable

    async def apply_entries(self, state: EncapState) -> list[str]: ...  # error messages

    async def apply_nat(self, script: str) -> None: ...  # raises nat.NatError


class NetlinkOverlay:
    """:class:`OverlayKernel` on the node's netlink thread (and ``nft``)."""

    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink

    async def ensure_vtep(self, vtep: Vtep) -> bool:
        return await self.netlink.run(lambda ipr: vxlan.ensure_device(ipr, vtep))

    async def remove_vtep(self) -> bool:
        return await self.netlink.run(vxlan.remove_device)

    async def ensure_tunnel(self, tunnel: Tunnel) -> None:
        await self.netlink.run(lambda ipr: ipip.ensure(ipr, tunnel))

    async def apply_entries(self, state: EncapState) -> list[str]:
        return await self.netlink.run(lambda ipr: vxlan.apply_entries(ipr, state))

    async def apply_nat(self, script: str) -> None:
        nat.apply(script)
