"""Traffic in a lab: one ping that must get through, a ping that runs for a while and counts what it lost, and
stopping a measuring tool so it writes its summary."""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
from typing import Any

from tests.eventually import within
from tests.lab.cni import in_ns

PING_RETRY_SECONDS = 0.1  # between pings that failed (each waits up to 1 s for its echo)


def pod_ping(ns: str, target: str, timeout: float = 10.0, version: int = 4) -> bool:
    """True once one echo from the pod namespace ``ns`` to ``target`` comes back, polling until ``timeout``."""
    argv = ("ping", "-n", "-c1", "-W1", target) if version == 4 else ("ping", "-6", "-n", "-c1", "-W1", target)
    return within(lambda: in_ns(ns, *argv).returncode == 0, timeout, PING_RETRY_SECONDS)


def interrupt(process: subprocess.Popen[Any]) -> None:
    """Stop a measuring tool (ping, tcpdump) as Ctrl-C would, so it writes its summary; kill it if it hangs."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Pinger:
    """``ping -i interval`` from a pod namespace to a target for as long as the ``with`` block lasts; afterwards
    ``sent`` and ``lost`` hold ping's own count. A packet still in flight when the block ends is not counted lost
    (ping's summary counts only answers that were due)."""

    def __init__(self, netns: str, target: str, interval: float = 0.05) -> None:
        self.argv = ["ip", "netns", "exec", netns, "ping", "-n", "-i", f"{interval:g}", target]
        self.sent = 0
        self.lost = 0
        self.output = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Pinger:
        # A file, not a pipe: nobody reads a pipe until the end, and ping blocks once 64 KiB (~1000 replies) of it
        # are unread, silently ending the measurement.
        self._log = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        interrupt(self._process)
        self._log.seek(0)
        self.output = self._log.read()
        self._log.close()
        counts = re.search(r"(\d+) packets transmitted, (\d+) received", self.output)
        if counts:
            self.sent, received = map(int, counts.groups())
            self.lost = self.sent - received

    def summary(self) -> str:
        return "\n".join(self.output.splitlines()[-3:])
