"""CNI ADD / DEL latency: calico-py (shim + node daemon) vs the reference ptp + host-local, same run, same box.

Deploys bench/cni-lab.clab.yml (lab ``cnibench``: etcd + one calico-py node), waits for the node daemon, then
runs bench/cni_driver.py once inside the node's network namespace. The driver invokes each plugin as a runtime
does -- a fresh process, ``env -i`` plus CNI_*, config on stdin, one pod at a time -- and times it from spawn to
exit. Ours and the reference are interleaved pod by pod, each pod in its own network namespace (created before,
deleted after, never timed). Prints markdown tables; nothing is asserted. Exits 1 if any ADD or DEL failed (or
a check found a pod without its address, or something left behind).

Our plugin is installed as a node installs it (bgpd.cni.install): the C shim, or with ``--shim python`` the Python
fallback; the report says which.

Usage (root): .venv/bin/python bench/cni_add.py [--pods 200] [--warmup 5] [--version-calls 50] [--no-direct]
              [--shim auto|c|python]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.figures import record  # noqa: E402
from bgpd.cni.install import Installed, InstallError, Kind, install  # noqa: E402
from containerlab.lab import Lab  # noqa: E402
from containerlab.topology import load  # noqa: E402

TOPOLOGY = ROOT / "bench" / "cni-lab.clab.yml"
DRIVER = ROOT / "bench" / "cni_driver.py"
NODE = "node1"
FAST_PYTHON = Path("/usr/bin/python3")
REF_DIR = Path("/usr/lib/cni")
OURS_CONFIG = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py",
               "ipam": {"type": "calico-py-ipam"}}
ETCD = "http://172.20.90.2:2379"
READY_TIMEOUT = 60.0
NS_PREFIX = "cnib-"


def ref_config(data_dir: Path) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "ref", "type": "ptp", "ipMasq": False, "mtu": 1500,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/16"}]], "dataDir": str(data_dir)}}


def run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def namespaces() -> set[str]:
    out = run(["ip", "-j", "netns", "list"]).stdout
    return {entry["name"] for entry in json.loads(out or "[]")}


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (network namespaces)")
    for binary in (REF_DIR / "ptp", REF_DIR / "host-local"):
        if not os.access(binary, os.X_OK):
            problems.append(f"{binary} missing: apt-get install containernetworking-plugins")
    if problems:
        raise SystemExit("cni_add: " + "; ".join(problems))


def install_plugin(bin_dir: Path, kind: Kind) -> tuple[Installed, str]:
    """Our plugins as a runtime finds them, installed as a node installs them: (what went in, its description
    for the report)."""
    try:
        shim = install(bin_dir, python=str(FAST_PYTHON), kind=kind)
    except InstallError as exc:
        raise SystemExit(f"cni_add: {exc}") from None
    if shim.kind == "c":
        return shim, f"the C shim: bgpd/cni/shim.c built by bgpd.cni.install with `{shim.how}`"
    version = run([str(FAST_PYTHON), "-I", "-S", "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
    if version.returncode != 0 or not version.stdout.startswith("3.11."):
        raise SystemExit(f"cni_add: {FAST_PYTHON} must exist and be Python 3.11 (the Python shim's fast start): "
                         f"got {(version.stdout or version.stderr).strip() or 'nothing'}")
    return shim, (f"the Python shim: a copy of bgpd/cni/shim.py whose first line is `{shim.how}` "
                  f"({FAST_PYTHON} {version.stdout.strip()})")


def wait_ready(lab: Lab, bin_dir: Path) -> float:
    """Until the daemon logged "ready" and answers a CNI STATUS through the shim; returns the seconds waited."""
    log = lab.run_dir / NODE / "calico-py-node.log"
    started = time.monotonic()
    deadline = started + READY_TIMEOUT
    status = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if " ready " in text:
            result = subprocess.run(
                ["ip", "netns", "exec", lab.netns(NODE), "env", "-i", "CNI_COMMAND=STATUS",
                 f"CNI_PATH={bin_dir}", str(bin_dir / "calico-py")],
                input=json.dumps(OURS_CONFIG), capture_output=True, text=True, timeout=60, check=False)
            if result.returncode == 0:
                return time.monotonic() - started
            status = (result.stdout or result.stderr).strip()
            try:
                code = json.loads(result.stdout).get("code")
            except ValueError:
                code = None
            if code != 11:  # only "try again later" is worth waiting for
                break
        if any(p.daemon == "calico-py-node" and not p.alive() for p in lab._load_processes()):
            break
        time.sleep(0.2)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else "(no log)"
    raise SystemExit(f"cni_add: calico-py-node not ready after {time.monotonic() - started:.1f}s "
                     f"(last STATUS: {status or 'not tried'}); last lines of {log}:\n{tail}")


def make_pods(prefix: str, container_prefix: str, count: int, args: str, tag: str = "") -> list[dict[str, str]]:
    pods = []
    for n in range(count):
        name = f"pod-{tag}{n}"
        netns = f"{NS_PREFIX}{prefix}-{tag}{n}"
        pods.append({"name": name, "netns": netns, "netns_path": f"/run/netns/{netns}",
                     "container_id": f"{container_prefix}-{tag}{n:04d}",
                     "args": args.format(pod=name, id=f"{container_prefix}-{tag}{n:04d}")})
    return pods


def plan_for(args: argparse.Namespace, bin_dir: Path, data_dir: Path, node_links: list[str]) -> dict[str, Any]:
    ours_args = "K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod}"
    # containerd's CNI_ARGS for every plugin; host-local refuses unknown keys without IgnoreUnknown=1
    ref_args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={id}"
    ours_main = make_pods("pod", "cnibench-ours", args.pods, ours_args)
    ours_direct = [dict(pod, container_id=pod["container_id"].replace("ours", "direct"))
                   for pod in ours_main]
    plugins = {
        "ours": {"binary": str(bin_dir / "calico-py"), "cni_path": str(bin_dir), "ifname": "eth0",
                 "plugin": "calico-py", "stdin": json.dumps(OURS_CONFIG),
                 "pods": {"main": ours_main, "warmup": make_pods("pod", "cnibench-ours", args.warmup,
                                                                 ours_args, "w"),
                          "direct": ours_direct}},
        "ref": {"binary": str(REF_DIR / "ptp"), "cni_path": str(REF_DIR), "ifname": "eth0", "plugin": "ptp",
                "stdin": json.dumps(ref_config(data_dir)),
                "pods": {"main": make_pods("ref", "cnibench-ref", args.pods, ref_args),
                         "warmup": make_pods("ref", "cnibench-ref", args.warmup, ref_args, "w")}},
    }
    if args.only:
        plugins = {args.only: plugins[args.only]}
    return {"pods": args.pods, "warmup": args.warmup, "version_calls": args.version_calls,
            "direct": args.direct and "ours" in plugins, "node_links": node_links, "plugins": plugins}


def pod_namespaces(plan: dict[str, Any]) -> list[str]:
    names = {pod["netns"] for plugin in plan["plugins"].values() for pods in plugin["pods"].values() for pod in pods}
    return sorted(names)


def create_namespaces(names: list[str]) -> list[str]:
    created = []
    for name in names:
        result = run(["ip", "netns", "add", name])
        if result.returncode != 0:
            raise RuntimeError(f"ip netns add {name}: {result.stderr.strip()}")
        created.append(name)
    return created


def delete_namespaces(names: list[str]) -> list[str]:
    for name in names:
        run(["ip", "netns", "del", name])
    return sorted(set(names) & namespaces())


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (linear interpolation between closest ranks), in milliseconds."""
    data = sorted(values)
    if len(data) == 1:
        return data[0] * 1000
    return statistics.quantiles(data, n=100, method="inclusive")[q - 1] * 1000


def stats(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples) * 1000, pct(samples, 99)


def leftovers(lab: Lab, data_dir: Path, node_links: list[str]) -> list[str]:
    """What the plugins left behind after every DEL: node interfaces, IPAM handles / endpoints, host-local leases."""
    found = []
    links = json.loads(run(["ip", "-j", "-n", lab.netns(NODE), "link", "show"]).stdout or "[]")
    extra = [link["ifname"] for link in links if link["ifname"] not in node_links]
    if extra:
        found.append(f"node interfaces left: {', '.join(extra[:10])} ({len(extra)})")
    routes = json.loads(run(["ip", "-j", "-n", lab.netns(NODE), "route", "show", "proto", "80"]).stdout or "[]")
    unicast = [r["dst"] for r in routes if r.get("type", "unicast") == "unicast"]  # a block's blackhole stays
    if unicast:
        found.append(f"proto 80 routes left in the node: {', '.join(unicast[:10])} ({len(unicast)})")
    for prefix in ("/calico/ipam/v2/handle/", "/calico/resources/v3/projectcalico.org/workloadendpoints/"):
        result = run(["ip", "netns", "exec", lab.netns(NODE), "etcdctl", f"--endpoints={ETCD}", "get", "--prefix",
                      "--keys-only", prefix])
        keys = [k for k in result.stdout.split() if k.startswith(prefix)]
        if result.returncode != 0:
            found.append(f"etcdctl get {prefix}: {result.stderr.strip()}")
        elif keys:
            found.append(f"etcd keys left under {prefix}: {len(keys)} (e.g. {keys[0]})")
    leases = [p.name for p in (data_dir / "ref").glob("*") if p.name not in ("lock",) and not
              p.name.startswith("last_reserved_ip")] if (data_dir / "ref").exists() else []
    if leases:
        found.append(f"host-local leases left: {len(leases)} (e.g. {leases[0]})")
    return found


def daemon_log_lines(lab: Lab) -> tuple[list[str], dict[str, int]]:
    """Warnings and errors of the daemon, and how often the reconciler changed a pod's /32: ADD makes the route
    and DEL takes it away with the veth, so every such change is the reconciler racing a CNI request."""
    log = lab.run_dir / NODE / "calico-py-node.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    notable = [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    pod_route = "RouteSpec(dst='10.244."
    counts = {"cni ADD": sum(" cni ADD " in line for line in lines),
              "cni DEL": sum(" cni DEL " in line for line in lines),
              "route added": sum(" route added " + pod_route in line and "/32'" in line for line in lines),
              "route removed": sum(" route removed " + pod_route in line and "/32'" in line for line in lines)}
    return notable, counts


def cpu_seconds(lab: Lab) -> dict[str, float]:
    """CPU time (user + system, all threads) used so far by each daemon of the lab."""
    used = {}
    for process in lab._load_processes():
        try:
            stat = Path(f"/proc/{process.pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        used[process.daemon] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def code_version() -> str:
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip() or "unknown"
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    return commit + (" + uncommitted changes" if dirty else "")


def fmt(value: float) -> str:
    return f"{value:.2f}"


def report(args: argparse.Namespace, result: dict[str, Any], bin_dir: Path, data_dir: Path, lab: Lab,
           ready_s: float, run_s: float, cpu: dict[str, float], shim: Installed, shim_text: str) -> None:
    samples = result["samples"]
    node_ns = lab.netns(NODE)
    print(f"# CNI ADD / DEL latency ({datetime.datetime.now().isoformat(timespec='seconds')})\n")
    print(f"- cores (os.cpu_count()): {os.cpu_count()}; kernel {platform.release()}; "
          f"code at commit {code_version()}")
    mix = (f"{args.only} ALONE (diagnostic)" if args.only else
           "ours and the reference interleaved pod by pod (even pods ours first)")
    print(f"- pods: {args.pods} per plugin, one at a time (sequential), {mix}; {args.warmup} warm-up pods per "
          "plugin not counted; all ADDs, then all DELs (so up to 2 x pods attached at once)")
    print("- timing: wall time of the plugin process, spawn to exit (time.perf_counter around subprocess.run, "
          f"stdin piped, stdout captured), measured by bench/cni_driver.py running inside {node_ns}")
    print(f"- daemon ready {ready_s:.1f}s after deploy; timing run (all phases) {run_s:.1f}s wall, CPU used meanwhile: "
          + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in sorted(cpu.items())) + "\n")
    print("How each plugin was invoked (inside the node namespace; env is exactly the CNI_* variables, as env -i):\n")
    print(f"- **calico-py**: `{bin_dir}/calico-py` ({shim_text}), "
          f"CNI_COMMAND=ADD|DEL CNI_CONTAINERID=cnibench-ours-NNNN CNI_NETNS=/run/netns/cnib-pod-N CNI_IFNAME=eth0 "
          f"CNI_ARGS=\"K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-N\" CNI_PATH={bin_dir}; stdin "
          f"`{json.dumps(OURS_CONFIG)}`; the shim forwards to calico-py-node on @calico-py-cni (etcd "
          f"{ETCD}, IPAM + WorkloadEndpoint in etcd, veth + proxy ARP + /32 route)")
    print(f"- **ptp + host-local** (containernetworking-plugins "
          f"{run(['dpkg-query', '-W', '-f', '${Version}', 'containernetworking-plugins']).stdout.strip()}): "
          f"`{REF_DIR}/ptp`, CNI_CONTAINERID=cnibench-ref-NNNN CNI_NETNS=/run/netns/cnib-ref-N CNI_IFNAME=eth0 "
          f"CNI_ARGS=\"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-N;K8S_POD_INFRA_CONTAINER_ID=...\" "
          f"CNI_PATH={REF_DIR}; stdin `{json.dumps(ref_config(data_dir))}` (ptp execs host-local from CNI_PATH)")
    print()

    ours, ref = samples.get("main:ours", {}), samples.get("main:ref", {})
    print("| plugin | ADD p50 | ADD p99 | DEL p50 | DEL p99 |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for label, data in (("calico-py", ours), ("ptp + host-local", ref)):
        if data.get("ADD") and data.get("DEL"):
            rows[label] = (*stats(data["ADD"]), *stats(data["DEL"]))
            print(f"| {label} | " + " | ".join(fmt(v) for v in rows[label]) + " |")
    if len(rows) == 2:
        a, b = rows["calico-py"], rows["ptp + host-local"]
        for (command, rank), x, y in zip((("ADD", 50), ("ADD", 99), ("DEL", 50), ("DEL", 99)), a, b, strict=True):
            record(f"CNI {command} p{rank}", x, y)
        print("| ratio ours/reference | " + " | ".join(f"{x / y:.2f}x" for x, y in zip(a, b, strict=True)) + " |")
    failed = sum(f["phase"] == "main" for f in result["failures"])
    print(f"\n(ms; n = {len(ours.get('ADD', []))} / {len(ref.get('ADD', []))} ADDs, "
          f"{len(ours.get('DEL', []))} / {len(ref.get('DEL', []))} DELs"
          + (f"; {failed} of them FAILED, their times included" if failed else "") + ")\n")

    quarters = [(q * args.pods // 4, (q + 1) * args.pods // 4) for q in range(4)]
    if args.pods >= 8 and all(len(d.get(c, [])) == args.pods for d in (ours, ref) for c in ("ADD", "DEL")):
        print("p50 by pod (ms), to show how the cost grows with the pods attached (ADD k attaches pod k of each "
              "plugin; DEL k runs with pods k..n of each still attached):\n")
        print("| pods | calico-py ADD | ptp ADD | calico-py DEL | ptp DEL |")
        print("|---|---:|---:|---:|---:|")
        for low, high in quarters:
            print(f"| {low + 1}-{high} | " + " | ".join(fmt(statistics.median(d[c][low:high]) * 1000)
                                                       for c in ("ADD", "DEL") for d in (ours, ref)) + " |")
        print()

    extra = []
    start = "process start" if shim.kind == "c" else "interpreter start"
    for key, label in (("version:ours", f"calico-py VERSION ({shim.name} only: {start} + exit)"),
                       ("version:ref", "ptp VERSION (Go binary start + exit)")):
        if samples.get(key, {}).get("VERSION"):
            p50, p99 = stats(samples[key]["VERSION"])
            extra.append(f"| {label} | {fmt(p50)} | {fmt(p99)} | | |")
    direct = samples.get("direct:ours", {})
    if direct.get("ADD") and direct.get("DEL"):
        values = (*stats(direct["ADD"]), *stats(direct["DEL"]))
        extra.append("| calico-py daemon only (request straight to @calico-py-cni, no process) | "
                     + " | ".join(fmt(v) for v in values) + " |")
    if extra:
        print("Where the time goes (ms; VERSION in the ADD columns):\n")
        print("| what | ADD p50 | ADD p99 | DEL p50 | DEL p99 |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(extra))
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=200, help="pods per plugin (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up pods per plugin, not counted (default 5)")
    parser.add_argument("--version-calls", type=int, default=50,
                        help="VERSION calls per plugin for the process floor (default 50, 0 to skip)")
    parser.add_argument("--no-direct", dest="direct", action="store_false",
                        help="skip the daemon-only phase (ours, straight to the socket)")
    parser.add_argument("--only", choices=("ours", "ref"), help="time one plugin alone (a diagnostic: the "
                        "table then has one row)")
    parser.add_argument("--save-log", metavar="PATH", help="copy the daemon's log here before the lab goes")
    parser.add_argument("--shim", choices=("auto", "c", "python"), default="auto",
                        help="which calico-py plugin to install (default auto: the C shim where it builds)")
    args = parser.parse_args()
    if args.pods < 1:
        parser.error("--pods must be at least 1")
    preflight()
    stale = sorted(n for n in namespaces() if n.startswith(NS_PREFIX))
    if stale:
        print(f"cni_add: deleting {len(stale)} namespaces left by an earlier run ({stale[0]}, ...)", file=sys.stderr)
        delete_namespaces(stale)

    work = Path(tempfile.mkdtemp(prefix="cni-bench-"))
    work.chmod(0o755)
    bin_dir, data_dir = work / "bin", work / "host-local"
    bin_dir.mkdir()
    data_dir.mkdir()
    try:
        shim, shim_text = install_plugin(bin_dir, args.shim)
    except SystemExit:
        shutil.rmtree(work, ignore_errors=True)
        raise
    lab = Lab(load(TOPOLOGY))
    created: list[str] = []
    failed = False
    try:
        print(f"cni_add: deploying {TOPOLOGY.name}", file=sys.stderr)
        lab.deploy()
        ready_s = wait_ready(lab, bin_dir)
        node_links = [link["ifname"] for link in
                      json.loads(run(["ip", "-j", "-n", lab.netns(NODE), "link", "show"]).stdout or "[]")]
        plan = plan_for(args, bin_dir, data_dir, node_links)
        (work / "plan.json").write_text(json.dumps(plan))
        print(f"cni_add: creating {len(pod_namespaces(plan))} pod namespaces", file=sys.stderr)
        created = create_namespaces(pod_namespaces(plan))
        cpu_before = cpu_seconds(lab)
        started = time.monotonic()
        driver = subprocess.run(["ip", "netns", "exec", lab.netns(NODE), sys.executable, str(DRIVER),
                                 str(work / "plan.json")], stdout=subprocess.PIPE, text=True, check=False)
        run_s = time.monotonic() - started
        cpu = {name: seconds - cpu_before.get(name, 0.0) for name, seconds in cpu_seconds(lab).items()}
        if driver.returncode != 0:
            print(f"cni_add: the driver exited {driver.returncode}", file=sys.stderr)
            return 1
        result = json.loads(driver.stdout)
        report(args, result, bin_dir, data_dir, lab, ready_s, run_s, cpu, shim, shim_text)
        left = leftovers(lab, data_dir, node_links)
        notable, counts = daemon_log_lines(lab)
        print(f"Daemon log: {counts['cni ADD']} `cni ADD` and {counts['cni DEL']} `cni DEL` lines, "
              f"{len(notable)} warnings/errors; the reconciler added {counts['route added']} and removed "
              f"{counts['route removed']} pod /32 routes itself" + (":" if notable else "."))
        for line in notable[:20]:
            print(f"    {line}")
        if args.save_log:
            shutil.copyfile(lab.run_dir / NODE / "calico-py-node.log", args.save_log)
            print(f"(daemon log saved to {args.save_log})")
        for failure in result["failures"]:
            failed = True
            print(f"\nFAILED {failure['phase']} {failure['plugin']} {failure['command']} {failure['pod']} "
                  f"(exit {failure['exit']}, {failure['seconds'] * 1000:.1f} ms): {failure['stdout']} "
                  f"{failure['stderr']}")
        for problem in result["problems"] + left:
            failed = True
            print(f"\nPROBLEM {problem}")
        if not result["failures"]:
            print("\nEvery ADD and DEL succeeded.")
        return 1 if failed else 0
    finally:
        left_ns = delete_namespaces(created)
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)
        mine = sorted(n for n in namespaces() if n.startswith((NS_PREFIX, "clab-cnibench")))
        if left_ns or mine:
            print(f"cni_add: namespaces still present: {', '.join(mine)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
