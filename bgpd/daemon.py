"""calico-py-node: the node daemon. Wiring only: settings, adapters, the CNI server and the reconciler.

Start-up: read settings (a bad one stops here with a one-line message), register the Node resource, create the
default pool if no pool exists, turn forwarding on, remove the veths an interrupted ADD left without an endpoint,
reconcile the kernel once (so a restart converges before new pods arrive), then serve CNI requests and reconcile
on every change and every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from bgpd import encap, logs, privileges
from bgpd.autodetect import detect
from bgpd.cleanup import sweep_orphan_interfaces
from bgpd.cni.handler import CNIHandler
from bgpd.cni.server import CNIServer
from bgpd.config import Config, ConfigError
from bgpd.dataplane.kernel import Netlink, interface_mtu
from bgpd.dataplane.overlay_kernel import NetlinkOverlay
from bgpd.dataplane.pod_kernel import NetlinkPods
from bgpd.dataplane.routes import NetlinkRoutes
from bgpd.health import HealthServer, Metrics, PeerHealth, Probe
from bgpd.kube import Kube, KubeError, KubeNode
from bgpd.overlay import Overlay
from bgpd.reconciler import RouteReconciler
from bgpd.resources import node_resource, node_settings
from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import router_id_for
from bgpd.speaker.sync import BGPSync
from bgpd.status import StatusServer
from bgpd.store import register_node
from bgpd.viewsync import ViewKeeper
from ipam import keys
from ipam.allocator import IPAM
from ipam.datastore import Datastore
from ipam.errors import InvalidResource, IPAMError, ResourceExists
from ipam.model import IPPool
from ipam.pools import list_pools, save_pool

log = logging.getLogger("calico-py-node")
__version__ = "0.1.0"
HEALTH_READ_TIMEOUT = 2.0  # seconds a readiness probe waits for etcd


def node_address(config: Config, kube_node: KubeNode | None = None) -> ipaddress.IPv4Interface | None:
    if config.ip == "none":
        return None
    ip = config.ip
    if config.ip == "autodetect" and config.ip_autodetection_method == "kubernetes-internal-ip":
        if kube_node is None or not kube_node.internal_ip:
            raise ConfigError(f"IP_AUTODETECTION_METHOD=kubernetes-internal-ip: the Kubernetes Node {config.nodename} "
                              "has no InternalIP (or no Kubernetes API is configured: KUBECONFIG or in-cluster)")
        ip = kube_node.internal_ip
    elif config.ip == "autodetect":
        found = detect(config.ip_autodetection_method)
        if not isinstance(found, ipaddress.IPv4Interface):
            raise ConfigError(f"IP=autodetect found no address with IP_AUTODETECTION_METHOD="
                              f"{config.ip_autodetection_method}; set IP or another method")
        return found
    address = ipaddress.ip_interface(ip)
    if "/" not in ip:  # take the prefix length from the interface that holds the address
        with IPRoute() as ipr:
            for entry in ipr.get_addr(family=2):
                if entry.get_attr("IFA_ADDRESS") == str(address.ip):
                    return ipaddress.IPv4Interface(f"{address.ip}/{entry['prefixlen']}")
    return ipaddress.IPv4Interface(address)


def node_address6(config: Config) -> ipaddress.IPv6Interface | None:
    """The node's IPv6 address from IP6 (Node spec.bgp.ipv6Address): None with IP6=none, Calico's default."""
    if config.ip6 == "none":
        return None
    if config.ip6 == "autodetect":
        found = detect(config.ip6_autodetection_method, version=6)
        if not isinstance(found, ipaddress.IPv6Interface):
            raise ConfigError(f"IP6=autodetect found no global IPv6 address with IP6_AUTODETECTION_METHOD="
                              f"{config.ip6_autodetection_method}; set IP6, another method, or IP6=none")
        return found
    address = ipaddress.IPv6Interface(config.ip6)
    if "/" not in config.ip6:  # the prefix length of the interface that holds the address
        with IPRoute() as ipr:
            for entry in ipr.get_addr(family=10):
                if entry.get_attr("IFA_ADDRESS") == str(address.ip):
                    return ipaddress.IPv6Interface(f"{address.ip}/{entry['prefixlen']}")
    return address


def warn_without_default_route() -> None:
    """Pods reach their gateway 169.254.1.1 by proxy ARP, which the kernel only answers when it has a route
    to that address through another interface: in practice, a default route."""
    with IPRoute() as ipr:
        if not ipr.get_default_routes(family=2):
            log.warning("no IPv4 default route on this node: proxy ARP will not answer pods asking for their "
                        "gateway 169.254.1.1; add a default route")


async def ensure_default_pool(store: Datastore, config: Config) -> None:
    """The default pool of each IP version, created when no pool of that version exists (as calico-node does):
    IPv4 unless NO_DEFAULT_POOLS, IPv6 when CALICO_IPV6POOL_CIDR is given."""
    existing = {pool.version for pool in await list_pools(store)}
    for document in (config.default_pool, config.default_pool6):
        if document is None:
            continue
        pool = IPPool.from_v3(document)
        if pool.version in existing:
            continue
        try:
            await save_pool(store, pool, replace=False)
            log.info("created pool %s %s", pool.name, pool.cidr)
        except ResourceExists:
            pass  # another node created it first
        except InvalidResource as exc:  # blocks of another size kept in its range (a forced pool delete)
            log.error("default pool %s %s not created: %s; create a pool by hand", pool.name, pool.cidr, exc)


async def register(store: Datastore, config: Config, address: ipaddress.IPv4Interface | None,
                   address6: ipaddress.IPv6Interface | None, kube_node: KubeNode | None) -> Config:
    """This node's Node resource (our fields set, the rest kept) and the default pools; the settings as the
    Kubernetes Node's labels and annotations complete them."""
    existing = await store.get(keys.resource_key(keys.NODES, config.nodename))
    settings = node_settings(kube_node.labels if kube_node else {}, kube_node.annotations if kube_node else {},
                             config.labels, config.as_number, config.rr_cluster_id)
    for problem in settings.problems:
        log.warning("kubernetes node %s: %s (ignored)", config.nodename, problem)
    config = dataclasses.replace(config, as_number=settings.as_number, rr_cluster_id=settings.rr_cluster_id)
    await register_node(store, node_resource(config.nodename, address, address6, config.as_number, settings.labels,
                                             existing.json() if existing else None, config.rr_cluster_id))
    await ensure_default_pool(store, config)
    return config


def forwarding_on(ipv6: bool) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    if ipv6:
        # IPv6 pods: the kernel forwards IPv6 only with the global switch on (per-interface forwarding, set on
        # each cali veth, only makes the interface act as a router).
        Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1")


class NodeDaemon:
    """The node's parts, wired: the view, the route reconciler, the overlay, the BGP speaker and its sync, the
    CNI server, status and health."""

    def __init__(self, store: Datastore, config: Config, address: ipaddress.IPv4Interface | None,
                 address6: ipaddress.IPv6Interface | None, kube: Kube | None) -> None:
        self.store, self.config, self.address, self.address6, self.kube = store, config, address, address6, kube
        self.netlink = Netlink()
        self.ipam = IPAM(store)
        self.underlay_mtu = interface_mtu(address)
        self.overlay = Overlay(store, self.ipam, NetlinkOverlay(self.netlink), config.nodename, address,
                               config.networking_backend, self.underlay_mtu, config.mtu) \
            if config.networking_backend != "none" else None
        self.keeper = ViewKeeper(store, config.nodename, wants_blocks=lambda view: self.overlay is not None
                                 and encap.vxlan_wanted(view.pools))
        self.bgp: BGPSync | None = None
        self.reconciler = RouteReconciler(self.keeper.view, NetlinkRoutes(self.netlink), config.nodename,
                                          config.reconcile_interval, overlay=self.overlay)
        # Drift while etcd was away (a route deleted by hand) waits for no periodic run.
        store.on_recovery(self.reconciler.wake)
        if config.networking_backend == "bird" and (address is not None or address6 is not None):
            speaker = ExaBGP(Path(os.environ.get("CALICO_STATE_DIR", f"/run/calico-py/{config.nodename}")),
                             router_id_for(str(address.ip) if address else None, config.nodename),
                             on_routes=self.reconciler.wake_routes,
                             listen=tuple(str(a.ip) for a in (address, address6) if a is not None),
                             hold_time=config.bgp_hold_time)
            self.bgp = BGPSync(self.keeper.view, speaker,
                               secrets_dir=Path(os.environ.get("CALICO_SECRETS_DIR", "/etc/calico-py/secrets")))
            self.reconciler.feed = speaker.rib
            self.keeper.subscribe(self.bgp.on_view_change)
        self.metrics = Metrics(self.snapshot)
        self.handler = CNIHandler(self.ipam, config.nodename, NetlinkPods(self.netlink), self.pod_mtu,
                                  changed=self.reconciler.wake, pods=kube, observe=self.metrics.observe_cni,
                                  on_endpoint=self.keeper.local_endpoint)
        self.servers = (CNIServer(self.handler.handle), StatusServer(self.snapshot),
                        HealthServer(config.health_host, config.health_port, self.probe, self.metrics))
        self.tasks: list[asyncio.Task[None]] = []
        self._datastore_check: asyncio.Task[Any] | None = None  # the readiness probe's read of etcd
        self.started, self.started_wall = time.monotonic(), time.time()

    def pod_mtu(self) -> int:
        return self.overlay.pod_mtu if self.overlay else self.config.mtu or self.underlay_mtu

    async def start(self) -> None:
        """Converge the kernel before serving: a restart repairs what it finds before new pods arrive."""
        self.tasks.append(asyncio.create_task(self.keeper.run()))
        if self.bgp:
            await self.bgp.speaker.start()
        # An ADD cut short by a crash of the previous daemon can have left a veth with no endpoint; nothing of
        # ours is in flight before the CNI socket opens, so any such veth is an orphan now (its routes go with it).
        await sweep_orphan_interfaces(self.store, self.netlink, self.config.nodename)
        await self.keeper.ready()
        self.keeper.subscribe(self.reconciler.on_view_change)
        await self.reconciler.reconcile_once()
        if self.kube is not None:  # routes are up: tell Kubernetes the node's network is ready, as calico-node does
            try:
                await asyncio.to_thread(self.kube.set_network_unavailable, self.config.nodename, False, "CalicoIsUp",
                                        "calico-py is running on this node")
            except KubeError as exc:
                log.warning("could not clear the NetworkUnavailable condition: %s", exc)
        for server in self.servers:
            await server.start()
        self.tasks.append(asyncio.create_task(self.reconciler.run()))
        if self.bgp:
            self.tasks.append(asyncio.create_task(self.bgp.run()))
        log.info("ready node=%s ip=%s ip6=%s etcd=%s", self.config.nodename, self.address, self.address6,
                 ",".join(self.config.etcd.endpoints))

    async def stop(self) -> None:
        log.info("stopping")
        for server in self.servers:
            await server.stop()
        for task in reversed(self.tasks):  # the loops that act first, the view they read last
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.bgp:
            await self.bgp.speaker.stop()
        self.netlink.close()

    async def _datastore_answers(self) -> bool:
        """Whether etcd answers a read within the probe's time. The read outlives a probe that gives up on it, so
        it can fail over to another member (a frozen one answers nothing; in steady state no other request of the
        daemon would move it on)."""
        check = self._datastore_check
        if check is None or check.done():
            if check is not None and not check.cancelled():
                check.exception()  # retrieved: a failure was this probe's answer already
            check = self._datastore_check = asyncio.create_task(self.store.get(keys.IPAM_CONFIG))
        try:
            await asyncio.wait_for(asyncio.shield(check), timeout=HEALTH_READ_TIMEOUT)
        except Exception:  # unreachable, timed out: not ready, whatever the cause
            return False
        return True

    def snapshot(self) -> dict[str, Any]:
        """What ``calicoctl-py node status`` and /metrics show."""
        bgp, store = self.bgp, self.store
        return {"node": self.config.nodename, "address": str(self.address) if self.address else None,
                "address6": str(self.address6) if self.address6 else None, "ready": True,
                "uptime_seconds": time.monotonic() - self.started, "version": __version__,
                "reconcile": dataclasses.asdict(self.reconciler.stats), "workloads": self.reconciler.stats.workloads,
                "datastore": {"endpoint": store.endpoint, "failovers": store.failovers,
                              "errors": store.request_errors, "unavailable": store.unavailable},
                "bgp": bgp is not None, "peers": bgp.status() if bgp else [],
                "bgp_last_update": bgp.speaker.last_update_at if bgp else None,
                "advertised": len(bgp.speaker.announced) if bgp else 0, "ipam": dict(self.ipam.stats),
                "exabgp": {"restarts": bgp.speaker.process.restarts, "reloads": bgp.speaker.process.reloads,
                           "reloads_unanswered": bgp.speaker.process.reloads_unanswered,
                           "malformed": dict(bgp.speaker.rib.malformed)} if bgp else {},
                "logs": [p for p in (os.environ.get("CALICO_LOG_FILE"),) if p]}

    async def probe(self) -> Probe:
        datastore_ok = await self._datastore_answers()
        now, bgp = time.time(), self.bgp
        peers = tuple(PeerHealth(a, p.state == "up", now - max(p.since, self.started_wall))
                      for a, p in bgp.speaker.peers.items()) if bgp else ()
        return Probe(reconciled=self.reconciler.stats.runs > 0, datastore_ok=datastore_ok,
                     exabgp_alive=bgp.speaker.alive if bgp else None, peers=peers,
                     grace=float(bgp.speaker.graceful_restart) if bgp else 0.0)


async def run(config: Config, address: ipaddress.IPv4Interface | None, kube: Kube | None = None,
              kube_node: KubeNode | None = None, address6: ipaddress.IPv6Interface | None = None) -> None:
    forwarding_on(ipv6=address6 is not None or config.default_pool6 is not None)
    async with Datastore(config.etcd) as store:
        config = await register(store, config, address, address6, kube_node)
        node = NodeDaemon(store, config, address, address6, kube)
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await node.stop()


def main() -> int:
    env = dict(os.environ)
    logs.start(env, log)
    try:
        config = Config.from_env(env)
        kube = Kube.from_env(env)  # None outside a cluster (no KUBECONFIG, not in a pod)
        kube_node = kube.get_node(config.nodename) if kube else None
        if kube is not None and kube_node is None:
            log.warning("no Kubernetes Node named %s: its labels and annotations are not used", config.nodename)
        # pyroute2's synchronous API runs its own event loop: use it before ours starts (or in threads).
        address = node_address(config, kube_node)
        address6 = node_address6(config)
        warn_without_default_route()
        privileges.drop_unneeded(bgp_speaker=config.networking_backend == "bird")  # before any thread starts
        asyncio.run(run(config, address, kube, kube_node, address6))
    except (ConfigError, IPAMError, KubeError, RuntimeError) as exc:
        print(f"calico-py-node: {exc}", file=sys.stderr)
        return 1
    return 0
