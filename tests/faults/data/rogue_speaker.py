"""A minimal BGP-4 speaker (RFC 4271) for the rogue-peer fault test: it waits for the calico-py node to connect
(passive, port 179), opens the session, announces one route inside the pool, keeps the session alive, and obeys lines
on stdin: ``malformed-attribute`` sends an UPDATE with one attribute overrunning the attribute list (RFC 7606:
treat-as-withdraw, the session stays), ``malformed-length`` one whose attribute length overruns the message (a
session reset: nothing in it can be trusted); ``announce PREFIX`` announces it, ``preferred PREFIX``
with LOCAL_PREF 1000, ``long-path PREFIX N`` with our AS prepended N times. After a reset it accepts the node's
next connection and behaves.

Standard library only; run inside the lab's ``raw`` namespace:
``rogue_speaker.py LOCAL_ADDRESS LOCAL_AS PREFIX``. Events go to stdout, one line each.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import sys
import time

MARKER = b"\xff" * 16
OPEN, UPDATE, NOTIFICATION, KEEPALIVE = 1, 2, 3, 4
HOLD_TIME = 30


def message(kind: int, body: bytes = b"") -> bytes:
    return MARKER + struct.pack("!HB", 19 + len(body), kind) + body


def open_message(local_as: int, router_id: str) -> bytes:
    capabilities = (bytes([1, 4]) + struct.pack("!HBB", 1, 0, 1)  # multiprotocol: IPv4 unicast
                    + bytes([65, 4]) + struct.pack("!I", local_as))  # four-octet AS numbers
    parameters = bytes([2, len(capabilities)]) + capabilities
    two_octet_as = local_as if local_as < 65536 else 23456  # AS_TRANS
    body = struct.pack("!BHH4sB", 4, two_octet_as, HOLD_TIME, socket.inet_aton(router_id), len(parameters))
    return message(OPEN, body + parameters)


def attribute(flags: int, code: int, value: bytes) -> bytes:
    if len(value) > 255:  # Extended Length: a two-octet length
        return struct.pack("!BBH", flags | 0x10, code, len(value)) + value
    return struct.pack("!BBB", flags, code, len(value)) + value


def as_path(asns: list[int]) -> bytes:
    """AS_SEQUENCE segments of at most 255 four-octet ASNs each."""
    segments = [asns[i:i + 255] for i in range(0, len(asns), 255)]
    return b"".join(bytes([2, len(seg)]) + struct.pack(f"!{len(seg)}I", *seg) for seg in segments)


def announce(prefix: str, path: list[int], next_hop: str, local_pref: int | None = None) -> bytes:
    network = ipaddress.IPv4Network(prefix)
    attributes = (attribute(0x40, 1, b"\x00")  # ORIGIN IGP
                  + attribute(0x40, 2, as_path(path))
                  + attribute(0x40, 3, socket.inet_aton(next_hop)))  # NEXT_HOP
    if local_pref is not None:  # meaningful inside one AS only (RFC 4271 5.1.5); sent here to outrank others
        attributes += attribute(0x40, 5, struct.pack("!I", local_pref))
    length = network.prefixlen
    nlri = bytes([length]) + network.network_address.packed[:(length + 7) // 8]
    return message(UPDATE, struct.pack("!H", 0) + struct.pack("!H", len(attributes)) + attributes + nlri)


def malformed_attribute() -> bytes:
    """ORIGIN, then an AS_PATH claiming 200 octets where 6 follow, for 10.244.231.0/24. The NLRI can still be
    found, so RFC 7606 (4) has the receiver treat the route as withdrawn and keep the session."""
    attributes = attribute(0x40, 1, b"\x00") + struct.pack("!BBB", 0x40, 2, 200) + bytes([2, 1]) + b"\x00\x00\xfe\x4b"
    nlri = bytes([24, 10, 244, 231])
    return message(UPDATE, struct.pack("!H", 0) + struct.pack("!H", len(attributes)) + attributes + nlri)


def malformed_length() -> bytes:
    """A Total Path Attribute Length beyond the end of the message: nothing in it can be located, RFC 7606 (4)
    and RFC 4271 (6.3) say UPDATE Message Error, session reset."""
    attributes = attribute(0x40, 1, b"\x00")
    return message(UPDATE, struct.pack("!H", 0) + struct.pack("!H", 200) + attributes + bytes([24, 10, 244, 232]))


def receive(conn: socket.socket) -> tuple[int, bytes] | None:
    header = b""
    while len(header) < 19:
        chunk = conn.recv(19 - len(header))
        if not chunk:
            return None
        header += chunk
    length, kind = struct.unpack("!HB", header[16:19])
    body = b""
    while len(body) < length - 19:
        chunk = conn.recv(length - 19 - len(body))
        if not chunk:
            return None
        body += chunk
    return kind, body


_pending = b""


def read_command() -> str | None:
    """One line from stdin, None at its end. Read from the descriptor, not the buffered file: two lines arriving
    together would otherwise leave the second in Python's buffer, where select() never sees it."""
    global _pending
    while b"\n" not in _pending:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            return None
        _pending += chunk
    line, _, _pending = _pending.partition(b"\n")
    return line.decode()


def say(*words: object) -> None:
    print(*words, flush=True)


def session(conn: socket.socket, local_address: str, local_as: int, prefix: str) -> bool:
    """One session, until the peer ends it (False) or the test closes our stdin (True: stop)."""
    conn.sendall(open_message(local_as, local_address))
    established = False
    last_keepalive = time.monotonic()
    while True:
        readable, _, _ = select.select([conn, sys.stdin], [], [], 0 if b"\n" in _pending else 1.0)
        if b"\n" in _pending:
            readable.append(sys.stdin)
        if time.monotonic() - last_keepalive > HOLD_TIME / 3:
            conn.sendall(message(KEEPALIVE))
            last_keepalive = time.monotonic()
        if sys.stdin in readable:
            command = read_command()
            if command is None:
                return True
            words = command.split()
            if words == ["malformed-attribute"] and established:
                conn.sendall(malformed_attribute())
                say("sent an UPDATE with an attribute overrunning the list")
            elif words == ["malformed-length"] and established:
                conn.sendall(malformed_length())
                say("sent an UPDATE whose attribute length overruns the message")
            elif words[:1] == ["announce"] and established:
                conn.sendall(announce(words[1], [local_as], local_address))
                say("announced", words[1])
            elif words[:1] == ["preferred"] and established:  # preferred PREFIX: with LOCAL_PREF 1000
                conn.sendall(announce(words[1], [local_as], local_address, local_pref=1000))
                say("announced", words[1], "with LOCAL_PREF 1000")
            elif words[:1] == ["long-path"] and established:  # long-path PREFIX LENGTH: prepended LENGTH times
                conn.sendall(announce(words[1], [local_as] * int(words[2]), local_address))
                say("announced", words[1], "with an AS path of", words[2])
        if conn not in readable:
            continue
        received = receive(conn)
        if received is None:
            say("connection closed by peer")
            return False
        kind, body = received
        if kind == OPEN:
            conn.sendall(message(KEEPALIVE))
        elif kind == KEEPALIVE and not established:
            established = True
            say("established")
            conn.sendall(announce(prefix, [local_as], local_address))
            say("announced", prefix)
        elif kind == NOTIFICATION:
            say("notification received", body[0], body[1])
            return False


def main() -> None:
    local_address, local_as, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((local_address, 179))
    listener.listen(1)
    say("listening")
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and read_command() is None:
            return
        if listener in readable:
            conn, peer = listener.accept()
            say("connected", peer[0])
            with conn:
                try:
                    if session(conn, local_address, local_as, prefix):
                        return
                except OSError as exc:
                    say("session error", exc)


if __name__ == "__main__":
    main()
