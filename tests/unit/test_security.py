"""Security properties that need no lab: which capabilities the daemon keeps (pure) and that dropping them really
removes them (in a child process), that the CNI socket answers root only, and that no Python of the project runs a
shell."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bgpd.cni.server import CNIServer
from bgpd.cni.shim import decode_response, encode_request
from bgpd.privileges import (
    CAPABILITIES,
    REASONS,
    CapabilitySets,
    drop_unneeded,
    mask,
    names_in,
    needed_capabilities,
    plan_drop,
)

ROOT = Path(__file__).resolve().parents[2]
ALL = (1 << (max(CAPABILITIES.values()) + 1)) - 1
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (capabilities, changing uid)")


# ---------------------------------------------------------------- capabilities: the decision

def test_the_daemon_keeps_network_admin_setns_and_the_bgp_port_only() -> None:
    assert needed_capabilities(bgp_speaker=True) == {"NET_ADMIN", "SYS_ADMIN", "NET_BIND_SERVICE"}
    assert needed_capabilities(bgp_speaker=False) == {"NET_ADMIN", "SYS_ADMIN"}
    assert set(REASONS) >= needed_capabilities(True), "every kept capability says why"


def test_a_full_root_process_drops_everything_else_from_every_set() -> None:
    root = CapabilitySets(inheritable=0, permitted=ALL, effective=ALL, bounding=ALL, ambient=0)
    plan = plan_drop(root, needed_capabilities(True))
    assert plan.permitted == mask({"NET_ADMIN", "SYS_ADMIN", "NET_BIND_SERVICE"})
    assert set(plan.dropped_names) == set(CAPABILITIES) - {"NET_ADMIN", "SYS_ADMIN", "NET_BIND_SERVICE"}
    assert {"SYS_MODULE", "DAC_OVERRIDE", "SYS_PTRACE", "NET_RAW", "SETUID"} <= set(plan.dropped_names)


def test_a_plan_never_grants_what_the_process_does_not_hold() -> None:
    # Started without SYS_ADMIN (a container runtime's default set): the plan keeps it out of permitted.
    held = mask({"NET_ADMIN", "NET_RAW", "SETPCAP", "CHOWN"})
    plan = plan_drop(CapabilitySets(0, held, held, held, 0), needed_capabilities(True))
    assert plan.permitted == mask({"NET_ADMIN"})
    assert set(plan.dropped_names) == {"NET_RAW", "SETPCAP", "CHOWN"}


def test_capability_sets_are_read_as_proc_shows_them() -> None:
    status = ("Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t0000000000201400\nCapEff:\t0000000000201400\n"
              "CapBnd:\t0000000000201400\nCapAmb:\t0000000000000000\n")
    sets = CapabilitySets.parse(status)
    assert names_in(sets.bounding) == ["NET_BIND_SERVICE", "NET_ADMIN", "SYS_ADMIN"]
    assert sets.permitted == sets.effective == sets.bounding and sets.ambient == 0


def test_the_drop_can_be_turned_off_for_debugging() -> None:
    before = CapabilitySets.of()
    assert drop_unneeded(bgp_speaker=True, env={"CALICO_KEEP_ALL_CAPABILITIES": "true"}) == []
    assert CapabilitySets.of() == before


# ---------------------------------------------------------------- capabilities: the kernel

DROP_AND_REPORT = """
import json, logging, subprocess, sys
logging.basicConfig(level=logging.INFO)
from bgpd.privileges import CapabilitySets, drop_unneeded, names_in
dropped = drop_unneeded(bgp_speaker=True, env={})
mine = CapabilitySets.of()
child = CapabilitySets.parse(subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout)
try:
    open(sys.argv[1]).read()
    unreadable = "read"
except PermissionError:
    unreadable = "refused"
print(json.dumps({"dropped": dropped, "bounding": names_in(mine.bounding), "effective": names_in(mine.effective),
                  "child_effective": names_in(child.effective), "child_bounding": names_in(child.bounding),
                  "mode_000_file": unreadable}))
"""


@needs_root
def test_dropped_capabilities_are_gone_for_the_process_and_whatever_it_starts(tmp_path: Path) -> None:
    secret = tmp_path / "mode-000"
    secret.write_text("root can read this only with CAP_DAC_OVERRIDE")
    secret.chmod(0)
    before = subprocess.run([sys.executable, "-c", f"open({str(secret)!r}).read()"], capture_output=True, check=False)
    assert before.returncode == 0, "root with all capabilities reads a mode 000 file (DAC_OVERRIDE)"
    result = subprocess.run([sys.executable, "-c", DROP_AND_REPORT, str(secret)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=True)
    report = json.loads(result.stdout.splitlines()[-1])
    kept = ["NET_BIND_SERVICE", "NET_ADMIN", "SYS_ADMIN"]
    assert report["bounding"] == report["effective"] == kept
    # A program the daemon starts (ExaBGP, ip, nft) runs as root but cannot get back what the bounding set lost.
    assert report["child_bounding"] == report["child_effective"] == kept
    assert "DAC_OVERRIDE" in report["dropped"] and "SYS_MODULE" in report["dropped"]
    assert report["mode_000_file"] == "refused"
    assert "dropped capabilities" in result.stderr


@needs_root
def test_no_drop_once_threads_run_and_the_log_says_why() -> None:
    code = ("import threading, time\nfrom bgpd.privileges import drop_unneeded, CapabilitySets\n"
            "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
            "print(drop_unneeded(True, env={}), CapabilitySets.of().bounding)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            check=True)
    dropped, bounding = result.stdout.split()
    assert dropped == "[]" and int(bounding) != mask(needed_capabilities(True))
    assert "capabilities are per thread" in result.stderr


# ---------------------------------------------------------------- the CNI socket

CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
sock.shutdown(socket.SHUT_WR)
answer = b""
while chunk := sock.recv(65536):
    answer += chunk
sys.stdout.write(answer.hex())
"""


async def call_as(uid: int | None, address: str, request: bytes) -> tuple[int, dict[str, object]]:
    """Call the CNI socket from a separate process, as ``uid`` (None: as we are); its (exit code, JSON)."""
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-I", "-c", CLIENT, address.lstrip("\0"), request.hex(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}))
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    code, stdout = decode_response(bytes.fromhex(out.decode()))
    return code, json.loads(stdout)


@needs_root
async def test_the_cni_socket_answers_root_and_refuses_any_other_user() -> None:
    calls: list[str] = []

    async def handler(plugin: str, env: dict[str, str], stdin: str, netns: object) -> tuple[int, str]:
        calls.append(env.get("CNI_COMMAND", ""))
        return 0, json.dumps({"cniVersion": "1.0.0"})

    # The socket is abstract: it has no file mode, and is reachable only from this network namespace; within
    # it, the caller's uid (SO_PEERCRED) is what decides. A unique name: the test never meets a real daemon.
    address = f"\0calico-py-cni-test-{uuid.uuid4().hex[:8]}"
    server = CNIServer(handler, address=address)
    await server.start()
    try:
        request = encode_request("calico-py", {"CNI_COMMAND": "VERSION"}, b"{}")
        code, answer = await call_as(NOBODY, address, request)
        assert code != 0 and "only root may call" in str(answer.get("msg")), answer
        assert calls == [], "the handler ran for a non-root caller"
        code, answer = await call_as(None, address, request)
        assert code == 0 and calls == ["VERSION"], answer
        code, answer = await call_as(None, address, b"not a CNI request")
        assert code != 0 and "malformed request" in str(answer.get("msg")), answer
    finally:
        await server.stop()


def test_the_cni_socket_is_abstract_so_it_has_no_file_to_chmod() -> None:
    from bgpd.cni.shim import SOCKET
    assert SOCKET.startswith("\0"), "a filesystem socket would need mode 0600 in a 0700 directory"


# ---------------------------------------------------------------- no shell

SOURCES = ("bgpd", "ipam", "calicoctl_py", "containerlab", "tests", "bench", "scripts")
# Topology ``exec:`` lines are shell commands by containerlab's definition, written by whoever writes the topology
# (the operator), never taken from pods, peers or the datastore.
SHELL_ALLOWED = {("containerlab/lab.py", "exec: lines of a topology file")}
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "dash", "/usr/bin/sh", "/usr/bin/bash"}


def python_files() -> list[Path]:
    return sorted(p for top in SOURCES if (ROOT / top).is_dir() for p in (ROOT / top).rglob("*.py"))


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def shell_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that run a shell: shell=True, os.system/popen, subprocess.getoutput, create_subprocess_shell, or an
    argv list starting with a shell and -c."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                    "asyncio.create_subprocess_shell", "os.execl", "os.execlp") or name.endswith(".system"):
            found.append((node.lineno, name))
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and not keyword.value.value):
                found.append((node.lineno, f"{name}(shell=...)"))
        for argument in node.args:
            if isinstance(argument, ast.List) and len(argument.elts) >= 2 and all(
                    isinstance(e, ast.Constant) for e in argument.elts[:2]):
                program, flag = (e.value for e in argument.elts[:2])  # type: ignore[attr-defined]
                if program in SHELLS and str(flag).startswith("-") and "c" in str(flag):
                    found.append((node.lineno, f"{name}([{program!r}, {flag!r}, ...])"))
    return found


def test_no_python_of_the_project_runs_a_shell() -> None:
    files = python_files()
    assert len(files) > 50, "the scan found too few files to mean anything"
    allowed_files = {path for path, _ in SHELL_ALLOWED}
    offenders = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        if relative == "tests/unit/test_security.py":
            continue  # this file names the calls it looks for
        for line, what in shell_uses(ast.parse(path.read_text(), filename=str(path))):
            if relative not in allowed_files:
                offenders.append(f"{relative}:{line}: {what}")
    assert not offenders, "a shell is run (pass an argv list instead):\n" + "\n".join(offenders)


def test_the_scan_catches_each_way_of_running_a_shell() -> None:
    code = ("import os, subprocess, asyncio\nos.system('ls ' + name)\nos.popen(cmd)\n"
            "subprocess.run(cmd, shell=True)\nsubprocess.Popen(['sh', '-c', 'ip link ' + name])\n"
            "asyncio.create_subprocess_shell(cmd)\nsubprocess.run(['ip', 'link'], shell=False)\n")
    assert [line for line, _ in shell_uses(ast.parse(code))] == [2, 3, 4, 5, 6]


def test_the_allowed_shell_is_only_for_topology_exec_lines() -> None:
    source = (ROOT / "containerlab/lab.py").read_text()
    uses = shell_uses(ast.parse(source))
    assert len(uses) == 1, uses
    line = source.splitlines()[uses[0][0] - 1]
    assert "command" in line and "sh" in line
