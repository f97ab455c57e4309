"""The one place that talks to etcd: reads at one revision, compare-and-swap transactions, endpoint failover.

Built on the etcd v3 gRPC stubs that ``aetcd`` ships (generated for protobuf >= 4) over our own ``grpc.aio``
channels, because aetcd's ``Client`` connects to a single plain-text endpoint while Calico's configuration gives a
list of endpoints (``ETCD_ENDPOINTS``) and optional TLS client certificates. Swapping the client means rewriting
this module only: callers see :class:`KeyValue`, :class:`TxnResult` and the :mod:`ipam.errors` hierarchy.

Failover: requests go to one endpoint at a time; a transport failure (member down, no leader, deadline) moves to
the next endpoint and retries with jittered backoff until ``failover_timeout`` runs out. Every write we make is
a compare-and-swap, so retrying one is safe: if the first attempt did commit before the connection broke, the
retry fails its comparison. :attr:`TxnResult.ambiguous` tells the caller that this may have happened, so it can
look at the data to find out (see the allocator).

Watch (:meth:`Datastore.watch`): list, then follow the changes under a few prefixes on one gRPC stream, from the
revision after the list. A broken stream (member down, restarted, without a leader, frozen: gRPC keepalive) is
opened again on the next member from the revision after the last event seen per prefix, so nothing is lost and
nothing is delivered twice; when etcd has compacted that revision away, the prefixes are listed again and the
watch goes on from the revision of that list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
from aetcd import rpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay

from ipam.envvalues import env_number
from ipam.errors import DatastoreError, DatastoreUnavailable

log = logging.getLogger("ipam.datastore")
DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
# Transport-level failures worth trying another member for. Everything else is a real error.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# etcd's "require leader" flag: a member that knows no leader (an election, a restart, cut off from the others)
# answers "no leader" (UNAVAILABLE) at once instead of holding the request until its deadline, so the client tries
# another member, or the same one a moment later, without losing a whole request timeout.
_REQUIRE_LEADER = (("hasleader", "true"),)
# A broken watch stream is opened again at once on the next member; after a whole round of members failed, with a
# jittered wait doubling up to this many seconds (an outage costs a connection attempt per member that often).
WATCH_RETRY_MAX_SECONDS = 2.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),  # retries are ours, with CAS semantics in mind
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]
    ca_cert_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    request_timeout: float = 5.0
    failover_timeout: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> EtcdConfig:
        env = dict(os.environ if env is None else env)
        return cls.parse(
            env.get("ETCD_ENDPOINTS") or DEFAULT_ENDPOINTS,
            ca_cert_file=env.get("ETCD_CA_CERT_FILE") or None,
            cert_file=env.get("ETCD_CERT_FILE") or None,
            key_file=env.get("ETCD_KEY_FILE") or None,
            failover_timeout=env_number(env, "CALICO_DATASTORE_FAILOVER_TIMEOUT", cls.failover_timeout, 1, 3600,
                                         DatastoreError),
        )

    @classmethod
    def parse(cls, endpoints: str | Sequence[str], **kwargs: Any) -> EtcdConfig:
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        items = [e.strip() for e in items if e.strip()]
        if not items:
            raise DatastoreError("ETCD_ENDPOINTS is empty: give e.g. http://127.0.0.1:2379")
        for endpoint in items:
            parts = urlsplit(endpoint)
            try:
                port = parts.port
            except ValueError:
                port = None
            if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
                raise DatastoreError(
                    f"bad etcd endpoint {endpoint!r}: expected http(s)://HOST:PORT, e.g. http://127.0.0.1:2379")
        if bool(kwargs.get("cert_file")) != bool(kwargs.get("key_file")):
            raise DatastoreError("ETCD_CERT_FILE and ETCD_KEY_FILE must be given together")
        return cls(endpoints=tuple(items), **kwargs)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int

    def json(self) -> Any:
        return json.loads(self.value) if self.value else None


@dataclass(frozen=True)
class ModRevisionIs:
    """The key's mod_revision equals ``revision``; 0 means the key does not exist."""

    key: str
    revision: int


@dataclass(frozen=True)
class PrefixUnchangedSince:
    """No key under ``prefix`` was created or modified after ``revision``."""

    prefix: str
    revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes

    @classmethod
    def json(cls, key: str, obj: Any) -> Put:
        return cls(key, encode(obj))


@dataclass(frozen=True)
class Delete:
    key: str


Condition = ModRevisionIs | PrefixUnchangedSince
Operation = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # True when a transport failure hit an earlier attempt of this transaction: it may have been applied then.
    ambiguous: bool = False


@dataclass(frozen=True)
class Snapshot:
    """Keys and prefixes read in one transaction, i.e. at one revision."""

    revision: int
    keys: dict[str, KeyValue | None]
    prefixes: dict[str, list[KeyValue]]


@dataclass(frozen=True)
class WatchEvent:
    """One key created, changed or deleted. For a delete, ``kv`` holds the key and the revision of the delete
    (no value); ``prev`` is the value before the change when the watch asked for it (``prev_kv=True``)."""

    kv: KeyValue
    deleted: bool
    prev: KeyValue | None = None

    @property
    def key(self) -> str:
        return self.kv.key

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True)
class WatchUpdate:
    """What a watch delivers, in revision order: either ``events`` (all of one or more revisions, up to
    ``revision``), or, with ``resync`` set, the whole state of the watched prefixes at ``revision``, which replaces
    whatever the consumer knew (the first update of a watch, and after a compaction)."""

    revision: int
    events: tuple[WatchEvent, ...] = ()
    resync: Snapshot | None = None


class _Compacted(Exception):
    pass


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _b(text: str) -> bytes:
    return text.encode()


def prefix_end(prefix: str) -> bytes:
    raw = bytearray(_b(prefix))
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.version)


def _event(event: Any) -> WatchEvent:
    return WatchEvent(_kv(event.kv), deleted=event.type == rpc.Event.DELETE,
                      prev=_kv(event.prev_kv) if event.HasField("prev_kv") else None)


def _range(key: str, prefix: bool) -> Any:
    return rpc.RangeRequest(key=_b(key), range_end=prefix_end(key) if prefix else b"")


def _compare(condition: Condition) -> Any:
    if isinstance(condition, ModRevisionIs):
        return rpc.Compare(key=_b(condition.key), target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                           mod_revision=condition.revision)
    return rpc.Compare(key=_b(condition.prefix), range_end=prefix_end(condition.prefix), target=rpc.Compare.MOD,
                       result=rpc.Compare.LESS, mod_revision=condition.revision + 1)


def _request_op(operation: Operation) -> Any:
    if isinstance(operation, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=_b(operation.key), value=operation.value))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_b(operation.key)))


class _Transient(Exception):
    pass


# Where each TLS setting comes from, as the user wrote it: the environment or calicoctl.cfg.
_TLS_SETTINGS = {"ca": "ETCD_CA_CERT_FILE (etcdCACertFile)", "cert": "ETCD_CERT_FILE (etcdCertFile)",
                 "key": "ETCD_KEY_FILE (etcdKeyFile)"}


def check_tls_files(config: EtcdConfig) -> None:
    """Read and parse the configured CA, certificate and key before any connection, so that a missing file, a
    file that is not PEM, or a certificate and key that do not belong together is named at once (gRPC would
    only say it "failed to create security handshaker", and keep retrying)."""
    for path, what in ((config.ca_cert_file, "ca"), (config.cert_file, "cert"), (config.key_file, "key")):
        if path and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "not readable by this user"
            raise DatastoreError(f"cannot read {_TLS_SETTINGS[what]} {path}: {reason}; fix the path or its "
                                 "permissions")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if config.ca_cert_file:
        try:
            context.load_verify_locations(cafile=config.ca_cert_file)
        except (ssl.SSLError, ValueError):
            raise DatastoreError(f"{_TLS_SETTINGS['ca']} {config.ca_cert_file} holds no PEM CA certificate; give "
                                 "the CA that signed etcd's server certificate") from None
    if config.cert_file and config.key_file:
        try:
            context.load_cert_chain(config.cert_file, config.key_file)
        except (ssl.SSLError, ValueError) as exc:
            mismatch = "KEY_VALUES_MISMATCH" in str(exc)
            raise DatastoreError(
                f"{_TLS_SETTINGS['cert']} {config.cert_file} and {_TLS_SETTINGS['key']} {config.key_file} "
                + ("are not a pair (the key does not match the certificate); give the key of that certificate"
                   if mismatch else "are not a PEM certificate and its unencrypted PEM key; check both files")
            ) from None


def _speaks_tls(host: str, port: int, timeout: float = 1.0) -> bool | None:
    """Whether the server at host:port answers a TLS ClientHello with TLS (whatever it then thinks of us): True,
    False when it answers in plain text, None when it does not answer (down, or closing as it starts up)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol matters here, not who the server is
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLEOFError:
        # Closed without a word: a plain etcd does that to a ClientHello, and so does one still starting up.
        return False if _answers_plain_http(host, port, timeout) else None
    except ssl.SSLError as exc:
        return "WRONG_VERSION_NUMBER" not in str(exc) and "RECORD_LAYER" not in str(exc)
    except OSError:
        return None


def _answers_plain_http(host: str, port: int, timeout: float) -> bool:
    """Whether host:port answers a plain-text HTTP request as an HTTP server would (etcd serves /version). A TLS
    server answers with an alert, a close, or Go's "Client sent an HTTP request to an HTTPS server"."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.sendall(f"GET /version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = raw.recv(512)
    except OSError:
        return False
    return answer.startswith(b"HTTP/") and b"HTTPS server" not in answer


async def tls_problem(config: EtcdConfig, endpoint: str, details: str) -> str | None:
    """The TLS misconfiguration a transport failure stems from, as a one-line message saying what to do; None
    when the failure looks like an ordinary outage (member down, no leader), which failover handles."""
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        if "CERTIFICATE_VERIFY_FAILED" in details:
            ca = f"{_TLS_SETTINGS['ca']} {config.ca_cert_file}" if config.ca_cert_file else \
                f"the system CAs (no {_TLS_SETTINGS['ca']} given)"
            return (f"etcd at {endpoint}: its server certificate does not verify against {ca}; give the CA that "
                    "signed etcd's certificate (and a certificate valid for that host)")
        if "TSI_DATA_CORRUPTED" in details or "BAD_CERTIFICATE" in details or "CERTIFICATE_REQUIRED" in details:
            if not config.cert_file:
                return (f"etcd at {endpoint} requires a client certificate: set {_TLS_SETTINGS['cert']} and "
                        f"{_TLS_SETTINGS['key']}")
            return (f"etcd at {endpoint} rejected the client certificate {config.cert_file}: give one signed by the "
                    "CA etcd trusts (its --trusted-ca-file)")
        # A handshake cut short is also what an etcd that is just starting gives (it accepts, then closes): only a
        # plain-text answer to a probe proves the endpoint does not speak TLS; anything else is an outage to retry.
        if "WRONG_VERSION_NUMBER" in details or ("Handshake read failed" in details and parts.hostname
                                                 and parts.port and await asyncio.to_thread(
                                                     _speaks_tls, parts.hostname, parts.port) is False):
            return f"etcd at {endpoint} does not speak TLS: use http:// for it in ETCD_ENDPOINTS, or enable TLS on etcd"
    elif "Socket closed" in details and parts.hostname and parts.port and \
            await asyncio.to_thread(_speaks_tls, parts.hostname, parts.port) is True:
        return (f"etcd at {endpoint} serves TLS: use https:// in ETCD_ENDPOINTS, with {_TLS_SETTINGS['ca']}, "
                f"{_TLS_SETTINGS['cert']} and {_TLS_SETTINGS['key']}")
    return None


class _Members:
    """The etcd members: a gRPC channel per endpoint, the one requests and watches go to, failover counts, and
    whether etcd was found unreachable (the recovery listeners hear when it answers again)."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.current = 0
        self.failovers = 0
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._credentials = self._load_credentials(config)
        # Set once a request gave up (DatastoreUnavailable); the next request that succeeds clears it and calls
        # the recovery listeners: state that could not be read during the outage is read again at once.
        self.unreachable = False
        self.recovery_listeners: list[Callable[[], None]] = []

    @staticmethod
    def _load_credentials(config: EtcdConfig) -> grpc.ChannelCredentials | None:
        if not any(e.startswith("https://") for e in config.endpoints):
            return None
        check_tls_files(config)

        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        return grpc.ssl_channel_credentials(root_certificates=read(config.ca_cert_file),
                                            private_key=read(config.key_file),
                                            certificate_chain=read(config.cert_file))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def channel(self, index: int) -> grpc.aio.Channel:
        channel = self._channels.get(index)
        if channel is None:
            parts = urlsplit(self.config.endpoints[index])
            target = f"{parts.hostname}:{parts.port}"
            if parts.scheme == "https":
                assert self._credentials is not None
                channel = grpc.aio.secure_channel(target, self._credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self._channels[index] = channel
        return channel

    def fail_over(self, index: int) -> None:
        """Endpoint ``index`` failed: move to the next one, unless another request moved on already."""
        if self.current == index:
            self.current = (index + 1) % len(self.config.endpoints)
            self.failovers += 1

    def answered(self, endpoint: str) -> None:
        """etcd answered: if it was unreachable, tell the recovery listeners."""
        if self.unreachable:
            self.unreachable = False
            log.info("etcd answers again at %s", endpoint)
            for listener in self.recovery_listeners:
                listener()


class Datastore:
    """An etcd v3 client over a list of endpoints. Use as ``async with Datastore(config) as store``."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._members = _Members(config)
        self.requests = 0  # unary requests made (reads and transactions, each once whatever its retries)
        self.request_errors = 0  # requests etcd failed or did not answer (each attempt; failover follows)
        self.unavailable = 0  # requests given up on: no endpoint answered within the failover time

    def on_recovery(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever etcd answers again after a request found it unreachable (or a watch found
        no member to watch on)."""
        self._members.recovery_listeners.append(listener)

    async def __aenter__(self) -> Datastore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._members.close()

    @property
    def endpoint(self) -> str:
        """The endpoint requests currently go to."""
        return self.config.endpoints[self._members.current]

    @property
    def failovers(self) -> int:
        """How often requests or watches moved to the next endpoint."""
        return self._members.failovers

    def _stub(self, index: int) -> rpc.KVStub:
        return rpc.KVStub(self._members.channel(index))

    def _failover_wait(self, state: RetryCallState) -> float:
        # Try the next member at once; back off (with jitter) only after a full round of members failed.
        if state.attempt_number % len(self.config.endpoints):
            return 0.0
        rounds = state.attempt_number // len(self.config.endpoints)
        return random.uniform(0, min(1.0, 0.05 * 2**rounds))

    async def _txn(self, request: Any, mutation: bool) -> tuple[Any, bool]:
        self.requests += 1
        ambiguous = False
        errors: list[str] = []
        tls_failures: dict[int, str] = {}  # endpoint index -> what is wrong with TLS there
        retrying = AsyncRetrying(stop=stop_after_delay(self.config.failover_timeout), wait=self._failover_wait,
                                 retry=retry_if_exception_type(_Transient), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    index = self._members.current
                    try:
                        response = await self._stub(index).Txn(request, timeout=self.config.request_timeout,
                                                               metadata=_REQUIRE_LEADER)
                    except grpc.aio.AioRpcError as exc:
                        self.request_errors += 1
                        if exc.code() not in _TRANSIENT:
                            raise DatastoreError(f"etcd at {self.config.endpoints[index]} refused the request: "
                                                 f"{exc.details()}") from None
                        ambiguous = ambiguous or mutation
                        errors.append(f"{self.config.endpoints[index]}: {exc.details()}")
                        # A certificate problem does not heal by waiting: once every endpoint has shown one, say so.
                        problem = await tls_problem(self.config, self.config.endpoints[index], exc.details() or "")
                        if problem:
                            tls_failures[index] = problem
                            if len(tls_failures) == len(self.config.endpoints):
                                raise DatastoreError(problem) from None
                        self._members.fail_over(index)
                        raise _Transient from None
        except _Transient:
            self._members.unreachable = True
            self.unavailable += 1
            raise DatastoreUnavailable(
                f"etcd unreachable after {self.config.failover_timeout:g}s (last error {errors[-1]}); "
                f"check ETCD_ENDPOINTS={','.join(self.config.endpoints)} and that etcd is running") from None
        self._members.answered(self.config.endpoints[index])
        return response, ambiguous

    async def read(self, keys: Sequence[str] = (), prefixes: Sequence[str] = ()) -> Snapshot:
        """Read single keys and whole prefixes in one round trip, all at one revision."""
        ops = [rpc.RequestOp(request_range=_range(k, False)) for k in keys]
        ops += [rpc.RequestOp(request_range=_range(p, True)) for p in prefixes]
        response, _ = await self._txn(rpc.TxnRequest(success=ops), mutation=False)
        results = [[_kv(kv) for kv in r.response_range.kvs] for r in response.responses]
        return Snapshot(
            revision=response.header.revision,
            keys={k: (found[0] if found else None) for k, found in zip(keys, results, strict=False)},
            prefixes=dict(zip(prefixes, results[len(keys):], strict=True)),
        )

    async def get(self, key: str) -> KeyValue | None:
        return (await self.read(keys=[key])).keys[key]

    async def get_prefix(self, prefix: str) -> list[KeyValue]:
        return (await self.read(prefixes=[prefix])).prefixes[prefix]

    async def txn(self, conditions: Sequence[Condition], operations: Sequence[Operation]) -> TxnResult:
        """Apply every operation if every condition holds, atomically."""
        request = rpc.TxnRequest(compare=[_compare(c) for c in conditions],
                                 success=[_request_op(o) for o in operations])
        response, ambiguous = await self._txn(request, mutation=True)
        return TxnResult(succeeded=response.succeeded, revision=response.header.revision, ambiguous=ambiguous)

    async def put(self, key: str, value: bytes) -> int:
        """Unconditional write: for tests and benchmarks; IPAM never uses it."""
        return (await self.txn([], [Put(key, value)])).revision

    async def delete_prefix(self, prefix: str) -> None:
        request = rpc.TxnRequest(success=[rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=_b(prefix), range_end=prefix_end(prefix)))])
        await self._txn(request, mutation=True)

    def watch(self, prefixes: Sequence[str], start_revision: int | None = None,
              prev_kv: bool = False) -> AsyncIterator[WatchUpdate]:
        """Every change under ``prefixes``, in revision order, for as long as the caller iterates.

        Without ``start_revision`` the first update is a resync (the prefixes listed at one revision) and events
        follow from the next revision; with it, events start at that revision. An outage does not end the
        watch: it fails over and waits until etcd answers, then resumes after the last event it delivered for
        each prefix (etcd keeps revisions across restarts), so no event is lost or delivered twice. When etcd has
        compacted that revision away, the update after the outage is a resync. Only a refusal that waiting cannot
        cure (a TLS problem, a request etcd rejects) raises :class:`DatastoreError`."""
        return _PrefixWatch(self._members, self.read, prefixes, start_revision, prev_kv).updates()


class _PrefixWatch:
    """One watch of a few prefixes on one gRPC stream at a time, resumed on the next member when it breaks, from
    the revision after the last event delivered per prefix; listed again when that revision is compacted."""

    def __init__(self, members: _Members, read: Callable[..., Awaitable[Snapshot]], prefixes: Sequence[str],
                 start_revision: int | None, prev_kv: bool) -> None:
        self.members = members
        self.config = members.config
        self._read = read
        self.prefixes = list(prefixes)
        self.prev_kv = prev_kv
        self.next_revision = dict.fromkeys(self.prefixes, start_revision or 0)
        self.resync_needed = start_revision is None
        self.failures = 0  # stream failures in a row

    async def updates(self) -> AsyncIterator[WatchUpdate]:
        while True:
            if self.resync_needed:
                snapshot = await self._list()
                if snapshot is None:
                    continue
                yield WatchUpdate(snapshot.revision, resync=snapshot)
            index = self.members.current
            endpoint = self.config.endpoints[index]
            try:
                async with contextlib.aclosing(self._stream(index)) as stream:
                    async for update in stream:
                        if update is None:  # every prefix is watched again
                            self._resumed(endpoint)
                            continue
                        yield update
            except _Compacted as exc:
                log.info("etcd watch: %s; listing %s again", exc, ", ".join(self.prefixes))
                self.resync_needed = True
            except _Transient as exc:
                await self._lost(index, exc)

    async def _list(self) -> Snapshot | None:
        """The prefixes at one revision, the watch to go on after it; None when etcd is unreachable."""
        try:
            snapshot = await self._read(prefixes=self.prefixes)  # fails over and retries on its own
        except DatastoreUnavailable as exc:
            log.warning("etcd watch of %s: listing postponed: %s", ", ".join(self.prefixes), exc)
            return None
        self.resync_needed = False
        self.next_revision = dict.fromkeys(self.prefixes, snapshot.revision + 1)
        return snapshot

    def _resumed(self, endpoint: str) -> None:
        if self.failures:
            log.info("etcd watch resumed at %s", endpoint)
            self.members.answered(endpoint)
        self.failures = 0

    async def _lost(self, index: int, exc: _Transient) -> None:
        """The stream to member ``index`` broke: fail over, and after a whole round of members wait a little."""
        endpoint = self.config.endpoints[index]
        self.failures += 1
        problem = await tls_problem(self.config, endpoint, str(exc))
        if problem:
            raise DatastoreError(problem) from None
        if self.failures == 1:
            log.warning("etcd watch lost at %s (%s): resuming where it was once etcd answers", endpoint, exc)
        members = len(self.config.endpoints)
        if self.failures >= members:
            # No member answers: an outage as far as the recovery listeners go. A daemon whose only requests are
            # its watches repairs drift from the outage (a full reconcile) when it resumes.
            self.members.unreachable = True
        self.members.fail_over(index)
        if self.failures % members == 0:  # a whole round failed: wait a little
            rounds = self.failures // members
            await asyncio.sleep(random.uniform(0, min(WATCH_RETRY_MAX_SECONDS, 0.05 * 2**rounds)))

    async def _stream(self, index: int) -> AsyncIterator[WatchUpdate | None]:
        """One watch stream to one member, a watcher per prefix from its ``next_revision`` (advanced here as events
        are delivered). Yields None once every watcher is created, then the events. Raises _Transient when the
        stream breaks, _Compacted when a revision asked for is gone."""
        prefixes, next_revision = self.prefixes, self.next_revision
        call = rpc.WatchStub(self.members.channel(index)).Watch(metadata=_REQUIRE_LEADER)
        try:
            for prefix in prefixes:
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=_b(prefix), range_end=prefix_end(prefix), start_revision=next_revision[prefix],
                    prev_kv=self.prev_kv)))
            # etcd answers the create requests of one stream in order, each before any event of its watcher.
            creating = list(prefixes)
            watching: dict[int, str] = {}
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise _Transient("etcd closed the watch stream")
                if response.compact_revision:
                    prefix = watching.get(response.watch_id, "?")
                    raise _Compacted(f"revision {next_revision.get(prefix, 0)} of {prefix} is compacted "
                                     f"(oldest kept: {response.compact_revision})")
                if response.created:
                    prefix = creating.pop(0)
                    if response.canceled:
                        raise DatastoreError(f"etcd at {self.config.endpoints[index]} refused to watch {prefix}: "
                                             f"{response.cancel_reason}")
                    watching[response.watch_id] = prefix
                    if not creating:
                        yield None
                    continue
                if response.canceled:
                    raise _Transient(f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}")
                prefix = watching[response.watch_id]
                # Anything before next_revision was delivered already (a resumed watch starts after it).
                events = tuple(_event(e) for e in response.events if e.kv.mod_revision >= next_revision[prefix])
                if events:
                    next_revision[prefix] = events[-1].revision + 1
                    yield WatchUpdate(events[-1].revision, events)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _TRANSIENT:
                raise DatastoreError(f"etcd at {self.config.endpoints[index]} refused the watch: "
                                     f"{exc.details()}") from None
            raise _Transient(exc.details() or exc.code().name) from None
        finally:
            call.cancel()
