"""containerlab topology files: parsed into plain dataclasses, validated, with file:line in every error.

Supported: ``name``, ``prefix`` (warned), ``mgmt.network`` / ``mgmt.ipv4-subnet``, ``topology.defaults``,
``topology.kinds.<kind>``, ``topology.nodes.<name>`` with ``kind`` (``linux``, ``bridge``), ``image``, ``exec``,
``env``, ``binds``, ``cmd``, ``mgmt-ipv4``, ``labels``, ``group``; ``topology.links`` with ``endpoints`` in the
short form (``["a:eth1", "b:eth1"]``) or the extended one (``{node:, interface:}``). Anything else is reported
as a warning naming the line, never silently dropped.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("linux", "bridge")
NODE_FIELDS = {"kind", "image", "exec", "env", "binds", "cmd", "mgmt-ipv4", "labels", "group"}
# Fields real containerlab knows that mean nothing without a container engine: warned about, then ignored.
NODE_FIELDS_IGNORED = {"ports", "entrypoint", "user", "restart-policy", "network-mode", "cpu", "memory",
                       "sysctls", "publish", "startup-config", "startup-delay", "enforce-startup-config",
                       "license", "mgmt-ipv6", "runtime", "stages", "healthcheck", "image-pull-policy",
                       "devices", "cap-add", "shm-size", "extras", "wait-for", "dns", "certificate",
                       "aliases", "components", "type", "config", "suppress-startup-config", "auto-remove"}
INTERFACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
DEFAULT_MGMT_SUBNET = "172.20.20.0/24"


class TopologyError(ValueError):
    """A topology file that cannot be deployed; the message names the file and line."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader that remembers the line of every mapping key and sequence item."""


class LineDict(dict):  # type: ignore[type-arg]
    lines: dict[Any, int]
    line: int


class LineList(list):  # type: ignore[type-arg]
    lines: list[int]
    line: int


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    result = LineDict()
    result.lines = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise TopologyError(f"{{file}}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(item, deep=True) for item in node.value)
    result.lines = [item.start_mark.line + 1 for item in node.value]
    result.line = node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


@dataclass(frozen=True)
class Endpoint:
    node: str
    interface: str

    def __str__(self) -> str:
        return f"{self.node}:{self.interface}"


@dataclass(frozen=True)
class Link:
    a: Endpoint
    b: Endpoint
    line: int


@dataclass(frozen=True)
class Bind:
    source: Path  # on this machine, resolved against the topology file's folder
    target: str  # inside the container
    read_only: bool


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    image: str = ""
    exec: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    binds: tuple[Bind, ...] = ()
    cmd: str = ""
    mgmt_ipv4: ipaddress.IPv4Address | None = None
    labels: dict[str, str] = field(default_factory=dict)
    group: str = ""
    line: int = 0

    def bind_for(self, target: str) -> Bind | None:
        return next((b for b in self.binds if b.target == target), None)


@dataclass(frozen=True)
class Topology:
    name: str
    path: Path
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    mgmt_network: str
    mgmt_subnet: ipaddress.IPv4Network
    warnings: tuple[str, ...] = ()

    def interfaces(self, node: str) -> list[str]:
        """The node's data-plane interfaces, in link order."""
        return [e.interface for link in self.links for e in (link.a, link.b) if e.node == node]

    def mgmt_addresses(self) -> dict[str, ipaddress.IPv4Interface]:
        """eth0 address of every non-bridge node: fixed ones first, then the next free host in file order."""
        taken = {n.mgmt_ipv4 for n in self.nodes.values() if n.mgmt_ipv4}
        gateway = self.mgmt_gateway
        free = (h for h in self.mgmt_subnet.hosts() if h != gateway.ip and h not in taken)
        result = {}
        for node in self.nodes.values():
            if node.kind == "bridge":
                continue
            address = node.mgmt_ipv4 or next(free, None)
            if address is None:
                raise TopologyError(f"{self.path}: mgmt ipv4-subnet {self.mgmt_subnet} has no address left "
                                    f"for node {node.name}; use a larger subnet")
            result[node.name] = ipaddress.IPv4Interface(f"{address}/{self.mgmt_subnet.prefixlen}")
        return result

    @property
    def mgmt_gateway(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{next(self.mgmt_subnet.hosts())}/{self.mgmt_subnet.prefixlen}")


def load(path: str | Path, name_override: str | None = None) -> Topology:
    """Read and validate a topology file. Raises TopologyError naming ``file:line`` and what to fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read the topology file: {exc.strerror}") from None
    return parse(text, path, name_override)


def parse(text: str, path: Path, name_override: str | None = None) -> Topology:
    try:
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except TopologyError as exc:
        raise TopologyError(str(exc).replace("{file}", str(path))) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TopologyError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return _Builder(path).build(doc, name_override)


class _Builder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []

    def fail(self, line: int, message: str) -> TopologyError:
        return TopologyError(f"{self.path}:{line}: {message}")

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(f"{self.path}:{line}: {message}")

    def mapping(self, value: Any, line: int, what: str) -> LineDict:
        if value is None:
            empty = LineDict()
            empty.lines, empty.line = {}, line
            return empty
        if not isinstance(value, LineDict):
            raise self.fail(line, f"{what} must be a mapping")
        return value

    def build(self, doc: Any, name_override: str | None) -> Topology:
        if not isinstance(doc, LineDict):
            raise self.fail(1, "a topology file is a mapping with name: and topology:")
        for key in doc:
            if key not in ("name", "mgmt", "topology", "prefix"):
                self.warn(doc.lines[key], f"top-level field {key!r} is not supported and is ignored")
        if "prefix" in doc:
            self.warn(doc.lines["prefix"], "prefix: is ignored; namespaces are always named clab-<lab>-<node>")
        name = name_override or doc.get("name")
        if not isinstance(name, str) or not NODE_NAME.match(name):
            raise self.fail(doc.lines.get("name", 1), f"name: must be a lab name of letters, digits, - and _, "
                                                      f"got {name!r}")
        mgmt = self.mapping(doc.get("mgmt"), doc.lines.get("mgmt", 1), "mgmt:")
        subnet_text = mgmt.get("ipv4-subnet", DEFAULT_MGMT_SUBNET)
        try:
            subnet = ipaddress.IPv4Network(subnet_text)
        except ValueError:
            raise self.fail(mgmt.lines.get("ipv4-subnet", mgmt.line),
                            f"mgmt ipv4-subnet {subnet_text!r} is not an IPv4 network") from None
        for key in mgmt:
            if key not in ("network", "ipv4-subnet"):
                self.warn(mgmt.lines[key], f"mgmt field {key!r} is not supported and is ignored")
        if "topology" not in doc:
            raise self.fail(1, "missing topology: (with nodes: and links:)")
        topo = self.mapping(doc["topology"], doc.lines["topology"], "topology:")
        for key in topo:
            if key not in ("nodes", "links", "defaults", "kinds"):
                self.warn(topo.lines[key], f"topology field {key!r} is not supported and is ignored")
        defaults = self.mapping(topo.get("defaults"), topo.lines.get("defaults", topo.line), "defaults:")
        kinds = self.mapping(topo.get("kinds"), topo.lines.get("kinds", topo.line), "kinds:")
        raw_nodes = self.mapping(topo.get("nodes"), topo.lines.get("nodes", topo.line), "nodes:")
        if not raw_nodes:
            raise self.fail(topo.line, "topology: has no nodes")
        nodes = {}
        for node_name, raw in raw_nodes.items():
            nodes[node_name] = self.node(str(node_name), raw, raw_nodes.lines[node_name], defaults, kinds)
        self.check_mgmt_addresses(nodes, subnet)
        links = self.links(topo, nodes)
        return Topology(name=name, path=self.path.resolve(), nodes=nodes, links=tuple(links),
                        mgmt_network=str(mgmt.get("network", f"clab-{name}")), mgmt_subnet=subnet,
                        warnings=tuple(self.warnings))

    def node(self, name: str, raw: Any, line: int, defaults: LineDict, kinds: LineDict) -> Node:
        if not NODE_NAME.match(name):
            raise self.fail(line, f"node name {name!r}: use letters, digits, - and _")
        raw = self.mapping(raw, line, f"node {name}")
        kind = raw.get("kind", defaults.get("kind", "linux"))
        if kind not in KINDS:
            raise self.fail(raw.lines.get("kind", line), f"node {name}: kind {kind!r} cannot run in namespaces "
                                                         f"(supported: {', '.join(KINDS)})")
        kind_defaults = self.mapping(kinds.get(kind), kinds.lines.get(kind, line), f"kinds.{kind}")
        # containerlab's inheritance: node overrides kind overrides defaults; env and labels merge.
        merged: dict[str, Any] = {}
        merged_lines: dict[str, int] = {}
        for layer in (defaults, kind_defaults, raw):
            for key, value in layer.items():
                merged_lines[key] = layer.lines[key]
                if key in ("env", "labels") and isinstance(value, dict):
                    merged[key] = {**merged.get(key, {}), **value}
                else:
                    merged[key] = value
        for key in merged:
            if key in NODE_FIELDS_IGNORED:
                self.warn(merged_lines[key], f"node {name}: {key} has no meaning without a container engine; "
                                             "ignored")
            elif key not in NODE_FIELDS:
                self.warn(merged_lines[key], f"node {name}: unknown field {key!r} ignored")
        image = merged.get("image", "")
        if kind == "linux" and not image:
            raise self.fail(line, f"node {name}: kind linux needs an image:")
        execs = merged.get("exec") or []
        if not isinstance(execs, list) or not all(isinstance(c, str) for c in execs):
            raise self.fail(merged_lines.get("exec", line), f"node {name}: exec must be a list of commands")
        env = merged.get("env") or {}
        if not isinstance(env, dict):
            raise self.fail(merged_lines.get("env", line), f"node {name}: env must be a mapping")
        mgmt_ip = None
        if "mgmt-ipv4" in merged:
            try:
                mgmt_ip = ipaddress.IPv4Address(merged["mgmt-ipv4"])
            except ValueError:
                raise self.fail(merged_lines["mgmt-ipv4"], f"node {name}: mgmt-ipv4 "
                                                           f"{merged['mgmt-ipv4']!r} is not an IPv4 address") from None
        if kind == "linux" and "cmd" in merged:
            self.warn(merged_lines["cmd"], f"node {name}: cmd is not run in namespaces; the image table's command "
                                           "runs (docs/lab.md)")
        if kind == "bridge":
            for key in ("image", "exec", "env", "binds", "cmd"):
                if key in merged:
                    self.warn(merged_lines[key], f"node {name}: {key} is ignored on a bridge")
        return Node(name=name, kind=kind, image=str(image), exec=tuple(execs),
                    env={str(k): "" if v is None else str(v) for k, v in env.items()},
                    binds=self.binds(name, merged.get("binds"), merged_lines.get("binds", line)),
                    cmd=str(merged.get("cmd", "")), mgmt_ipv4=mgmt_ip,
                    labels={str(k): str(v) for k, v in (merged.get("labels") or {}).items()},
                    group=str(merged.get("group", "")), line=line)

    def binds(self, node: str, raw: Any, line: int) -> tuple[Bind, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail(line, f"node {node}: binds must be a list of host:container[:ro]")
        result = []
        lines = getattr(raw, "lines", [line] * len(raw))
        for entry, entry_line in zip(raw, lines, strict=True):
            parts = str(entry).split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
                raise self.fail(entry_line, f"node {node}: bind {entry!r} is not host_path:/container/path[:ro]")
            source = (self.path.parent / parts[0]).resolve()
            if not source.exists():
                raise self.fail(entry_line, f"node {node}: bind source {parts[0]} does not exist "
                                            f"(looked for {source})")
            result.append(Bind(source=source, target=parts[1], read_only=len(parts) == 3 and parts[2] == "ro"))
        return tuple(result)

    def check_mgmt_addresses(self, nodes: dict[str, Node], subnet: ipaddress.IPv4Network) -> None:
        seen: dict[ipaddress.IPv4Address, str] = {}
        gateway = next(subnet.hosts())
        for node in nodes.values():
            address = node.mgmt_ipv4
            if address is None:
                continue
            if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
                raise self.fail(node.line, f"node {node.name}: mgmt-ipv4 {address} is not a host of {subnet}")
            if address == gateway:
                raise self.fail(node.line, f"node {node.name}: mgmt-ipv4 {address} is the management gateway")
            if address in seen:
                raise self.fail(node.line, f"node {node.name}: mgmt-ipv4 {address} is already used by "
                                           f"node {seen[address]}")
            seen[address] = node.name

    def links(self, topo: LineDict, nodes: dict[str, Node]) -> list[Link]:
        raw_links = topo.get("links") or LineList()
        if not isinstance(raw_links, list):
            raise self.fail(topo.lines.get("links", topo.line), "links: must be a list")
        used: dict[Endpoint, int] = {}
        links = []
        lines = getattr(raw_links, "lines", [topo.line] * len(raw_links))
        for raw, line in zip(raw_links, lines, strict=True):
            if not isinstance(raw, dict) or "endpoints" not in raw:
                raise self.fail(line, "a link needs endpoints: [\"a:eth1\", \"b:eth1\"]")
            for key in raw:
                if key not in ("endpoints", "type"):
                    self.warn(getattr(raw, "lines", {}).get(key, line), f"link field {key!r} is ignored")
            if raw.get("type", "veth") != "veth":
                raise self.fail(line, f"link type {raw['type']!r} is not supported (only veth)")
            ends = raw["endpoints"]
            if not isinstance(ends, list) or len(ends) != 2:
                raise self.fail(line, "a link has exactly two endpoints")
            pair = [self.endpoint(end, line) for end in ends]
            for end in pair:
                if end.node not in nodes:
                    raise self.fail(line, f"link endpoint {end} names node {end.node!r}, which is not defined "
                                          "under topology.nodes")
                if end.interface == "eth0" and nodes[end.node].kind != "bridge":
                    raise self.fail(line, f"link endpoint {end}: eth0 is the management interface; "
                                          "data links start at eth1")
                if end in used:
                    raise self.fail(line, f"interface {end} is already used by the link on line {used[end]}")
                used[end] = line
            if pair[0].node == pair[1].node and nodes[pair[0].node].kind == "bridge":
                raise self.fail(line, "a link cannot join a bridge to itself")
            links.append(Link(pair[0], pair[1], line))
        return links

    def endpoint(self, raw: Any, line: int) -> Endpoint:
        if isinstance(raw, dict):
            node, interface = raw.get("node"), raw.get("interface")
        elif isinstance(raw, str) and raw.count(":") == 1:
            node, interface = raw.split(":")
        else:
            raise self.fail(line, f"link endpoint {raw!r} is not \"node:interface\"")
        if not node or not interface or not INTERFACE_NAME.match(str(interface)):
            raise self.fail(line, f"link endpoint {raw!r}: interface names are 1-15 characters of letters, "
                                  "digits, ., _, - and @")
        return Endpoint(str(node), str(interface))
