"""The process ExaBGP runs for its API (`process calico { run ...; encoder json; }`): a relay between ExaBGP's
pipes and the node daemon's abstract unix socket, standard library only.

ExaBGP writes one JSON object per line to our stdin (relayed to the daemon) and reads commands, one per line,
from our stdout (relayed from the daemon). When either side goes, the relay exits and ExaBGP respawns it.
"""

import socket
import sys
import threading

ADDRESS = "\0calico-py-exabgp"


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else ADDRESS
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
    except OSError as exc:
        sys.stderr.write(f"calico-py exabgp relay: cannot reach the node daemon: {exc}\n")
        return 1

    def to_daemon() -> None:
        for line in sys.stdin.buffer:
            conn.sendall(line)
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=to_daemon, daemon=True).start()
    with conn.makefile("rb") as commands:
        for line in commands:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
