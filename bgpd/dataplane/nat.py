"""NAT outgoing with nftables: traffic from a ``natOutgoing`` pool to anywhere outside every pool is masqueraded;
traffic between pools (and within one) keeps its pod source.

Everything lives in tables of our own (``ip calico-py`` and ``ip6 calico-py``), rewritten as one ``nft -f``
transaction: the old table is flushed away and the new one defined atomically, and rules we did not create are
never touched. The ruleset is rendered by a pure function; only :func:`apply` runs ``nft``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from ipam.model import IPPool

TABLE = "calico-py"
FAMILIES = {4: "ip", 6: "ip6"}


class NatError(Exception):
    """nft refused the ruleset (the message is nft's)."""


def render(pools: Iterable[IPPool]) -> str:
    """The nft script that makes our tables match ``pools`` (idempotent: safe to apply again)."""
    enabled = [p for p in pools if not p.disabled]
    lines = []
    for version, family in FAMILIES.items():
        mine = [p for p in enabled if p.version == version]
        nat = sorted(str(p.cidr) for p in mine if p.nat_outgoing)
        # "add" then "delete": deleting a table that does not exist would fail the whole transaction.
        lines += [f"add table {family} {TABLE}", f"delete table {family} {TABLE}"]
        if not nat:
            continue
        address = "ipv4_addr" if version == 4 else "ipv6_addr"
        every = ", ".join(sorted(str(p.cidr) for p in mine))
        lines += [
            f"table {family} {TABLE} {{",
            f"  set all-pools {{ type {address}; flags interval; elements = {{ {every} }} }}",
            f"  set nat-pools {{ type {address}; flags interval; elements = {{ {', '.join(nat)} }} }}",
            "  chain nat-outgoing {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    {family} saddr @nat-pools {family} daddr != @all-pools masquerade fully-random",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def apply(script: str) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30,
                            check=False)
    if result.returncode != 0:
        raise NatError(f"nft rejected the NAT ruleset: {result.stderr.strip()}")


def current() -> str:
    """Our tables as nft lists them (empty when there are none): what a reconcile compares against."""
    out = []
    for family in FAMILIES.values():
        result = subprocess.run(["nft", "list", "table", family, TABLE], capture_output=True, text=True,
                                timeout=30, check=False)
        if result.returncode == 0:
            out.append(result.stdout)
    return "".join(out)
