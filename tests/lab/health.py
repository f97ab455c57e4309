"""The node daemon's health and metrics endpoints (127.0.0.1:9099 in each node), read from inside the node."""

from __future__ import annotations

import re
import sys

from tests.lab.handle import LabHandle

FETCH = ("import sys, urllib.request, urllib.error\n"
         "try:\n"
         "    answer = urllib.request.urlopen('http://127.0.0.1:9099' + sys.argv[1], timeout=10)\n"
         "    print(answer.status); print(answer.read().decode())\n"
         "except urllib.error.HTTPError as error:\n"
         "    print(error.code); print(error.read().decode())\n")


def get(handle: LabHandle, node: str, path: str) -> tuple[int, str]:
    out = handle.exec(node, sys.executable, "-c", FETCH, path).stdout
    status, _, body = out.partition("\n")
    return int(status or 0), body


def sample(metrics: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else None
