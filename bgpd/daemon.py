"""calico-py-node: the node daemon (issue 4 onwards)."""

from __future__ import annotations

import sys


def main() -> int:
    print("calico-py-node: the node daemon is not built yet (issues 4 and 6)", file=sys.stderr)
    return 1
