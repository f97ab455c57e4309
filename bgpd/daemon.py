"""calico-py-node: the node daemon.

Today a skeleton: it reads its settings, says what it would do, and stays up until SIGTERM, so labs and
supervisors can manage it. The dataplane (issue 4) and the BGP speaker (issue 6) plug in here.
"""

from __future__ import annotations

import logging
import os
import signal

SETTINGS = ("NODENAME", "IP", "AS", "ETCD_ENDPOINTS", "CALICO_IPV4POOL_CIDR", "CALICO_NETWORKING_BACKEND")


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s calico-py-node %(message)s")
    log = logging.getLogger("calico-py-node")
    settings = " ".join(f"{k}={os.environ[k]}" for k in SETTINGS if k in os.environ)
    log.info("starting (skeleton: no dataplane or BGP yet) %s", settings)
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    received = signal.sigwait(signals)
    log.info("stopping on %s", signal.Signals(received).name)
    return 0
