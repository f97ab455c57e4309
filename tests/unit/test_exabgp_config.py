"""The ExaBGP configuration the speaker writes, against golden files, and parsed by ExaBGP itself
(``exabgp validate``): a mesh with an IPv6 session, a route-reflector client with a TCP-MD5 password, graceful
restart on and off. Regenerate the golden files with ``UPDATE_GOLDEN=1`` after a deliberate change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgpd.speaker.peers import GLOBAL, MESH, PeerSpec, render_exabgp

GOLDEN = Path(__file__).parent / "golden"
EXABGP = Path(sys.executable).parent / "exabgp"
RELAY = ["/usr/bin/python3", "-I", "-S", "/opt/calico-py/relay.py"]
CASES = {
    "mesh-dual-stack": (
        [PeerSpec("10.0.0.12", 64512, 64512, "10.0.0.11", MESH, "node2"),
         PeerSpec("fd00:7::12", 64512, 64512, "fd00:7::11", MESH, "node2")], 120),
    "reflector-client-md5": (
        [PeerSpec("10.0.0.13", 64512, 64512, "10.0.0.11", GLOBAL, "rr", rr_client=True, password="s3cret"),
         PeerSpec("10.0.0.1", 65100, 64512, "10.0.0.11", GLOBAL, "tor")], 30),
    "graceful-restart-off": ([PeerSpec("10.0.0.12", 65002, 64512, "10.0.0.11", MESH, "node2")], 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_rendered_configuration_matches_its_golden_file(case: str) -> None:
    peers, restart = CASES[case]
    text = render_exabgp("10.0.0.11", peers, RELAY, restart)
    golden = GOLDEN / f"exabgp-{case}.conf"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_exabgp_parses_the_golden_configuration(case: str, tmp_path: Path) -> None:
    conf = tmp_path / "exabgp.conf"
    conf.write_text((GOLDEN / f"exabgp-{case}.conf").read_text())
    done = subprocess.run([str(EXABGP), "validate", "-n", str(conf)], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "exabgp_log_enable": "false"})
    assert done.returncode == 0, done.stdout + done.stderr
