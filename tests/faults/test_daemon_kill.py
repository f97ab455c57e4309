"""The node daemon killed with SIGKILL at a random point of a storm of concurrent CNI ADDs, again and again.

One mesh3 lab; node1's runtime (the real shim, ``Runtime``) starts a storm of concurrent ADDs, and a timer kills
node1's calico-py-node by the PID the lab recorded at a random moment of the storm. While the daemon is down an
ADD must fail at once with a clear CNI error. The lab restarts the daemon; the runtime, as kubelet does, sends a
DEL for every ADD that failed, except in every third run, where it behaves as a runtime that lost track of its
failed sandboxes: no DEL, a CNI GC with the attachments it still has instead (what the daemon's start-up sweep
and GC must clean up).

After every run, over every pod of every run so far: each pod whose ADD succeeded holds its address in IPAM
under its own handle, its endpoint, its veth and its host route, and reaches a pod on node2; nothing else is
left on node1 (no veth, route, endpoint or address of a failed ADD); no address was given twice;
``calicoctl-py ipam check`` finds nothing. A ping from a node1 pod to node2's pod runs throughout: a daemon
crash must not stop the forwarding of pods already running.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bgpd.dataplane.workloads import host_interface_name
from tests.lab.bgp import CLI, mesh3, place_pods
from tests.lab.cni import (
    CONF,
    ETCD,
    NETWORK,
    NODE,
    PATH,
    Call,
    Pods,
    Runtime,
    cali_links,
    cni_bin_dir,
    host_routes,
    in_ns,
)
from tests.lab.daemon import daemon_log, restart_daemon, stop_daemon
from tests.lab.handle import Deployer, LabHandle
from tests.lab.report import FaultRecord
from tests.lab.traffic import Pinger, pod_ping

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="fault tests need root (network namespaces)"),
              pytest.mark.slow]
RUNS = int(os.environ.get("DAEMON_KILL_RUNS", "20"))  # fewer for a quick look; the fault's promise is 20
STORM = 10  # concurrent ADDs per run
SEED = int(os.environ.get("DAEMON_KILL_SEED", str(time.time_ns() % 1_000_000)))
FAIL_FAST_SECONDS = 2.0  # an ADD with no daemon to answer it: the shim's connect is refused, no waiting
RESTART_DEADLINE = 60.0
POD_NAMESPACE = "cnitest"  # Runtime's default K8S_POD_NAMESPACE

# Run inside node1 (etcd answers on the lab's management network only): who holds which address, and the
# endpoints of every node.
IPAM_SNAPSHOT = """
import asyncio, json
from ipam import check, keys
from ipam.datastore import Datastore, EtcdConfig

async def main():
    async with Datastore(EtcdConfig.from_env()) as store:
        state = await check.load_state(store)
        weps = [kv.json() for kv in await store.get_prefix(keys.resource_prefix("workloadendpoints"))]
    held = {}
    for block, _ in state.blocks.values():
        for ordinal, index in enumerate(block.allocations):
            if index is not None:
                held.setdefault(str(block.address(ordinal)), []).append(block.attributes[index].handle_id)
    print(json.dumps({"held": held, "weps": [{"node": w["spec"]["node"], "containerID": w["spec"]["containerID"],
                      "interface": w["spec"]["interfaceName"], "ips": w["spec"]["ipNetworks"]} for w in weps]}))

asyncio.run(main())
"""


@dataclass(frozen=True)
class Pod:
    container_id: str
    netns: str
    address: str
    host_if: str


def ipam_snapshot(handle: LabHandle) -> dict[str, Any]:
    result = subprocess.run(["ip", "netns", "exec", handle.netns(NODE), sys.executable, "-c", IPAM_SNAPSHOT],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={"PATH": PATH, "ETCD_ENDPOINTS": ETCD})
    assert result.returncode == 0, f"IPAM snapshot failed: {result.stderr}"
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def ipam_check(handle: LabHandle) -> subprocess.CompletedProcess[str]:
    return handle.exec(NODE, "env", f"ETCD_ENDPOINTS={ETCD}", CLI, "ipam", "check")


def storm(runtime: Runtime, pods: Pods, run: int, kill_after: float | None
          ) -> tuple[list[tuple[str, str, Call]], float]:
    """``STORM`` concurrent ADDs; with ``kill_after``, node1's daemon gets SIGKILL that many seconds after the
    first. Returns (container id, netns, call) per ADD and the storm's duration."""
    names = [(f"k{run:02d}x{i}", pods.new(f"k{run:02d}-{i}")) for i in range(STORM)]
    killed: list[BaseException] = []

    def kill() -> None:
        try:
            stop_daemon(runtime.handle, signal.SIGKILL)
        except BaseException as exc:  # re-raised in the test's thread below
            killed.append(exc)

    # The delay is the fault's random point in the storm, not a wait for anything.
    timer = threading.Timer(kill_after, kill) if kill_after is not None else None
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=STORM) as pool:
        if timer is not None:
            timer.start()
        futures = [pool.submit(runtime.add, cid, ns, pod=cid) for cid, ns in names]
        calls = [f.result() for f in futures]
    duration = time.monotonic() - started
    if timer is not None:
        timer.join()
        if killed:
            raise killed[0]
    return [(cid, ns, call) for (cid, ns), call in zip(names, calls, strict=True)], duration


def leftovers(handle: LabHandle, failed: list[tuple[str, str]]) -> list[str]:
    """What each failed ADD had made when the daemon died, read while it is down: "nothing", or the parts of
    "veth", "address" and "endpoint" found."""
    links = cali_links(handle)
    snapshot = ipam_snapshot(handle)
    handles = {h for holders in snapshot["held"].values() for h in holders}
    endpoints = {w["containerID"] for w in snapshot["weps"] if w["node"] == NODE}
    kinds = []
    for cid, _ in failed:
        parts = [name for name, found in (("veth", host_interface_name(POD_NAMESPACE, cid, cid) in links),
                                          ("address", f"{NETWORK}.{cid}" in handles),
                                          ("endpoint", cid in endpoints)) if found]
        kinds.append("+".join(parts) or "nothing")
    return kinds


def restart(handle: LabHandle) -> float:
    """The lab restarts the missing daemon; seconds from then until it logs 'ready' (its CNI socket is open)."""
    started = time.monotonic()
    restart_daemon(handle, timeout=RESTART_DEADLINE)
    return time.monotonic() - started


def test_daemon_sigkill_during_add_storm(lab: Deployer, pods: Pods, tmp_path: Path,
                                         fault_report: FaultRecord) -> None:
    handle = mesh3(lab)
    fault_report.fault = "daemon SIGKILL during ADD storm"
    rng = random.Random(SEED)
    runtime = Runtime(handle, cni_bin_dir(tmp_path / "cni-bin"))
    _, peer = place_pods(handle, pods, tmp_path, ("node2",), "peer")["node2"]

    alive: dict[str, Pod] = {}  # container id -> every pod whose ADD succeeded, all runs
    failed_total = cleaned_by_del = cleaned_by_gc = 0
    left_at_crash: Counter[str] = Counter()  # what the failed ADDs had made when the daemon died
    fail_fast: list[float] = []

    def record_successes(calls: list[tuple[str, str, Call]]) -> list[tuple[str, str]]:
        """Keep the pods whose ADD succeeded; the failed ones are returned (container id, netns)."""
        failed = []
        for cid, ns, call in calls:
            if call.rc == 0:
                body = call.json
                alive[cid] = Pod(cid, ns, body["ips"][0]["address"].split("/")[0], body["interfaces"][0]["name"])
            else:
                error = json.loads(call.stdout)  # a CNI error, whatever the moment of the crash
                assert error["code"] and error["msg"], call
                failed.append((cid, ns))
        return failed

    # A storm nobody disturbs: its duration is the window the kills land in, and its pods carry the ping.
    calls, window = storm(runtime, pods, 0, None)
    assert not record_successes(calls), [str(c) for _, _, c in calls if c.rc]
    source = next(iter(alive.values()))
    assert pod_ping(source.netns, peer, timeout=60), "node1's pod cannot reach node2's pod before any fault"

    with Pinger(source.netns, peer) as pinger:
        for run in range(1, RUNS + 1):
            calls, _ = storm(runtime, pods, run, rng.uniform(0, window))
            failed = record_successes(calls)

            # The daemon is down: an ADD now fails at once, with the CNI error that says so, and plumbs nothing.
            probe_id, probe_ns = f"k{run:02d}down", pods.new(f"k{run:02d}-down")
            asked = time.monotonic()
            down = runtime.add(probe_id, probe_ns, pod=probe_id)
            fail_fast.append(time.monotonic() - asked)
            assert down.rc != 0, down
            # Code 11 either way: "not running", or "did not answer" when a child the daemon was forking as it died
            # still held its socket until it exec'd (the connection is then reset).
            assert down.json["code"] == 11 and ("not running" in down.json["msg"]
                                                or "did not answer" in down.json["msg"]), down
            assert fail_fast[-1] < FAIL_FAST_SECONDS, f"ADD with the daemon down took {fail_fast[-1]:.2f}s"
            assert [link["ifname"] for link in json.loads(in_ns(probe_ns, "ip", "-j", "link").stdout)] == ["lo"]
            failed.append((probe_id, probe_ns))
            failed_total += len(failed)

            left_at_crash.update(leftovers(handle, failed))
            fault_report.recovery_seconds.append(restart(handle))

            if run % 3:  # kubelet: a DEL for every sandbox whose ADD failed, each from its own pod worker
                with concurrent.futures.ThreadPoolExecutor(max_workers=len(failed)) as pool:
                    deleted = list(pool.map(lambda sandbox: runtime.delete(*sandbox, pod=sandbox[0]), failed))
                assert all(c.rc == 0 for c in deleted), [str(c) for c in deleted if c.rc]
                cleaned_by_del += len(failed)
            else:  # a runtime that lost track of them: only its valid attachments, in a CNI GC
                valid = [{"containerID": cid, "ifname": "eth0"} for cid in alive]
                collected = runtime.call("GC", {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": valid},
                                         "gc", None)
                assert collected.rc == 0, collected
                cleaned_by_gc += len(failed)

            # Every pod that ADD reported works; nothing of a failed ADD is left; no address given twice.
            expected_routes = {p.address: p.host_if for p in alive.values()}
            duplicated = [a for a, n in Counter(p.address for p in alive.values()).items() if n > 1]
            fault_report.allocations_duplicated = len(duplicated)
            assert not duplicated, f"run {run}: addresses given to two pods: {duplicated}"
            for cid, ns in failed:
                assert host_interface_name(POD_NAMESPACE, cid, cid) not in expected_routes.values()
                pod_links = [link["ifname"] for link in json.loads(in_ns(ns, "ip", "-j", "link").stdout)]
                assert pod_links == ["lo"], f"run {run}: failed ADD {cid} left {pod_links} in its pod"
            # What node1 and the datastore hold, and whether this run's pods reach node2, read side by side.
            new = [p for p in alive.values() if p.container_id.startswith(f"k{run:02d}x")]
            with concurrent.futures.ThreadPoolExecutor(max_workers=4 + len(new)) as pool:
                links, routes = pool.submit(cali_links, handle), pool.submit(host_routes, handle)
                snapshot_read, checked_read = pool.submit(ipam_snapshot, handle), pool.submit(ipam_check, handle)
                reached = [(p, pool.submit(pod_ping, p.netns, peer, 30)) for p in new]
            assert links.result() == set(expected_routes.values()), f"run {run} (seed {SEED})"
            assert routes.result() == expected_routes, f"run {run} (seed {SEED})"
            snapshot = snapshot_read.result()
            held = snapshot["held"]
            lost = [p.address for p in alive.values() if held.get(p.address) != [f"{NETWORK}.{p.container_id}"]]
            fault_report.allocations_lost = len(lost)
            assert not lost, f"run {run} (seed {SEED}): pods whose address IPAM no longer holds for them: {lost}"
            node1_held = set(held) - {peer}
            assert node1_held == set(expected_routes), \
                f"run {run} (seed {SEED}): addresses held for no pod: {sorted(node1_held - set(expected_routes))}"
            endpoints = {(w["containerID"], w["interface"], tuple(w["ips"])) for w in snapshot["weps"]
                         if w["node"] == NODE}
            assert endpoints == {(p.container_id, p.host_if, (f"{p.address}/32",)) for p in alive.values()}
            checked = checked_read.result()
            assert checked.returncode == 0 and "Found 0 problems" in checked.stdout, checked.stdout
            unreachable = [p.container_id for p, ok in reached if not ok.result()]
            assert not unreachable, f"run {run}: pods whose ADD succeeded cannot reach node2's pod: {unreachable}"
            fault_report.runs = run

    fault_report.packets_sent, fault_report.packets_lost = pinger.sent, pinger.lost
    node1_log = daemon_log(handle)
    swept, gc_released = node1_log.count("no workload endpoint names it"), node1_log.count("cni GC released")
    fault_report.notes = (f"{STORM} concurrent ADDs a run, killed within {window:.2f}s: {len(alive) - STORM} "
                          f"succeeded, {failed_total} failed (one a run with the daemon down: failed in "
                          f"{max(fail_fast) * 1000:.0f} ms at worst); failed ones cleaned by DEL {cleaned_by_del}, "
                          f"by start-up sweep ({swept} veths) + CNI GC ({gc_released} handles) {cleaned_by_gc}; "
                          f"left at the crash: {', '.join(f'{k} {n}' for k, n in sorted(left_at_crash.items()))}; "
                          f"seed {SEED}")

    # Every pod made across the crashes still works, and the last daemon deletes what its predecessors made.
    everyone = list(alive.values())
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        reach = list(pool.map(lambda p: pod_ping(p.netns, peer, timeout=30), everyone))
        assert all(reach), [p.container_id for p, ok in zip(everyone, reach, strict=True) if not ok]
        deleted = list(pool.map(lambda p: runtime.delete(p.container_id, p.netns, pod=p.container_id), everyone))
    assert all(c.rc == 0 for c in deleted), [str(c) for c in deleted if c.rc][:3]
    assert cali_links(handle) == set() and host_routes(handle) == {}
    snapshot = ipam_snapshot(handle)
    assert set(snapshot["held"]) == {peer} and not [w for w in snapshot["weps"] if w["node"] == NODE], snapshot

    # A crash of the daemon is no outage of the pods it made: the kernel keeps forwarding, and the restarted
    # ExaBGP sends End-of-RIB only after its routes, so the peers never drop node1's block meanwhile.
    assert pinger.lost == 0, f"node1's running pod lost packets across the daemon's crashes: {pinger.summary()}"
