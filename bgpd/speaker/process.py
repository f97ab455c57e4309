"""ExaBGP as a child process: started with our configuration, asked to reload it (SIGUSR1, confirmed from its
log), restarted with backoff when it dies, and an ExaBGP left running by an earlier daemon stopped first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("calico-py-node.bgp")
API_READY_TIMEOUT = 10.0  # seconds a reload waits for a starting ExaBGP before signalling it anyway
RELOAD_CONFIRM_TIMEOUT = 3.0  # seconds ExaBGP has to start acting on a SIGUSR1 before it is sent again
# SIGUSR1s per configuration change before ExaBGP is restarted instead: a peer that stays down keeps routes queued
# for it, and every reload dropped, so a restart (cheap: graceful restart both ways) must come soon.
RELOAD_ATTEMPTS = 3


def reload_outcome(log_since_signal: str) -> str | None:
    """What ExaBGP did with our SIGUSR1, from what it logged since just before it was sent: ``"loaded"``,
    ``"failed"`` (it read the configuration and refused it), or None (not acted on yet, or never will).

    ExaBGP 5.0 drops a reload without a word when any configured peer still has routes waiting to be sent (its
    adj-rib-out is pending, which it stays while that peer is not Established), and ignores a SIGUSR1 that arrives
    while an earlier one waits to be handled. A reload that starts after our signal reads the file we wrote before
    it; "performing reload" logged before our signal belongs to an earlier reload, which may have read the old one.
    """
    received = log_since_signal.find("SIGUSR1 received")
    if received < 0:
        return None
    started = log_since_signal.find("performing reload", received)
    if started < 0:
        return None
    after = log_since_signal[started:]
    if "could not load/reload configuration" in after:
        return "failed"
    return "loaded" if "loaded new configuration successfully" in after else None


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (dead, not yet reaped by whoever inherited it) holds no socket."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] != "Z"


class ExaBGPProcess:
    """Runs ``exabgp`` with the configuration ``render()`` gives; ``changed()`` asks it to read the configuration
    again. ``has_peers()``: ExaBGP waits to be started until there is someone to peer with. ``on_exit()``: it
    exited, and every session went with it."""

    def __init__(self, state_dir: Path, exabgp: str, listen: tuple[str, ...], render: Callable[[], str],
                 has_peers: Callable[[], bool], on_exit: Callable[[], None]) -> None:
        self.state_dir = state_dir
        self.exabgp = exabgp
        self.listen = listen
        self.render = render
        self.has_peers = has_peers
        self.on_exit = on_exit
        self.restarts = 0
        self.reloads = 0
        self.reloads_unanswered = 0  # SIGUSR1s ExaBGP dropped (see reload_outcome), each sent again
        self.api_ready = asyncio.Event()  # the running ExaBGP has connected to our API socket
        self._config_changed = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    def changed(self) -> None:
        self._config_changed.set()

    @property
    def alive(self) -> bool:
        """ExaBGP runs, or its supervisor is restarting it."""
        return self._supervisor is not None and not self._supervisor.done()

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._stop_leftover()
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._terminate()

    async def _stop_leftover(self) -> None:
        """An ExaBGP left running by a daemon that was killed holds port 179: kill it (by the PID we recorded,
        after checking it is that ExaBGP). SIGKILL, not SIGTERM: a terminated ExaBGP sends its peers a
        NOTIFICATION, which ends graceful restart on most of them, and takes over a second to exit; a killed one
        only drops its sessions, and its peers keep our routes meanwhile (graceful restart)."""
        pid_file = self.state_dir / "exabgp.pid"
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"exabgp" not in cmdline or str(self.state_dir).encode() not in cmdline:
            return
        log.info("stopping exabgp %s left by an earlier run", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling for the old process to go (its port freed), with a deadline

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except TimeoutError:
                process.kill()
                await process.wait()

    def _write_config(self) -> Path:
        config = self.state_dir / "exabgp.conf"
        tmp = config.with_suffix(".tmp")
        tmp.write_text(self.render())
        tmp.replace(config)
        return config

    async def _supervise(self) -> None:
        """Run ExaBGP; on a configuration change ask it to reload (SIGUSR1: sessions whose neighbor did not
        change stay up); restart it with backoff when it dies."""
        backoff = 0.5
        while not self._stopping:
            if not self.has_peers():
                self._config_changed.clear()
                await self._config_changed.wait()
                continue
            self._config_changed.clear()  # what changed until now is in the file ExaBGP starts with
            config = self._write_config()
            env = {**os.environ, "exabgp_daemon_user": "root", "exabgp_daemon_daemonize": "false",
                   "exabgp_api_ack": "false", "exabgp_api_cli": "false", "exabgp_log_destination": "stdout",
                   # Reloads are confirmed from ExaBGP's signal and reload lines (see reload_outcome).
                   "exabgp_log_enable": "true", "exabgp_log_level": "INFO", "exabgp_log_reactor": "true",
                   "exabgp_log_configuration": "true",
                   # Unicast NLRI as plain strings, not {"nlri": ...} objects: less to encode and to parse.
                   "exabgp_api_compact": "true",
                   "exabgp_tcp_bind": " ".join(self.listen), "exabgp_tcp_port": "179"}
            started = time.monotonic()
            self.api_ready.clear()
            with open(self.state_dir / "exabgp.log", "ab") as out:
                self._process = await asyncio.create_subprocess_exec(
                    self.exabgp, "server", str(config), stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
                    start_new_session=True)
            (self.state_dir / "exabgp.pid").write_text(str(self._process.pid))
            waiter = asyncio.create_task(self._process.wait())
            while True:
                changed = asyncio.create_task(self._config_changed.wait())
                done, _ = await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    changed.cancel()
                    break
                # A SIGUSR1 that reaches ExaBGP while it is still starting is lost (its reactor is not running
                # yet), and the peer added by it would never be configured: wait until ExaBGP has started our
                # API process, which it does from its running reactor.
                ready = asyncio.create_task(self.api_ready.wait())
                await asyncio.wait({waiter, ready}, timeout=API_READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if waiter.done() or not await self._reload(waiter):
                    break
            await asyncio.wait({waiter})
            self.on_exit()
            self.restarts += 1
            code = waiter.result()
            log.warning("exabgp exited (code %s); restarting in %.1fs", code, backoff)
            await asyncio.sleep(backoff)  # backoff between restarts of a crashing child, not synchronisation
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 30)

    async def _reload(self, exited: asyncio.Task[int]) -> bool:
        """Make the running ExaBGP read the current configuration: SIGUSR1, confirmed from its log and sent again
        while it is not acted on (see :func:`reload_outcome`); after ``RELOAD_ATTEMPTS`` unanswered signals
        ExaBGP is restarted, which reads the whole file (peers keep our routes meanwhile: graceful restart).
        False when ExaBGP exited (or was stopped here): the supervisor starts it again."""
        exabgp_log = self.state_dir / "exabgp.log"
        for attempt in range(1, RELOAD_ATTEMPTS + 1):
            offset = _size(exabgp_log)
            self._config_changed.clear()  # a change from here on is written by a later reload
            self._write_config()
            self.reloads += 1
            log.info("bgp peers changed: exabgp reloads its configuration%s",
                     f" (attempt {attempt})" if attempt > 1 else "")
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + RELOAD_CONFIRM_TIMEOUT
            while (outcome := reload_outcome(_read_from(exabgp_log, offset))) is None:
                if exited.done():
                    return False
                if time.monotonic() > deadline:
                    break
                # polling ExaBGP's log for its answer, with a deadline; wakes at once if ExaBGP exits
                await asyncio.wait({exited}, timeout=0.1)
            if outcome == "failed":
                log.error("exabgp refused the new configuration; see %s", exabgp_log)
            if outcome is not None:
                return True
            self.reloads_unanswered += 1
            log.warning("exabgp did not act on reload signal %d of %d (a peer's routes still wait to be sent)",
                        attempt, RELOAD_ATTEMPTS)
        log.error("exabgp ignored %d reload signals: restarting it to apply the configuration", RELOAD_ATTEMPTS)
        await self._terminate()
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
