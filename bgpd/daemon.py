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
from bgpd.dataplane.kernel import Netlink
from bgpd.dataplane.routes import NetlinkRoutes
from bgpd.health import HealthServer, Metrics, PeerHealth, Probe
from bgpd.kube import Kube, KubeError, KubeNode
from bgpd.overlay import Overlay, interface_mtu
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


async def run(config: Config, address: ipaddress.IPv4Interface | None, kube: Kube | None = None,
              kube_node: KubeNode | None = None, address6: ipaddress.IPv6Interface | None = None) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    if address6 is not None or config.default_pool6 is not None:
        # IPv6 pods: the kernel forwards IPv6 only with the global switch on (per-interface forwarding, set on
        # each cali veth, only makes the interface act as a router).
        Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1")
    async with Datastore(config.etcd) as store:
        existing = await store.get(f"/calico/resources/v3/projectcalico.org/nodes/{config.nodename}")
        settings = node_settings(kube_node.labels if kube_node else {}, kube_node.annotations if kube_node else {},
                                 config.labels, config.as_number, config.rr_cluster_id)
        for problem in settings.problems:
            log.warning("kubernetes node %s: %s (ignored)", config.nodename, problem)
        config = dataclasses.replace(config, as_number=settings.as_number, rr_cluster_id=settings.rr_cluster_id)
        await register_node(store, node_resource(config.nodename, address, address6, config.as_number, settings.labels,
                                                 existing.json() if existing else None, config.rr_cluster_id))
        await ensure_default_pool(store, config)
        netlink = Netlink()
        ipam = IPAM(store)
        underlay_mtu = interface_mtu(address)
        overlay = Overlay(store, ipam, netlink, config.nodename, address, config.networking_backend, underlay_mtu,
                          config.mtu) if config.networking_backend != "none" else None
        bgp: BGPSync | None = None
        keeper = ViewKeeper(store, config.nodename,
                            wants_blocks=lambda view: overlay is not None and encap.vxlan_wanted(view.pools))
        keeper_task = asyncio.create_task(keeper.run())
        reconciler = RouteReconciler(keeper.view, NetlinkRoutes(netlink), config.nodename, config.reconcile_interval,
                                     overlay=overlay,
                                     learned=lambda: bgp.learned() if bgp else {},
                                     learned_changes=lambda: bgp.learned_changes() if bgp else {},
                                     keep_startup_routes=lambda: bgp.speaker.keeps_startup_routes() if bgp else False)
        store.on_recovery(reconciler.wake)  # drift while etcd was away (a route deleted by hand) waits for no period
        if config.networking_backend == "bird" and (address is not None or address6 is not None):
            speaker = ExaBGP(Path(os.environ.get("CALICO_STATE_DIR", f"/run/calico-py/{config.nodename}")),
                             router_id_for(str(address.ip) if address else None, config.nodename),
                             on_routes=reconciler.wake_routes,
                             listen=tuple(str(a.ip) for a in (address, address6) if a is not None))
            bgp = BGPSync(keeper.view, speaker,
                          secrets_dir=Path(os.environ.get("CALICO_SECRETS_DIR", "/etc/calico-py/secrets")))
            keeper.subscribe(bgp.on_view_change)
            await speaker.start()
        # An ADD cut short by a crash of the previous daemon can have left a veth with no endpoint; nothing of
        # ours is in flight before the CNI socket opens, so any such veth is an orphan now (its routes go with it).
        await sweep_orphan_interfaces(store, netlink, config.nodename)
        await keeper.ready()
        keeper.subscribe(reconciler.on_view_change)
        await reconciler.reconcile_once()
        if kube is not None:  # routes are up: tell Kubernetes the node's network is ready, as calico-node does
            try:
                await asyncio.to_thread(kube.set_network_unavailable, config.nodename, False, "CalicoIsUp",
                                        "calico-py is running on this node")
            except KubeError as exc:
                log.warning("could not clear the NetworkUnavailable condition: %s", exc)
        def changed() -> None:  # a CNI ADD or DEL; the BGP sync hears of it from its etcd watch
            reconciler.wake()

        metrics = Metrics(lambda: snapshot())
        handler = CNIHandler(ipam, config.nodename, netlink,
                             lambda: overlay.pod_mtu if overlay else config.mtu or underlay_mtu, changed=changed,
                             pods=kube, observe=lambda *sample: metrics.observe_cni(*sample),
                             on_endpoint=keeper.local_endpoint)
        server = CNIServer(handler.handle)
        await server.start()
        started, started_wall = time.monotonic(), time.time()

        def snapshot() -> dict[str, Any]:
            return {"node": config.nodename, "address": str(address) if address else None,
                    "address6": str(address6) if address6 else None, "ready": True,
                    "uptime_seconds": time.monotonic() - started, "version": __version__,
                    "reconcile": dataclasses.asdict(reconciler.stats), "workloads": reconciler.stats.workloads,
                    "datastore": {"endpoint": store.endpoint, "failovers": store.failovers,
                                  "errors": store.request_errors, "unavailable": store.unavailable},
                    "bgp": bgp is not None, "peers": bgp.status() if bgp else [],
                    "bgp_last_update": bgp.speaker.last_update_at if bgp else None,
                    "advertised": len(bgp.speaker.announced) if bgp else 0, "ipam": dict(ipam.stats),
                    "exabgp": {"restarts": bgp.speaker.process.restarts, "reloads": bgp.speaker.process.reloads,
                               "reloads_unanswered": bgp.speaker.process.reloads_unanswered,
                               "malformed": dict(bgp.speaker.rib.malformed)} if bgp else {},
                    "logs": [p for p in (os.environ.get("CALICO_LOG_FILE"),) if p]}

        async def probe() -> Probe:
            try:
                await asyncio.wait_for(store.get(keys.IPAM_CONFIG), timeout=HEALTH_READ_TIMEOUT)
                datastore_ok = True
            except Exception:  # unreachable, timed out: not ready, whatever the cause
                datastore_ok = False
            now = time.time()
            peers = tuple(PeerHealth(a, p.state == "up", now - max(p.since, started_wall))
                          for a, p in bgp.speaker.peers.items()) if bgp else ()
            return Probe(reconciled=reconciler.stats.runs > 0, datastore_ok=datastore_ok,
                         exabgp_alive=bgp.speaker.alive if bgp else None, peers=peers,
                         grace=float(bgp.speaker.graceful_restart) if bgp else 0.0)

        status = StatusServer(snapshot)
        await status.start()
        health = HealthServer(config.health_host, config.health_port, probe, metrics)
        await health.start()
        log.info("ready node=%s ip=%s ip6=%s etcd=%s", config.nodename, address, address6,
                 ",".join(config.etcd.endpoints))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reconcile_task = asyncio.create_task(reconciler.run())
        bgp_task = asyncio.create_task(bgp.run()) if bgp else None
        await stop.wait()
        log.info("stopping")
        await server.stop()
        await status.stop()
        await health.stop()
        for task in (reconcile_task, bgp_task, keeper_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if bgp:
            await bgp.speaker.stop()
        netlink.close()


def main() -> int:
    env = dict(os.environ)
    problem = logs.setup(env)
    if problem:
        log.warning("%s", problem)
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
