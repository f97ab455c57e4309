"""calico-py-lab: containerlab topologies in network namespaces (issue 3)."""

from __future__ import annotations

import sys


def main() -> int:
    print("calico-py-lab: the namespace lab runner is not built yet (issue 3)", file=sys.stderr)
    return 1
