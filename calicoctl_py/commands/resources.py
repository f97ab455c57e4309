"""create / apply / replace / delete / get for IPPool, BGPPeer, BGPConfiguration, Node.

A file is checked as a whole before anything is written, and then written in ONE etcd transaction guarded by
the revision of every key it touches (and, when pools are involved, by "no pool changed since I looked"): a
file lands entirely or not at all.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from calicoctl_py.output import dump, table
from ipam import keys
from ipam.datastore import Condition, Datastore, Delete, ModRevisionIs, Operation, PrefixUnchangedSince, Put
from ipam.errors import ConflictRetriesExhausted, InvalidResource, IPAMError, ResourceExists, ResourceNotFound
from ipam.model import IPPool, check_overlap
from ipam.pools import PoolInUse, block_cidrs, check_blocks_fit, delete_pool
from ipam.validation import validate


class UserError(IPAMError):
    """A mistake in what the user asked (exit code 1)."""


@dataclass(frozen=True)
class Kind:
    name: str
    plural: str
    aliases: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (header, dotted path)
    wide: tuple[tuple[str, str], ...]


KINDS = {
    "IPPool": Kind("IPPool", keys.IP_POOLS, ("ippool", "ippools", "pool", "pools", "ipp"),
                   (("NAME", "metadata.name"), ("CIDR", "spec.cidr"), ("SELECTOR", "spec.nodeSelector")),
                   (("NAME", "metadata.name"), ("CIDR", "spec.cidr"), ("NAT", "spec.natOutgoing"),
                    ("IPIPMODE", "spec.ipipMode"), ("VXLANMODE", "spec.vxlanMode"), ("DISABLED", "spec.disabled"),
                    ("DISABLEBGPEXPORT", "spec.disableBGPExport"), ("SELECTOR", "spec.nodeSelector"))),
    "BGPPeer": Kind("BGPPeer", keys.BGP_PEERS, ("bgppeer", "bgppeers", "bgpp", "peer", "peers"),
                    (("NAME", "metadata.name"), ("PEERIP", "spec.peerIP"), ("NODE", "spec.node"),
                     ("ASN", "spec.asNumber")),
                    (("NAME", "metadata.name"), ("PEERIP", "spec.peerIP"), ("NODE", "spec.node"),
                     ("ASN", "spec.asNumber"), ("NODESELECTOR", "spec.nodeSelector"),
                     ("PEERSELECTOR", "spec.peerSelector"))),
    "BGPConfiguration": Kind("BGPConfiguration", keys.BGP_CONFIGURATIONS,
                             ("bgpconfiguration", "bgpconfigurations", "bgpconfig", "bgpconfigs"),
                             (("NAME", "metadata.name"), ("LOGSEVERITY", "spec.logSeverityScreen"),
                              ("MESHENABLED", "spec.nodeToNodeMeshEnabled"), ("ASNUMBER", "spec.asNumber")),
                             (("NAME", "metadata.name"), ("LOGSEVERITY", "spec.logSeverityScreen"),
                              ("MESHENABLED", "spec.nodeToNodeMeshEnabled"), ("ASNUMBER", "spec.asNumber"),
                              ("LISTENPORT", "spec.listenPort"))),
    "Node": Kind("Node", keys.NODES, ("node", "nodes", "no"), (("NAME", "metadata.name"),),
                 (("NAME", "metadata.name"), ("ASN", "spec.bgp.asNumber"), ("IPV4", "spec.bgp.ipv4Address"),
                  ("IPV6", "spec.bgp.ipv6Address"))),
}


def kind_named(text: str) -> Kind:
    for kind in KINDS.values():
        if text == kind.name or text.lower() in kind.aliases:
            return kind
    raise UserError(f"unknown resource kind {text!r}: use one of {', '.join(KINDS)}")


# ------------------------------------------------------------------ reading files


def read_documents(path: str, stdin: TextIO | None = None) -> list[tuple[str, Any]]:
    """(label, object) for each document of a YAML/JSON file or stdin ("-"); lists are expanded."""
    try:
        stream = stdin or sys.stdin
        # Bytes where there are bytes (a binary stdin), so that non-UTF-8 input is refused, not a traceback.
        data = (stream.buffer.read() if hasattr(stream, "buffer") else stream.read()) if path == "-" \
            else Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    source = "stdin" if path == "-" else path
    text = utf8_text(data, source)
    try:
        raw = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        # problem: the parser's own one-line reason; a reader error (a control character) has only its str()
        problem = " ".join(str(getattr(exc, "problem", None) or str(exc).splitlines()[0]).split())
        raise UserError(f"{where}: not valid YAML/JSON: {problem}; nothing was written") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a resource file; nothing was written") from None
    documents: list[tuple[str, Any]] = []
    for index, doc in enumerate(d for d in raw if d is not None):
        items = doc if isinstance(doc, list) else doc.get("items") if isinstance(doc, dict) and str(
            doc.get("kind", "")).endswith("List") else [doc]
        if items is not None and not isinstance(items, list):
            raise UserError(f"{source} document {index + 1}: items of a {doc.get('kind')} must be a list of "
                            "resources; nothing was written")
        for sub, item in enumerate(items or []):
            label = f"{source} document {index + 1}" + (f" item {sub + 1}" if len(items) > 1 else "")
            documents.append((label, item))
    if not documents:
        raise UserError(f"{source}: no resources found")
    return documents


def utf8_text(data: bytes | str, source: str) -> str:
    """The text of a resource file; YAML and JSON are UTF-8, so anything else is refused, naming the first bad
    byte."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); give a "
                        "YAML or JSON file; nothing was written") from None


def normalise(label: str, obj: Any) -> dict[str, Any]:
    """Validate one document; the error names the document, the field and the reason."""
    try:
        if not isinstance(obj, dict):
            raise InvalidResource("?", "?", "(document)", "not a mapping")
        kind = kind_named(str(obj.get("kind", "")))
        if "apiVersion" not in obj:  # calicoctl refuses a document without one, whatever else it holds
            name = (obj.get("metadata") or {}).get("name", "?") if isinstance(obj.get("metadata"), dict) else "?"
            raise InvalidResource(kind.name, str(name), "apiVersion", "missing; set apiVersion: projectcalico.org/v3")
        if kind.name == "IPPool":
            return IPPool.from_v3({**obj, "kind": "IPPool"}).to_v3()
        return validate({**obj, "kind": kind.name})
    except (InvalidResource, UserError) as exc:
        raise UserError(f"{label}: {exc}; nothing was written") from None


# ------------------------------------------------------------------ writing


async def write(store: Datastore, documents: list[tuple[str, Any]], mode: str) -> list[str]:
    """mode: create (must not exist), replace (must exist), apply (either). Returns one line per resource."""
    objects = [(label, normalise(label, obj)) for label, obj in documents]
    seen: dict[str, str] = {}
    for label, obj in objects:
        key = keys.resource_key(KINDS[obj["kind"]].plural, obj["metadata"]["name"])
        if key in seen:
            raise UserError(f"{label}: {obj['kind']} {obj['metadata']['name']!r} also appears in {seen[key]}; "
                            "nothing was written")
        seen[key] = label
    pool_prefix = keys.resource_prefix(keys.IP_POOLS)
    new_pools = [IPPool.from_v3(obj) for _, obj in objects if obj["kind"] == "IPPool"]
    block_prefixes = [keys.blocks_prefix(version) for version in sorted({p.version for p in new_pools})]
    snapshot = await store.read(keys=list(seen), prefixes=[pool_prefix, *block_prefixes])
    existing_pools = [IPPool.from_v3(kv.json()) for kv in snapshot.prefixes[pool_prefix]]
    existing_blocks = block_cidrs(kv for prefix in block_prefixes for kv in snapshot.prefixes[prefix])
    conditions: list[Condition] = []
    operations: list[Operation] = []
    messages = []
    for (label, obj), key in zip(objects, seen, strict=True):
        kv = snapshot.keys[key]
        name = f"{obj['kind']} {obj['metadata']['name']!r}"
        if mode == "create" and kv is not None:
            raise UserError(f"{label}: {name} already exists; use apply or replace; nothing was written")
        if mode == "replace" and kv is None:
            raise UserError(f"{label}: {name} does not exist; use create or apply; nothing was written")
        if obj["kind"] == "IPPool":
            pool = IPPool.from_v3(obj)
            current = next((p for p in existing_pools if p.name == pool.name), None)
            try:
                if current is not None and (current.cidr, current.block_size) != (pool.cidr, pool.block_size):
                    raise InvalidResource("IPPool", pool.name, "spec.cidr" if current.cidr != pool.cidr
                                          else "spec.blockSize", "cannot change on an existing pool; create a new pool")
                check_overlap(pool, [p for p in existing_pools if p.name != pool.name]
                              + [p for p in new_pools if p.name != pool.name])
                if current is None:
                    check_blocks_fit(pool, existing_blocks)
            except InvalidResource as exc:
                raise UserError(f"{label}: {exc}; nothing was written") from None
        if kv is not None and kv.json() == obj:
            messages.append(f"{name} unchanged")
            continue
        conditions.append(ModRevisionIs(key, kv.mod_revision if kv else 0))
        operations.append(Put.json(key, obj))
        messages.append(f"{name} {'created' if kv is None else 'replaced' if mode == 'replace' else 'configured'}")
    if new_pools:
        conditions.append(PrefixUnchangedSince(pool_prefix, snapshot.revision))
    if operations:
        result = await store.txn(conditions, operations)
        if not result.succeeded:
            raise UserError("the resources changed while this file was being written; run the command again "
                            "(nothing was written)")
    return messages


async def delete(store: Datastore, targets: list[tuple[str, str]], force: bool = False) -> list[str]:
    """Delete (kind, name) pairs. A pool goes with its empty blocks and their affinities (ipam.pools.delete_pool);
    one with allocations is refused unless ``force``, whose blocks that hold addresses stay, affine to no node."""
    messages = []
    for kind_text, name in targets:
        kind = kind_named(kind_text)
        if kind.name == "IPPool":
            try:
                messages.append((await delete_pool(store, name, force=force)).summary())
            except (ResourceNotFound, PoolInUse, ConflictRetriesExhausted) as exc:
                raise UserError(str(exc)) from None
            continue
        key = keys.resource_key(kind.plural, name)
        kv = await store.get(key)
        if kv is None:
            raise UserError(f"{kind.name} {name!r} does not exist")
        if not (await store.txn([ModRevisionIs(key, kv.mod_revision)], [Delete(key)])).succeeded:
            raise UserError(f"{kind.name} {name!r} changed meanwhile; run the command again")
        messages.append(f"{kind.name} {name!r} deleted")
    return messages


async def delete_documents(store: Datastore, documents: list[tuple[str, Any]], force: bool) -> list[str]:
    targets = []
    for label, obj in documents:
        normalised = normalise(label, obj)
        targets.append((normalised["kind"], normalised["metadata"]["name"]))
    return await delete(store, targets, force)


# ------------------------------------------------------------------ reading back


def _field(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else value


async def get(store: Datastore, kind_text: str, name: str | None, fmt: str) -> None:
    kind = kind_named(kind_text)
    if name:
        kv = await store.get(keys.resource_key(kind.plural, name))
        if kv is None:
            raise UserError(f"{kind.name} {name!r} does not exist")
        objects = [kv.json()]
    else:
        objects = sorted((kv.json() for kv in await store.get_prefix(keys.resource_prefix(kind.plural))),
                         key=lambda o: _sort_key(o))
    if fmt in ("yaml", "json"):
        if name:
            dump(objects[0], fmt)
        else:
            dump({"apiVersion": "projectcalico.org/v3", "kind": f"{kind.name}List", "items": objects}, fmt)
        return
    columns = kind.wide if fmt == "wide" else kind.columns
    table([h for h, _ in columns], [[_field(o, path) for _, path in columns] for o in objects])


def _sort_key(obj: dict[str, Any]) -> tuple[str, str]:
    return (str(obj.get("metadata", {}).get("name", "")), json.dumps(obj, sort_keys=True))


def ip_arg(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UserError(f"{text!r} is not an IP address") from None


__all__ = ["KINDS", "ResourceExists", "ResourceNotFound", "UserError", "delete", "get", "read_documents", "write"]
