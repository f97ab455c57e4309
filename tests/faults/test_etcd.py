"""etcd faults in a mesh3 lab whose datastore is a three-member cluster (data/etcd3.clab.yml).

One member killed, or frozen: pods keep forwarding, a CNI ADD still succeeds (the client fails over to another
member), the daemons stay ready. All members stopped: pods keep forwarding, a CNI ADD fails with one clear line and
leaves nothing behind, the daemons stay up; started again on the same data: the daemons reconnect on their own, a
new ADD works, a route deleted meanwhile is repaired, readiness returns, and IPAM has lost and duplicated nothing.

Every node runs one pod pinged continuously from a pod on another node (``Pinger``); the datastore is read from
inside node1 (etcd answers on the lab's management network only), through every member's endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from containerlab import netns
from containerlab.netns import Process
from containerlab.topology import load
from ipam.datastore import EtcdConfig
from tests.eventually import within
from tests.lab.bgp import CLI, place_pods, wait_mesh
from tests.lab.cni import Call, Pods, Runtime, cali_links, host_routes
from tests.lab.daemon import daemon_log, daemon_process
from tests.lab.handle import Deployer, LabHandle
from tests.lab.health import get
from tests.lab.report import FaultRecord
from tests.lab.traffic import Pinger, pod_ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fault tests need root (network namespaces)")

TOPOLOGY = Path(__file__).resolve().parent / "data" / "etcd3.clab.yml"
MEMBERS = ("etcd1", "etcd2", "etcd3")
NODES = ("node1", "node2", "node3")
CNI_NODE = "node1"  # where the test's own CNI requests go, and where the datastore is read from
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Generous for a loaded machine; each wait polls and returns as soon as its condition holds.
CONVERGE_SECONDS = 90.0
RECOVER_SECONDS = 60.0
# What the daemons use: the topology's CALICO_DATASTORE_FAILOVER_TIMEOUT.
FAILOVER_SECONDS = EtcdConfig.from_env(load(TOPOLOGY).nodes["node1"].env).failover_timeout

# Run inside CNI_NODE: every allocation (address, handle) from the blocks, every endpoint's addresses, and the
# consistency check's problems, all from one read.
SNAPSHOT = """
import asyncio, json
from ipam import check, keys
from ipam.datastore import Datastore, EtcdConfig

async def main():
    async with Datastore(EtcdConfig.from_env()) as store:
        state = await check.load_state(store)
        weps = {kv.key: kv.json()["spec"].get("ipNetworks") or []
                for kv in await store.get_prefix(keys.resource_prefix("workloadendpoints"))}
    held = [[str(block.address(ordinal)), block.attributes[attribute].handle_id]
            for block, _ in state.blocks.values() for ordinal, attribute in enumerate(block.allocations)
            if attribute is not None]
    print(json.dumps({"held": held, "weps": weps,
                      "problems": [p["message"] for p in check.check(state).to_json()["problems"]]}))

asyncio.run(main())
"""


# ---------------------------------------------------------------------------------------------- the cluster


def endpoints(handle: LabHandle) -> str:
    mgmt = handle.topology.mgmt_addresses()
    return ",".join(f"http://{mgmt[m].ip}:2379" for m in MEMBERS)


def member(handle: LabHandle, name: str) -> Process:
    found = [p for p in handle.processes() if p.node == name and p.daemon == "etcd"]
    assert found, f"no etcd recorded for {name} in {handle.lab.state_file}"
    return found[-1]


def kill_member(handle: LabHandle, name: str) -> None:
    """SIGKILL one member by the PID the lab recorded (checked against its start time), and reap it."""
    process = member(handle, name)
    assert process.alive(), f"etcd member {name} is not running before the test kills it"
    os.kill(process.pid, signal.SIGKILL)
    handle.wait_for(lambda: not process.alive(), 10, f"etcd member {name} (pid {process.pid}) to die")
    with contextlib.suppress(ChildProcessError):  # the lab started it from this process
        os.waitpid(process.pid, os.WNOHANG)


def stop_members(handle: LabHandle) -> None:
    """Stop every member still running, one after another: SIGTERM, SIGKILL after a grace period (by PID and start
    time). In turn, because a leader stopped beside its stopping peers waits out its leadership transfer."""
    for running in [p for p in (member(handle, m) for m in MEMBERS) if p.alive()]:
        netns.stop_pids([(running.pid, running.started)])
        # stop_pids returns right after a SIGKILL, which the process may not have finished dying of
        handle.wait_for(lambda running=running: not running.alive(), 10, f"etcd member {running.pid} to stop")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(running.pid, os.WNOHANG)


def start_members(handle: LabHandle, names: tuple[str, ...]) -> None:
    """Start the stopped members again on their data directories (the lab's deploy starts what is not running);
    nothing else may need starting: a daemon that died would be restarted here and hide it."""
    report = handle.lab.deploy()
    assert sorted(report.started) == sorted(f"{m}/etcd" for m in names), report.started


def cluster_health(handle: LabHandle) -> bool:
    """Every member answers and the cluster has a leader (etcdctl's own check, a quorum read on each member)."""
    return handle.exec(CNI_NODE, "etcdctl", "--endpoints", endpoints(handle), "--command-timeout=3s",
                       "endpoint", "health", timeout=30).returncode == 0


def statuses(handle: LabHandle) -> dict[str, dict[str, Any]]:
    """Each member's ``etcdctl endpoint status``, by member name."""
    result = handle.exec(CNI_NODE, "etcdctl", "--endpoints", endpoints(handle), "--command-timeout=3s",
                         "endpoint", "status", "-w", "json", timeout=30)
    names = {f"http://{a.ip}:2379": n for n, a in handle.topology.mgmt_addresses().items()}
    return {names[e["Endpoint"]]: e["Status"] for e in json.loads(result.stdout or "[]")}


def leader(handle: LabHandle) -> str | None:
    return next((n for n, s in statuses(handle).items() if s["leader"] == s["header"]["member_id"]), None)


def make_leader(handle: LabHandle, name: str) -> None:
    """Hand the leadership to member ``name`` (etcdctl move-leader, sent to the current leader)."""
    current = leader(handle)
    assert current is not None, "the etcd cluster has no leader"
    if current != name:
        target = statuses(handle)[name]["header"]["member_id"]
        moved = handle.exec(CNI_NODE, "etcdctl", "--endpoints", f"http://{handle.topology.mgmt_addresses()[current].ip}"
                            ":2379", "move-leader", f"{target:x}", timeout=30)
        assert moved.returncode == 0, moved.stderr
    handle.wait_for(lambda: leader(handle) == name, 30, f"{name} to lead the etcd cluster")


# ---------------------------------------------------------------------------------------------- the datastore


@dataclass(frozen=True)
class Allocations:
    held: dict[str, list[str]]  # handle -> addresses it holds in the blocks
    addresses: Counter[str]  # address -> how many times it is held (blocks) or claimed (endpoints)
    problems: list[str]

    def lost_from(self, before: Allocations) -> int:
        """Addresses a handle held before and does not hold now."""
        return sum(len(set(addresses) - set(self.held.get(h, []))) for h, addresses in before.held.items())

    def duplicated(self) -> int:
        """Addresses held or claimed more than once, and extra addresses of a handle (one IPv4 per pod)."""
        return sum(n - 1 for n in self.addresses.values() if n > 1) + \
            sum(len(addresses) - 1 for addresses in self.held.values() if len(addresses) > 1)


def allocations(handle: LabHandle) -> Allocations:
    result = netns.ns_exec(handle.netns(CNI_NODE), [sys.executable, "-c", SNAPSHOT], timeout=60,
                           env={"PATH": PATH, "ETCD_ENDPOINTS": endpoints(handle)})
    assert result.returncode == 0, f"the IPAM snapshot failed: {result.stderr}"
    state = json.loads(result.stdout)
    held: dict[str, list[str]] = {}
    for address, handle_id in state["held"]:
        held.setdefault(handle_id, []).append(address)
    # Each address once in the blocks and once in its endpoint: a second block slot or endpoint is a duplicate.
    in_blocks = Counter(address for address, _ in state["held"])
    in_weps = Counter(network.split("/")[0] for networks in state["weps"].values() for network in networks)
    duplicates = Counter({a: max(in_blocks[a], in_weps[a]) for a in in_blocks | in_weps})
    return Allocations(held, duplicates, state["problems"])


def ipam_check(handle: LabHandle) -> str:
    result = handle.exec(CNI_NODE, "env", f"ETCD_ENDPOINTS={endpoints(handle)}", CLI, "ipam", "check", timeout=60)
    assert result.returncode == 0, f"calicoctl-py ipam check found problems:\n{result.stdout}{result.stderr}"
    return result.stdout


# ---------------------------------------------------------------------------------------------- the daemons


def ready(handle: LabHandle, node: str) -> bool:
    return get(handle, node, "/readiness")[0] == 200


def daemons(handle: LabHandle) -> dict[str, Process]:
    found = {node: daemon_process(handle, node) for node in NODES}
    assert all(p.alive() for p in found.values()), found
    return found


def wait_showing_log(handle: LabHandle, node: str, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """``handle.wait_for``, with the end of the node daemon's log in the failure: what it did meanwhile."""
    try:
        handle.wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; calico-py-node on {node} logged:\n{daemon_log(handle, node)[-3000:]}") from None


def assert_same_daemons(handle: LabHandle, before: dict[str, Process]) -> None:
    """The daemons that ran before the fault still run: none exited, none was restarted, and none logged a
    traceback (an outage is an expected condition: one warning line, not a crash report)."""
    for node, process in before.items():
        log = daemon_log(handle, node)
        assert process.alive(), f"calico-py-node on {node} exited:\n{log[-3000:]}"
        assert daemon_process(handle, node).pid == process.pid, f"calico-py-node on {node} was restarted"
        crash = log.find("Traceback")
        assert crash < 0, f"calico-py-node on {node} logged a traceback:\n{log[crash:crash + 3000]}"


# ---------------------------------------------------------------------------------------------- pods and pings


@dataclass(frozen=True)
class Placed:
    namespaces: dict[str, str]  # node -> pod namespace
    addresses: dict[str, str]  # node -> pod address


def place(handle: LabHandle, pods: Pods, tmp_path: Path, tag: str) -> Placed:
    """A pod on every node, and every pod reaching every other (routes learned over BGP)."""
    placed = place_pods(handle, pods, tmp_path, NODES, tag)
    result = Placed({n: ns for n, (ns, _) in placed.items()}, {n: a for n, (_, a) in placed.items()})
    for node in NODES:
        for other in NODES:
            if other != node:
                assert pod_ping(result.namespaces[node], result.addresses[other], timeout=CONVERGE_SECONDS), \
                    f"pod on {node} cannot reach the pod on {other} before the fault"
    return result


@contextlib.contextmanager
def pinging(placed: Placed) -> Iterator[list[Pinger]]:
    """Each pod pings the pod on the next node, continuously, for as long as the block lasts."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Pinger(placed.namespaces[node], placed.addresses[NODES[(i + 1) % len(NODES)]]))
               for i, node in enumerate(NODES)]


def count_packets(record: FaultRecord, pingers: list[Pinger]) -> None:
    record.packets_sent += sum(p.sent for p in pingers)
    record.packets_lost += sum(p.lost for p in pingers)


def runtime(handle: LabHandle, tmp_path: Path) -> Runtime:
    return Runtime(handle, tmp_path / "cni-bin", CNI_NODE)  # installed by place_pods


def add_until_it_works(rt: Runtime, ns: str, container: str, timeout: float) -> Call:
    """ADD as a runtime retries one: after a failure, DEL the attempt, then ADD again, until ``timeout``; the
    last attempt's answer."""
    calls: list[Call] = []

    def attempt() -> bool:
        if calls and calls[-1].rc != 0:
            assert rt.delete(container, ns, pod=container).rc == 0
        calls.append(rt.add(container, ns, pod=container))
        return calls[-1].rc == 0
    within(attempt, timeout)
    return calls[-1]


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def etcd3(module_lab: Deployer) -> Iterator[LabHandle]:
    """One lab for the three faults: each starts again what it stopped and waits for the cluster to be healthy.
    The members are stopped in turn before the lab goes (see stop_members)."""
    handle = module_lab(TOPOLOGY)
    wait_mesh(handle, NODES, CONVERGE_SECONDS)
    handle.wait_for(lambda: cluster_health(handle), timeout=CONVERGE_SECONDS, what="the etcd cluster to be healthy")
    yield handle
    stop_members(handle)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_one_member_lost(etcd3: LabHandle, pods: Pods, tmp_path: Path, fault_report: FaultRecord, how: str) -> None:
    """Killed (SIGKILL: connections refused at once) or frozen (SIGSTOP: its sockets still accept, nothing
    answers, so requests to it must time out and fail over rather than wait for it)."""
    fault_report.fault = {"killed": "etcd: one of three members killed",
                          "frozen": "etcd: one of three members frozen (SIGSTOP)"}[how]
    fault_report.runs = 1
    tag = how[0]
    placed = place(etcd3, pods, tmp_path, tag)
    running = daemons(etcd3)
    before = allocations(etcd3)
    # The worst single member to lose: the leader (an election follows) that is also the first endpoint of every
    # node's ETCD_ENDPOINTS (every daemon's requests go there until it fails).
    victim = MEMBERS[0]
    make_leader(etcd3, victim)
    frozen = member(etcd3, victim)
    ns = pods.new(f"{tag}-after")
    with pinging(placed) as pingers:
        lost_at = time.monotonic()
        if how == "killed":
            kill_member(etcd3, victim)
        else:
            os.kill(frozen.pid, signal.SIGSTOP)
        try:
            added = runtime(etcd3, tmp_path).add(f"{tag}-after", ns, pod=f"{tag}-after")
            fault_report.recovery_seconds.append(time.monotonic() - lost_at)
            assert added.rc == 0, f"CNI ADD with one member of three {how}:\n{added}"
            address = added.json["ips"][0]["address"].split("/")[0]
            # The new pod is reachable across nodes, and every daemon still reads the datastore (readiness does).
            assert pod_ping(placed.namespaces["node2"], address, timeout=30), "pod added meanwhile is unreachable"
            for node in NODES:
                wait_showing_log(etcd3, node, lambda node=node: ready(etcd3, node), RECOVER_SECONDS,
                                 f"{node} to be ready")
            assert_same_daemons(etcd3, running)
            new_leader = leader(etcd3)
        finally:
            if how == "frozen":
                os.kill(frozen.pid, signal.SIGCONT)
        if how == "killed":
            start_members(etcd3, (victim,))  # and it rejoins on its data
        etcd3.wait_for(lambda: cluster_health(etcd3), RECOVER_SECONDS, f"{victim} to be back in the cluster")
    count_packets(fault_report, pingers)
    fault_report.notes = (f"{how} {victim}, the leader and first in ETCD_ENDPOINTS; {new_leader} took over; "
                          f"recovery = fault to first ADD done")

    after = allocations(etcd3)
    fault_report.allocations_lost = after.lost_from(before)
    fault_report.allocations_duplicated = after.duplicated()
    assert f"k8s-pod-network.{tag}-after" in after.held, after.held
    assert fault_report.packets_lost == 0, [p.summary() for p in pingers]
    assert (fault_report.allocations_lost, fault_report.allocations_duplicated) == (0, 0), (before, after)
    assert after.problems == []
    ipam_check(etcd3)


def test_all_members_stopped_and_restarted(etcd3: LabHandle, pods: Pods, tmp_path: Path,
                                           fault_report: FaultRecord) -> None:
    fault_report.fault, fault_report.runs = "etcd: all members stopped and restarted", 1
    placed = place(etcd3, pods, tmp_path, "s")
    # A pod on node3 outside the ping ring: its host route is deleted by hand during the outage.
    _, spare = place_pods(etcd3, pods, tmp_path, ("node3",), "spare")["node3"]
    running = daemons(etcd3)
    before = allocations(etcd3)
    links_before, routes_before = cali_links(etcd3), host_routes(etcd3)
    rt = runtime(etcd3, tmp_path)
    outage_ns, later_ns = pods.new("s-outage"), pods.new("s-later")
    with pinging(placed) as pingers:
        stop_members(etcd3)
        etcd3.wait_for(lambda: not ready(etcd3, CNI_NODE), RECOVER_SECONDS, f"{CNI_NODE} to report etcd gone")

        started = time.monotonic()
        failed = rt.add("s-outage", outage_ns, pod="s-outage")
        outage_add_seconds = time.monotonic() - started
        assert failed.rc != 0, failed
        error = failed.json
        assert error["code"] == 11, failed  # try again later
        assert "etcd" in error["msg"] and "retry" in error["msg"] and "\n" not in error["msg"], error
        # The answer comes after the datastore's failover time, once: the clean-up does not wait it again.
        assert FAILOVER_SECONDS - 1 <= outage_add_seconds < FAILOVER_SECONDS + 20, \
            f"the failed ADD took {outage_add_seconds:.1f}s (failover time {FAILOVER_SECONDS:g}s)"
        # Nothing of the failed ADD is left: no veth, no route, nothing in the pod (the datastore is read after).
        assert cali_links(etcd3) == links_before
        assert host_routes(etcd3) == routes_before
        pod_links = json.loads(netns.ns_exec(outage_ns, ["ip", "-j", "link", "show"]).stdout)
        assert [link["ifname"] for link in pod_links] == ["lo"], pod_links

        deleted = etcd3.exec("node3", "ip", "route", "del", f"{spare}/32", "proto", "80")
        assert deleted.returncode == 0, deleted.stderr
        assert_same_daemons(etcd3, running)
        assert all(get(etcd3, node, "/liveness")[0] == 200 for node in NODES)

        back_at = time.monotonic()  # recovery counts from the moment etcd is started again
        start_members(etcd3, MEMBERS)
        added = add_until_it_works(rt, later_ns, "s-later", RECOVER_SECONDS)
        fault_report.recovery_seconds.append(time.monotonic() - back_at)
        assert added.rc == 0, f"no CNI ADD succeeded within {RECOVER_SECONDS:g}s of etcd's return:\n{added}"
        later = added.json["ips"][0]["address"].split("/")[0]
        assert pod_ping(placed.namespaces["node2"], later, timeout=30), "pod added after the outage is unreachable"
        wait_showing_log(etcd3, "node3", lambda: spare in host_routes_of(etcd3, "node3"), RECOVER_SECONDS,
                         "node3 to repair the route deleted during the outage")
        assert pod_ping(placed.namespaces["node1"], spare, timeout=30), "the repaired route does not carry traffic"
        for node in NODES:
            wait_showing_log(etcd3, node, lambda node=node: ready(etcd3, node), RECOVER_SECONDS,
                             f"{node} to be ready again")
        assert_same_daemons(etcd3, running)
    count_packets(fault_report, pingers)
    fault_report.notes = (f"a CNI ADD during the outage failed cleanly in {outage_add_seconds:.1f}s; recovery = etcd "
                          "started to first ADD done")

    after = allocations(etcd3)
    fault_report.allocations_lost = after.lost_from(before)
    fault_report.allocations_duplicated = after.duplicated()
    assert "k8s-pod-network.s-outage" not in after.held, "the failed ADD left its allocation"
    assert "k8s-pod-network.s-later" in after.held, after.held
    assert fault_report.packets_lost == 0, [p.summary() for p in pingers]
    assert (fault_report.allocations_lost, fault_report.allocations_duplicated) == (0, 0), (before, after)
    assert after.problems == []
    ipam_check(etcd3)


def host_routes_of(handle: LabHandle, node: str) -> set[str]:
    """The node's proto-80 routes to single addresses (pods)."""
    found = json.loads(handle.exec(node, "ip", "-j", "route", "show", "proto", "80").stdout or "[]")
    return {r["dst"] for r in found if r.get("type") != "blackhole" and "/" not in r["dst"]}
