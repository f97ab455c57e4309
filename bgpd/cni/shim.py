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

The framing (this module is its one definition: the daemon's server imports it; shim.c speaks it too), simple
enough for C to write and read without a JSON parser:

- request: ``CNI1\\0`` + plugin name + ``\\0``, then ``NAME=VALUE\\0`` for every ``CNI_*`` variable, then an
  empty entry (``\\0``), then stdin's raw bytes to the end; the shim half-closes its side after it.
- answer: the exit code in ASCII decimal + ``\\n``, then the plugin's stdout bytes to the end.
"""

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
MAGIC = b"CNI1\0"
ENV_PREFIX = "CNI_"


def version_answer() -> str:
    """What VERSION prints (shim.c prints the same bytes; the installer checks that it does)."""
    return json.dumps({"cniVersion": "1.1.0", "supportedVersions": VERSIONS}) + "\n"


def encode_request(plugin: str, env: Mapping[str, str], stdin: bytes) -> bytes:
    """The request for ``plugin``: the ``CNI_*`` variables of ``env`` (in its order) and the raw ``stdin``."""
    # surrogateescape: os.environ holds undecodable bytes that way; they go out as the bytes they were
    entries = [f"{name}={value}\0".encode("utf-8", "surrogateescape")
               for name, value in env.items() if name.startswith(ENV_PREFIX)]
    return b"".join([MAGIC, plugin.encode(), b"\0", *entries, b"\0", stdin])


def decode_request(raw: bytes) -> tuple[str, dict[str, str], str]:
    """(plugin, CNI_* environment, stdin as text) of a request; ValueError if it is not one."""
    if not raw.startswith(MAGIC):
        raise ValueError("no CNI1 header")
    end = raw.find(b"\0", len(MAGIC))
    if end <= len(MAGIC):
        raise ValueError("no plugin name")
    plugin = raw[len(MAGIC):end].decode()  # strict: a name is ASCII
    env: dict[str, str] = {}
    while True:
        start, end = end + 1, raw.find(b"\0", end + 1)
        if end < 0:
            raise ValueError("environment not terminated")
        if end == start:
            break
        name, sep, value = raw[start:end].decode("utf-8", "surrogateescape").partition("=")
        if not sep or not name.startswith(ENV_PREFIX):
            raise ValueError(f"bad environment entry {name[:50]!r}")
        env[name] = value
    # the configuration is JSON text; undecodable bytes become U+FFFD and the handler's parser judges the rest
    return plugin, env, raw[end + 1:].decode("utf-8", "replace")


def encode_response(code: int, stdout: str) -> bytes:
    return f"{code}\n".encode() + stdout.encode()


def decode_response(raw: bytes) -> tuple[int, bytes]:
    """(exit code, stdout bytes) of an answer; ValueError if it is not one."""
    head, sep, stdout = raw.partition(b"\n")
    # isdigit() on bytes is ASCII digits only: int() alone would take " 1", "+1", "1_0"
    if not sep or not head.isdigit() or len(head) > 3 or int(head) > 255:
        raise ValueError(f"no exit code line at the start of its {len(raw)}-byte answer")
    return int(head), stdout


def exchange(plugin: str, env: Mapping[str, str], stdin: bytes, address: str = SOCKET) -> tuple[int, bytes]:
    """One request to the daemon of this network namespace: (exit code, stdout bytes). OSError if the socket
    fails, ValueError if the answer is malformed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(address)
        conn.sendall(encode_request(plugin, env, stdin))
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
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
