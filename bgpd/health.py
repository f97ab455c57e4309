"""The node daemon's HTTP endpoints (``CALICO_HEALTH_HOST``:``CALICO_HEALTH_PORT``, default 127.0.0.1:9099, as
Felix's health port): ``/liveness``, ``/readiness`` and ``/metrics`` (Prometheus text format).

What the endpoints judge is plain data (:class:`Probe`) that the daemon fills in; :func:`liveness` and
:func:`readiness` are pure. Metrics are read at scrape time from the counters the components already keep
(:class:`DaemonCollector`), except the CNI latency histogram, observed per request. The server is a minimal
HTTP/1.0 responder on asyncio: three GET paths, no keep-alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("calico-py-node.health")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class PeerHealth:
    address: str
    established: bool
    down_for: float  # seconds since the session was last Established (or since the daemon started)


@dataclass(frozen=True)
class Probe:
    """What the health endpoints look at, gathered at request time."""

    reconciled: bool  # the first full reconcile has run
    datastore_ok: bool  # a read of the datastore answered just now
    exabgp_alive: bool | None  # None: BGP is off
    peers: tuple[PeerHealth, ...] = ()
    grace: float = 120.0  # a peer may be down this long (its graceful-restart window) and still count as ready
    problems: tuple[str, ...] = field(default=())


def liveness(probe: Probe) -> list[str]:
    """Reasons the daemon is not alive (empty: alive). The event loop is judged by answering at all."""
    return ["ExaBGP is not running and not being restarted"] if probe.exabgp_alive is False else []


def readiness(probe: Probe) -> list[str]:
    """Reasons the node is not ready (empty: ready), like calico-node's -bird-ready."""
    reasons = []
    if not probe.reconciled:
        reasons.append("the first reconcile has not run yet")
    if not probe.datastore_ok:
        reasons.append("the datastore (etcd) does not answer")
    for peer in probe.peers:
        if not peer.established and peer.down_for > probe.grace:
            reasons.append(f"BGP peer {peer.address} not Established for {peer.down_for:.0f}s")
    return reasons + list(probe.problems)


class DaemonCollector(Collector):
    """Prometheus metrics read from the daemon's own counters at scrape time."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield from _bgp_metrics(s)
        yield from _reconcile_metrics(s)
        yield from _datastore_metrics(s)
        yield from _exabgp_metrics(s.get("exabgp", {}))


def _bgp_metrics(s: dict) -> Iterator[Metric]:
    sessions = GaugeMetricFamily("calico_py_bgp_sessions", "BGP peers by session state", labels=["state"])
    up = GaugeMetricFamily("calico_py_bgp_peer_up", "1 when the session to the peer is Established",
                           labels=["peer", "type"])
    learned = GaugeMetricFamily("calico_py_bgp_routes_learned", "Prefixes in the peer's table", labels=["peer"])
    rejected = CounterMetricFamily("calico_py_bgp_routes_rejected", "Routes from the peer the import filter "
                                   "refused, by reason", labels=["peer", "reason"])
    states: dict[str, int] = {}
    for peer in s.get("peers", []):
        state = "established" if peer["state"] == "up" else "active"
        states[state] = states.get(state, 0) + 1
        up.add_metric([peer["address"], peer["type"]], 1.0 if peer["state"] == "up" else 0.0)
        learned.add_metric([peer["address"]], float(peer.get("learned", 0)))
        for reason, count in sorted((peer.get("rejected") or {}).items()):
            rejected.add_metric([peer["address"], reason], float(count))
    for state in ("established", "active"):
        sessions.add_metric([state], float(states.get(state, 0)))
    yield from (sessions, up, learned, rejected)
    yield GaugeMetricFamily("calico_py_bgp_routes_advertised", "Prefixes this node announces",
                            value=float(s.get("advertised", 0)))


def _reconcile_metrics(s: dict) -> Iterator[Metric]:
    kernel = GaugeMetricFamily("calico_py_kernel_routes", "Routes of ours in the kernel, by type, as of the "
                               "last reconcile (full, or the BGP fast path)", labels=["type"])
    for kind in ("blackhole", "workload", "remote", "tunnel"):
        kernel.add_metric([kind], float(s["reconcile"].get("by_type", {}).get(kind, 0)))
    yield kernel
    yield GaugeMetricFamily("calico_py_workloads", "Local workload endpoints", value=float(s["workloads"]))
    runs = CounterMetricFamily("calico_py_reconcile_runs", "Reconcile runs", labels=["kind"])
    runs.add_metric(["full"], float(s["reconcile"]["runs"]))
    runs.add_metric(["fast"], float(s["reconcile"]["fast_runs"]))
    yield runs
    yield CounterMetricFamily("calico_py_reconcile_errors", "Failed reconcile runs and route changes",
                              value=float(s["reconcile"]["errors"]))
    yield GaugeMetricFamily("calico_py_reconcile_last_duration_seconds", "Duration of the last full reconcile",
                            value=float(s["reconcile"]["last_seconds"]))


def _datastore_metrics(s: dict) -> Iterator[Metric]:
    ipam = s.get("ipam", {})
    for name, text in (("allocations", "Addresses allocated"), ("releases", "Addresses released"),
                       ("conflicts", "IPAM writes retried after a concurrent change"),
                       ("blocks_claimed", "Blocks claimed by this node")):
        yield CounterMetricFamily(f"calico_py_ipam_{name}", text, value=float(ipam.get(name, 0)))
    yield CounterMetricFamily("calico_py_datastore_failovers", "Switches to another etcd endpoint",
                              value=float(s["datastore"]["failovers"]))
    yield CounterMetricFamily("calico_py_datastore_errors", "etcd requests that failed or got no answer (each "
                              "attempt)", value=float(s["datastore"].get("errors", 0)))
    yield CounterMetricFamily("calico_py_datastore_unavailable", "etcd requests given up on: no endpoint "
                              "answered within the failover time", value=float(s["datastore"].get("unavailable", 0)))


def _exabgp_metrics(exabgp: dict) -> Iterator[Metric]:
    yield CounterMetricFamily("calico_py_exabgp_restarts", "ExaBGP restarts", value=float(exabgp.get("restarts", 0)))
    yield CounterMetricFamily("calico_py_exabgp_reloads", "ExaBGP configuration reloads",
                              value=float(exabgp.get("reloads", 0)))
    yield CounterMetricFamily("calico_py_exabgp_reloads_unanswered", "Reload signals ExaBGP dropped, each sent "
                              "again (after 3 in a row ExaBGP is restarted)",
                              value=float(exabgp.get("reloads_unanswered", 0)))
    malformed = CounterMetricFamily("calico_py_bgp_routes_malformed", "Routes from the peer withdrawn because "
                                    "their path attributes were malformed (RFC 7606)", labels=["peer"])
    for peer, count in sorted((exabgp.get("malformed") or {}).items()):
        malformed.add_metric([peer], float(count))
    yield malformed


class Metrics:
    """The daemon's registry: the collector above and the CNI latency histogram."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(snapshot))
        self.cni_requests = Counter("calico_py_cni_requests", "CNI requests handled, by command and result",
                                    ["command", "result"], registry=self.registry)
        self.cni = Histogram("calico_py_cni_request_duration_seconds", "CNI requests, by command and result",
                             ["command", "result"], registry=self.registry,
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))

    def observe_cni(self, command: str, result: str, seconds: float) -> None:
        self.cni_requests.labels(command, result).inc()
        self.cni.labels(command, result).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    def __init__(self, host: str, port: int, probe: Callable[[], Awaitable[Probe]], metrics: Metrics) -> None:
        self.host, self.port = host, port
        self.probe = probe
        self.metrics = metrics
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 and parts[0] == "GET" else ""
            status, body, kind = await self._answer(path)
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, path: str) -> tuple[str, bytes, str]:
        if path == "/metrics":
            return "200 OK", self.metrics.text(), CONTENT_TYPE
        if path in ("/liveness", "/readiness"):
            started = time.monotonic()
            probe = await self.probe()
            reasons = liveness(probe) if path == "/liveness" else readiness(probe)
            if reasons:
                log.debug("%s failing (%.0f ms): %s", path, (time.monotonic() - started) * 1000, "; ".join(reasons))
                return "503 Service Unavailable", ("\n".join(reasons) + "\n").encode(), "text/plain"
            return "200 OK", b"ok\n", "text/plain"
        return "404 Not Found", b"try /liveness, /readiness or /metrics\n", "text/plain"
