#!/usr/bin/python3 -IS
"""calico-py / calico-py-ipam: the CNI plugins, as a thin shim to the node daemon -- the Python fallback of
shim.c, which bgpd.cni.install builds wherever a C compiler exists (a C process starts in about a millisecond,
an interpreter in about fifteen).

Standard library only and nothing imported that is not needed, so it starts as fast as Python can (install it
with the ``-IS`` shebang above -- one word: Linux hands everything after the interpreter to it as a single
argument, and python3 rejects "-I -S"; the console scripts of the venv work too, slower). It passes the CNI
environment and stdin to the node daemon over the abstract unix socket ``@calico-py-cni`` -- abstract sockets
belong to a network namespace, so the shim always reaches the daemon of the node (namespace) it runs in, with no
per-node configuration -- and prints what the daemon answers. VERSION is answered here.

The framing is specified once, in docs/cni.md "The wire format"; the functions below are its Python
definition (the daemon's server imports them), shim.c speaks it too, and tests/unit/test_cni_protocol.py holds
both shims to it. In short: ``CNI2\\0`` plugin ``\\0`` netns-field ``\\0`` ``CNI_*=...\\0``... ``\\0`` stdin, the
descriptor of CNI_NETNS (opened here, with the runtime's privileges: the daemon never opens a runtime's path)
riding on the first bytes; the answer is the exit code line and stdout.
"""

import errno
import json
import os
import socket
import sys
from collections.abc import Mapping

SOCKET = "\0calico-py-cni"
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
TIMEOUT = 150.0  # beyond the daemon's own datastore deadlines; runtimes allow minutes
TRY_AGAIN_LATER = 11
IO_FAILURE = 5
MAGIC = b"CNI2\0"
OLD_MAGIC = b"CNI1\0"  # the framing before the netns field: an older shim
# O_NONBLOCK: a FIFO under CNI_NETNS must not hang the shim (it is no namespace; the daemon says so)
NETNS_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
ENV_PREFIX = "CNI_"


def version_answer() -> str:
    """What VERSION prints (shim.c prints the same bytes; the installer checks that it does)."""
    return json.dumps({"cniVersion": "1.1.0", "supportedVersions": VERSIONS}) + "\n"


def encode_request(plugin: str, env: Mapping[str, str], stdin: bytes, netns_errno: int | None = None) -> bytes:
    """The request for ``plugin``: the ``CNI_*`` variables of ``env`` (in its order), the raw ``stdin`` and the
    outcome of opening CNI_NETNS (``netns_errno``: 0 opened, its descriptor sent along; an errno; None: no
    CNI_NETNS)."""
    # surrogateescape: os.environ holds undecodable bytes that way; they go out as the bytes they were
    entries = [f"{name}={value}\0".encode("utf-8", "surrogateescape")
               for name, value in env.items() if name.startswith(ENV_PREFIX)]
    netns = b"" if netns_errno is None else str(netns_errno).encode()
    return b"".join([MAGIC, plugin.encode(), b"\0", netns, b"\0", *entries, b"\0", stdin])


def _field(raw: bytes, start: int, what: str) -> tuple[bytes, int]:
    """The NUL-terminated field of ``raw`` at ``start`` and where the next one starts."""
    end = raw.find(b"\0", start)
    if end < 0:
        raise ValueError(f"{what} not terminated")
    return raw[start:end], end + 1


def decode_request(raw: bytes, descriptors: int = 0) -> tuple[str, dict[str, str], str, int | None]:
    """(plugin, CNI_* environment, stdin as text, netns errno) of a request that came with ``descriptors``
    file descriptors; ValueError if it is not one, or if what came along does not match its netns field."""
    if raw.startswith(OLD_MAGIC):
        raise ValueError("a CNI1 request: the calico-py plugin in the CNI bin directory is older than the node "
                         "daemon; reinstall the CNI plugins")
    if not raw.startswith(MAGIC):
        raise ValueError("no CNI2 header")
    name, at = _field(raw, len(MAGIC), "plugin name")
    if not name:
        raise ValueError("no plugin name")
    plugin = name.decode()  # strict: a name is ASCII
    netns, at = _field(raw, at, "netns field")
    # isdigit() on bytes is ASCII digits only; an errno has at most 4 of them
    if netns and not (netns.isdigit() and len(netns) <= 4):
        raise ValueError(f"bad netns field {netns[:20]!r}")
    netns_errno = int(netns) if netns else None
    env: dict[str, str] = {}
    while True:
        entry, at = _field(raw, at, "environment")
        if not entry:
            break
        key, sep, value = entry.decode("utf-8", "surrogateescape").partition("=")
        if not sep or not key.startswith(ENV_PREFIX):
            raise ValueError(f"bad environment entry {key[:50]!r}")
        env[key] = value
    if descriptors != (1 if netns_errno == 0 else 0):
        raise ValueError(f"{descriptors} file descriptors came with netns field {netns.decode()!r}")
    if (netns_errno is None) != (not env.get("CNI_NETNS")):
        raise ValueError("the netns field does not match CNI_NETNS")
    # the configuration is JSON text; undecodable bytes become U+FFFD and the handler's parser judges the rest
    return plugin, env, raw[at:].decode("utf-8", "replace"), netns_errno


def encode_response(code: int, stdout: str) -> bytes:
    return f"{code}\n".encode() + stdout.encode()


def decode_response(raw: bytes) -> tuple[int, bytes]:
    """(exit code, stdout bytes) of an answer; ValueError if it is not one."""
    head, sep, stdout = raw.partition(b"\n")
    # isdigit() on bytes is ASCII digits only: int() alone would take " 1", "+1", "1_0"
    if not sep or not head.isdigit() or len(head) > 3 or int(head) > 255:
        raise ValueError(f"no exit code line at the start of its {len(raw)}-byte answer")
    return int(head), stdout


def open_netns(path: str) -> tuple[int | None, int | None]:
    """(descriptor, netns errno) of CNI_NETNS opened with the caller's (the runtime's) privileges."""
    if not path:
        return None, None
    try:
        return os.open(path, NETNS_OPEN_FLAGS), 0
    except OSError as exc:
        return None, exc.errno or errno.EIO


def exchange(plugin: str, env: Mapping[str, str], stdin: bytes, address: str = SOCKET) -> tuple[int, bytes]:
    """One request to the daemon of this network namespace, CNI_NETNS's descriptor passed along: (exit code,
    stdout bytes). OSError if the socket fails, ValueError if the answer is malformed."""
    netns_fd, netns_errno = open_netns(env.get("CNI_NETNS", ""))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(TIMEOUT)
            conn.connect(address)
            request = memoryview(encode_request(plugin, env, stdin, netns_errno))
            # The descriptor rides on the first bytes; what sendmsg did not take follows without it.
            sent = socket.send_fds(conn, [request], [netns_fd]) if netns_fd is not None else 0
            conn.sendall(request[sent:])
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
    return decode_response(b"".join(chunks))


def _error(code: int, msg: str, details: str = "") -> int:
    body: dict[str, object] = {"cniVersion": "1.1.0", "code": code, "msg": msg}
    if details:
        body["details"] = details
    sys.stdout.write(json.dumps(body) + "\n")
    return 1


def _request(plugin: str) -> int:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        return _error(IO_FAILURE, "calico-py shim could not read its stdin", exc.strerror or str(exc))
    try:
        code, stdout = exchange(plugin, os.environ, stdin)
    except (FileNotFoundError, ConnectionRefusedError):
        return _error(TRY_AGAIN_LATER, "calico-py node daemon is not running on this node; try again later",
                      "no listener on the abstract socket @calico-py-cni in this network namespace")
    except OSError as exc:
        return _error(TRY_AGAIN_LATER, "calico-py node daemon did not answer; try again later",
                      exc.strerror or str(exc))
    except ValueError as exc:
        return _error(IO_FAILURE, "calico-py node daemon gave a malformed answer", str(exc))
    sys.stdout.buffer.write(stdout)
    return code


def run(plugin: str) -> int:
    if os.environ.get("CNI_COMMAND") == "VERSION":
        sys.stdout.write(version_answer())
        return 0
    return _request(plugin)


def main() -> int:
    return run("calico-py")


def ipam_main() -> int:
    return run("calico-py-ipam")


if __name__ == "__main__":
    sys.exit(run("calico-py-ipam" if os.path.basename(sys.argv[0]).endswith("-ipam") else "calico-py"))
