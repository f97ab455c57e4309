"""Full-mesh scale: N nodes on one LAN, ours (calico-py-node + ExaBGP per node) against a BIRD full mesh of the
same shape (the anchor), N = 8, 16, 32 (as memory allows) in one run.

Per N and path: seconds from the start of deploy until every node has an Established session to every other
(ours: each daemon's status socket; BIRD: birdc), then until every node has a route to every other node's block
in its kernel. Ours gets its blocks from one pod per node made through the CNI plugin right after its sessions
are up (each node claims a block; the pods' time is inside the figure); BIRD's blocks are static blackholes in
its configuration from the start. Then the resident memory (VmRSS) per node of everything in its namespace
(our daemon + ExaBGP + its relay; bird) and the idle CPU over ``--idle`` seconds.

Usage (root): .venv/bin/python bench/scale.py [--sizes 8,16,32] [--idle 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import bird_established, code_version, machine, run  # noqa: E402

from bench.figures import record  # noqa: E402
from bgpd.cni.install import install  # noqa: E402
from containerlab.lab import Lab  # noqa: E402
from containerlab.netns import namespace_pids  # noqa: E402
from containerlab.topology import load  # noqa: E402

TIMEOUT = 300.0
STATUS = ("import json, socket\n"
          "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(5)\n"
          "try:\n"
          "    s.connect('\\0calico-py-status'); data = b''\n"
          "    while chunk := s.recv(65536): data += chunk\n"
          "    print(sum(p['state'] == 'up' for p in json.loads(data).get('peers', [])))\n"
          "except OSError:\n"
          "    print(0)\n")
CONF = '{"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py", "ipam": {"type": "calico-py-ipam"}}'


def address(i: int) -> str:
    return f"10.0.9.{10 + i}"


def topology(name: str, size: int, bird: bool, work: Path) -> Path:
    lines = [f"name: {name}", "mgmt:", f"  network: {name}-mgmt", "  ipv4-subnet: 172.20.96.0/24",
             "topology:", "  nodes:", "    lan:", "      kind: bridge"]
    if not bird:
        lines += ["    etcd:", "      kind: linux", "      image: quay.io/coreos/etcd:v3.4.23",
                  "      mgmt-ipv4: 172.20.96.2"]
    for i in range(1, size + 1):
        node = f"node{i}"
        if bird:
            (work / f"{node}.conf").write_text(bird_config(i, size))
            lines += [f"    {node}:", "      kind: linux", "      image: ghcr.io/calico-py/bird2:latest",
                      "      binds:", f"        - {node}.conf:/etc/bird/bird.conf:ro",
                      "      exec:", f"        - ip addr add {address(i)}/24 dev eth1"]
        else:
            lines += [f"    {node}:", "      kind: linux", "      image: ghcr.io/calico-py/calico-py-node:latest",
                      "      env:", f"        NODENAME: {node}", f"        IP: {address(i)}",
                      "        ETCD_ENDPOINTS: http://172.20.96.2:2379", "        CALICO_IPV4POOL_CIDR: 10.244.0.0/16",
                      "        CALICO_NETWORKING_BACKEND: bird",
                      "      exec:", f"        - ip addr add {address(i)}/24 dev eth1",
                      "        - ip route add default dev eth1 metric 4096"]
    lines += ["  links:"] + [f'    - endpoints: ["node{i}:eth1", "lan:eth{i}"]' for i in range(1, size + 1)]
    path = work / f"{name}.clab.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bird_config(i: int, size: int) -> str:
    peers = "\n".join(f"protocol bgp node{j} from mesh {{ neighbor {address(j)} as 64512; }}"
                      for j in range(1, size + 1) if j != i)
    return (f"router id {address(i)};\nprotocol device {{}}\n"
            "protocol kernel { ipv4 { import none; export all; }; }\n"
            f"protocol static {{ ipv4; route 10.200.{i}.0/26 blackhole; }}\n"
            f"template bgp mesh {{ local {address(i)} as 64512; direct; connect retry time 2;\n"
            f"  ipv4 {{ import all; export all; }}; }}\n{peers}\n")


def remote_routes(lab: Lab, node: str, proto: str) -> int:
    out = lab.exec(node, ["ip", "route", "show", "proto", proto]).stdout
    return sum(1 for line in out.splitlines() if " via " in line)


def ours_established(lab: Lab, node: str) -> int:
    out = lab.exec(node, [sys.executable, "-I", "-S", "-c", STATUS]).stdout.strip()
    return int(out) if out.isdigit() else 0


def wait_all(lab: Lab, nodes: list[str], count: callable, wanted: int, t0: float) -> float | None:  # type: ignore[valid-type]
    """Seconds until every node counts ``wanted``; None if some still do not after TIMEOUT (then reported, with how
    many did: not converging is a finding, not a failure of the benchmark)."""
    pending = set(nodes)
    deadline = time.monotonic() + TIMEOUT
    while pending:
        pending = {n for n in pending if count(lab, n) < wanted}
        if pending and time.monotonic() > deadline:
            print(f"  {len(nodes) - len(pending)}/{len(nodes)} nodes complete after {TIMEOUT:.0f}s; short: "
                  f"{sorted(pending)[:8]}", file=sys.stderr)
            return None
    return time.monotonic() - t0


def rss_and_cpu(lab: Lab, nodes: list[str], idle: float) -> tuple[float, float]:
    """Median VmRSS (MiB) per node of its namespace's processes, and their CPU share (% of one core) over idle."""
    def sample() -> dict[str, tuple[float, float]]:
        out = {}
        for node in nodes:
            rss = cpu = 0.0
            for pid in namespace_pids(lab.netns(node)):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                rss += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
                cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            out[node] = (rss / 1024, cpu)
        return out
    before = sample()
    time.sleep(idle)  # a measurement window, not synchronisation
    after = sample()
    rss = sorted(after[n][0] for n in nodes)
    cpu = sorted((after[n][1] - before[n][1]) / idle * 100 for n in nodes)
    return rss[len(rss) // 2], cpu[len(cpu) // 2]


def seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else f"not within {TIMEOUT:.0f}"


def ratio(ours: float | None, anchor: float | None) -> str:
    return f"{ours / anchor:.1f}x" if ours is not None and anchor else "-"


@dataclass
class Result:
    size: int
    path: str
    sessions: float | None  # None: not every node got there within TIMEOUT
    routes: float | None
    rss_mib: float
    cpu_pct: float


ARP_LIMIT = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")


def arp_room(size: int) -> str | None:
    """Why ``size`` nodes cannot run here, or None. The kernel's ARP table is one table for every network
    namespace, capped by the host's gc_thresh3 (1024 by default; only the host namespace can change it): a
    full mesh needs about N*(N-1) entries plus the management network's, and past the cap new neighbours are
    refused ("neighbor table overflow") and sessions never start. This benchmark does not change the host."""
    limit = int(ARP_LIMIT.read_text())
    needed = size * (size - 1) + 4 * size
    return None if needed <= limit else (f"needs about {needed} ARP entries; the host's shared ARP table holds "
                                         f"{limit} (net.ipv4.neigh.default.gc_thresh3)")


def measure(size: int, bird: bool, work: Path, bin_dir: Path, idle: float) -> Result:
    name = f"scale{'b' if bird else 'c'}{size}"
    lab = Lab(load(topology(name, size, bird, work)))
    nodes = [f"node{i}" for i in range(1, size + 1)]
    try:
        t0 = time.monotonic()
        lab.deploy()
        if bird:
            sessions = wait_all(lab, nodes, bird_established, size - 1, t0)
            routes = wait_all(lab, nodes, lambda lab, n: remote_routes(lab, n, "bird"), size - 1, t0)
        else:
            sessions = wait_all(lab, nodes, ours_established, size - 1, t0)
            # One pod per node: each claims a block, which the others must route to.
            for node in nodes if sessions is not None else []:
                ns = f"{name}-pod-{node}"
                run(["ip", "netns", "add", ns])
                env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"scale-{node}", "CNI_NETNS": f"/run/netns/{ns}",
                       "CNI_IFNAME": "eth0", "CNI_ARGS": f"K8S_POD_NAMESPACE=scale;K8S_POD_NAME={node}",
                       "CNI_PATH": str(bin_dir)}
                added = subprocess.run(["ip", "netns", "exec", lab.netns(node), "env", "-i",
                                        *[f"{k}={v}" for k, v in env.items()], str(bin_dir / "calico-py")],
                                       input=CONF, capture_output=True, text=True, timeout=60, check=False)
                if added.returncode != 0:
                    raise RuntimeError(f"CNI ADD on {node}: {added.stdout} {added.stderr}")
            routes = wait_all(lab, nodes, lambda lab, n: remote_routes(lab, n, "80"), size - 1, t0) \
                if sessions is not None else None
        rss, cpu = rss_and_cpu(lab, nodes, idle)
        return Result(size, "BIRD" if bird else "ours", sessions, routes, rss, cpu)
    finally:
        lab.destroy()
        for node in nodes:
            run(["ip", "netns", "del", f"{name}-pod-{node}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("scale: run as root (network namespaces)")
    host = machine()
    results = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = Path(tmp)
        bin_dir = work / "bin"
        installed = install(bin_dir)
        for size in (int(s) for s in args.sizes.split(",")):
            if (reason := arp_room(size)) is not None:
                skipped.append(f"{size} nodes not run: {reason}")
                print(f"  {skipped[-1]}", file=sys.stderr)
                continue
            for bird in (False, True):
                result = measure(size, bird, work, bin_dir, args.idle)
                print(f"  {size} nodes, {result.path}: sessions {seconds(result.sessions)}, routes "
                      f"{seconds(result.routes)}, RSS {result.rss_mib:.0f} MiB/node, idle CPU {result.cpu_pct:.1f}%",
                      file=sys.stderr)
                results.append(result)
        shutil.rmtree(bin_dir, ignore_errors=True)
    print("## Full-mesh scale: ours vs a BIRD full mesh\n")
    print("| nodes | path | all sessions Established s | all block routes installed s | RSS per node MiB | "
          "idle CPU per node % of a core |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.size} | {r.path} | {seconds(r.sessions)} | {seconds(r.routes)} | {r.rss_mib:.0f} | "
              f"{r.cpu_pct:.1f} |")
    print("\nRatios ours / BIRD:\n")
    for size in sorted({r.size for r in results}):
        ours = next(r for r in results if r.size == size and r.path == "ours")
        bird = next(r for r in results if r.size == size and r.path == "BIRD")
        if ours.routes and bird.routes:
            record(f"mesh {size} routes", ours.routes, bird.routes, unit="s")
        print(f"- {size} nodes: sessions {ratio(ours.sessions, bird.sessions)}, "
              f"routes {ratio(ours.routes, bird.routes)}, RSS {ours.rss_mib / bird.rss_mib:.0f}x")
    for line in skipped:
        print(f"- {line}")
    print(f"\nOurs: {installed}; one pod per node made after the sessions are up (inside the routes figure). "
          f"Polling: every node in turn, so the resolution grows with N. BIRD waits its default connect delay "
          f"(5 s) before a first session.\nMachine: {host}. Code: {code_version()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
