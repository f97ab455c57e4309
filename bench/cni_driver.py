"""The timing loop of bench/cni_add.py, run INSIDE the node's network namespace (the standard library, and the
shim's own request function for the "direct" phase).

bench/cni_add.py starts it once with ``ip netns exec <node ns> python bench/cni_driver.py PLAN.json`` so that
nothing of ``ip netns exec`` (it remounts /sys) is in the timed work. Every plugin invocation is a fresh
process with an empty environment except the CNI_* variables (as ``env -i`` gives), the network configuration
on stdin, and is timed from spawn to exit with time.perf_counter, the way a runtime sees it.

Phases, plugins interleaved pod by pod (even pods ours first, odd pods the reference first):
  version   VERSION calls: the process floor (spawn, interpreter or Go runtime start, exit), no daemon work;
  warm-up   ADD + DEL of a few pods per plugin, not counted;
  add       ADD of every pod, then (untimed) a check that each pod's interface holds the address returned;
  del       DEL of every pod, then (untimed) a check that the pods' and the node's interfaces are gone;
  direct    ours only: the same ADD / DEL requests written straight to the daemon's socket, no process (the
            daemon's share of the latency, seen from the client).
Writes one JSON document to stdout; progress and problems to stderr. Exits 0 even when invocations failed (the
caller reports them and decides).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bgpd.cni.shim import exchange

TIMEOUT = 200.0  # seconds; beyond the shim's own 150 s socket timeout
MAX_FAILURES = 10  # stop starting new pods after this many failed ADDs (DEL still runs for what was tried)


def invoke(plugin: dict[str, Any], env: dict[str, str]) -> tuple[float, int, str, str]:
    """Run the plugin once: (seconds from spawn to exit, exit code, stdout, stderr)."""
    stdin = plugin["stdin"].encode()
    start = time.perf_counter()
    try:
        proc = subprocess.run([plugin["binary"]], input=stdin, env=env, capture_output=True, timeout=TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        return time.perf_counter() - start, -1, "", f"timed out after {exc.timeout:g}s"
    elapsed = time.perf_counter() - start
    return elapsed, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def direct(plugin: dict[str, Any], env: dict[str, str]) -> tuple[float, int, str, str]:
    """The shim's request, written to the daemon's socket by this process: (seconds, exit code, stdout, error)."""
    stdin = plugin["stdin"].encode()
    start = time.perf_counter()
    try:
        code, stdout = exchange(plugin["plugin"], env, stdin)
    except (OSError, ValueError) as exc:
        return time.perf_counter() - start, -1, "", f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - start, code, stdout.decode(errors="replace"), ""


def environment(plugin: dict[str, Any], command: str, pod: dict[str, str] | None) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_PATH": plugin["cni_path"]}
    if pod is not None:
        env.update({"CNI_CONTAINERID": pod["container_id"], "CNI_NETNS": pod["netns_path"],
                    "CNI_IFNAME": plugin["ifname"], "CNI_ARGS": pod["args"]})
    return env


def ip_json(*argv: str) -> Any:
    result = subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout or "[]")


def addresses_of(add_stdout: str) -> list[str]:
    try:
        return [ip["address"].split("/")[0] for ip in json.loads(add_stdout).get("ips", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        return []


class Driver:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.plugins: dict[str, dict[str, Any]] = plan["plugins"]
        self.failures: list[dict[str, Any]] = []
        self.problems: list[str] = []  # checks (not invocations) that found something wrong
        self.samples: dict[str, dict[str, list[float]]] = {}

    def record(self, phase: str, key: str, command: str, pod: dict[str, str] | None,
               outcome: tuple[float, int, str, str]) -> bool:
        elapsed, code, out, err = outcome
        self.samples.setdefault(f"{phase}:{key}", {}).setdefault(command, []).append(elapsed)
        if code != 0:
            self.failures.append({"phase": phase, "plugin": key, "command": command,
                                  "pod": pod["name"] if pod else None, "exit": code, "seconds": elapsed,
                                  "stdout": out.strip()[:2000], "stderr": err.strip()[:2000]})
            print(f"cni_driver: {phase} {key} {command} {pod['name'] if pod else ''} failed (exit {code}): "
                  f"{(out or err).strip()[:300]}", file=sys.stderr)
        return code == 0

    def version_floor(self, count: int) -> None:
        for i in range(count):
            for key in self._order(i):
                plugin = self.plugins[key]
                self.record("version", key, "VERSION", None, invoke(plugin, environment(plugin, "VERSION", None)))

    def _order(self, i: int) -> list[str]:
        keys = list(self.plugins)
        return keys if i % 2 == 0 else keys[::-1]

    def add_del(self, phase: str, count: int, check: bool) -> dict[str, dict[str, list[str]]]:
        added: dict[str, dict[str, list[str]]] = {key: {} for key in self.plugins}
        tried = 0
        for i in range(count):
            if len([f for f in self.failures if f["command"] == "ADD"]) >= MAX_FAILURES:
                print(f"cni_driver: {MAX_FAILURES} ADDs failed; not starting more pods", file=sys.stderr)
                break
            tried = i + 1
            for key in self._order(i):
                plugin = self.plugins[key]
                pod = plugin["pods"][phase][i]
                outcome = invoke(plugin, environment(plugin, "ADD", pod))
                if self.record(phase, key, "ADD", pod, outcome):
                    added[key][pod["name"]] = addresses_of(outcome[2])
        if check:
            self.check_added(phase, tried, added)
        for i in range(tried):
            for key in self._order(i):
                plugin = self.plugins[key]
                pod = plugin["pods"][phase][i]
                self.record(phase, key, "DEL", pod, invoke(plugin, environment(plugin, "DEL", pod)))
        if check:
            self.check_deleted(phase, tried)
        return added

    def check_added(self, phase: str, tried: int, added: dict[str, dict[str, list[str]]]) -> None:
        for key, plugin in self.plugins.items():
            seen: dict[str, str] = {}
            for pod in plugin["pods"][phase][:tried]:
                if pod["name"] not in added[key]:
                    continue
                want = added[key][pod["name"]]
                if not want:
                    self.problems.append(f"{key} ADD {pod['name']}: the result names no address")
                for address in want:
                    if address in seen:
                        self.problems.append(f"{key} ADD {pod['name']}: address {address} was also given to "
                                             f"{seen[address]}")
                    seen[address] = pod["name"]
                links = ip_json("-n", pod["netns"], "addr", "show", "dev", plugin["ifname"])
                have = {a["local"] for link in links or [] for a in link.get("addr_info", [])}
                if links is None:
                    self.problems.append(f"{key} ADD {pod['name']}: no {plugin['ifname']} in {pod['netns']}")
                elif not set(want) <= have:
                    self.problems.append(f"{key} ADD {pod['name']}: {plugin['ifname']} holds {sorted(have)}, "
                                         f"the result said {want}")

    def check_deleted(self, phase: str, tried: int) -> None:
        for key, plugin in self.plugins.items():
            for pod in plugin["pods"][phase][:tried]:
                if ip_json("-n", pod["netns"], "link", "show", "dev", plugin["ifname"]) is not None:
                    self.problems.append(f"{key} DEL {pod['name']}: {plugin['ifname']} still in {pod['netns']}")
        left = [link["ifname"] for link in ip_json("link", "show") or []
                if link["ifname"] not in self.plan["node_links"]]
        if left:
            self.problems.append(f"after {phase} DEL the node still has {len(left)} pod interfaces: "
                                 f"{', '.join(left[:10])}")

    def direct_phase(self, key: str, count: int) -> None:
        plugin = self.plugins[key]
        for i in range(count):
            pod = plugin["pods"]["direct"][i]
            self.record("direct", key, "ADD", pod, direct(plugin, environment(plugin, "ADD", pod)))
        for i in range(count):
            pod = plugin["pods"]["direct"][i]
            self.record("direct", key, "DEL", pod, direct(plugin, environment(plugin, "DEL", pod)))


def main() -> int:
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    driver = Driver(plan)
    started = time.monotonic()
    driver.version_floor(plan["version_calls"])
    driver.add_del("warmup", plan["warmup"], check=False)
    driver.samples.pop("warmup:ours", None)
    driver.samples.pop("warmup:ref", None)
    print(f"cni_driver: timing {plan['pods']} pods per plugin", file=sys.stderr)
    driver.add_del("main", plan["pods"], check=True)
    if plan["direct"]:
        driver.direct_phase("ours", plan["pods"])
    json.dump({"samples": driver.samples, "failures": driver.failures, "problems": driver.problems,
               "seconds": time.monotonic() - started}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
