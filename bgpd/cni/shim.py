#!/usr/bin/python3 -IS
"""calico-py / calico-py-ipam: the CNI plugins, as a thin shim to the node daemon.

Standard library only and nothing imported that is not needed, so it starts in milliseconds (install it with
the ``-IS`` shebang above -- one word: Linux hands everything after the interpreter to it as a single argument,
and python3 rejects "-I -S"; the console scripts of the venv work too, slower). It passes the CNI environment
and stdin to the node daemon over the abstract unix socket ``@calico-py-cni`` -- abstract sockets belong to
a network namespace, so the shim always reaches the daemon of the node (namespace) it runs in, with no
per-node configuration -- and prints what the daemon answers. VERSION is answered here.
"""

import json
import os
import socket
import sys

SOCKET = "\0calico-py-cni"
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
TIMEOUT = 150.0  # beyond the daemon's own datastore deadlines; runtimes allow minutes
TRY_AGAIN_LATER = 11
IO_FAILURE = 5


def _error(code: int, msg: str, details: str = "") -> int:
    body = {"cniVersion": "1.1.0", "code": code, "msg": msg}
    if details:
        body["details"] = details
    sys.stdout.write(json.dumps(body) + "\n")
    return 1


def exchange(plugin: str, env: dict, stdin: str) -> bytes:
    """One request to the daemon of this network namespace; its raw answer (raises OSError)."""
    payload = json.dumps({"plugin": plugin, "env": env, "stdin": stdin}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(SOCKET)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _request(plugin: str, stdin: bytes) -> int:
    env = {k: v for k, v in os.environ.items() if k.startswith("CNI_")}
    try:
        raw = exchange(plugin, env, stdin.decode("utf-8", "replace"))
    except (FileNotFoundError, ConnectionRefusedError):
        return _error(TRY_AGAIN_LATER, "calico-py node daemon is not running on this node; try again later",
                      "no listener on the abstract socket @calico-py-cni in this network namespace")
    except OSError as exc:
        return _error(TRY_AGAIN_LATER, "calico-py node daemon did not answer; try again later", str(exc))
    try:
        answer = json.loads(raw)
        sys.stdout.write(answer["stdout"])
        return int(answer["exit"])
    except (ValueError, KeyError, TypeError):
        return _error(IO_FAILURE, "calico-py node daemon gave a malformed answer", repr(raw[:200]))


def run(plugin: str) -> int:
    if os.environ.get("CNI_COMMAND") == "VERSION":
        sys.stdout.write(json.dumps({"cniVersion": "1.1.0", "supportedVersions": VERSIONS}) + "\n")
        return 0
    return _request(plugin, sys.stdin.buffer.read())


def main() -> int:
    return run("calico-py")


def ipam_main() -> int:
    return run("calico-py-ipam")


if __name__ == "__main__":
    sys.exit(run("calico-py-ipam" if os.path.basename(sys.argv[0]).endswith("-ipam") else "calico-py"))
