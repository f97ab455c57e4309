"""Workload (pod) plumbing with pyroute2, Calico's way.

Host side: a veth ``cali<11 hex>`` with MAC ee:ee:ee:ee:ee:ee, proxy-ARP (the host answers for 169.254.1.1, an
address that exists nowhere), forwarding on, and a /32 (/128) route to the pod owned by our route protocol.
Pod side: the pod's /32 (/128) on ``CNI_IFNAME``, ``169.254.1.1 dev eth0 scope link`` and a default route via
it (IPv6: via fe80::ecee:eeff:feee:eeee).

Every call here is synchronous netlink work; the daemon runs it in a thread. Pod-side work enters the pod's
network namespace for the duration of one call and comes straight back (see :func:`in_netns`). The namespace is
a descriptor the CNI shim opened and passed over the socket: nothing here opens a path a runtime gave (a
container's ``/proc/<pid>/ns/net`` refuses a process with fewer capabilities than the container's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import setns

from bgpd.dataplane import rtnl
from bgpd.dataplane.kernel import IFF_UP, ROUTE_PROTO, if_index

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"
IFACE_PREFIX = "cali"
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace descriptor: its CLONE_NEW* type (linux/nsfs.h)
CLONE_NEWNET = 0x40000000

T = TypeVar("T")
Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class PlumbingError(Exception):
    """The kernel refused a step; the message names the step and the device."""


def host_interface_name(namespace: str, pod: str, container_id: str) -> str:
    """Calico's rule: ``cali`` + the first 11 hex digits of sha1("<namespace>.<pod>"); callers outside
    Kubernetes (no pod name) hash the container id."""
    key = f"{namespace}.{pod}" if namespace and pod else container_id
    return IFACE_PREFIX + hashlib.sha1(key.encode()).hexdigest()[:11]


@dataclass(frozen=True)
class Workload:
    host_if: str
    pod_if: str
    netns_fd: int  # the pod's network namespace: a descriptor the caller holds open for as long as it works here
    sandbox: str  # CNI_NETNS as the runtime named it, for messages only (never opened)
    addresses: tuple[Address, ...]
    mtu: int
    pod_mac: str = ""  # chosen here, so nothing has to be read back from the pod


def random_mac() -> str:
    """A locally administered unicast MAC."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def is_network_namespace(fd: int) -> bool:
    """Whether ``fd`` is a network namespace (a runtime may name any file as CNI_NETNS)."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


@contextlib.contextmanager
def entered(netns_fd: int) -> Iterator[None]:
    """The calling thread inside the network namespace ``netns_fd`` for the block, and always back after it
    (``setns`` changes only the calling thread; sockets keep the namespace they were opened in). Entering in
    place saves a thread per pod; a thread that could not come back would plumb the wrong namespace, so that is
    fatal."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # the daemon's own thread
    try:
        try:
            setns(netns_fd)
        except OSError as exc:
            raise PlumbingError(f"cannot enter the pod's network namespace: {exc.strerror}") from None
        try:
            yield
        finally:
            try:
                setns(home)
            except OSError as exc:  # never carry on inside a pod's namespace: die, a restart reconciles
                os.write(2, f"FATAL cannot return to the node's network namespace: {exc}\n".encode())
                os._exit(70)
    finally:
        os.close(home)


def in_netns(netns_fd: int, work: Callable[[IPRoute], T]) -> T:
    """Run ``work(ipr)`` with an ``IPRoute`` inside the network namespace ``netns_fd`` (reads: CHECK)."""
    with entered(netns_fd), IPRoute() as ipr:
        return work(ipr)


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        raise PlumbingError(f"{what}: {os.strerror(exc.code) if exc.code else exc}") from None


def create_link(ipr: IPRoute, workload: Workload, families: tuple[int, ...] = (4,)) -> int:
    """Create the veth pair, both ends up with their MAC and MTU, the pod end moved into the pod's namespace
    with its gateway and default routes (``families``: 4 and/or 6), and proxy ARP on the host end; returns the
    host end's index. Needs no address, so it runs while IPAM allocates. A leftover host end of an earlier
    attempt is replaced."""
    if if_index(workload.host_if) is not None:
        with _step(f"removing stale {workload.host_if}"):
            ipr.link("del", ifname=workload.host_if)
    with _step(f"creating veth {workload.host_if}"):
        peer: dict[str, Any] = {"ifname": workload.pod_if, "net_ns_fd": workload.netns_fd, "mtu": workload.mtu}
        if workload.pod_mac:
            peer["address"] = workload.pod_mac
        # One request: the host end comes up at creation (flags/change), with its MAC and MTU.
        ipr.link("add", ifname=workload.host_if, kind="veth", address=HOST_MAC, mtu=workload.mtu,
                 flags=IFF_UP, change=IFF_UP, peer=peer)
    index = if_index(workload.host_if)
    if index is None:
        raise PlumbingError(f"{workload.host_if} vanished right after it was created")
    name = workload.host_if
    _sysctl(f"net/ipv4/conf/{name}/proxy_arp", "1")
    _sysctl(f"net/ipv4/neigh/{name}/proxy_delay", "0")
    _sysctl(f"net/ipv4/conf/{name}/forwarding", "1")

    with entered(workload.netns_fd), _step(f"configuring {workload.pod_if} in the pod"):
        pod_index = _pod_index(workload)
        batch = rtnl.Batch().link_up(pod_index)
        if 4 in families:  # a default route needs no address of the pod's own, only the on-link gateway
            batch.route(f"{GATEWAY_V4}/32", pod_index).route("0.0.0.0/0", pod_index, gateway=GATEWAY_V4)
        batch.send()
    return index


def _pod_index(workload: Workload) -> int:
    index = if_index(workload.pod_if)  # the calling thread is inside the pod's namespace
    if index is None:
        raise PlumbingError(f"{workload.pod_if} did not appear in {workload.sandbox}")
    return index


def configure_pod(workload: Workload) -> None:
    """Pod side, once IPAM has answered: the pod's /32 (/128), and the IPv6 default route (it needs the link's
    IPv6 to be up, which it is by now)."""
    with entered(workload.netns_fd), _step(f"addressing {workload.pod_if} in the pod"):
        pod_index = _pod_index(workload)
        batch = rtnl.Batch()
        for address in workload.addresses:
            batch.address(pod_index, address.ip)
        if any(a.version == 6 for a in workload.addresses):
            batch.route("::/0", pod_index, gateway=GATEWAY_V6)
        batch.send()


def route_to_pod(workload: Workload, index: int) -> None:
    """Host side: the /32 (/128) routes to the pod, under our protocol number (and IPv6 neighbour proxying)."""
    name = workload.host_if
    if any(a.version == 6 for a in workload.addresses) and Path(f"/proc/sys/net/ipv6/conf/{name}").exists():
        _sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")
        _sysctl(f"net/ipv6/conf/{name}/proxy_ndp", "1")
        _sysctl(f"net/ipv6/conf/{name}/forwarding", "1")
    with _step(f"routing {', '.join(str(a.ip) for a in workload.addresses)} to {workload.host_if}"):
        batch = rtnl.Batch()
        for address in workload.addresses:
            batch.route(f"{address.ip}/{address.max_prefixlen}", index, proto=ROUTE_PROTO, replace=True)
        batch.send()


def add(ipr: IPRoute, workload: Workload) -> None:
    """All of the plumbing in one go (the daemon runs the three steps itself, interleaved with the datastore).
    Idempotent only for a clean slate: the caller removes a half-made workload on failure (see :func:`remove`)."""
    index = create_link(ipr, workload, tuple(sorted({a.version for a in workload.addresses})))
    configure_pod(workload)
    route_to_pod(workload, index)


def host_interfaces() -> list[str]:
    """The names of the workload (``cali*``) interfaces in the calling thread's namespace."""
    return [name for _, name in socket.if_nameindex() if name.startswith(IFACE_PREFIX)]


def remove(ipr: IPRoute, host_if: str) -> bool:
    """Delete the host veth (its pod end and the routes via it go with it). False if it was not there."""
    try:
        ipr.link("del", ifname=host_if)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise PlumbingError(f"deleting {host_if}: {os.strerror(exc.code)}") from None


def check(ipr: IPRoute, workload: Workload) -> list[str]:
    """Everything about the workload that is not as ADD left it (empty when all is well)."""
    problems = []
    index = if_index(workload.host_if)
    if index is None:
        return [f"host interface {workload.host_if} is missing"]
    link = ipr.get_links(index)[0]
    if link.get_attr("IFLA_ADDRESS") != HOST_MAC:
        problems.append(f"{workload.host_if} has MAC {link.get_attr('IFLA_ADDRESS')}, expected {HOST_MAC}")
    if Path(f"/proc/sys/net/ipv4/conf/{workload.host_if}/proxy_arp").read_text().strip() != "1":
        problems.append(f"proxy_arp is off on {workload.host_if}")
    routes = {(r.get_attr("RTA_DST"), r.get_attr("RTA_OIF")) for r in ipr.get_routes(proto=ROUTE_PROTO)}
    routes |= {(r.get_attr("RTA_DST"), r.get_attr("RTA_OIF")) for r in ipr.get_routes(family=10, proto=ROUTE_PROTO)}
    for address in workload.addresses:
        if (str(address.ip), index) not in routes:
            problems.append(f"no route to {address.ip} via {workload.host_if}")

    def pod_side(pod: IPRoute) -> list[str]:
        found = []
        pod_index = if_index(workload.pod_if)
        if pod_index is None:
            return [f"{workload.pod_if} is missing in {workload.sandbox}"]
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in pod.get_addr(index=pod_index)}
        for address in workload.addresses:
            if (str(address.ip), address.max_prefixlen) not in have:
                found.append(f"{address.ip}/{address.max_prefixlen} missing on {workload.pod_if}")
        if any(a.version == 4 for a in workload.addresses):
            gateways = {r.get_attr("RTA_GATEWAY") for r in pod.get_default_routes(family=2)}
            if GATEWAY_V4 not in gateways:
                found.append(f"no default route via {GATEWAY_V4} in the pod")
        return found

    return problems + in_netns(workload.netns_fd, pod_side)
