"""The wire format of docs/cni.md, as both installed shims (C and Python) speak it to the daemon's real server: the
descriptor of CNI_NETNS travels with the request (SCM_RIGHTS), the errno of a failed open instead of it, and the
server hands the handler a descriptor of the very namespace the path named, never opening the path itself.

The shims reach the daemon on the abstract socket of their network namespace: each case runs in a fresh one
(``unshare --net``, root), where a stand-in daemon serves bgpd.cni.server.CNIServer with a handler that reports
what it received."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bgpd.cni import spec
from bgpd.cni.handler import CNIHandler
from bgpd.cni.server import CNIServer
from bgpd.cni.shim import decode_response, encode_request
from tests.cnishim import CONF, ROOT_ONLY, UNSHARE

# Run under ``unshare --net``: the daemon's server on @calico-py-cni, the shim run as a runtime runs it; prints
# what the handler saw and what the shim printed, and whether every received descriptor was closed afterwards.
DAEMON = """
import asyncio, fcntl, json, os, subprocess, sys
from bgpd.cni.server import CNIServer
from bgpd.dataplane.workloads import is_network_namespace

case = json.load(sys.stdin)
seen = {}

async def handler(plugin, env, stdin, netns):
    seen.update(plugin=plugin, env=env, stdin_bytes=len(stdin.encode()), path=netns.path, error=netns.error,
                fd=netns.fd is not None)
    if netns.fd is not None:
        named = os.stat(netns.path)
        got = os.fstat(netns.fd)
        seen.update(same_file=(got.st_dev, got.st_ino) == (named.st_dev, named.st_ino),
                    cloexec=bool(fcntl.fcntl(netns.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                    network_namespace=is_network_namespace(netns.fd))
    return 0, json.dumps({"cniVersion": "1.0.0", "answered": True}) + "\\n"

async def main():
    server = CNIServer(handler)
    await server.start()
    before = sorted(os.listdir("/proc/self/fd"))
    env = {k: v.replace("{daemon}", str(os.getpid())) for k, v in case["env"].items()}
    shim = await asyncio.create_subprocess_exec(case["plugin"], env=env, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(shim.communicate(bytes.fromhex(case["stdin"])), 30)
    await server.stop()
    leaked = sorted(set(os.listdir("/proc/self/fd")) - set(before))
    print(json.dumps({"rc": shim.returncode, "stdout": out.decode(), "stderr": err.decode(), "seen": seen,
                      "leaked": leaked}))

asyncio.run(main())
"""
ADD = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_IFNAME": "eth0"}


def through_daemon(plugin: Path, env: dict[str, str], stdin: bytes = CONF) -> dict[str, Any]:
    """``plugin`` run against the daemon's server in a fresh network namespace (``{daemon}`` in a value: the
    stand-in daemon's pid)."""
    case = {"plugin": str(plugin), "env": env, "stdin": stdin.hex()}
    result = subprocess.run([UNSHARE, "--net", sys.executable, "-c", DAEMON], input=json.dumps(case),
                            capture_output=True, text=True, timeout=60, check=False,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert out["leaked"] == [], f"descriptors left open in the daemon: {out['leaked']}"
    assert (out["rc"], json.loads(out["stdout"]), out["stderr"]) == (0, {"cniVersion": "1.0.0", "answered": True},
                                                                     ""), out
    return out["seen"]  # type: ignore[no-any-return]


@ROOT_ONLY
def test_the_descriptor_of_cni_netns_reaches_the_handler(plugins: Path) -> None:
    netns = "/proc/{daemon}/ns/net"  # a namespace path of a process the shim may open, as a runtime's is
    seen = through_daemon(plugins / "calico-py", {**ADD, "CNI_NETNS": netns})
    assert seen["plugin"] == "calico-py" and seen["env"]["CNI_NETNS"] == seen["path"] != netns
    assert seen["fd"] and seen["error"] == 0
    assert seen["same_file"] and seen["network_namespace"], seen
    assert seen["cloexec"], "a received descriptor must not leak into the daemon's children"


@ROOT_ONLY
def test_a_netns_that_does_not_exist_comes_as_its_errno(plugins: Path) -> None:
    seen = through_daemon(plugins / "calico-py", {**ADD, "CNI_NETNS": "/run/netns/calico-py-no-such-pod"})
    assert (seen["fd"], seen["error"], seen["path"]) == (False, errno.ENOENT, "/run/netns/calico-py-no-such-pod")


@ROOT_ONLY
def test_no_netns_sends_no_descriptor(plugins: Path) -> None:
    seen = through_daemon(plugins / "calico-py-ipam", {**ADD, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    assert (seen["plugin"], seen["fd"], seen["error"], seen["path"]) == ("calico-py-ipam", False, 0, "")


@ROOT_ONLY
def test_a_file_that_is_no_namespace_goes_as_a_descriptor_the_daemon_can_tell(plugins: Path) -> None:
    seen = through_daemon(plugins / "calico-py", {**ADD, "CNI_NETNS": "/dev/null"})
    assert seen["fd"] and seen["same_file"] and not seen["network_namespace"], seen


@ROOT_ONLY
def test_the_descriptor_rides_on_a_large_request_too(plugins: Path) -> None:
    stdin = b'{"pad": "' + b"x" * (2 << 20) + b'"}'  # beyond the socket buffers: sendmsg takes only a part
    seen = through_daemon(plugins / "calico-py", {**ADD, "CNI_NETNS": "/proc/{daemon}/ns/net"}, stdin)
    assert seen["fd"] and seen["same_file"] and seen["stdin_bytes"] == len(stdin), seen


# ---------------------------------------------------------------------------------------------- the daemon side


@ROOT_ONLY
async def test_descriptors_that_do_not_match_the_request_are_refused_and_closed() -> None:
    calls = []

    async def handler(plugin: str, env: dict[str, str], stdin: str, netns: spec.Netns) -> tuple[int, str]:
        calls.append(netns)
        return 0, ""

    address = f"\0calico-py-cni-protocol-test-{os.getpid()}"
    server = CNIServer(handler, address)
    before = set(os.listdir("/proc/self/fd"))
    await server.start()
    try:
        request = encode_request("calico-py", {"CNI_COMMAND": "ADD", "CNI_NETNS": "/proc/self/ns/net"}, CONF, 0)
        for descriptors in ([], [0, 1]):  # "opened" with none, or with one too many
            code, out = decode_response(await asyncio.to_thread(send_with, address, request, descriptors))
            assert code == 1 and json.loads(out)["code"] == spec.DECODE_FAILURE, out
        old = b"CNI1\0calico-py\0CNI_COMMAND=ADD\0\0" + CONF
        code, out = decode_response(await asyncio.to_thread(send_with, address, old, []))
        assert "reinstall the CNI plugins" in json.loads(out)["details"], out
    finally:
        await server.stop()
    assert calls == []
    assert set(os.listdir("/proc/self/fd")) == before, "the server kept a descriptor it was sent"


def send_with(address: str, request: bytes, descriptors: list[int]) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(address)
        sent = socket.send_fds(conn, [request], descriptors) if descriptors else 0
        conn.sendall(request[sent:])
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(("netns", "code", "words"), [
    (spec.Netns("/proc/4242/ns/net", None, errno.ENOENT), spec.UNKNOWN_CONTAINER, "/proc/4242/ns/net does not exist"),
    (spec.Netns("/proc/4242/ns/net", None, errno.EACCES), spec.IO_FAILURE, os.strerror(errno.EACCES)),
    (spec.NO_NETNS, spec.INVALID_ENVIRONMENT, "CNI_NETNS"),
])
def test_add_and_check_without_a_descriptor_get_the_spec_error(netns: spec.Netns, code: int, words: str) -> None:
    error = spec.netns_error(netns)
    assert error is not None and error.code == code and words in error.msg, error and error.to_json()


def test_a_descriptor_is_no_error() -> None:
    assert spec.netns_error(spec.Netns("/run/netns/p", 7, 0)) is None


def test_a_descriptor_of_no_namespace_is_an_invalid_cni_netns() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(spec.CNIError) as raised:
            CNIHandler._pod_netns(spec.Netns("/dev/null", fd, 0))
        assert raised.value.code == spec.INVALID_ENVIRONMENT and "not a network namespace" in raised.value.msg
        own = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            assert CNIHandler._pod_netns(spec.Netns("/proc/self/ns/net", own, 0)) == own
        finally:
            os.close(own)
    finally:
        os.close(fd)
