"""calicoctl-py: the operator's CLI (issue 5)."""

from __future__ import annotations

import sys


def main() -> int:
    print("calicoctl-py: not built yet (issue 5)", file=sys.stderr)
    return 1
