"""Block convergence: a node's first pod claims a block; how long until that block's route is in the kernel of
every other node. Ours (calico-py on containerlab/topologies/mesh3.clab.yml) against a BIRD anchor on the same
shape (bench/bgp/bird-mesh3.clab.yml), both labs deployed side by side in ONE run, repetitions interleaved.

Ours, one repetition k:
  A fresh block every time, without deleting anything: before the repetitions, ONE calicoctl-py apply (one etcd
  transaction) creates pools ``bench-rep-K`` = 10.101.K.0/24 (blockSize 26, enabled, nodeSelector all()). Pod k
  is created on node1 through the CNI plugin (installed by bgpd.cni.install; run as a runtime runs it:
  ``ip netns exec <node1> calico-py`` with CNI_* and the config on stdin) with
  ``"ipam": {"ipv4_pools": ["bench-rep-K"]}``, so its ADD claims the first block of a pool nobody has used: the
  path measured is claim -> affinity in etcd -> node1's daemon announces the block over ExaBGP -> node2's and
  node3's daemons install it (proto 80).
  t0 = just before the plugin is spawned; end = the later of the two moments the block's route appears in
  node2's and node3's kernels.
Anchor, one repetition k:
  t0 = just before ``route 10.200.K.0/26 blackhole;`` is appended to node1's include file (its static protocol
  ``blocks``); then ``birdc configure``; end = the later of the route's arrival in node2's and node3's kernels
  (iBGP full mesh, ``direct`` peers, kernel protocols exporting what they learn).

Arrival times come from ``ip -ts -o monitor route`` running in each receiving namespace from before the first
repetition (written to a file, so ip never waits for this script; at nice -10, so it reads promptly on a busy
box): the kernel's notification, stamped by ip when it reads it. Each monitor is proven live with a sentinel
route (192.0.2.1/32, proto static, added and deleted) before anything is measured.

Before each repetition of either path the script pauses a random 0-1 s: our daemon polls etcd for its
affinities every second, and back-to-back repetitions would otherwise lock onto that poll's phase and measure
the same offset every time. The pause is outside the timed interval.

One warm-up repetition per path (pool ``bench-rep-0``, route 10.200.0.0/26) runs first and is reported apart:
it also proves node2 and node3 have read the pools (all pools were written in one transaction), so no measured
repetition meets a receiver that does not know its pool yet. (The warm-up itself can: a route that arrives
before the receiver's 1 s poll has read its pool is filtered out and, as of 6f4eb98, only installed by the
periodic reconcile up to 60 s later; a warm-up near 60 s is that, not noise.)

Percentiles: p50 is the median; p99 is nearest-rank (with up to 100 samples, the largest).

Usage (root): .venv/bin/python bench/convergence.py [--reps 50] [--keep-logs DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.figures import record  # noqa: E402
from bgpd.cni.install import install  # noqa: E402
from containerlab.lab import Lab  # noqa: E402
from containerlab.topology import load  # noqa: E402

MESH3 = ROOT / "containerlab" / "topologies" / "mesh3.clab.yml"
BGP_DIR = ROOT / "bench" / "bgp"
BIRD_TOPOLOGY = "bird-mesh3.clab.yml"
BIRD_BLOCKS = "blocks-node1.conf"
CLI = Path(sys.executable).parent / "calicoctl-py"
SOURCE, RECEIVERS = "node1", ("node2", "node3")
BLOCK_SIZE = 26
SENTINEL = "192.0.2.1/32"
SETUP_TIMEOUT = 90.0
REP_TIMEOUT = 30.0
WARMUP_TIMEOUT = 90.0  # longer than the daemon's periodic reconcile (60 s): a missed wake-up still completes
MONITOR_RCVBUF = 32 << 20
MONITOR_NICE = -10


# ---------------------------------------------------------------------------------------------- kernel monitors


def parse_monitor_line(line: str) -> tuple[float, bool, str, str] | None:
    """``[2026-01-01T10:00:00.123456] [Deleted ]<route>`` -> (wall time, deleted, prefix, proto)."""
    if not line.startswith("[") or "] " not in line:
        return None
    stamp, rest = line[1:].split("] ", 1)
    try:
        when = datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None
    tokens = rest.split()
    deleted = bool(tokens) and tokens[0] == "Deleted"
    if deleted:
        tokens = tokens[1:]
    if tokens and tokens[0] in ("blackhole", "unreachable", "prohibit", "throw", "unicast", "local", "broadcast",
                                "multicast", "anycast", "nat"):
        tokens = tokens[1:]
    if not tokens:
        return None
    prefix = tokens[0]
    if "/" not in prefix:
        try:
            prefix = f"{prefix}/{ipaddress.ip_address(prefix).max_prefixlen}"
        except ValueError:
            return None
    proto = tokens[tokens.index("proto") + 1] if "proto" in tokens[:-1] else "boot"
    return when, deleted, prefix, proto


class RouteMonitor:
    """``ip -ts -o monitor route`` in one namespace, into a file (ip never waits for its reader); which routes are
    present per protocol, with the time each was last added, and when each absent one was last deleted."""

    def __init__(self, namespace: str, path: Path) -> None:
        self.namespace = namespace
        self.path = path
        self._out: IO[bytes] = open(path, "wb")  # noqa: SIM115 - lives as long as the monitor
        # niced up: ip stamps each notification when it reads it, so it must not queue behind the daemons
        self.process = subprocess.Popen(["nice", "-n", str(MONITOR_NICE), "ip", "-n", namespace, "-ts", "-o",
                                         "-rcvbuf", str(MONITOR_RCVBUF), "monitor", "route"],
                                        stdout=self._out, stderr=subprocess.STDOUT)
        self._in: IO[bytes] = open(path, "rb")  # noqa: SIM115
        self._partial = b""
        self.present: dict[str, dict[str, float]] = {}  # proto -> prefix -> time of its latest add
        self.gone: dict[str, dict[str, float]] = {}  # proto -> prefix -> time of its latest delete
        self.events = 0
        self.other: list[str] = []  # lines that are not routes (an overrun would show here)

    def poll(self) -> bool:
        """Read what ip wrote since the last call; True if anything new arrived."""
        data = self._in.read()
        if not data:
            return False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            text = raw.decode(errors="replace")
            parsed = parse_monitor_line(text)
            if parsed is None:
                if text.strip():
                    self.other.append(text)
                continue
            when, deleted, prefix, proto = parsed
            self.events += 1
            if deleted:
                self.present.get(proto, {}).pop(prefix, None)
                self.gone.setdefault(proto, {})[prefix] = when
            else:
                self.gone.get(proto, {}).pop(prefix, None)
                self.present.setdefault(proto, {})[prefix] = when
        return True

    def seen(self, prefix: str, proto: str) -> float | None:
        """When ``prefix`` of ``proto`` was added, if it is present."""
        return self.present.get(proto, {}).get(prefix)

    def prove_live(self, timeout: float = 10.0) -> None:
        """Add and delete a sentinel route of another protocol; returns once the monitor reported both."""
        subprocess.run(["ip", "-n", self.namespace, "route", "add", "blackhole", SENTINEL, "proto", "static"],
                       check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.namespace, "route", "del", "blackhole", SENTINEL, "proto", "static"],
                       check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while SENTINEL not in self.gone.get("static", {}):
            if self.process.poll() is not None:
                raise RuntimeError(f"ip monitor in {self.namespace} exited: {self.path.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ip monitor in {self.namespace} did not report the sentinel in {timeout:g}s")
            self.poll()
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        self._in.close()


def wait_all(monitors: dict[str, RouteMonitor], prefix: str, proto: str, timeout: float) -> dict[str, float]:
    """Until every monitor has seen ``prefix``; returns node -> arrival time (wall clock)."""
    deadline = time.monotonic() + timeout
    while True:
        arrived = {}
        for node, monitor in monitors.items():
            monitor.poll()
            when = monitor.seen(prefix, proto)
            if when is not None:
                arrived[node] = when
        if len(arrived) == len(monitors):
            return arrived
        if time.monotonic() > deadline:
            missing = sorted(set(monitors) - set(arrived))
            raise TimeoutError(f"{prefix} not in the kernel of {', '.join(missing)} after {timeout:g}s")
        time.sleep(0.001)


# ---------------------------------------------------------------------------------------------- helpers


def run(argv: list[str], timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, input=input)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> float:
    """Poll ``predicate()`` until true; returns the seconds waited, raises after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def pctl(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    data = sorted(values)
    return data[max(0, math.ceil(q / 100 * len(data)) - 1)]


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    load1, load5, _ = os.getloadavg()
    return (f"{os.cpu_count()} cores ({model or platform.machine()}), kernel {platform.release()}, "
            f"load average {load1:.2f} / {load5:.2f} (1 / 5 min)")


def code_version() -> str:
    """The commit under test, and whether the daemon's code differs from it (others may be editing)."""
    head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip() or "unknown"
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "bgpd", "ipam", "calicoctl_py",
                 "containerlab"]).stdout.strip()
    return f"{head}{' + uncommitted changes in bgpd/ipam/calicoctl_py/containerlab' if dirty else ''}"


def etcd_endpoint(lab: Lab) -> str:
    return lab.topology.nodes[SOURCE].env["ETCD_ENDPOINTS"]


def calico_established(lab: Lab, node: str) -> int:
    out = lab.exec(node, [str(CLI), "node", "status"]).stdout
    return sum(1 for line in out.splitlines() if line[:1].isdigit() and line.rstrip().endswith("Established"))


def bird_established(lab: Lab, node: str) -> int:
    out = run(["birdc", "-s", str(lab.run_dir / node / "bird.ctl"), "show", "protocols"]).stdout
    return sum(1 for line in out.splitlines() if " BGP " in line and "Established" in line)


# ---------------------------------------------------------------------------------------------- the two paths


@dataclass
class Sample:
    k: int
    total: float  # t0 -> route in the last receiver's kernel
    per_node: dict[str, float]  # t0 -> route in that node's kernel
    step: float  # ours: the CNI ADD; BIRD: birdc configure (t0 -> command returned)
    prefix: str
    t0: float


def pools_document(reps: int) -> str:
    docs = [{"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": f"bench-rep-{k}"},
             "spec": {"cidr": f"10.101.{k}.0/24", "blockSize": BLOCK_SIZE, "ipipMode": "Never",
                      "vxlanMode": "Never", "natOutgoing": False, "nodeSelector": "all()"}}
            for k in range(reps + 1)]
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


class Ours:
    def __init__(self, lab: Lab, bin_dir: Path, monitors: dict[str, RouteMonitor]) -> None:
        self.lab = lab
        self.installed = install(bin_dir)
        self.plugin = self.installed.paths[0]
        self.bin_dir = bin_dir
        self.monitors = monitors

    def setup(self, reps: int) -> None:
        for node in (SOURCE, *RECEIVERS):
            wait_until(f"{node} to have Established sessions to both other nodes",
                       lambda node=node: calico_established(self.lab, node) == 2, SETUP_TIMEOUT)
        applied = run(["ip", "netns", "exec", self.lab.netns(SOURCE), "env",
                       f"ETCD_ENDPOINTS={etcd_endpoint(self.lab)}", str(CLI), "apply", "-f", "-"],
                      input=pools_document(reps))
        if applied.returncode != 0:
            raise RuntimeError(f"calicoctl-py apply of the pools failed: {applied.stderr or applied.stdout}")

    def rep(self, k: int, timeout: float = REP_TIMEOUT) -> Sample:
        pod_ns = f"{self.lab.mgmt_ns}-pod-{SOURCE}-{k}"
        subprocess.run(["ip", "netns", "add", pod_ns], check=True, capture_output=True)
        config = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py",
                  "ipam": {"type": "calico-py-ipam", "ipv4_pools": [f"bench-rep-{k}"]}}
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"conv-{k}",
               "CNI_NETNS": f"/run/netns/{pod_ns}", "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin_dir),
               "CNI_ARGS": f"K8S_POD_NAMESPACE=bench;K8S_POD_NAME=conv-{k}"}
        argv = ["ip", "netns", "exec", self.lab.netns(SOURCE), str(self.plugin)]
        payload = json.dumps(config)
        t0 = time.time()
        result = subprocess.run(argv, env=env, input=payload, capture_output=True, text=True, timeout=60,
                                check=False)
        added = time.time()
        if result.returncode != 0:
            raise RuntimeError(f"CNI ADD of pod {k} failed: {result.stdout.strip() or result.stderr.strip()}")
        address = json.loads(result.stdout)["ips"][0]["address"].split("/")[0]
        prefix = str(ipaddress.ip_network(f"{address}/{BLOCK_SIZE}", strict=False))
        arrived = wait_all(self.monitors, prefix, "80", timeout)
        return Sample(k, max(arrived.values()) - t0, {n: t - t0 for n, t in arrived.items()}, added - t0, prefix, t0)


class Bird:
    def __init__(self, lab: Lab, config_dir: Path, monitors: dict[str, RouteMonitor]) -> None:
        self.lab = lab
        self.blocks = config_dir / BIRD_BLOCKS
        self.monitors = monitors
        self.control = str(lab.run_dir / SOURCE / "bird.ctl")

    def setup(self) -> None:
        for node in (SOURCE, *RECEIVERS):
            wait_until(f"BIRD on {node} to have Established sessions to both other nodes",
                       lambda node=node: bird_established(self.lab, node) == 2, SETUP_TIMEOUT)

    def rep(self, k: int, timeout: float = REP_TIMEOUT) -> Sample:
        prefix = f"10.200.{k}.0/{BLOCK_SIZE}"
        argv = ["birdc", "-s", self.control, "configure"]
        t0 = time.time()
        with open(self.blocks, "a") as blocks:
            blocks.write(f"route {prefix} blackhole;\n")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        configured = time.time()
        if result.returncode != 0 or "Reconfigured" not in result.stdout:
            raise RuntimeError(f"birdc configure failed: {result.stdout.strip()} {result.stderr.strip()}")
        arrived = wait_all(self.monitors, prefix, "bird", timeout)
        return Sample(k, max(arrived.values()) - t0, {n: t - t0 for n, t in arrived.items()}, configured - t0,
                      prefix, t0)


ANNOUNCE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ calico-py-node\.bgp bgp announce (\S+)")


def announce_times(log: Path) -> dict[str, float]:
    """prefix -> wall time node1's daemon logged ``bgp announce`` for it (millisecond resolution)."""
    found: dict[str, float] = {}
    if not log.exists():
        return found
    for line in log.read_text(errors="replace").splitlines():
        match = ANNOUNCE.match(line)
        if match:
            when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.setdefault(match.group(2), when)
    return found


# ---------------------------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(ours: list[Sample], bird: list[Sample], warm: tuple[Sample, Sample], announced: dict[str, float],
           seconds: float, started: str, host_before: str, version: str, plugin: str) -> str:
    ours_total, bird_total = [s.total for s in ours], [s.total for s in bird]
    o50, o99, b50, b99 = (statistics.median(ours_total), pctl(ours_total, 99), statistics.median(bird_total),
                          pctl(bird_total, 99))
    record("convergence p50", o50 * 1000, b50 * 1000)
    record("convergence p99 / our p50", o99 * 1000, o50 * 1000)
    lines = [
        f"## Block convergence on mesh3: ours vs BIRD ({started})",
        "",
        "| path | p50 ms | p99 ms | n |",
        "|---|---|---|---|",
        f"| ours: CNI ADD on node1 claims a block -> route in node2's and node3's kernels | {ms(o50)} | {ms(o99)} "
        f"| {len(ours)} |",
        f"| BIRD: blackhole appended to node1's config, birdc configure -> route in node2's and node3's kernels "
        f"| {ms(b50)} | {ms(b99)} | {len(bird)} |",
        "",
        f"Ratio ours / BIRD: p50 {o50 / b50:.1f}x, p99 {o99 / b99:.1f}x.",
        "",
        "Where our time goes (p50 / p99 ms, from t0):",
        "",
        "| step | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| CNI ADD returned (the {plugin}) | {ms(statistics.median([s.step for s in ours]))} | "
        f"{ms(pctl([s.step for s in ours], 99))} |",
    ]
    announce = [announced[s.prefix] - s.t0 for s in ours if s.prefix in announced]
    if announce:
        lines.append(f"| node1 logged `bgp announce` (ms resolution; {len(announce)} of {len(ours)}) | "
                     f"{ms(statistics.median(announce))} | {ms(pctl(announce, 99))} |")
        after = [s.total - (announced[s.prefix] - s.t0) for s in ours if s.prefix in announced]
        lines.append(f"| announce -> last receiver's kernel | {ms(statistics.median(after))} | "
                     f"{ms(pctl(after, 99))} |")
    for node in RECEIVERS:
        values = [s.per_node[node] for s in ours]
        lines.append(f"| route in {node}'s kernel | {ms(statistics.median(values))} | {ms(pctl(values, 99))} |")
    lines += [
        f"| BIRD: birdc configure returned | {ms(statistics.median([s.step for s in bird]))} | "
        f"{ms(pctl([s.step for s in bird], 99))} |",
        "",
        f"Spread: ours min {ms(min(ours_total))} / max {ms(max(ours_total))} ms; "
        f"BIRD min {ms(min(bird_total))} / max {ms(max(bird_total))} ms.",
        f"Warm-up (first block after the pools were written; not in the table): ours {ms(warm[0].total)} ms, "
        f"BIRD {ms(warm[1].total)} ms.",
        f"Machine: before {host_before}; after: {machine()}.",
        f"Code: {version}.",
        f"Run: {seconds:.0f} s including deploy and destroy. p99 is nearest-rank (n={len(ours)}: sample "
        f"{math.ceil(0.99 * len(ours))} of {len(ours)} in order).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="for the random pauses between repetitions")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the labs' logs here before destroy")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("convergence: run as root (network namespaces)")
    if not 1 <= args.reps <= 254:
        raise SystemExit("convergence: --reps from 1 to 254 (one 10.101.K.0/24 pool per repetition)")
    rng = random.Random(args.seed)
    started_wall = time.strftime("%Y-%m-%d %H:%M:%S")
    host_before = machine()
    version = code_version()
    started = time.monotonic()
    tag = os.getpid() % 100000
    work = Path(tempfile.mkdtemp(prefix="calico-py-convergence-"))
    shutil.copytree(BGP_DIR, work / "bgp")
    ours_lab = Lab(load(MESH3, name_override=f"conv{tag}"))
    bird_lab = Lab(load(work / "bgp" / BIRD_TOPOLOGY, name_override=f"convb{tag}"))
    monitors: list[RouteMonitor] = []
    try:
        for lab in (ours_lab, bird_lab):
            print(f"deploying {lab.topology.name} ...", file=sys.stderr)
            lab.deploy()
        ours_monitors = {n: RouteMonitor(ours_lab.netns(n), work / f"ours-{n}.mon") for n in RECEIVERS}
        bird_monitors = {n: RouteMonitor(bird_lab.netns(n), work / f"bird-{n}.mon") for n in RECEIVERS}
        monitors = [*ours_monitors.values(), *bird_monitors.values()]
        ours = Ours(ours_lab, work, ours_monitors)
        bird = Bird(bird_lab, work / "bgp", bird_monitors)
        ours.setup(args.reps)
        bird.setup()
        for monitor in monitors:
            monitor.prove_live()
        print(f"labs up after {time.monotonic() - started:.1f}s; warm-up ...", file=sys.stderr)
        warm = (ours.rep(0, WARMUP_TIMEOUT), bird.rep(0, WARMUP_TIMEOUT))
        print(f"warm-up: ours {ms(warm[0].total)} ms, BIRD {ms(warm[1].total)} ms", file=sys.stderr)
        ours_samples: list[Sample] = []
        bird_samples: list[Sample] = []
        for k in range(1, args.reps + 1):
            time.sleep(rng.random())  # de-phasing from the daemon's 1 s poll (see the docstring), not timed
            ours_samples.append(ours.rep(k))
            time.sleep(rng.random())
            bird_samples.append(bird.rep(k))
            if k % 10 == 0:
                print(f"  {k}/{args.reps}: ours {ms(ours_samples[-1].total)} ms, BIRD {ms(bird_samples[-1].total)} ms",
                      file=sys.stderr)
        announced = announce_times(ours_lab.run_dir / SOURCE / "calico-py-node.log")
        samples = {"ours": [s.__dict__ for s in ours_samples], "bird": [s.__dict__ for s in bird_samples]}
        (work / "samples.json").write_text(json.dumps(samples, indent=1))
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "samples.json", args.keep_logs / "samples.json")
    finally:
        for monitor in monitors:
            monitor.stop()
        if args.keep_logs:
            for lab in (ours_lab, bird_lab):
                if lab.run_dir.exists():
                    shutil.copytree(lab.run_dir, args.keep_logs / lab.topology.name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.ctl", "etcd", "*.sock"))
        for lab in (ours_lab, bird_lab):
            try:
                lab.destroy()
            except Exception as exc:  # keep destroying the other one
                print(f"convergence: destroying {lab.topology.name}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print(report(ours_samples, bird_samples, warm, announced, time.monotonic() - started, started_wall, host_before,
                 version, str(ours.installed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
