"""Real etcd servers on loopback for the tests: one member or a small cluster, each member a child process of
ours (Debian's ``etcd-server``, etcd 3.4) with its own data dir and log file.

Members are started with ``start_new_session=True`` and are only ever signalled by the PID we started; every
``stop`` reaps the process, so nothing is left behind, not even a zombie. Ports are picked by binding to
``127.0.0.1:0``; when a port gets taken before etcd binds it, the cluster start is retried with new ports.

With ``tls=`` (a :class:`TestPKI` from :func:`make_test_pki`), members serve clients over https and require a
client certificate signed by the test CA (``--client-cert-auth``); peers still talk plain http on loopback.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.eventually import within

__all__ = [
    "ETCDCTL_BINARY",
    "ETCD_BINARY",
    "EtcdCluster",
    "EtcdMember",
    "EtcdStartError",
    "TestPKI",
    "etcd_available",
    "etcdctl",
    "free_port",
    "free_ports",
    "make_test_pki",
    "wipe_all_keys",
]

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BINARY = shutil.which("etcdctl") or "/usr/bin/etcdctl"

POLL_INTERVAL = 0.05
LEADER_ALONE_SECONDS = 2.0  # how long a stopping leader is given to see its followers go
STOP_TIMEOUT = 10.0
START_TIMEOUT = 30.0
START_ATTEMPTS = 4
LOG_TAIL_LINES = 20

# Fast elections and no fsync: these clusters live for one test and hold nothing worth keeping.
TUNING_FLAGS = ["--heartbeat-interval", "50", "--election-timeout", "500", "--snapshot-count", "100000"]

# Members started and not yet stopped, so that an interpreter exiting mid-test still takes them down.
_LIVE: set[EtcdMember] = set()
# Ports handed out by this process: never hand the same one out twice.
_GIVEN_PORTS: set[int] = set()


def etcd_available() -> bool:
    """Whether the etcd server and etcdctl binaries are installed and executable."""
    return all(os.path.isfile(path) and os.access(path, os.X_OK) for path in (ETCD_BINARY, ETCDCTL_BINARY))


@functools.lru_cache(maxsize=1)
def _supports_unsafe_no_fsync() -> bool:
    # etcd 3.4.23 accepts the flag but does not list it in --help; an unknown flag makes etcd exit 2.
    try:
        result = subprocess.run([ETCD_BINARY, "--unsafe-no-fsync", "--version"], capture_output=True,
                                timeout=10, check=False, env=_clean_env("ETCD_"))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _clean_env(prefix: str, **extra: str) -> dict[str, str]:
    """The environment without variables etcd (``ETCD_``) or etcdctl (``ETCDCTL_``) would read."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefix)}
    env.update(extra)
    return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (bound to port 0, then released)."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _GIVEN_PORTS:
                _GIVEN_PORTS.add(port)
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd (Go) does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class TestPKI:
    """A throw-away CA with a server certificate (for 127.0.0.1 and localhost) and a client certificate, plus a
    second, unrelated CA with its own client certificate: what a wrong certificate looks like."""

    __test__ = False  # not a pytest test class, despite the name

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path

    def client_context(self) -> ssl.SSLContext:
        """What our probes (``/health``, ``/metrics``) present to a member started with this PKI."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))} failed: {result.stderr.strip()}")


def _new_key_and_csr(directory: Path, name: str, common_name: str) -> tuple[Path, Path]:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}")
    return key, csr


def _self_signed_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-keyout", key, "-out", cert, "-subj", f"/CN=calico-py test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _sign(directory: Path, name: str, csr: Path, ca: tuple[Path, Path], extensions: str) -> Path:
    cert, ext_file = directory / f"{name}.crt", directory / f"{name}.ext"
    ext_file.write_text(extensions)
    ca_key, ca_cert = ca
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
             "-out", cert, "-extfile", ext_file)
    return cert


def make_test_pki(directory: Path, server_ips: Sequence[str] = ("127.0.0.1",)) -> TestPKI:
    """Generate the CAs and certificates under ``directory`` with the ``openssl`` command (ECDSA P-256: fast);
    the server certificate is valid for ``server_ips`` and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _self_signed_ca(directory, "ca")
    other_ca = _self_signed_ca(directory, "other-ca")
    server_key, server_csr = _new_key_and_csr(directory, "server", "etcd")
    server_cert = _sign(directory, "server", server_csr, ca,
                        f"subjectAltName={','.join(f'IP:{ip}' for ip in server_ips)},DNS:localhost\n"
                        "extendedKeyUsage=serverAuth\n")
    client_ext = "extendedKeyUsage=clientAuth\n"
    client_key, client_csr = _new_key_and_csr(directory, "client", "calico-py")
    client_cert = _sign(directory, "client", client_csr, ca, client_ext)
    other_key, other_csr = _new_key_and_csr(directory, "other-client", "calico-py")
    other_cert = _sign(directory, "other-client", other_csr, other_ca, client_ext)
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return TestPKI(ca_cert=ca[1], server_cert=server_cert, server_key=server_key, client_cert=client_cert,
                   client_key=client_key, other_ca_cert=other_ca[1], other_client_cert=other_cert,
                   other_client_key=other_key)


class EtcdStartError(RuntimeError):
    """A member did not come up; ``address_in_use`` says whether it lost one of its ports to someone else."""

    def __init__(self, message: str, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


@dataclass(eq=False)
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    cluster_token: str = "etcd-test"
    log_offset: int = 0  # size of the log when the current run started
    fsync: bool = False  # False adds --unsafe-no-fsync (tests); True for benchmarks
    tls: TestPKI | None = None  # clients over https with client certificates

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return self.client_url

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self, initial_cluster: str, state: str = "new") -> list[str]:
        cmd = [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.cluster_token,
            *TUNING_FLAGS,
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        if not self.fsync and _supports_unsafe_no_fsync():
            cmd.append("--unsafe-no-fsync")
        if self.tls is not None:
            cmd += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                    "--trusted-ca-file", str(self.tls.ca_cert), "--client-cert-auth"]
        return cmd

    def start(self, initial_cluster: str, state: str = "new") -> None:
        """Launch the member (without waiting for it to be healthy); its stdout and stderr go to the log."""
        if self.is_running():
            raise RuntimeError(f"etcd member {self.name} is already running (pid {self.pid})")
        self._reap()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(initial_cluster, state)
        with open(self.log_path, "ab") as log:
            self.log_offset = log.tell()
            log.write(f"=== {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                            env=_clean_env("ETCD_"))
        _LIVE.add(self)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process we started and reap it. A no-op when it is not running."""
        self._signal_and_wait(signal.SIGKILL, None)

    def stop(self) -> None:
        """SIGTERM, up to 10 s to exit, then SIGKILL; always reaps. A no-op when it is not running."""
        self._signal_and_wait(signal.SIGTERM, STOP_TIMEOUT)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float | None) -> None:
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)  # only our own PID: Popen never signals an already reaped child
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    process.wait()
        finally:
            if process.poll() is not None:
                _LIVE.discard(self)

    def _reap(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            _LIVE.discard(self)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def log_of_this_run(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def lost_a_port(self) -> bool:
        """Whether the current (or last) run failed to bind one of its ports."""
        return "address already in use" in self.log_of_this_run()

    def _get(self, url: str, timeout: float) -> bytes | None:
        """The body of a GET (also of an HTTP error answer), or None when nothing answered."""
        try:
            if url.startswith("https://"):
                assert self.tls is not None
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                     urllib.request.HTTPSHandler(context=self.tls.client_context()))
            else:
                opener = _NO_PROXY_OPENER
            with opener.open(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            return exc.read()
        except (OSError, ValueError):
            return None

    def probe_peer_serving(self, timeout: float = 0.5) -> bool:
        """Whether the peer port answers HTTP, i.e. etcd is past its bootstrap and serves its peers."""
        return self._get(f"{self.peer_url}/members", timeout) is not None

    def metrics(self, timeout: float = 1.0) -> dict[str, float]:
        """The Prometheus samples of ``/metrics`` whose names start with ``etcd_server_`` or
        ``etcd_network_active_peers``, keyed by the sample's full name with labels; {} when not answering."""
        body = self._get(f"{self.client_url}/metrics", timeout)
        samples: dict[str, float] = {}
        for line in (body or b"").decode(errors="replace").splitlines():
            if line.startswith(("etcd_server_", "etcd_network_active_peers")):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[name] = float(value)
        return samples

    def is_leader(self) -> bool:
        return self.is_running() and self.metrics().get("etcd_server_is_leader") == 1.0

    def active_peers(self) -> int:
        """How many peers this member currently sees as connected (-1 when it does not answer)."""
        metrics = self.metrics()
        if not metrics:
            return -1
        return int(sum(v for k, v in metrics.items() if k.startswith("etcd_network_active_peers")))

    def terminate(self) -> None:
        """Send SIGTERM to the process we started, without waiting (``stop`` waits and reaps)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    def probe_health(self, timeout: float = 1.0) -> bool:
        """One GET of ``/health``: True when etcd answers ``{"health": "true"}``."""
        body = self._get(f"{self.client_url}/health", timeout)  # 503 and health "false" while leaderless
        if body is None:
            return False
        try:
            doc = json.loads(body)
        except ValueError:
            return False
        return isinstance(doc, dict) and str(doc.get("health")).lower() == "true"

    def check_alive(self) -> None:
        """Raise EtcdStartError when the process has exited."""
        if self.process is None:
            raise EtcdStartError(f"etcd member {self.name} was never started")
        code = self.process.poll()
        if code is not None:
            _LIVE.discard(self)
            tail = self.log_tail()
            raise EtcdStartError(
                f"etcd member {self.name} exited with code {code}; last lines of {self.log_path}:\n{tail}",
                address_in_use=self.lost_a_port())

    def wait_healthy(self, timeout: float) -> None:
        """Poll ``/health`` until it says healthy; RuntimeError (with the log's tail) on timeout or exit."""
        deadline = time.monotonic() + timeout

        def healthy() -> bool:
            self.check_alive()
            return self.probe_health(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        if not within(healthy, timeout, POLL_INTERVAL):
            raise EtcdStartError(
                f"etcd member {self.name} ({self.client_url}) not healthy after {timeout:.1f}s; "
                f"last lines of {self.log_path}:\n{self.log_tail()}")


class EtcdCluster:
    """``size`` members on loopback, each with its data dir and log under ``base_dir``."""

    def __init__(self, size: int, base_dir: Path, fsync: bool = False, tls: TestPKI | None = None) -> None:
        """``fsync=True`` keeps etcd's disk syncs, for benchmarks that should look like production; ``tls`` serves
        clients over https only, to clients with a certificate from its CA."""
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.size = size
        self.base_dir = Path(base_dir)
        self.token = ""
        self.members: list[EtcdMember] = []
        self.startup_seconds: float | None = None
        ports = free_ports(2 * size)
        for index in range(size):
            name = f"m{index}"
            self.members.append(EtcdMember(
                name=name, client_port=ports[2 * index], peer_port=ports[2 * index + 1],
                data_dir=self.base_dir / f"{name}.data", log_path=self.base_dir / f"{name}.log", fsync=fsync,
                tls=tls))

    @property
    def endpoints(self) -> list[str]:
        return [member.client_url for member in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{member.name}={member.peer_url}" for member in self.members)

    @property
    def pids(self) -> list[int]:
        return [member.pid for member in self.members if member.pid is not None]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every member and wait until all are healthy. On a lost port, retry with new ports; on any
        other failure, stop what was started and raise."""
        begin = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self.token = f"etcd-test-{uuid.uuid4().hex[:12]}"
            for member in self.members:
                member.cluster_token = self.token
                if member.data_dir.exists():
                    shutil.rmtree(member.data_dir)
            try:
                deadline = time.monotonic() + timeout
                for member in self.members:
                    member.start(self.initial_cluster, "new")
                    # One at a time: a new member asks the others whether it is already bootstrapped, and a
                    # peer that is listening but not yet serving makes that question wait a whole second.
                    self._wait_peer_serving(member, deadline)
                self._wait_all_healthy(max(1.0, deadline - time.monotonic()))
            except EtcdStartError as exc:
                # A failed attempt's members are of no use, and a graceful stop can hang on a peer that
                # never answers (whoever holds the port we lost): SIGKILL them.
                self.kill_all()
                if not exc.address_in_use or attempt == START_ATTEMPTS:
                    raise
                self._new_ports_for_dead_members()
            except BaseException:
                self.kill_all()
                raise
            else:
                self.startup_seconds = time.monotonic() - begin
                return

    def _new_ports_for_dead_members(self) -> None:
        for member in self.members:
            if member.lost_a_port():
                member.client_port, member.peer_port = free_ports(2)
                with open(member.log_path, "ab") as log:
                    log.write(b"=== address already in use: retrying with new ports\n")

    @staticmethod
    def _wait_peer_serving(member: EtcdMember, deadline: float) -> None:
        def serving() -> bool:
            if member.probe_peer_serving():
                return True
            member.check_alive()
            return False
        if not within(serving, deadline - time.monotonic(), POLL_INTERVAL):
            raise EtcdStartError(f"etcd member {member.name} does not serve its peer port "
                                 f"{member.peer_url}; last lines of {member.log_path}:\n"
                                 f"{member.log_tail()}")

    def _wait_all_healthy(self, timeout: float) -> None:
        pending = list(self.members)

        def all_healthy() -> bool:
            for member in pending:
                member.check_alive()
            pending[:] = [member for member in pending if not member.probe_health(timeout=0.5)]
            return not pending
        if not within(all_healthy, timeout, POLL_INTERVAL):
            tails = "\n".join(f"--- {m.name} ({m.log_path}):\n{m.log_tail()}" for m in pending)
            raise EtcdStartError(f"etcd members {[m.name for m in pending]} not healthy after "
                                 f"{timeout:.1f}s:\n{tails}")

    def kill(self, index: int) -> None:
        self.members[index].kill()

    def kill_all(self) -> None:
        """SIGKILL every member still running, and reap them."""
        for member in self.members:
            member.kill()

    def stop_member(self, index: int) -> None:
        self.members[index].stop()

    def restart_member(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Start a stopped (or killed) member again on its data dir and ports; wait until it is healthy."""
        member = self.members[index]
        member.stop()
        deadline = time.monotonic() + timeout
        # While it was down, an outgoing connection may have borrowed one of its ports as its local port.
        if not within(lambda: _port_bindable(member.client_port) and _port_bindable(member.peer_port), timeout,
                      POLL_INTERVAL):
            raise EtcdStartError(f"ports of etcd member {member.name} still taken after {timeout:.1f}s",
                                 address_in_use=True)
        member.start(self.initial_cluster, "existing")
        try:
            member.wait_healthy(max(1.0, deadline - time.monotonic()))
        except BaseException:
            member.stop()
            raise

    def stop(self) -> None:
        """Stop every member still running; idempotent, and quiet about members already dead.

        Followers go first, all at once. The leader goes last, once it has seen them go: a leader told to stop
        hands its leadership to a peer it believes connected, and waits 6 s when that peer is already gone."""
        running = [member for member in self.members if member.is_running()]
        leaders = [member for member in running if member.is_leader()] if len(running) > 1 else []
        followers = [member for member in running if member not in leaders]
        errors: list[BaseException] = []
        for member in followers:
            member.terminate()
        for member in [*followers, *leaders]:
            try:
                if member in leaders:
                    within(lambda member=member: member.active_peers() == 0, LEADER_ALONE_SECONDS, POLL_INTERVAL)
                member.stop()
            except Exception as exc:  # keep going: the other members must go down too
                errors.append(exc)
        for member in self.members:  # whatever is left (an error above): no process of ours outlives stop()
            with contextlib.suppress(Exception):
                member.kill()
        if errors:
            raise errors[0]

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def etcdctl(endpoints: Sequence[str], *args: str, timeout: float = 15.0, check: bool = True,
            tls: TestPKI | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``etcdctl`` (API v3) against ``endpoints``; with ``check``, RuntimeError on a non-zero exit; with
    ``tls``, as the PKI's good client."""
    cmd = [ETCDCTL_BINARY, "--endpoints", ",".join(endpoints)]
    if tls is not None:
        cmd += ["--cacert", str(tls.ca_cert), "--cert", str(tls.client_cert), "--key", str(tls.client_key)]
    cmd += args
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                            env=_clean_env("ETCDCTL_", ETCDCTL_API="3"))
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def wipe_all_keys(endpoints: Sequence[str], tls: TestPKI | None = None) -> None:
    """Delete every key in the cluster."""
    etcdctl(endpoints, "del", "", "--from-key=true", tls=tls)


@atexit.register
def _kill_leftovers() -> None:
    for member in list(_LIVE):
        with contextlib.suppress(Exception):
            member.kill()
