"""The CNI plugin end to end: the shim invoked as a container runtime invokes it, inside node1 of a mesh3 lab.

Pods are network namespaces of their own (``cnit<pid>-*``, always deleted). The shim is installed the way a node
installs it (bgpd.cni.install into a CNI_PATH directory: the C shim, and the Python fallback in one test) and
found by the ``type`` of its configuration, as libcni finds plugins. What the kernel holds is read
with iproute2 inside node1; what the datastore holds with a small Python program run inside node1 (etcd
answers only on the lab's management network).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.cni import (
    CONF,
    NETWORK,
    NODE,
    POOL,
    PORTMAP,
    Pods,
    Runtime,
    assert_nothing_left,
    cali_links,
    cni_bin_dir,
    host_routes,
    in_ns,
    ip_json,
    ipam_state,
)
from tests.lab.daemon import restart_daemon, route_log, stop_daemon, wait_ready
from tests.lab.handle import Deployer, LabHandle
from tests.lab.traffic import pod_ping

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root (network namespaces)"),
              pytest.mark.slow]

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY = "169.254.1.1"

# A one-line TCP server for the port-mapping test: answers every connection with a greeting.
GREETER = """
import socket
s = socket.create_server(("0.0.0.0", 80))
while True:
    c, _ = s.accept()
    c.sendall(b"hello from the pod\\n")
    c.close()
"""

CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
    print(c.recv(100).decode().strip())
"""


def link_stats(handle: LabHandle, name: str) -> dict[str, Any]:
    return ip_json(handle, "-s", "link", "show", "dev", name)[0]["stats64"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def mesh(module_lab: Deployer) -> LabHandle:
    """One mesh3 lab for the module: every test adds its pods, deletes them and asserts nothing is left; the
    tests that stop node1's daemon start it again."""
    handle = module_lab("mesh3.clab.yml")
    wait_ready(handle)
    return handle


@pytest.fixture
def runtime(mesh: LabHandle, tmp_path: Path) -> Runtime:
    return Runtime(mesh, cni_bin_dir(tmp_path / "cni-bin"))


# ---------------------------------------------------------------------------------------------- tests


def test_two_pods_reach_each_other_and_the_node_through_cali_veths(mesh: LabHandle, pods: Pods,
                                                                   runtime: Runtime) -> None:
    a_ns, b_ns = pods.new("a"), pods.new("b")
    a = runtime.add("ctr-a", a_ns, pod="pod-a")
    b = runtime.add("ctr-b", b_ns, pod="pod-b")
    assert a.rc == 0, a
    assert b.rc == 0, b

    addresses, host_ifs = {}, {}
    for name, call, ns in (("a", a, a_ns), ("b", b, b_ns)):
        body = call.json
        assert body["cniVersion"] == "1.0.0"
        host, pod_if = body["interfaces"]
        assert re.fullmatch(r"cali[0-9a-f]{11}", host["name"]), host
        assert host["mac"] == HOST_MAC and "sandbox" not in host
        pod_link = json.loads(in_ns(ns, "ip", "-j", "link", "show", "dev", "eth0").stdout)[0]
        assert pod_if == {"name": "eth0", "mac": pod_link["address"], "sandbox": f"/run/netns/{ns}"}
        assert len(body["ips"]) == 1 and body["ips"][0]["interface"] == 1, body["ips"]
        address = ipaddress.ip_interface(body["ips"][0]["address"])
        assert address.network.prefixlen == 32 and address.ip in POOL, address
        assert body["routes"] == [{"dst": "0.0.0.0/0", "gw": GATEWAY}]
        pod_addrs = [a["local"] for a in json.loads(in_ns(ns, "ip", "-j", "addr", "show", "dev", "eth0").stdout)[0]
                     ["addr_info"] if a["family"] == "inet"]
        assert pod_addrs == [str(address.ip)]
        addresses[name], host_ifs[name] = str(address.ip), host["name"]

    # The host side of each veth: Calico's MAC, proxy ARP, up, and a /32 of our protocol to the pod through it.
    routes = host_routes(mesh)
    for name in ("a", "b"):
        link = ip_json(mesh, "link", "show", "dev", host_ifs[name])[0]
        assert link["address"] == HOST_MAC and "UP" in link["flags"], link
        proxy_arp = mesh.exec(NODE, "cat", f"/proc/sys/net/ipv4/conf/{host_ifs[name]}/proxy_arp").stdout.strip()
        assert proxy_arp == "1"
        assert routes.get(addresses[name]) == host_ifs[name], routes

    # Traffic pod a -> pod b leaves a through its cali veth and reaches b through b's.
    a_before, b_before = link_stats(mesh, host_ifs["a"]), link_stats(mesh, host_ifs["b"])
    assert pod_ping(a_ns, addresses["b"]), "pod a cannot reach pod b"
    assert pod_ping(b_ns, addresses["a"]), "pod b cannot reach pod a"
    node_ip = str(mesh.address(NODE).ip)
    assert pod_ping(a_ns, node_ip), "pod a cannot reach its node"
    a_after, b_after = link_stats(mesh, host_ifs["a"]), link_stats(mesh, host_ifs["b"])
    assert a_after["rx"]["packets"] > a_before["rx"]["packets"]  # host side receives what the pod sends
    assert b_after["tx"]["packets"] > b_before["tx"]["packets"]
    neighbours = json.loads(in_ns(a_ns, "ip", "-j", "neigh", "show", "dev", "eth0").stdout)
    assert any(n["dst"] == GATEWAY and n.get("lladdr") == HOST_MAC for n in neighbours), neighbours

    checked = runtime.check("ctr-a", a_ns, a.json, pod="pod-a")
    assert checked.rc == 0 and checked.stdout.strip() == "", checked

    deleted = runtime.delete("ctr-a", a_ns, a.json, pod="pod-a")
    assert deleted.rc == 0 and deleted.stdout.strip() == "", deleted
    assert host_ifs["a"] not in cali_links(mesh)
    assert addresses["a"] not in host_routes(mesh)
    state = ipam_state(mesh)
    assert f"{NETWORK}.ctr-a" not in state["handles"] and f"{NETWORK}.ctr-b" in state["handles"], state
    assert [w.rsplit("/", 1)[1] for w in state["weps"]] == ["node1-k8s-pod--b-eth0"], state["weps"]
    assert state["report"]["problems"] == []
    # Pod b is untouched, and a second DEL of a is a success that changes nothing (the spec's idempotent DEL).
    assert pod_ping(b_ns, node_ip), "pod b lost its network when pod a was deleted"
    again = runtime.delete("ctr-a", a_ns, a.json, pod="pod-a")
    assert again.rc == 0, again
    assert host_ifs["b"] in cali_links(mesh) and host_routes(mesh) == {addresses["b"]: host_ifs["b"]}

    assert runtime.delete("ctr-b", b_ns, b.json, pod="pod-b").rc == 0
    assert_nothing_left(mesh)


def test_portmap_chained_after_calico_py(mesh: LabHandle, pods: Pods, runtime: Runtime) -> None:
    if not PORTMAP.exists():
        pytest.skip(f"{PORTMAP} missing: apt-get install -y containernetworking-plugins")
    probe = mesh.exec(NODE, "iptables", "-t", "nat", "-S")
    if probe.returncode != 0:
        pytest.skip(f"iptables cannot run in a lab namespace here, so portmap cannot: {probe.stderr.strip()}")
    conflist = {"cniVersion": "1.0.0", "name": NETWORK,
                "plugins": [{"type": "calico-py", "ipam": {"type": "calico-py-ipam"}},
                            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}
    mappings = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]

    def plugin_config(index: int, prev: dict[str, Any] | None) -> dict[str, Any]:
        """What libcni hands plugin ``index`` of the list: its own section, the list's name and version, the
        runtime's values for the capabilities it declares, and the previous plugin's result."""
        section = conflist["plugins"][index]  # type: ignore[index]
        config = {**section, "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
        if section.get("capabilities", {}).get("portMappings"):
            config["runtimeConfig"] = {"portMappings": mappings}
        if prev is not None:
            config["prevResult"] = prev
        return config

    ns = pods.new("pm")
    container = "ctr-pm"
    first = runtime.call("ADD", plugin_config(0, None), container, ns, pod="pod-pm")
    assert first.rc == 0, first
    pod_ip = first.json["ips"][0]["address"].split("/")[0]
    second = runtime.call("ADD", plugin_config(1, first.json), container, ns, pod="pod-pm")
    assert second.rc == 0, second
    passed = second.json
    for key in ("interfaces", "ips", "routes"):
        assert passed[key] == first.json[key], (key, passed, first.json)

    def nat_rules() -> str:
        result = mesh.exec(NODE, "iptables", "-t", "nat", "-S")
        assert result.returncode == 0, result.stderr
        return result.stdout

    rules = nat_rules()
    dnat = [line for line in rules.splitlines() if f"--to-destination {pod_ip}:80" in line]
    assert dnat and all("--dport 8080" in line for line in dnat), rules
    assert f'id: \\"{container}\\"' in rules, rules

    # The mapping works: node2 reaches the pod's port 80 at node1's port 8080.
    greeter = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-I", "-c", GREETER],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        node_ip = str(mesh.address(NODE).ip)

        def answered() -> bool:
            out = mesh.exec("node2", sys.executable, "-I", "-c", CONNECT, node_ip, "8080", timeout=10)
            return out.returncode == 0 and out.stdout.strip() == "hello from the pod"

        mesh.wait_for(answered, 20, f"node2 to reach the pod through {node_ip}:8080")
    finally:
        greeter.kill()
        greeter.wait(timeout=10)

    # DEL in reverse order, each plugin given the list's final result.
    removed = runtime.call("DEL", plugin_config(1, passed), container, ns, pod="pod-pm")
    assert removed.rc == 0, removed
    rules = nat_rules()
    assert pod_ip not in rules and container not in rules, rules
    assert not re.search(r"^-N CNI-DN-", rules, re.MULTILINE), rules
    gone = runtime.call("DEL", plugin_config(0, passed), container, ns, pod="pod-pm")
    assert gone.rc == 0, gone
    assert_nothing_left(mesh)


def test_fifty_concurrent_adds_ping_and_dels(mesh: LabHandle, pods: Pods, runtime: Runtime) -> None:
    count = 50
    names = [pods.new(f"p{i:02d}") for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        added = list(pool.map(lambda i: runtime.add(f"ctr-{i:02d}", names[i], pod=f"pod-{i:02d}"), range(count)))
    failed = [str(c) for c in added if c.rc != 0]
    assert not failed, "\n".join(failed[:5])
    ips = [c.json["ips"][0]["address"].split("/")[0] for c in added]
    host_ifs = [c.json["interfaces"][0]["name"] for c in added]
    assert len(set(ips)) == count and len(set(host_ifs)) == count
    assert cali_links(mesh) == set(host_ifs)
    routes = host_routes(mesh)
    missing = {ip: dev for ip, dev in zip(ips, host_ifs, strict=True) if routes.get(ip) != dev}
    assert not missing, f"pod routes missing or wrong: {missing}\n{route_log(mesh)}"

    def neighbour_ping(i: int) -> str | None:
        target = ips[(i + 1) % count]
        return None if pod_ping(names[i], target, timeout=10) else f"pod {i} cannot reach pod {(i + 1) % count}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        unreachable = [r for r in pool.map(neighbour_ping, range(count)) if r]
    assert not unreachable, unreachable

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        deleted = list(pool.map(lambda i: runtime.delete(f"ctr-{i:02d}", names[i], added[i].json,
                                                         pod=f"pod-{i:02d}"), range(count)))
    failed = [str(c) for c in deleted if c.rc != 0]
    assert not failed, "\n".join(failed[:5])
    state = assert_nothing_left(mesh)
    assert state["report"]["allocated"] == 0, state["report"]


def test_daemon_restart_keeps_traffic_and_repairs_a_deleted_route(mesh: LabHandle, pods: Pods,
                                                                 runtime: Runtime) -> None:
    a_ns, b_ns, c_ns = pods.new("ra"), pods.new("rb"), pods.new("rc")
    calls = {n: runtime.add(f"ctr-{n}", ns, pod=f"pod-{n}") for n, ns in (("ra", a_ns), ("rb", b_ns), ("rc", c_ns))}
    for call in calls.values():
        assert call.rc == 0, call
    ip = {n: c.json["ips"][0]["address"].split("/")[0] for n, c in calls.items()}
    c_if = calls["rc"].json["interfaces"][0]["name"]
    assert pod_ping(a_ns, ip["rb"]) and pod_ping(a_ns, ip["rc"])

    replies: list[tuple[float, int]] = []
    pinger = subprocess.Popen(["ip", "netns", "exec", a_ns, "ping", "-n", "-i", "0.05", "-W", "1", ip["rb"]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []

    def read() -> None:
        assert pinger.stdout is not None
        for line in pinger.stdout:
            output.append(line)
            if match := re.search(r"icmp_seq=(\d+) ttl=", line):
                replies.append((time.monotonic(), int(match.group(1))))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        mesh.wait_for(lambda: len(replies) >= 10, 10, "the first replies of the running ping")
        killed_at = time.monotonic()
        stop_daemon(mesh, signal.SIGKILL)
        # While the daemon is down, pod c's route disappears behind its back.
        removed = mesh.exec(NODE, "ip", "route", "del", f"{ip['rc']}/32", "dev", c_if, "proto", "80")
        assert removed.returncode == 0, removed.stderr
        assert ip["rc"] not in host_routes(mesh)
        restart_daemon(mesh)
        restarted_at = time.monotonic()
        # The start-up reconcile puts it back.
        mesh.wait_for(lambda: host_routes(mesh).get(ip["rc"]) == c_if, 20, f"the route to {ip['rc']} to return")
        mesh.wait_for(lambda: sum(t > restarted_at for t, _ in replies) >= 10, 10, "replies after the restart")
    finally:
        pinger.send_signal(signal.SIGINT)
        pinger.wait(timeout=10)
        reader.join(timeout=10)
    text = "".join(output)
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    assert summary, text
    transmitted, received = int(summary.group(1)), int(summary.group(2))
    seqs = [s for _, s in replies]
    # Every echo answered, in order; at most the one in flight when ping was stopped has no answer yet.
    assert seqs == list(range(1, len(seqs) + 1)), f"lost echoes: {sorted(set(range(1, max(seqs))) - set(seqs))}"
    assert transmitted - received <= 1, text[-300:]
    assert any(t < killed_at for t, _ in replies) and any(t > restarted_at for t, _ in replies)
    assert pod_ping(a_ns, ip["rc"]), "pod c is unreachable after the route repair"
    # The restarted daemon serves CNI again.
    for n, ns in (("ra", a_ns), ("rb", b_ns), ("rc", c_ns)):
        assert runtime.delete(f"ctr-{n}", ns, calls[n].json, pod=f"pod-{n}").rc == 0
    assert_nothing_left(mesh)


@pytest.mark.parametrize("case", ["malformed-json", "no-netns", "unknown-version", "missing-netns-path",
                                  "daemon-down"])
def test_bad_input_gets_the_spec_error_and_leaves_nothing(mesh: LabHandle, pods: Pods, runtime: Runtime,
                                                          case: str) -> None:
    ns = pods.new("bad")
    container = f"ctr-{case}"
    if case == "malformed-json":
        call, code, words = runtime.add(container, ns, pod="bad", stdin='{"cniVersion": "1.0.0", "name": '), 6, "JSON"
    elif case == "no-netns":
        call, code, words = runtime.call("ADD", CONF, container, None, pod="bad"), 4, "CNI_NETNS"
    elif case == "unknown-version":
        call, code, words = runtime.call("ADD", {**CONF, "cniVersion": "9.9.9"}, container, ns, pod="bad"), 1, "9.9.9"
    elif case == "missing-netns-path":
        path = f"/run/netns/{pods.prefix}never-created"
        call, code, words = runtime.add(container, path, pod="bad"), 3, path
    else:
        stop_daemon(mesh, signal.SIGTERM)
        call, code, words = runtime.add(container, ns, pod="bad"), 11, "try again later"
    assert call.rc != 0, call
    error = call.json
    assert error["code"] == code, call
    assert words in error["msg"] and error["cniVersion"], call
    pod_links = json.loads(in_ns(ns, "ip", "-j", "link", "show").stdout)
    assert [link["ifname"] for link in pod_links] == ["lo"], pod_links
    assert_nothing_left(mesh)
    if case == "daemon-down":
        restart_daemon(mesh)  # and the same ADD succeeds once the daemon is back: a runtime's retry works
        retried = runtime.add(container, ns, pod="bad")
        assert retried.rc == 0, retried
        assert runtime.delete(container, ns, retried.json, pod="bad").rc == 0
        assert_nothing_left(mesh)


def test_status_version_and_gc_of_attachments_the_runtime_no_longer_has(mesh: LabHandle, pods: Pods,
                                                                       runtime: Runtime) -> None:
    version = runtime.call("VERSION", CONF, "x", None)
    assert version.rc == 0 and "1.1.0" in version.json["supportedVersions"]
    assert runtime.call("STATUS", {**CONF, "cniVersion": "1.1.0"}, "x", None).rc == 0
    kept, gone = pods.new("gc-kept"), pods.new("gc-gone")
    assert runtime.add("gckept", kept, pod="kept").rc == 0
    assert runtime.add("gcgone", gone, pod="gone").rc == 0
    assert len(cali_links(mesh)) == 2
    valid = {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "gckept", "ifname": "eth0"}]}
    result = runtime.call("GC", valid, "x", None)
    assert result.rc == 0, result
    links = cali_links(mesh)
    assert len(links) == 1
    handles = ipam_state(mesh)["handles"]
    assert any(h.endswith(".gckept") for h in handles) and not any(h.endswith(".gcgone") for h in handles)
    assert runtime.delete("gckept", kept, pod="kept").rc == 0
    assert_nothing_left(mesh)


def test_the_python_fallback_shim_adds_checks_and_deletes(mesh: LabHandle, pods: Pods, tmp_path: Path) -> None:
    runtime = Runtime(mesh, cni_bin_dir(tmp_path / "cni-bin-python", kind="python"))
    assert (runtime.bin_dir / "calico-py").read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")
    version = runtime.call("VERSION", CONF, "x", None)
    assert version.rc == 0 and "1.1.0" in version.json["supportedVersions"], version
    ns = pods.new("py")
    added = runtime.add("ctr-py", ns, pod="pod-py")
    assert added.rc == 0, added
    address = added.json["ips"][0]["address"].split("/")[0]
    pod_addrs = [a["local"] for a in json.loads(in_ns(ns, "ip", "-j", "addr", "show", "dev", "eth0").stdout)[0]
                 ["addr_info"] if a["family"] == "inet"]
    assert pod_addrs == [address]
    checked = runtime.check("ctr-py", ns, added.json, pod="pod-py")
    assert checked.rc == 0 and checked.stdout.strip() == "", checked
    deleted = runtime.delete("ctr-py", ns, added.json, pod="pod-py")
    assert deleted.rc == 0 and deleted.stdout.strip() == "", deleted
    assert_nothing_left(mesh)


def test_a_late_del_of_a_replaced_pod_leaves_its_successor_alone(mesh: LabHandle, pods: Pods,
                                                                 runtime: Runtime) -> None:
    """A pod recreated under the same name (a StatefulSet's) gets the same cali name and endpoint record; the
    old sandbox's DEL, arriving after the new ADD, must not take the new pod's veth, record or address."""
    old_ns, new_ns = pods.new("late-old"), pods.new("late-new")
    assert runtime.add("lateold", old_ns, pod="web-0").rc == 0
    added = runtime.add("latenew", new_ns, pod="web-0")
    assert added.rc == 0, added
    assert runtime.delete("lateold", old_ns, pod="web-0").rc == 0
    checked = runtime.check("latenew", new_ns, added.json, pod="web-0")
    assert checked.rc == 0, checked
    assert pod_ping(new_ns, str(mesh.address(NODE).ip))
    handles = ipam_state(mesh)["handles"]
    assert any(h.endswith(".latenew") for h in handles) and not any(h.endswith(".lateold") for h in handles)
    assert runtime.delete("latenew", new_ns, pod="web-0").rc == 0
    assert_nothing_left(mesh)
