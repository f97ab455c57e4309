"""calicoctl-py driven as a user drives it (the installed console script), against a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ipam.allocator import IPAM
from ipam.datastore import Datastore, EtcdConfig
from tests.integration.ipamhelpers import add_pool

pytestmark = pytest.mark.etcd
CLI = shutil.which("calicoctl-py", path=str(Path(sys.executable).parent)) or "calicoctl-py"
Run = Callable[..., subprocess.CompletedProcess[str]]

RESOURCES = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool-a}
spec: {cidr: 10.50.0.0/16, natOutgoing: true, blockSize: 26}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: tor}
spec: {peerIP: 10.0.0.1, asNumber: 65000, nodeSelector: "rack == 'r1'"}
---
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false, asNumber: 64512, logSeverityScreen: Info}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node1, labels: {rack: r1}}
spec: {bgp: {ipv4Address: 10.0.0.11/24, asNumber: 65101}}
"""


@pytest.fixture
def cli(etcd_endpoints: list[str], tmp_path: Path) -> Run:
    env = {**os.environ, "ETCD_ENDPOINTS": ",".join(etcd_endpoints)}

    def run(*args: str, stdin: str | None = None, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60,
                                cwd=tmp_path, check=False)
        if check is not None:
            assert result.returncode == check, (args, result.stdout, result.stderr)
        return result
    return run


def keyspace(endpoints: list[str]) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        async with Datastore(EtcdConfig.parse(endpoints)) as store:
            return {kv.key: kv.value for kv in await store.get_prefix("/")}
    return asyncio.run(read())


def test_apply_get_round_trip_and_delete(cli: Run, etcd_endpoints: list[str]) -> None:
    out = cli("apply", "-f", "-", stdin=RESOURCES).stdout
    assert "IPPool 'pool-a' created" in out and "Node 'node1' created" in out
    assert cli("get", "ippools").stdout.splitlines()[0].split() == ["NAME", "CIDR", "SELECTOR"]
    assert cli("get", "ippool", "-o", "wide").stdout.splitlines()[0].split() == [
        "NAME", "CIDR", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED", "DISABLEBGPEXPORT", "SELECTOR"]
    assert cli("get", "bgppeer").stdout.splitlines()[1].split() == ["tor", "10.0.0.1", "65000"]
    assert cli("get", "nodes", "-o", "wide").stdout.splitlines()[1].split() == ["node1", "65101", "10.0.0.11/24"]
    one = json.loads(cli("get", "bgpconfig", "default", "-o", "json").stdout)
    assert one["spec"]["nodeToNodeMeshEnabled"] is False
    for kind in ("ippools", "bgppeers", "bgpconfigurations", "nodes"):
        listing = yaml.safe_load(cli("get", kind, "-o", "yaml").stdout)
        assert listing["kind"].endswith("List") and len(listing["items"]) == 1
        before = keyspace(etcd_endpoints)
        assert "unchanged" in cli("apply", "-f", "-", stdin=yaml.safe_dump(listing)).stdout
        assert keyspace(etcd_endpoints) == before  # the round trip changes nothing
    assert "already exists" in cli("create", "-f", "-", stdin=RESOURCES, check=1).stderr
    cli("delete", "bgppeer", "tor")
    assert "does not exist" in cli("get", "bgppeer", "tor", check=1).stderr
    cli("delete", "-f", "-", stdin=RESOURCES.split("---")[0])
    assert cli("get", "ippools").stdout.split() == ["NAME", "CIDR", "SELECTOR"]


BAD = [
    ("kind: IPPool\nmetadata: {name: p\nspec: {}", "not valid YAML"),
    ("apiVersion: projectcalico.org/v3\nkind: Gadget\nmetadata: {name: g}\n", "unknown resource kind 'Gadget'"),
    ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/33}\n",
     "document 1: IPPool 'p': field spec.cidr"),
    ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p2}\nspec: {cidr: 10.50.128.0/17}\n",
     "IPPool 'p2': field spec.cidr: 10.50.128.0/17 overlaps pool 'pool-a'"),
    ("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: x}\nspec: {peerIP: 10.0.0.9, asNumber: -5}\n",
     "BGPPeer 'x': field spec.asNumber: must be a whole number"),
    ("- {apiVersion: projectcalico.org/v3, kind: BGPPeer, metadata: {name: ok},\n"
     "   spec: {peerIP: 10.0.0.8, asNumber: 1}}\n"
     "- {apiVersion: projectcalico.org/v3, kind: BGPPeer, metadata: {name: bad},\n"
     "   spec: {peerIP: nope, asNumber: 1}}\n",
     "document 1 item 2: BGPPeer 'bad': field spec.peerIP"),
    ("kind: BGPPeer\nmetadata: {name: nover}\nspec: {peerIP: 10.0.0.7, asNumber: 65001}\n",
     "BGPPeer 'nover': field apiVersion: missing"),
    ("kind: IPPool\nmetadata: {name: nover}\nspec: {cidr: 10.70.0.0/24}\n",
     "IPPool 'nover': field apiVersion: missing"),
]


@pytest.mark.parametrize(("document", "message"), BAD)
def test_bad_input_is_refused_and_writes_nothing(cli: Run, etcd_endpoints: list[str], document: str,
                                                 message: str) -> None:
    cli("apply", "-f", "-", stdin=RESOURCES)
    before = keyspace(etcd_endpoints)
    result = cli("apply", "-f", "-", stdin=document, check=1)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert keyspace(etcd_endpoints) == before


def test_ipam_show_check_and_release_from_report(cli: Run, etcd_endpoints: list[str], tmp_path: Path) -> None:
    async def seed() -> None:
        async with Datastore(EtcdConfig.parse(etcd_endpoints)) as store:
            await add_pool(store, "pool-a", "10.60.0.0/24", 26)
            ipam = IPAM(store)
            await ipam.auto_assign("k8s-pod-network.leaked", "node1", attrs={"namespace": "ns", "pod": "gone"})
            await ipam.auto_assign("vxlan-tunnel-addr-node1", "node1", use="Tunnel")
            await store.put("/calico/ipam/v2/handle/ghost", b'{"handleID":"ghost","block":{"10.60.0.64/26":2}}')
            await store.put("/calico/ipam/v2/host/node9/ipv4/block/10.60.0.128-26", b'{"state":"confirmed"}')
    asyncio.run(seed())
    show = cli("ipam", "show").stdout.splitlines()
    assert show[0].split() == ["GROUPING", "CIDR", "IPS", "TOTAL", "IPS", "IN", "USE", "IPS", "FREE"]
    assert show[1].split() == ["IP", "Pool", "10.60.0.0/24", "256", "2", "(1%)", "254", "(99%)"]
    blocks = cli("ipam", "show", "--show-blocks").stdout
    assert "Block" in blocks and "10.60.0.0/26" in blocks and "host:node1" in blocks
    held = cli("ipam", "show", "--ip", "10.60.0.0").stdout
    assert "Handle: k8s-pod-network.leaked" in held and "Pod: ns/gone" in held
    assert "is not assigned" in cli("ipam", "show", "--ip", "10.60.0.200").stdout

    report = tmp_path / "report.json"
    checked = cli("ipam", "check", "-o", str(report), check=1).stdout
    for kind in ("leaked-ip", "handle-without-ips", "affinity-without-block"):
        assert kind in checked
    leaked = json.loads(report.read_text())["leakedIPs"]
    assert [entry["ip"] for entry in leaked] == ["10.60.0.0"]  # the tunnel address is not a leak
    assert "not confirmed" in cli("ipam", "release", "--from-report", str(report), stdin="n\n", check=1).stderr
    no_answer = cli("ipam", "release", "--from-report", str(report), check=1).stderr  # no terminal, no input
    assert "add --force" in no_answer and "Traceback" not in no_answer
    assert "Released 1 addresses" in cli("ipam", "release", "--from-report", str(report), "--force").stdout
    after = cli("ipam", "check", check=1).stdout
    assert "leaked-ip" not in after and "handle-without-ips" not in after  # the ghost handle went too
    assert "affinity-without-block" in after  # not a leak: left for GC


def test_ipam_configure_and_unreachable_etcd(cli: Run, etcd_endpoints: list[str]) -> None:
    assert "StrictAffinity" in cli("ipam", "configure", "--strictaffinity=true").stdout
    before = keyspace(etcd_endpoints)
    for args, message in ((("--max-blocks-per-host=4",), "--strictaffinity"),
                          (("--strictaffinity=true", "--max-blocks-per-host=-1"), "must be 0 (no cap) or more")):
        refused = cli("ipam", "configure", *args, check=1)
        assert message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert keyspace(etcd_endpoints) == before
    env = {**os.environ, "ETCD_ENDPOINTS": "http://127.0.0.1:9"}
    result = subprocess.run([CLI, "get", "ippools"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 2 and "etcd unreachable" in result.stderr


def test_binary_files_and_usage_errors_are_user_errors_not_etcd_outages(cli: Run, tmp_path: Path,
                                                                         etcd_endpoints: list[str]) -> None:
    binary = tmp_path / "pool.yaml.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
    before = keyspace(etcd_endpoints)
    refused = cli("apply", "-f", str(binary), check=1).stderr
    assert "not UTF-8 text (byte 0x8b at offset 1)" in refused and len(refused.strip().splitlines()) == 1
    assert keyspace(etcd_endpoints) == before
    for args in (("apply",), ("get",), ("--bogus", "get", "ippools"), ("ipam", "show", "--nope")):
        assert "usage:" in cli(*args, check=1).stderr  # 2 is "etcd unreachable" only


def test_node_status_without_a_daemon(cli: Run) -> None:
    assert cli("node", "status", check=1).stdout.strip() == "calico-py process is not running."


def test_pool_with_allocations_is_kept_unless_forced(cli: Run, etcd_endpoints: list[str]) -> None:
    cli("apply", "-f", "-", stdin=RESOURCES)

    async def allocate() -> None:
        async with Datastore(EtcdConfig.parse(etcd_endpoints)) as store:
            await IPAM(store).auto_assign("k8s-pod-network.c1", "node1")
    asyncio.run(allocate())
    before = keyspace(etcd_endpoints)
    refused = cli("delete", "ippool", "pool-a", check=1).stderr
    assert "still has 1 addresses allocated" in refused and "--force" in refused
    assert keyspace(etcd_endpoints) == before
    assert "deleted" in cli("delete", "ippool", "pool-a", "--force").stdout
    assert "does not exist" in cli("get", "ippool", "pool-a", check=1).stderr


def test_config_file_like_calicoctl_cfg(etcd_endpoints: list[str], tmp_path: Path) -> None:
    config = tmp_path / "calicoctl.cfg"
    config.write_text("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\n"
                      f"spec:\n  datastoreType: etcdv3\n  etcdEndpoints: {','.join(etcd_endpoints)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    result = subprocess.run([CLI, "--config", str(config), "apply", "-f", "-"], input=RESOURCES, text=True,
                            capture_output=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.cfg"
    bad.write_text("kind: Something\n")
    result = subprocess.run([CLI, "--config", str(bad), "get", "ippools"], text=True, capture_output=True, env=env,
                            timeout=60, check=False)
    assert result.returncode == 1 and "expected kind CalicoAPIConfig" in result.stderr
