"""calico-py and calico-py-ipam: the CNI plugins (issue 4)."""

from __future__ import annotations

import json

NOT_YET = {"cniVersion": "1.0.0", "code": 11, "msg": "calico-py CNI plugin not built yet (issue 4)"}


def main() -> int:
    print(json.dumps(NOT_YET))
    return 1


def ipam_main() -> int:
    return main()
