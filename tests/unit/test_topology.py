"""containerlab topology parsing: the shapes we accept, and errors that name the line."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from containerlab.graph import to_dot
from containerlab.images import spec_for
from containerlab.topology import TopologyError, parse

GOOD = """\
name: t1
mgmt:
  network: t1-mgmt
  ipv4-subnet: 172.31.0.0/24
topology:
  defaults:
    env: {CALICO_IPV4POOL_CIDR: 10.244.0.0/16}
  kinds:
    linux:
      env: {LOG_LEVEL: info}
  nodes:
    etcd:
      kind: linux
      image: quay.io/coreos/etcd:v3.4.23
      mgmt-ipv4: 172.31.0.10
    lan:
      kind: bridge
    node1:
      kind: linux
      image: ghcr.io/calico-py/calico-py-node:latest
      env: {NODENAME: node1, LOG_LEVEL: debug}
      exec: ["ip addr add 10.0.0.11/24 dev eth1"]
      ports: ["8080:80"]
    node2:
      kind: linux
      image: alpine:3.20
  links:
    - endpoints: ["node1:eth1", "lan:eth1"]
    - endpoints: [{node: node2, interface: eth1}, {node: lan, interface: eth2}]
"""


def load_text(text: str) -> object:
    return parse(textwrap.dedent(text), Path("/labs/t.clab.yml"))


def test_a_good_file() -> None:
    topo = load_text(GOOD)
    assert topo.name == "t1" and topo.mgmt_subnet == ipaddress.ip_network("172.31.0.0/24")
    assert list(topo.nodes) == ["etcd", "lan", "node1", "node2"]
    node1 = topo.nodes["node1"]
    # defaults < kinds < node, env merged
    assert node1.env == {"CALICO_IPV4POOL_CIDR": "10.244.0.0/16", "LOG_LEVEL": "debug", "NODENAME": "node1"}
    assert topo.nodes["node2"].env["LOG_LEVEL"] == "info"
    assert [str(link.a) + "-" + str(link.b) for link in topo.links] == ["node1:eth1-lan:eth1", "node2:eth1-lan:eth2"]
    assert topo.interfaces("lan") == ["eth1", "eth2"]
    mgmt = topo.mgmt_addresses()
    assert str(topo.mgmt_gateway) == "172.31.0.1/24"
    assert {n: str(a) for n, a in mgmt.items()} == {
        "etcd": "172.31.0.10/24", "node1": "172.31.0.2/24", "node2": "172.31.0.3/24"}
    assert any(":23: node node1: ports has no meaning" in w for w in topo.warnings), topo.warnings


def test_name_override() -> None:
    assert parse(GOOD, Path("x.yml"), name_override="t1-copy").name == "t1-copy"


@pytest.mark.parametrize(("change", "message"), [
    (('["node1:eth1", "lan:eth1"]', '["node9:eth1", "lan:eth1"]'),
     ":28: link endpoint node9:eth1 names node 'node9', which is not defined"),
    (('{node: node2, interface: eth1}, {node: lan, interface: eth2}', '{node: node2, interface: eth1}, '
      '{node: lan, interface: eth1}'), ":29: interface lan:eth1 is already used by the link on line 28"),
    (('["node1:eth1", "lan:eth1"]', '["node1:eth0", "lan:eth1"]'), ":28: link endpoint node1:eth0: eth0 is the "
     "management interface"),
    (('["node1:eth1", "lan:eth1"]', '["node1-eth1", "lan:eth1"]'), ":28: link endpoint 'node1-eth1' is not"),
    (('["node1:eth1", "lan:eth1"]', '["node1:averyveryverylongname", "lan:eth1"]'), ":28: link endpoint"),
    (("      kind: bridge", "      kind: ovs-bridge"), ":17: node lan: kind 'ovs-bridge' cannot run"),
    (("      mgmt-ipv4: 172.31.0.10", "      mgmt-ipv4: 172.31.9.10"), "is not a host of 172.31.0.0/24"),
    (("      mgmt-ipv4: 172.31.0.10", "      mgmt-ipv4: 172.31.0.1"), "is the management gateway"),
    (("  ipv4-subnet: 172.31.0.0/24", "  ipv4-subnet: 172.31.0.0/33"), ":4: mgmt ipv4-subnet"),
    (("    node2:\n", "    node1:\n"), ":24: duplicate key 'node1'"),
    (("      image: alpine:3.20", "      exec: [1, 2]\n      image: alpine"), ":26: node node2: exec must be"),
    (("    - endpoints: [\"node1:eth1\"", "    - endpoints: [\"node1:eth1\", \"lan:eth9\", \"lan:eth8\"]\n    -"
      " endpoints: [\"node1:eth1\""), ":28: a link has exactly two endpoints"),
    (("name: t1", "name: t1\nfoo: [unclosed"), "not valid YAML"),
])
def test_broken_files_name_the_line(change: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*change, 1)
    assert text != GOOD
    with pytest.raises(TopologyError) as caught:
        load_text(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("/labs/t.clab.yml")


def test_unknown_fields_are_warnings_not_silence() -> None:
    topo = load_text(GOOD.replace("  network: t1-mgmt", "  network: t1-mgmt\n  mtu: 9000").replace(
        "name: t1", "name: t1\nprefix: lab"))
    assert any(":5: mgmt field 'mtu' is not supported" in w for w in topo.warnings)
    assert any(":2: prefix: is ignored" in w for w in topo.warnings)


def test_binds_must_exist(tmp_path: Path) -> None:
    (tmp_path / "bird.conf").write_text("")
    bird = "      image: bird2\n      binds: [bird.conf:/etc/bird/bird.conf:ro]"
    good = GOOD.replace("      image: alpine:3.20", bird)
    topo = parse(good, tmp_path / "t.clab.yml")
    bind = topo.nodes["node2"].bind_for("/etc/bird/bird.conf")
    assert bind is not None and bind.source == tmp_path / "bird.conf" and bind.read_only
    with pytest.raises(TopologyError, match=r":27: node node2: bind source nope.conf does not exist"):
        parse(good.replace("bird.conf:/etc", "nope.conf:/etc"), tmp_path / "t.clab.yml")


def test_image_table() -> None:
    assert spec_for("quay.io/frrouting/frr:8.4.4").name == "frr"
    assert spec_for("ghcr.io/calico-py/bird2:latest").name == "bird"
    assert spec_for("quay.io/coreos/etcd:v3.4.23").name == "etcd"
    assert spec_for("ghcr.io/calico-py/calico-py-node:latest").name == "calico-py-node"
    assert spec_for("alpine:3.20").name == "plain"
    assert spec_for("example.com/mystery:1") is None


def test_graph_is_dot_with_every_node_and_link() -> None:
    dot = to_dot(load_text(GOOD))
    assert dot.startswith('graph "t1" {')
    for name in ("etcd", "lan", "node1", "node2"):
        assert f'"{name}" [shape=' in dot
    assert '"node1" -- "lan" [taillabel="eth1", headlabel="eth1"]' in dot
    assert dot.count(" -- ") == 2
