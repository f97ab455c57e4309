"""The route adapter against a real kernel, in a throwaway namespace: single requests and the ip -batch path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")

SCRIPT = textwrap.dedent("""
    import json, sys
    from pyroute2 import IPRoute
    from bgpd.dataplane import routes
    from bgpd.desired import RouteSpec, diff_routes
    count = int(sys.argv[1])
    want = {RouteSpec(f"10.{200 + i // 1024}.{(i // 4) % 256}.{(i % 4) * 64}/26", device="veth0", gateway="10.0.0.2")
            for i in range(count)}
    want.add(RouteSpec("10.250.0.0/26", kind="blackhole"))
    for i in range(3):  # equal-cost multipath
        want.add(RouteSpec(f"10.251.0.{i * 64}/26", nexthops=(("10.0.0.2", "veth0"), ("10.0.0.3", "veth0"))))
    with IPRoute() as ipr:
        errors = routes.apply(ipr, diff_routes(want, routes.actual_routes(ipr)))
        after = routes.actual_routes(ipr)
        again = diff_routes(want, after)
        cleared = routes.apply(ipr, diff_routes(set(), after))
        left = routes.actual_routes(ipr)
    print(json.dumps({"errors": [message for _, message in errors + cleared], "installed": len(after),
                      "converged": again.empty, "left": len(left), "equal": after == want}))
""")


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"rtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (["link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
                        ["link", "set", "veth0", "up"], ["link", "set", "veth1", "up"],
                        ["addr", "add", "10.0.0.1/24", "dev", "veth0"]):
            subprocess.run(["ip", "-n", name, *command], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("count", [5, 2000])  # one netlink request per route; one ip -batch
def test_routes_apply_and_read_back(namespace: str, count: int) -> None:
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT, str(count)],
                            capture_output=True, text=True, timeout=120, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome == {"errors": [], "installed": count + 4, "converged": True, "left": 0, "equal": True}
    other = subprocess.run(["ip", "-n", namespace, "route", "show", "10.0.0.0/24"], capture_output=True, text=True)
    assert "proto kernel" in other.stdout  # routes of other protocols are never touched
