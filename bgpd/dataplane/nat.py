"""NAT outgoing with nftables: traffic from a ``natOutgoing`` pool to anywhere outside every pool is masqueraded;
traffic between pools (and within one) keeps its pod source.

Everything lives in tables of our own (``ip calico-py`` and ``ip6 calico-py``), rewritten as one ``nft -f``
transaction: the old table is flushed away and the new one defined atomically, and rules we did not create are
never touched. The ruleset is rendered by :func:`bgpd.encap.nat_ruleset`; only :func:`apply` runs
``nft``.
"""

from __future__ import annotations

import subprocess

from bgpd.encap import NAT_FAMILIES as FAMILIES
from bgpd.encap import NAT_TABLE as TABLE


class NatError(Exception):
    """nft refused the ruleset (the message is nft's)."""


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
