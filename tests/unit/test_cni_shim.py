"""The CNI shim: its framing, the daemon's server speaking it, and both installed shims (C and Python) run as a
runtime runs them. Talking to a daemon needs its abstract socket, which is per network namespace: those tests run
inside a fresh one (``unshare --net``, root), so no real daemon can answer and nothing outlives the test."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgpd.cni import spec
from bgpd.cni.install import NAMES, SHIM_C, InstallError, install
from bgpd.cni.server import CNIServer
from bgpd.cni.shim import (
    VERSIONS,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    exchange,
    version_answer,
)
from tests.cnishim import COMPILER, CONF, NO_COMPILER, ROOT_ONLY, UNSHARE

NOT_RUNNING = {"cniVersion": "1.1.0", "code": 11,
               "msg": "calico-py node daemon is not running on this node; try again later",
               "details": "no listener on the abstract socket @calico-py-cni in this network namespace"}

# Run under ``unshare --net``: a stand-in daemon on @calico-py-cni that records one raw request and sends a
# canned answer (or, with no answer, hangs up at once without reading), while the shim runs as a runtime runs it.
PEER = """
import json, subprocess, sys, threading
from bgpd.cni.shim import SOCKET
from bgpd.unixsock import bind_abstract

case = json.load(sys.stdin)
received = []
server = bind_abstract(SOCKET)
server.listen(1)
server.settimeout(20)

def serve():
    conn, _ = server.accept()
    with conn:
        if case["answer"] is None:
            return
        conn.settimeout(20)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        received.append(b"".join(chunks))
        conn.sendall(bytes.fromhex(case["answer"]))

thread = threading.Thread(target=serve, daemon=True)
thread.start()
shim = subprocess.run([case["plugin"]], env=case["env"], input=bytes.fromhex(case["stdin"]), capture_output=True,
                      timeout=30)
thread.join(20)
print(json.dumps({"rc": shim.returncode, "stdout": shim.stdout.hex(), "stderr": shim.stderr.decode("replace"),
                  "request": received[0].hex() if received else None}))
"""


def cni_error(body: dict[str, object]) -> bytes:
    """A CNI error as both shims print it (json.dumps' spacing: shim.c writes the same bytes)."""
    return (json.dumps(body) + "\n").encode()


# ---------------------------------------------------------------------------------------------- the framing


def test_request_bytes_and_round_trip() -> None:
    env = {"CNI_COMMAND": "ADD", "PATH": "/bin", "CNI_ARGS": "A=1;B=2", "CNI_EMPTY": "", "XCNI_NOT": "x"}
    raw = encode_request("calico-py-ipam", env, CONF)
    assert raw == b"CNI2\0calico-py-ipam\0\0CNI_COMMAND=ADD\0CNI_ARGS=A=1;B=2\0CNI_EMPTY=\0\0" + CONF
    assert decode_request(raw) == ("calico-py-ipam", {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=1;B=2", "CNI_EMPTY": ""},
                                   CONF.decode(), None)
    netns = {"CNI_COMMAND": "ADD", "CNI_NETNS": "/run/netns/p1"}
    assert encode_request("calico-py", netns, CONF, 0) == b"CNI2\0calico-py\0000\0CNI_COMMAND=ADD\0" \
        b"CNI_NETNS=/run/netns/p1\0\0" + CONF
    assert decode_request(encode_request("calico-py", netns, CONF, 0), descriptors=1)[3] == 0
    assert decode_request(encode_request("calico-py", netns, CONF, errno.EACCES))[3] == errno.EACCES


def test_request_keeps_undecodable_bytes_of_the_environment_and_replaces_them_in_stdin() -> None:
    netns = os.fsdecode(b"/run/netns/\xff")  # as os.environ holds it
    _, env, stdin, _ = decode_request(encode_request("calico-py", {"CNI_NETNS": netns}, b"{\xff\0}", errno.ENOENT))
    assert env == {"CNI_NETNS": netns} and os.fsencode(env["CNI_NETNS"]) == b"/run/netns/\xff"
    assert stdin == "{\ufffd\0}"


@given(plugin=st.sampled_from(NAMES),
       env=st.dictionaries(st.text(st.characters(exclude_characters="=\0", exclude_categories=("Cs",)),
                                   max_size=10).map("CNI_".__add__),
                           st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)))),
       stdin=st.text())
def test_request_round_trip_property(plugin: str, env: dict[str, str], stdin: str) -> None:
    netns_errno = errno.ENOENT if env.get("CNI_NETNS") else None
    assert decode_request(encode_request(plugin, env, stdin.encode(), netns_errno)) == (plugin, env, stdin,
                                                                                       netns_errno)


@pytest.mark.parametrize(("raw", "descriptors"), [
    (b"", 0), (b"CNI2", 0), (b"CNI2\0", 0), (b"CNI3\0calico-py\0\0\0{}", 0),
    (b'{"plugin": "calico-py", "env": {}, "stdin": ""}', 0),
    (b"CNI2\0\0\0\0{}", 0),  # no plugin name
    (b"CNI2\0calico-py", 0),  # plugin name not terminated
    (b"CNI2\0calico-py\0", 0),  # netns field not terminated
    (b"CNI2\0calico-py\0\0CNI_COMMAND=ADD\0", 0),  # environment not terminated
    (b"CNI2\0calico-py\0\0CNI_COMMAND\0\0{}", 0),  # an entry without "="
    (b"CNI2\0calico-py\0\0PATH=/bin\0\0{}", 0),  # not a CNI_ variable
    (b"CNI2\0calico-\xffpy\0\0\0{}", 0),  # a name that is not text
    (b"CNI2\0calico-py\0-1\0CNI_NETNS=/x\0\0{}", 0), (b"CNI2\0calico-py\0fd\0CNI_NETNS=/x\0\0{}", 1),
    (b"CNI2\0calico-py\00012345\0CNI_NETNS=/x\0\0{}", 0),  # netns fields that are no errno
    (b"CNI2\0calico-py\0000\0CNI_NETNS=/x\0\0{}", 0),  # "opened" but no descriptor came
    (b"CNI2\0calico-py\0000\0CNI_NETNS=/x\0\0{}", 2),  # a descriptor too many
    (b"CNI2\0calico-py\0\0\0{}", 1),  # a descriptor with no CNI_NETNS
    (b"CNI2\0calico-py\0002\0\0{}", 0),  # an errno for a CNI_NETNS that was not given
    (b"CNI2\0calico-py\0\0CNI_NETNS=/x\0\0{}", 0),  # a CNI_NETNS with no netns field
])
def test_decode_request_rejects_garbage(raw: bytes, descriptors: int) -> None:
    with pytest.raises(ValueError):
        decode_request(raw, descriptors)


def test_a_request_of_an_older_shim_says_to_reinstall_the_plugins() -> None:
    with pytest.raises(ValueError, match="older than the node daemon; reinstall the CNI plugins"):
        decode_request(b"CNI1\0calico-py\0CNI_COMMAND=ADD\0\0{}")


def test_response_round_trip() -> None:
    assert encode_response(0, '{"cniVersion": "1.0.0"}\n') == b'0\n{"cniVersion": "1.0.0"}\n'
    assert decode_response(encode_response(1, "é\n")) == (1, "é\n".encode())
    assert decode_response(b"255\n") == (255, b"")


@pytest.mark.parametrize("raw", [b"", b"0", b"x\n", b"-1\n", b"+1\n", b" 1\n", b"1 \n", b"256\n", b"0001\n",
                                 b'{"exit": 0, "stdout": ""}'])
def test_decode_response_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_response(raw)


def test_the_shim_supports_the_versions_the_daemon_does() -> None:
    assert list(spec.SUPPORTED_VERSIONS) == VERSIONS


# ---------------------------------------------------------------------------------------------- the server


@ROOT_ONLY
async def test_the_server_decodes_requests_and_frames_answers() -> None:
    seen = []

    async def handler(plugin: str, env: dict[str, str], stdin: str, netns: spec.Netns) -> tuple[int, str]:
        seen.append((plugin, env, stdin, netns))
        return 0, "done ✓\n"

    address = f"\0calico-py-cni-test-{os.getpid()}"
    server = CNIServer(handler, address)
    await server.start()
    try:
        answer = await asyncio.to_thread(exchange, "calico-py", {"CNI_COMMAND": "ADD", "HOME": "/root"}, CONF,
                                         address)
        assert answer == (0, "done ✓\n".encode())
        assert seen == [("calico-py", {"CNI_COMMAND": "ADD"}, CONF.decode(), spec.NO_NETNS)]
        code, out = decode_response(await asyncio.to_thread(raw_exchange, address, b'{"plugin": "calico-py"}'))
        assert code == 1 and json.loads(out)["code"] == spec.DECODE_FAILURE, out
        assert len(seen) == 1
    finally:
        await server.stop()


def raw_exchange(address: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(address)
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- install


@NO_COMPILER
@pytest.mark.parametrize("std", ["c99", "c11"])
def test_the_c_shim_compiles_without_warnings(std: str, tmp_path: Path) -> None:
    result = subprocess.run([*COMPILER, f"-std={std}", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                             str(tmp_path / "shim"), str(SHIM_C)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_install_falls_back_to_python_without_a_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "calico-py-no-such-compiler")
    with pytest.raises(InstallError, match="no C compiler"):
        install(tmp_path, kind="c")
    installed = install(tmp_path, python="/opt/python3.11/bin/python3")
    assert installed.kind == "python" and installed.how == "#!/opt/python3.11/bin/python3 -IS"
    assert installed.paths == tuple(tmp_path / name for name in NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)  # no temporary file left
    for path in installed.paths:
        assert path.read_text().startswith("#!/opt/python3.11/bin/python3 -IS\n\"\"\"calico-py")
        assert os.access(path, os.X_OK)


# ---------------------------------------------------------------------------------------------- the shims


@pytest.mark.parametrize("name", NAMES)
def test_version_is_answered_by_the_shim(plugins: Path, name: str) -> None:
    result = subprocess.run([str(plugins / name)], env={"CNI_COMMAND": "VERSION"}, input=b"", capture_output=True,
                            timeout=30, check=False)
    assert (result.returncode, result.stdout.decode(), result.stderr) == (0, version_answer(), b"")


@ROOT_ONLY
def test_no_daemon_is_try_again_later(plugins: Path) -> None:
    result = subprocess.run([UNSHARE, "--net", str(plugins / "calico-py")], env={"CNI_COMMAND": "ADD"},
                            input=CONF, capture_output=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (1, cni_error(NOT_RUNNING)), result.stderr


class Seen(NamedTuple):
    rc: int
    stdout: bytes
    stderr: str
    request: bytes | None  # as the stand-in daemon received it


def through_peer(plugin: Path, env: dict[str, str], stdin: bytes, answer: bytes | None) -> Seen:
    """Run ``plugin`` against the stand-in daemon in a fresh network namespace."""
    case = {"plugin": str(plugin), "env": env, "stdin": stdin.hex(), "answer": None if answer is None else answer.hex()}
    result = subprocess.run([UNSHARE, "--net", sys.executable, "-c", PEER], input=json.dumps(case),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return Seen(out["rc"], bytes.fromhex(out["stdout"]), out["stderr"],
                None if out["request"] is None else bytes.fromhex(out["request"]))


ENV = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/run/netns/p1",
       "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=a=b", "CNI_PATH": "/opt/cni/bin",
       "HOME": "/root"}


@ROOT_ONLY
@pytest.mark.parametrize("name", NAMES)
def test_request_and_answer_pass_through_unchanged(plugins: Path, name: str) -> None:
    stdout = b'{"cniVersion": "1.0.0", "ips": []}\n\xff\0 not text'
    seen = through_peer(plugins / name, ENV, CONF, b"7\n" + stdout)
    assert seen.request == encode_request(name, ENV, CONF, errno.ENOENT)  # ENV's netns does not exist
    assert decode_request(seen.request)[1] == {k: v for k, v in ENV.items() if k.startswith("CNI_")}
    assert (seen.rc, seen.stdout, seen.stderr) == (7, stdout, "")


@ROOT_ONLY
def test_a_large_stdin_arrives_whole(plugins: Path) -> None:
    stdin = b'{"pad": "' + bytes(range(32, 127)) * 20000 + b'"}'  # ~1.9 MB: many partial writes
    seen = through_peer(plugins / "calico-py", ENV, stdin, b"0\n")
    assert seen.request == encode_request("calico-py", ENV, stdin, errno.ENOENT)
    assert (seen.rc, seen.stdout) == (0, b"")


@ROOT_ONLY
@pytest.mark.parametrize("answer", [b"", b"garbage", b"1000\n{}"])
def test_a_malformed_answer_is_an_io_failure(plugins: Path, answer: bytes) -> None:
    seen = through_peer(plugins / "calico-py", ENV, CONF, answer)
    expected = {"cniVersion": "1.1.0", "code": 5, "msg": "calico-py node daemon gave a malformed answer",
                "details": f"no exit code line at the start of its {len(answer)}-byte answer"}
    assert (seen.rc, seen.stdout) == (1, cni_error(expected)), seen.stderr


@ROOT_ONLY
def test_a_daemon_that_hangs_up_mid_request_is_try_again_later(plugins: Path) -> None:
    # Larger than the socket buffers, so the shim is still writing when the daemon hangs up: EPIPE, not SIGPIPE.
    seen = through_peer(plugins / "calico-py", ENV, b" " * (8 << 20), None)
    expected = {"cniVersion": "1.1.0", "code": 11, "msg": "calico-py node daemon did not answer; try again later",
                "details": os.strerror(errno.EPIPE)}
    assert (seen.rc, seen.stdout) == (1, cni_error(expected)), seen.stderr
