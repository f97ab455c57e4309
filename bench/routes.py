"""Bulk routes: a BIRD peer sends 10,000 routes inside an enabled pool; how long until all of them are in the
kernel of our node (calico-py: ExaBGP -> node daemon -> reconciler -> ip -batch), and of a BIRD receiver fed by
the same peer (the anchor), in one run.

Lab: bench/bgp/bulk.clab.yml (etcd, calico-py node1 10.0.0.11, BIRD injector 10.0.0.50 AS 65050, BIRD receiver
10.0.0.60). node1 peers with the injector through bench/bgp/bulk-peers.yaml (applied with calicoctl-py from
inside node1). The injector holds the routes (/32s from 10.244.64.0 up, inside node1's pool 10.244.0.0/16; written
into a run copy of bench/bgp) in three static protocols that start disabled:

- together: ``birdc enable bulk`` sends them to node1 and the receiver at once (the two share the 2 cores);
- alone: ``bulk_node1`` to node1 only, then ``bulk_receiver`` to the receiver only (nothing else busy).

Each phase: t0 just before ``birdc enable``; done when every route is in the kernel (proto 80 on node1, proto
bird on the receiver); then ``birdc disable`` and the same until every route is gone again (reported as
withdraw). Times come from ``ip -ts -o monitor route`` in each receiving namespace (into a file: ip never waits
for this script; at nice -10, so it reads promptly while the daemons are busy), proven live with a sentinel route
first; every 2 s of waiting a route dump cross-checks the monitor, so lost notifications are caught (and flagged,
with the dump's time as an upper bound) instead of stalling the run. Deadline 120 s a phase.

CPU seconds per phase: utime+stime (+ reaped children) of every process in the node's namespace (our daemon,
ExaBGP, its relay, ip -batch) or the receiver's (bird), read from /proc before and after, minus our monitor.

Usage (root): .venv/bin/python bench/routes.py [--routes 10000] [--reps 3] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import CLI, RouteMonitor, code_version, machine, run, wait_until  # noqa: E402

from bench.figures import record  # noqa: E402
from containerlab.lab import Lab  # noqa: E402
from containerlab.topology import load  # noqa: E402

BGP_DIR = ROOT / "bench" / "bgp"
TOPOLOGY = "bulk.clab.yml"
PEERS = "bulk-peers.yaml"
ROUTES_FILE = "bulk-routes.conf"
FIRST = ipaddress.IPv4Address("10.244.64.0")
POOL = ipaddress.IPv4Network("10.244.0.0/16")
OURS, ANCHOR, INJECTOR = "node1", "receiver", "injector"
PROTO = {OURS: "80", ANCHOR: "bird"}
PHASE_TIMEOUT = 120.0
SETUP_TIMEOUT = 90.0
CROSS_CHECK = 2.0


def prefixes(count: int) -> list[str]:
    last = FIRST + count - 1
    if last not in POOL:
        raise SystemExit(f"routes: {count} /32s from {FIRST} do not fit in {POOL}")
    return [f"{FIRST + i}/32" for i in range(count)]


def write_routes(path: Path, routes: list[str]) -> None:
    path.write_text("".join(f"route {p} blackhole;\n" for p in routes))


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Arrival:
    node: str
    complete: bool
    count: int  # of the wanted routes, present (install) or gone (withdraw) at the end
    first: float | None = None  # seconds from t0 to the first / last change, by the monitor
    last: float | None = None
    note: str = ""


@dataclass
class Phase:
    name: str
    install: dict[str, Arrival] = field(default_factory=dict)
    withdraw: dict[str, Arrival] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # node -> CPU seconds over install + withdraw
    exabgp: float | None = None  # seconds from t0 to the last UPDATE ExaBGP handed to node1's daemon
    reconciles: int | None = None  # node1's reconcile runs over the phase
    log_lines: int | None = None  # lines node1's daemon logged over the phase


def dump_count(lab: Lab, node: str, wanted: set[str]) -> int:
    out = run(["ip", "-n", lab.netns(node), "-4", "-o", "route", "show", "proto", PROTO[node]]).stdout
    found = set()
    for line in out.splitlines():
        tokens = line.split()
        if tokens and tokens[0] == "blackhole":
            tokens = tokens[1:]
        if tokens:
            found.add(tokens[0] if "/" in tokens[0] else f"{tokens[0]}/32")
    return len(found & wanted)


def wait_routes(lab: Lab, monitors: dict[str, RouteMonitor], wanted: set[str], present: bool, t0: float,
                timeout: float = PHASE_TIMEOUT) -> dict[str, Arrival]:
    """Until every monitored kernel holds all of ``wanted`` (present) or none of them; per node, by the monitor."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + CROSS_CHECK
    done: dict[str, Arrival] = {}
    while True:
        for node, monitor in monitors.items():
            if node in done:
                continue
            monitor.poll()
            table = monitor.present if present else monitor.gone
            times = table.get(PROTO[node], {})
            have = wanted & times.keys()
            if len(have) == len(wanted):
                stamps = [times[p] for p in have]
                done[node] = Arrival(node, True, len(have), min(stamps) - t0, max(stamps) - t0)
        if len(done) == len(monitors):
            return done
        now = time.monotonic()
        if now > deadline or now > next_check:
            for node in set(monitors) - set(done):
                held = dump_count(lab, node, wanted)
                count = held if present else len(wanted) - held
                if count == len(wanted):  # the kernel is there: give the monitor a moment to catch up
                    dumped = time.time() - t0
                    if not catch_up(monitors[node], PROTO[node], wanted, present):
                        done[node] = Arrival(node, True, count, None, dumped,
                                             note="monitor lost events; time from a route dump (upper bound)")
                elif now > deadline:
                    done[node] = Arrival(node, False, count, note=f"{count} of {len(wanted)} after {timeout:g}s")
            if len(done) == len(monitors):
                return done
            next_check = now + CROSS_CHECK
        time.sleep(0.005)


def catch_up(monitor: RouteMonitor, proto: str, wanted: set[str], present: bool, grace: float = 2.0) -> bool:
    """True once the monitor reports what a dump already showed (it lags the kernel a little on a busy box)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        monitor.poll()
        if wanted <= (monitor.present if present else monitor.gone).get(proto, {}).keys():
            return True
        time.sleep(0.01)
    return False


def namespace_cpu(namespace: str, exclude: set[int]) -> float:
    """CPU seconds (user + system, with reaped children) of the processes in a network namespace."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in run(["ip", "netns", "pids", namespace]).stdout.split():
        if int(pid) in exclude:
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / ticks


STATUS = re.compile(r"Routes: (\d+) owned, last reconcile ([\d.]+) ms, (\d+) runs, (\d+) errors")


def node_status(lab: Lab) -> tuple[int, float, int, int] | None:
    match = STATUS.search(lab.exec(OURS, [str(CLI), "node", "status"]).stdout)
    if not match:
        return None
    return int(match.group(1)), float(match.group(2)), int(match.group(3)), int(match.group(4))


def last_update_at(lab: Lab) -> float | None:
    """When node1's daemon got the last UPDATE from its ExaBGP (wall clock, from its status socket)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from calicoctl_py.commands.node import query_status; print(json.dumps(query_status()))")
    out = lab.exec(OURS, [sys.executable, "-c", code]).stdout
    try:
        return float(json.loads(out).get("bgp_last_update") or 0) or None
    except (ValueError, AttributeError):
        return None


def log_lines(lab: Lab) -> int:
    log = lab.run_dir / OURS / "calico-py-node.log"
    with open(log, "rb") as handle:
        return sum(1 for _ in handle)


class Bench:
    def __init__(self, lab: Lab, monitors: dict[str, RouteMonitor], wanted: set[str]) -> None:
        self.lab = lab
        self.monitors = monitors
        self.wanted = wanted
        self.control = str(lab.run_dir / INJECTOR / "bird.ctl")
        self.monitor_pids = {m.process.pid for m in monitors.values()}

    def birdc(self, *argv: str) -> str:
        result = run(["birdc", "-s", self.control, *argv])
        if result.returncode != 0:
            raise RuntimeError(f"birdc {' '.join(argv)}: {result.stdout} {result.stderr}")
        return result.stdout

    def phase(self, name: str, protocol: str, nodes: tuple[str, ...]) -> Phase:
        monitors = {n: self.monitors[n] for n in nodes}
        result = Phase(name)
        cpu_before = {n: namespace_cpu(self.lab.netns(n), self.monitor_pids) for n in nodes}
        status_before = node_status(self.lab) if OURS in nodes else None
        lines_before = log_lines(self.lab) if OURS in nodes else 0
        t0 = time.time()
        out = self.birdc("enable", protocol)
        if "enabled" not in out:
            raise RuntimeError(f"birdc enable {protocol}: {out.strip()}")
        result.install = wait_routes(self.lab, monitors, self.wanted, True, t0)
        if OURS in nodes:
            last_update = last_update_at(self.lab)
            result.exabgp = last_update - t0 if last_update else None
        t1 = time.time()
        self.birdc("disable", protocol)
        result.withdraw = wait_routes(self.lab, monitors, self.wanted, False, t1)
        result.cpu = {n: namespace_cpu(self.lab.netns(n), self.monitor_pids) - cpu_before[n] for n in nodes}
        if OURS in nodes:
            status_after = node_status(self.lab)
            if status_before and status_after:
                result.reconciles = status_after[2] - status_before[2]
            result.log_lines = log_lines(self.lab) - lines_before
        return result


# ---------------------------------------------------------------------------------------------- report


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def report(phases: list[Phase], count: int, seconds: float, host_before: str, started: str, version: str) -> str:
    lines = [f"## {count:,} routes from a BIRD peer into the kernel: ours vs BIRD ({started})", "",
             "Per phase (ms from `birdc enable` / `disable`; first and last route as the kernel reported them):", "",
             "| phase | kernel | all installed | first route | first -> last | all withdrawn | CPU s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for phase in phases:
        for node, arrival in phase.install.items():
            gone = phase.withdraw.get(node)
            span = (arrival.last - arrival.first) if arrival.first is not None and arrival.last is not None else None
            label = "ours (node1)" if node == OURS else "BIRD (receiver)"
            note = "; ".join(n for n in (arrival.note, gone.note if gone else "") if n)
            if node == OURS and phase.exabgp is not None:
                note = "; ".join(n for n in (note, f"ExaBGP's last UPDATE reached the daemon at {ms(phase.exabgp)}")
                                 if n)
            if node == OURS and phase.reconciles is not None:
                note = "; ".join(n for n in (note, f"{phase.reconciles} reconciles, {phase.log_lines} log lines")
                                 if n)
            lines.append(f"| {phase.name} | {label} | {ms(arrival.last) if arrival.complete else 'INCOMPLETE'} | "
                         f"{ms(arrival.first)} | {ms(span)} | "
                         f"{ms(gone.last) if gone and gone.complete else 'INCOMPLETE'} | "
                         f"{phase.cpu.get(node, 0):.2f} | {note} |")
    lines += ["", "Medians over the repetitions:", "",
              "| mode | ours: all installed ms | BIRD: all installed ms | ours / BIRD | ours: withdrawn ms | "
              "BIRD: withdrawn ms |", "|---|---|---|---|---|---|"]
    verdicts: list[str] = []
    exabgp_share: list[str] = []
    for mode in ("together", "alone"):
        ours = [p.install[OURS] for p in phases if p.name.startswith(mode) and OURS in p.install]
        bird = [p.install[ANCHOR] for p in phases if p.name.startswith(mode) and ANCHOR in p.install]
        ours_w = [p.withdraw[OURS] for p in phases if p.name.startswith(mode) and OURS in p.withdraw]
        bird_w = [p.withdraw[ANCHOR] for p in phases if p.name.startswith(mode) and ANCHOR in p.withdraw]
        exabgp = median([p.exabgp for p in phases if p.name.startswith(mode) and OURS in p.install])
        exabgp_share.append(f"{mode} {ms(exabgp)} ms")
        o = median([a.last if a.complete else None for a in ours])
        b = median([a.last if a.complete else None for a in bird])
        incomplete = sum(not a.complete for a in ours + bird)
        ratio = f"{o / b:.1f}x" if o is not None and b else "-"
        lines.append(f"| {mode} | {ms(o)} | {ms(b)} | {ratio} | "
                     f"{ms(median([a.last if a.complete else None for a in ours_w]))} | "
                     f"{ms(median([a.last if a.complete else None for a in bird_w]))} |"
                     + (f" ({incomplete} incomplete)" if incomplete else ""))
        if o is not None and b:
            record(f"10,000 routes, {mode}", o * 1000, b * 1000)
            verdicts.append(f"{mode}: {o / b:.1f}x ({'within' if o / b <= 1.5 else 'NOT within'} 1.5x)")
    lines += ["", "Goal ours within 1.5x of BIRD: " + "; ".join(verdicts) + ".",
              "Of ours, ExaBGP alone (t0 to its last UPDATE reaching the daemon, median): " + ", ".join(exabgp_share)
              + ".",
              f"Machine: before {host_before}; after: {machine()}.",
              f"Code: {version}.",
              f"Run: {seconds:.0f} s including deploy and destroy."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def wait_setup(lab: Lab, etcd: str, work: Path) -> None:
    wait_until("node1's daemon to answer node status",
               lambda: "calico-py process is running" in lab.exec(OURS, [str(CLI), "node", "status"]).stdout,
               SETUP_TIMEOUT)
    applied = run(["ip", "netns", "exec", lab.netns(OURS), "env", f"ETCD_ENDPOINTS={etcd}", str(CLI), "apply", "-f",
                   str(work / PEERS)])
    if applied.returncode != 0:
        raise RuntimeError(f"calicoctl-py apply -f {PEERS}: {applied.stderr or applied.stdout}")

    def ours_up() -> bool:
        out = lab.exec(OURS, [str(CLI), "node", "status"]).stdout
        return any("10.0.0.50" in line and line.rstrip().endswith("Established") for line in out.splitlines())

    wait_until("node1's session to the injector", ours_up, SETUP_TIMEOUT)
    control = str(lab.run_dir / INJECTOR / "bird.ctl")
    wait_until("the injector's sessions to node1 and the receiver",
               lambda: run(["birdc", "-s", control, "show", "protocols"]).stdout.count("Established") == 2,
               SETUP_TIMEOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each phase")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the lab's logs here before destroy")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("routes: run as root (network namespaces)")
    routes = prefixes(args.routes)
    started_wall = time.strftime("%Y-%m-%d %H:%M:%S")
    host_before = machine()
    version = code_version()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="calico-py-routes-"))
    shutil.copytree(BGP_DIR, work, dirs_exist_ok=True)
    write_routes(work / ROUTES_FILE, routes)
    lab = Lab(load(work / TOPOLOGY, name_override=f"bulk{os.getpid() % 100000}"))
    monitors: dict[str, RouteMonitor] = {}
    phases: list[Phase] = []
    try:
        print(f"deploying {lab.topology.name} ...", file=sys.stderr)
        lab.deploy()
        wait_setup(lab, lab.topology.nodes[OURS].env["ETCD_ENDPOINTS"], work)
        monitors = {n: RouteMonitor(lab.netns(n), work / f"{n}.mon") for n in (OURS, ANCHOR)}
        for monitor in monitors.values():
            monitor.prove_live()
        print(f"lab up after {time.monotonic() - started:.1f}s", file=sys.stderr)
        bench = Bench(lab, monitors, set(routes))
        for rep in range(1, args.reps + 1):
            for name, protocol, nodes in ((f"together {rep}", "bulk", (OURS, ANCHOR)),
                                          (f"alone {rep}", "bulk_node1", (OURS,)),
                                          (f"alone {rep}", "bulk_receiver", (ANCHOR,))):
                phase = bench.phase(name, protocol, nodes)
                phases.append(phase)
                print(f"  {name} ({protocol}): " + ", ".join(
                    f"{n} {ms(a.last) if a.complete else 'INCOMPLETE'} ms" for n, a in phase.install.items()),
                    file=sys.stderr)
        for node, monitor in monitors.items():
            if monitor.other:
                print(f"note: ip monitor in {node} printed: {monitor.other[:3]}", file=sys.stderr)
    finally:
        for monitor in monitors.values():
            monitor.stop()
        if args.keep_logs and lab.run_dir.exists():
            shutil.copytree(lab.run_dir, args.keep_logs / lab.topology.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.ctl", "etcd", "*.sock"))
        try:
            lab.destroy()
        except Exception as exc:
            print(f"routes: destroying {lab.topology.name}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print(report(phases, args.routes, time.monotonic() - started, host_before, started_wall, version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
