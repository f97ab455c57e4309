"""ipam show / check / release / configure, in calicoctl's shapes."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from calicoctl_py.commands.resources import UserError
from calicoctl_py.output import Progress, table
from ipam import blocks, keys
from ipam.allocator import IPAM
from ipam.check import IPAMState, Report, check, load_state
from ipam.datastore import Datastore, Delete, ModRevisionIs
from ipam.model import IPAddress, IPAMConfig

REPORT_VERSION = 1


def _percent(part: int, whole: int) -> str:
    return f"{part} ({round(100 * part / whole) if whole else 0}%)"


async def show(store: Datastore, show_blocks: bool) -> None:
    state = await load_state(store)
    rows = []
    for pool in sorted(state.pools, key=lambda p: (p.version, p.cidr)):
        total = pool.cidr.num_addresses
        pool_blocks = sorted(((c, b) for c, (b, _) in state.blocks.items() if blocks.pool_of(c, [pool])),
                             key=lambda item: item[0])
        used = sum(b.in_use for _, b in pool_blocks)
        rows.append(["IP Pool", str(pool.cidr), total, _percent(used, total), _percent(total - used, total)])
        if show_blocks:
            for cidr, block in pool_blocks:
                rows.append(["Block", str(cidr), block.size, _percent(block.in_use, block.size),
                             _percent(block.free, block.size)])
    table(["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"], rows)
    if show_blocks and state.blocks:
        table(["BLOCK", "AFFINITY", "IN USE / SIZE"],
              [[str(c), b.affinity or "-", f"{b.in_use}/{b.size}"]
               for c, (b, _) in sorted(state.blocks.items(), key=lambda item: (item[0].version, item[0]))])


async def show_ip(store: Datastore, address: IPAddress) -> None:
    state = await load_state(store)
    for cidr, (block, _) in state.blocks.items():
        if address in cidr:
            attribute = block.attribute_of(block.ordinal(address))
            if attribute is None:
                break
            secondary = dict(attribute.secondary)
            print(f"IP {address} is in use")
            print(f"Handle: {attribute.handle_id}")
            if secondary.get("pod"):
                print(f"Pod: {secondary.get('namespace', '')}/{secondary['pod']}")
            print(f"Node: {secondary.get('node', block.host or '-')}")
            print(f"Block: {cidr} (affine to {block.host or 'no node'})")
            print("Attributes:")
            for key, value in sorted(secondary.items()):
                print(f"  {key}: {value}")
            return
    pools = [p for p in state.pools if address in p.cidr]
    print(f"IP {address} is not assigned" + ("" if pools else " and lies in no IP pool"))


async def live_addresses(store: Datastore) -> set[IPAddress]:
    """Every address a WorkloadEndpoint uses."""
    live: set[IPAddress] = set()
    for kv in await store.get_prefix(keys.resource_prefix(keys.WORKLOAD_ENDPOINTS)):
        for network in (kv.json().get("spec") or {}).get("ipNetworks") or []:
            live.add(ipaddress.ip_interface(network).ip)
    return live


def report_json(state: IPAMState, report: Report) -> dict[str, Any]:
    leaked = []
    for problem in report.problems:
        if problem.kind != "leaked-ip" or problem.ip is None:
            continue
        address = ipaddress.ip_address(problem.ip)
        block = state.blocks[ipaddress.ip_network(problem.block or "")][0]
        ordinal = block.ordinal(address)
        leaked.append({"ip": problem.ip, "block": problem.block, "ordinal": ordinal, "handle": problem.handle,
                       "sequenceNumber": block.sequence_number_for_allocation.get(ordinal)})
    return {"version": REPORT_VERSION, "revision": state.revision, **report.to_json(), "leakedIPs": leaked}


async def run_check(store: Datastore, output: Path | None) -> int:
    state = await load_state(store)
    progress = Progress(len(state.blocks), "checking blocks")
    nodes = {kv.key.rsplit("/", 1)[-1] for kv in await store.get_prefix(keys.resource_prefix(keys.NODES))}
    report = check(state, known_nodes=nodes or None, live_addresses=await live_addresses(store))
    progress.step(len(state.blocks))
    progress.close()
    print(f"Checked {report.blocks} blocks, {report.allocated} allocations, {report.handles} handles, "
          f"{report.affinities} affinities at revision {report.revision}.")
    counts = report.counts()
    if counts:
        table(["PROBLEM", "COUNT"], sorted(counts.items()))
        for problem in report.problems:
            print(f"  {problem.kind}: {problem.message}")
    print(f"Found {len(report.problems)} problems.")
    if output is not None:
        output.write_text(json.dumps(report_json(state, report), indent=2) + "\n")
        print(f"Report written to {output}.")
    return 1 if report.problems else 0


async def release_ip(store: Datastore, address: IPAddress) -> None:
    not_freed = await IPAM(store).release_ips([address])
    if not_freed:
        raise UserError(f"IP {address} is not assigned; nothing to release")
    print(f"Released {address}")


async def release_from_report(store: Datastore, path: Path, yes: bool) -> None:
    try:
        report = json.loads(path.read_text())
        leaked = report["leakedIPs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not an ipam check report ({exc}); run ipam check -o {path}") from None
    if report.get("version") != REPORT_VERSION:
        raise UserError(f"{path}: report version {report.get('version')!r} is not {REPORT_VERSION}; check again")
    if not leaked:
        print("The report lists no leaked addresses.")
        return
    if not yes:
        try:
            answer = input(f"Release {len(leaked)} leaked addresses from {path}? [y/N] ")
        except EOFError:
            raise UserError("ipam release --from-report asks for confirmation and stdin has no answer; add --force "
                            "to release without asking; nothing was released") from None
        if answer.strip().lower() not in ("y", "yes"):
            raise UserError("not confirmed; nothing was released")
    ipam = IPAM(store)
    progress = Progress(len(leaked), "releasing")
    released = skipped = 0
    for entry in leaked:
        address = ipaddress.ip_address(entry["ip"])
        sequence = entry.get("sequenceNumber")
        # Only at the sequence number seen by the check: an address given to someone new since is kept.
        kept = await ipam.release_ips([address], handle_id=entry.get("handle"),
                                      sequence_numbers={address: sequence} if sequence else None)
        released += not kept
        skipped += bool(kept)
        progress.step()
    progress.close()
    await _drop_empty_handles(store)
    print(f"Released {released} addresses; {skipped} had changed since the report and were kept.")


async def _drop_empty_handles(store: Datastore) -> None:
    state = await load_state(store)
    holding = {a.handle_id for block, _ in state.blocks.values() for a in block.attributes}
    for handle_id, (_, revision) in state.handles.items():
        if handle_id not in holding:
            key = keys.handle_key(handle_id)
            await store.txn([ModRevisionIs(key, revision)], [Delete(key)])


async def configure(store: Datastore, strict_affinity: bool | None, max_blocks: int | None) -> None:
    """calicoctl's ``ipam configure --strictaffinity=true|false [--max-blocks-per-host=N]``."""
    if strict_affinity is None:
        raise UserError("ipam configure needs --strictaffinity=true|false (with --max-blocks-per-host N or alone); "
                        "nothing was written")
    if max_blocks is not None and max_blocks < 0:
        raise UserError(f"--max-blocks-per-host {max_blocks}: must be 0 (no cap) or more; nothing was written")
    ipam = IPAM(store)
    current = await ipam.get_config()
    new = IPAMConfig(strict_affinity=strict_affinity,
                     auto_allocate_blocks=current.auto_allocate_blocks,
                     max_blocks_per_host=current.max_blocks_per_host if max_blocks is None else max_blocks)
    await ipam.set_config(new)
    table(["PROPERTY", "VALUE"], [["StrictAffinity", str(new.strict_affinity).lower()],
                                  ["AutoAllocateBlocks", str(new.auto_allocate_blocks).lower()],
                                  ["MaxBlocksPerHost", new.max_blocks_per_host]])
