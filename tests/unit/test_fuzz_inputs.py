"""Fuzzing what users and peers hand us (hypothesis): the CNI request parser, Calico's pod annotations, the
resource validators calicoctl-py runs on YAML files, and the BGP import filter. Whatever comes in, the only
exception out is the documented one (CNIError with a spec code, AnnotationError, InvalidResource, UserError), and
its message is one non-empty line: what is wrong, and what to do."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import string
from pathlib import Path
from typing import Any, TextIO

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bgpd.cni import spec
from bgpd.cni.annotations import IP_ADDRS, IPV4_POOLS, IPV6_POOLS, AnnotationError, pod_request
from bgpd.health import Metrics
from bgpd.speaker.exabgp import ExaBGP
from bgpd.speaker.peers import (
    AS_PATH_TOO_LONG,
    DEFAULT_ROUTE,
    GLOBAL,
    MALFORMED,
    MAX_AS_PATH,
    MESH,
    MORE_SPECIFIC,
    OUTSIDE_POOLS,
    WHOLE_POOL,
    BGPPath,
    NodeInfo,
    PeerSpec,
    PoolFilter,
    config_problem,
    desired_peers,
    node_problem,
    peer_problem,
    secret_ref,
)
from bgpd.speaker.plan import restart_seconds
from bgpd.speaker.sync import BGPSync
from bgpd.view import NodeView
from calicoctl_py.commands.resources import UserError, normalise, read_documents
from ipam.errors import InvalidResource
from ipam.model import IPPool
from ipam.validation import validate

# FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the file within a few seconds.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SPEC_CODES = {value for name, value in vars(spec).items() if name.isupper() and isinstance(value, int)}

# JSON-like values: what a decoder can give back, nested.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
DEEP = "[" * 3000  # nesting deeper than the interpreter's recursion limit (1000)


def one_clean_line(exc: BaseException) -> None:
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in message and "\r" not in message, f"a message of several lines: {message!r}"


# ------------------------------------------------------------------ CNI

env_keys = st.sampled_from(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"])
commands = st.sampled_from([*spec.COMMANDS, "", "add", "ADD ", "DEL\n"]) | st.text(max_size=8)
versions = st.sampled_from([*spec.SUPPORTED_VERSIONS, "2.0.0", ""]) | json_values
ipams = st.fixed_dictionaries({}, optional={
    "type": st.just("calico-py-ipam") | json_values, "ipv4_pools": st.lists(st.text(max_size=8)) | json_values,
    "assign_ipv4": st.sampled_from(["true", "false", "TRUE", True]) | json_values,
    "assign_ipv6": st.sampled_from(["true", "false"]) | json_values})
configs = st.fixed_dictionaries({}, optional={
    "cniVersion": versions, "name": st.text(min_size=1, max_size=10) | json_values, "type": st.just("calico-py"),
    "ipam": ipams | json_values, "mtu": st.integers(-1, 70000) | st.sampled_from(["1400", "²", "0"]) | json_values,
    "cni.dev/valid-attachments": st.lists(json_values, max_size=2) | json_values}) | json_values
stdins = (configs.map(lambda c: json.dumps(c).encode()) | st.binary(max_size=64) | st.text(max_size=64)
          | st.sampled_from([DEEP, DEEP.encode(), b"\xff\xfe", "{\"name\": \"\ud800\"}", ""]))


@FUZZ
@given(env=st.dictionaries(env_keys, st.text(max_size=20), max_size=6), command=commands, stdin=stdins)
def test_cni_parse_request_accepts_or_says_what_is_wrong(env: dict[str, str], command: str, stdin: Any) -> None:
    env = {**env, "CNI_COMMAND": command}
    try:
        request = spec.parse_request(env, stdin)
    except spec.CNIError as exc:
        assert exc.code in SPEC_CODES
        one_clean_line(exc)
        json.dumps(exc.to_json())  # what the shim prints must serialise
        return
    assert request.command in spec.COMMANDS and isinstance(request.config, dict)
    if request.command != "VERSION":  # what the handler then reads is in the shape it reads it in
        ipam = request.config.get("ipam") or {}
        assert isinstance(ipam, dict) and isinstance(ipam.get("ipv4_pools") or [], list)
        int(request.config.get("mtu") or 0)
        assert isinstance(request.config.get("cni.dev/valid-attachments") or [], list)


@FUZZ
@given(st.text(max_size=40) | st.lists(st.sampled_from(["K=V", ";", "=", "A=", "=B", "K8S_POD_NAME=x", "\n"]))
       .map("".join))
def test_cni_args_parse_or_say_what_is_wrong(text: str) -> None:
    try:
        parsed = spec.parse_args(text)
    except spec.CNIError as exc:
        assert exc.code == spec.INVALID_ENVIRONMENT
        one_clean_line(exc)
        return
    assert all(key and "=" not in key for key in parsed)


annotation_values = (st.text(max_size=30) | json_values.map(json.dumps)
                     | st.lists(st.text(max_size=8) | st.sampled_from(["10.244.1.1", "fd00::1", "fe80::1%eth0"]),
                                max_size=3).map(json.dumps)
                     | st.just(DEEP))
annotations = st.dictionaries(st.sampled_from([IPV4_POOLS, IPV6_POOLS, IP_ADDRS, "other"]), annotation_values,
                              max_size=3)


@FUZZ
@given(pod=annotations, namespace=annotations, labels=st.dictionaries(st.text(max_size=8), st.text(max_size=8)))
@example(pod={IPV4_POOLS: DEEP}, namespace={}, labels={})
def test_pod_annotations_are_used_or_refused_in_one_line(pod: dict[str, str], namespace: dict[str, str],
                                                         labels: dict[str, str]) -> None:
    try:
        chosen = pod_request(pod, namespace, labels)
    except AnnotationError as exc:
        one_clean_line(exc)
        return
    assert all(isinstance(p, str) and p for p in chosen.ipv4_pools or ())
    assert len({a.version for a in chosen.fixed}) == len(chosen.fixed)


# ------------------------------------------------------------------ resources (calicoctl-py create/apply)

kinds = st.sampled_from(["IPPool", "BGPPeer", "BGPConfiguration", "Node", "ippool", "FooList", "List", ""])
field_values = (json_values | st.sampled_from(["10.244.0.0/16", "10.244.0.1/16", "fd00::/48", "10.0.0.1",
                                                "10.0.0.1:1179", "[fd00::1]:179", "120s", "all()", "has(x",
                                                "a == 'b'", "Always", "Never", "UseNodeIP", "00:11:22:33:44:55",
                                                "10.0.0.11/24", "169.254.0.0/16"])
                | st.integers(-1, 2**33) | st.just({"secretKeyRef": {"name": "s", "key": "k"}}))
spec_fields = st.sampled_from(["cidr", "blockSize", "ipipMode", "vxlanMode", "natOutgoing", "nodeSelector",
                               "disabled", "allowedUses", "peerIP", "asNumber", "node", "peerSelector",
                               "password", "nodeToNodeMeshEnabled", "listenPort", "serviceClusterIPs",
                               "nodeMeshMaxRestartTime", "bgp", "orchRefs", "unknownField"])
specs = st.dictionaries(spec_fields, field_values | st.dictionaries(
    st.sampled_from(["ipv4Address", "asNumber", "routeReflectorClusterID", "x"]), field_values), max_size=5)
names = st.sampled_from(["default", "pool-1", "node.a", "Bad_Name", ""]) | json_values
documents = st.fixed_dictionaries(
    {"kind": kinds}, optional={"apiVersion": st.sampled_from(["projectcalico.org/v3", "v1"]) | json_values,
                               "metadata": st.fixed_dictionaries({}, optional={"name": names,
                                                                              "labels": json_values})
                               | json_values,
                               "spec": specs | json_values, "items": st.lists(json_values, max_size=2) | json_values})


@FUZZ
@given(documents | json_values)
def test_resource_validators_accept_or_name_field_and_reason(document: Any) -> None:
    for check in (validate, IPPool.from_v3):
        try:
            check(document)
        except InvalidResource as exc:
            one_clean_line(exc)
    try:
        normalise("file document 1", document)
    except UserError as exc:
        one_clean_line(exc)


yaml_texts = (documents.map(lambda d: json.dumps(d)) | json_values.map(json.dumps) | st.text(max_size=80)
              | st.lists(st.sampled_from(["kind: IPPool\n", "metadata: {name: a}\n", "spec:\n", "  cidr: x\n",
                                          "---\n", "- a\n", "items: 5\n", "kind: FooList\n", "&a [*a]\n",
                                          "!!python/object:os.system {}\n",
                                          "key: [\n", "\t", ": :\n", "%YAML 9\n"]), max_size=8).map("".join)
              | st.just(DEEP))


@FUZZ
@given(yaml_texts)
@example("kind: IPPoolList\nitems: 5\n")
@example("kind: BGPPeerList\nitems: {a: 1}\n")
def test_calicoctl_reads_any_file_into_documents_or_one_clean_error(text: str) -> None:
    documents_or_one_clean_error(io.StringIO(text))


def documents_or_one_clean_error(stdin: TextIO) -> None:
    """Every document of ``stdin`` validated, or one clean line for the whole file or each document."""
    try:
        for label, document in read_documents("-", stdin):
            try:
                normalise(label, document)
            except UserError as exc:
                one_clean_line(exc)
    except UserError as exc:
        one_clean_line(exc)


@FUZZ
@given(st.binary(max_size=64) | yaml_texts.map(lambda t: t.encode("utf-8")))
@example(b"\x1f\x8b\x08\x00 gzip")
@example(b"kind: IPPool\nmetadata: {name: \xff}\n")
def test_calicoctl_reads_any_bytes_into_documents_or_one_clean_error(data: bytes) -> None:
    documents_or_one_clean_error(io.TextIOWrapper(io.BytesIO(data)))


argv_words = st.sampled_from(["apply", "create", "get", "delete", "ipam", "show", "check", "release", "configure",
                              "node", "status", "-f", "--force", "--yes", "--strictaffinity=true", "-o", "yaml",
                              "--max-blocks-per-host=-1", "--ip", "--bogus", "ippool", "x", ""])


@FUZZ
@given(st.lists(argv_words, max_size=5))
def test_calicoctl_usage_errors_exit_1_never_the_unreachable_code(argv: list[str]) -> None:
    from calicoctl_py.cli import parser
    try:
        parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, 1), f"{argv}: exit {exc.code} (2 means etcd unreachable)"


def test_a_document_without_api_version_is_refused_naming_the_field() -> None:
    with pytest.raises(UserError, match="field apiVersion: missing"):
        normalise("f document 1", {"kind": "BGPPeer", "metadata": {"name": "p"},
                                   "spec": {"peerIP": "10.0.0.1", "asNumber": 65001}})


# ------------------------------------------------------------------ BGP: what a peer announces

POOLS = [IPPool("p", ipaddress.ip_network("10.244.0.0/16"), 26),
         IPPool("one-block", ipaddress.ip_network("10.96.0.0/26"), 26),
         IPPool("v6", ipaddress.ip_network("fd00:10::/48"), 122)]


@pytest.mark.parametrize(("prefix", "path_length", "reason"), [
    ("10.244.7.0/26", 1, None),  # another node's block
    ("10.244.7.9/32", 1, None),  # a borrowed address: a host route, longest prefix wins
    ("10.244.0.0/20", 1, None),  # an aggregate of blocks (a ToR summarising)
    ("10.96.0.0/26", 0, None),  # a one-block pool's own CIDR
    ("fd00:10::40/122", 0, None),
    ("fd00:10::41/128", 0, None),
    ("10.244.7.16/28", 1, MORE_SPECIFIC),  # a piece of another node's block
    ("10.244.7.8/31", 1, MORE_SPECIFIC),
    ("fd00:10::40/124", 0, MORE_SPECIFIC),
    ("0.0.0.0/0", 1, DEFAULT_ROUTE),
    ("::/0", 1, DEFAULT_ROUTE),
    ("10.0.0.12/32", 1, OUTSIDE_POOLS),  # a node address
    ("192.0.2.0/24", 1, OUTSIDE_POOLS),
    ("10.0.0.0/8", 1, OUTSIDE_POOLS),  # covers the pool: not inside it
    ("10.244.0.0/16", 1, WHOLE_POOL),
    ("10.244.7.0/26", MAX_AS_PATH + 1, AS_PATH_TOO_LONG),
    ("10.244.7.0/26", MAX_AS_PATH, None),
    ("192.0.2.0/24", 1000, OUTSIDE_POOLS),  # the first reason found is the one counted
    ("10.244.7.1/26", 1, MALFORMED),  # host bits set
    ("bogus", 1, MALFORMED),
])
def test_import_filter_reasons(prefix: str, path_length: int, reason: str | None) -> None:
    assert PoolFilter(POOLS).reason(prefix, path_length) == reason
    assert PoolFilter(POOLS)(prefix) == (PoolFilter(POOLS).reason(prefix) is None)


@FUZZ
@given(st.text(string.hexdigits + ".:/%", max_size=45) | st.text(max_size=20)
       | st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1), st.integers(-1, 33)),
       st.integers(0, 5000))
def test_import_filter_judges_any_text_without_raising(prefix: str, path_length: int) -> None:
    reason = PoolFilter(POOLS).reason(prefix, path_length)
    assert reason in (None, OUTSIDE_POOLS, DEFAULT_ROUTE, WHOLE_POOL, MORE_SPECIFIC, AS_PATH_TOO_LONG, MALFORMED)
    if reason is None:  # accepted: inside a pool, as a block, an aggregate or a host route
        network = ipaddress.ip_network(prefix)
        assert any(network.version == p.cidr.version and network.subnet_of(p.cidr) for p in POOLS)  # type: ignore[arg-type]


def test_refused_routes_are_counted_once_per_announcement_and_exposed_as_a_metric(tmp_path: Path) -> None:
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
    rogue, mesh = "10.0.0.66", "10.0.0.12"
    speaker.set_peers([PeerSpec(rogue, 65066, 64512, "10.0.0.11", GLOBAL, "rogue"),
                       PeerSpec(mesh, 64512, 64512, "10.0.0.11", MESH, "node2")])
    sync = BGPSync(lambda: NodeView("node1"), speaker)
    speaker.rib.set_filter(PoolFilter(POOLS[:1]))

    def update(peer: str, announce: list[str] = (), withdraw: list[str] = (), **attributes: Any) -> None:  # type: ignore[assignment]
        body: dict[str, Any] = {"attribute": attributes}
        if announce:
            body["announce"] = {"ipv4 unicast": {peer: [{"nlri": p} for p in announce]}}
        if withdraw:
            body["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
        speaker._handle(json.dumps({"type": "update", "neighbor": {
            "address": {"peer": peer, "local": "10.0.0.11"}, "message": {"update": body}}}).encode())

    update(mesh, ["10.244.9.0/26"], **{"local-preference": 100})
    update(rogue, ["0.0.0.0/0", "192.0.2.0/24", "10.244.9.16/28", "10.244.9.0/26"],
           **{"local-preference": 1000, "as-path": [65066]})
    assert speaker.learned_changes() == {"10.244.9.0/26": (mesh,), "0.0.0.0/0": (), "192.0.2.0/24": (),
                                      "10.244.9.16/28": ()}  # the rogue's LOCAL_PREF is ignored: node2's path wins
    counts = {(rogue, DEFAULT_ROUTE): 1, (rogue, OUTSIDE_POOLS): 1, (rogue, MORE_SPECIFIC): 1}
    assert sync.rejected_total == counts
    assert speaker.learned() == {"10.244.9.0/26": (mesh,)} and speaker.learned_changes() == {}
    assert sync.rejected_total == counts  # the filter ran again; the peer announced nothing new
    update(rogue, withdraw=["192.0.2.0/24"])
    speaker.learned_changes()
    update(rogue, ["192.0.2.0/24"])  # announced again after a withdrawal: counted again
    speaker.learned_changes()
    assert sync.rejected_total[(rogue, OUTSIDE_POOLS)] == 2
    speaker.peers[rogue].downs, speaker.peers[rogue].last_down = 1, "notification sent (3,1)"
    sync.note_malformed()
    sync.note_malformed()  # the same reset seen twice counts once
    assert sync.rejected_total[(rogue, MALFORMED)] == 1

    update(rogue, ["10.244.9.64/26"], med=-1)  # a malformed attribute: the route is treated as withdrawn
    assert "10.244.9.64/26" not in speaker.learned()

    snapshot = {"peers": sync.status(), "reconcile": {"runs": 0, "fast_runs": 0, "errors": 0, "last_seconds": 0.0},
                "workloads": 0, "datastore": {"failovers": 0},
                "exabgp": {"malformed": dict(speaker.rib.malformed), "reloads_unanswered": 0}}
    text = Metrics(lambda: snapshot).text().decode()
    assert f'calico_py_bgp_routes_malformed_total{{peer="{rogue}"}} 1.0' in text
    assert f'calico_py_bgp_routes_rejected_total{{peer="{rogue}",reason="outside-pools"}} 2.0' in text
    assert f'calico_py_bgp_routes_rejected_total{{peer="{rogue}",reason="malformed"}} 1.0' in text
    assert f'peer="{mesh}",reason' not in text


def test_a_reflector_hands_its_clients_only_what_it_accepts(tmp_path: Path) -> None:
    speaker = ExaBGP(tmp_path, "10.0.1.11", on_routes=lambda: None)
    speaker.rib.set_filter(PoolFilter(POOLS[:1]))
    rogue_client, client = (PeerSpec(a, 64512, 64512, "10.0.1.11", GLOBAL, a, rr_client=True)
                            for a in ("10.0.1.66", "10.0.1.13"))
    speaker.set_peers([rogue_client, client])
    speaker.rib.cluster_id = "224.0.0.1"
    speaker.rib.tables = {rogue_client.address: {"0.0.0.0/0": BGPPath("10.0.1.66"),
                                                 "10.0.1.0/24": BGPPath("10.0.1.66"),
                                                 "10.244.1.0/26": BGPPath("10.0.1.66")}}
    out = speaker.rib.reflections()
    assert set(out[client.address]) == {"10.244.1.0/26"}


def test_a_flood_of_refused_routes_logs_a_bounded_number_of_lines(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    speaker = ExaBGP(tmp_path, "10.0.0.11", on_routes=lambda: None)
    speaker.set_peers([PeerSpec("10.0.0.66", 65066, 64512, "10.0.0.11", GLOBAL, "rogue")])
    sync = BGPSync(lambda: NodeView("node1"), speaker)
    speaker.rib.set_filter(PoolFilter(POOLS[:1]))
    speaker.rib.tables["10.0.0.66"] = {f"192.0.{i // 256}.{i % 256}/32": BGPPath("10.0.0.66") for i in range(5000)}
    with caplog.at_level("WARNING", logger="calico-py-node.bgp"):
        assert speaker.learned() == {}
    assert sync.rejected_total == {("10.0.0.66", OUTSIDE_POOLS): 5000}
    assert len(caplog.records) == 21 and "4980 more routes rejected" in caplog.records[-1].getMessage()


# ------------------------------------------------------------------ BGP: resources read from the datastore

ME = NodeInfo("n1", ipaddress.IPv4Interface("10.0.0.11/24"), None, {"rack": "a"}, "224.0.0.1")
peer_specs = st.fixed_dictionaries({}, optional={
    "peerIP": st.sampled_from(["10.0.0.9", "10.0.0.9:1179", "fd00::1", "x:y", "[::1]:5"]) | json_values,
    "asNumber": st.integers(-1, 2**33) | json_values, "node": st.sampled_from(["n1", "n2"]) | json_values,
    "nodeSelector": st.sampled_from(["all()", "has(x", "rack == 'a'"]) | json_values,
    "peerSelector": st.sampled_from(["all()", "has(x"]) | json_values,
    "password": st.just({"secretKeyRef": {"name": "s", "key": "k"}}) | st.just({"secretKeyRef": "x"}) | json_values})
bgp_peers = st.fixed_dictionaries({"metadata": st.fixed_dictionaries({"name": st.text(max_size=5)}) | json_values,
                                   "spec": peer_specs | json_values}) | json_values
nodes = st.fixed_dictionaries({"metadata": st.fixed_dictionaries(
    {"name": st.sampled_from(["n2", "n3"])}, optional={"labels": st.just({"rack": "a"}) | json_values}) | json_values,
    "spec": st.fixed_dictionaries({}, optional={"bgp": st.fixed_dictionaries({}, optional={
        "ipv4Address": st.sampled_from(["10.0.0.12/24", "10.0.0.12", "x"]) | json_values,
        "asNumber": st.integers(-1, 2**33) | json_values,
        "routeReflectorClusterID": st.sampled_from(["224.0.0.2", "x"]) | json_values}) | json_values}) | json_values})
bgp_configs = st.fixed_dictionaries({"spec": st.fixed_dictionaries({}, optional={
    "asNumber": st.integers(-1, 2**33) | json_values, "nodeToNodeMeshEnabled": json_values,
    "nodeMeshMaxRestartTime": st.sampled_from(["120s", "0s"]) | json_values,
    "nodeMeshPassword": json_values}) | json_values}) | json_values


@FUZZ
@given(st.lists(nodes, max_size=3), st.lists(bgp_peers, max_size=3), bgp_configs)
def test_peering_uses_every_usable_resource_and_never_trips_on_the_others(node_objs: list[Any], peer_objs: list[Any],
                                                                         config: Any) -> None:
    """What a tool other than calicoctl-py wrote to etcd: resources the problem checks pass never make the peer
    computation raise (one bad BGPPeer used to stop every node's BGP sync)."""
    others = [NodeInfo.from_v3(n) for n in node_objs if node_problem(n) is None]
    peers = [p for p in peer_objs if peer_problem(p) is None]
    usable_config = config if config_problem(config) is None else None
    desired = desired_peers(ME, [ME, *others], usable_config, peers)
    assert all(ipaddress.ip_address(p.address) and 1 <= p.peer_as <= 4294967295 for p in desired)
    for peer in peers:
        secret_ref(peer.get("spec") or {}, "password")
    restart_seconds(((usable_config or {}).get("spec") or {}).get("nodeMeshMaxRestartTime"))
    for problem in (node_problem, peer_problem, config_problem):
        for obj in (*node_objs, *peer_objs, config):
            reason = problem(obj)
            assert reason is None or (reason.strip() and "\n" not in reason)
