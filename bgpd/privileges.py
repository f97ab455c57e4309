"""Dropping the Linux capabilities the node daemon does not need, once it has started.

The daemon runs as root (it plumbs pods and routes), which by default means every capability. What it really
uses after start-up is small: netlink, nftables and interface moves (NET_ADMIN), entering a pod's network
namespace with ``setns`` (SYS_ADMIN), and, when it runs ExaBGP, binding the BGP port 179 (NET_BIND_SERVICE).
Everything else (loading kernel modules, reading any file regardless of its mode, ptrace, raw sockets, changing
uids, ...) is dropped from the bounding set, so neither the daemon nor anything it starts (ExaBGP, ``ip``,
``nft``) can regain it, and from the permitted, effective, inheritable and ambient sets.

Capabilities are per thread in Linux: :func:`drop_unneeded` must run in the main thread before any other
thread exists (threads created afterwards inherit the reduced sets). ``needed_capabilities`` is the pure
decision; the rest is a thin ``prctl``/``capset`` adapter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("calico-py-node.privileges")

# linux/capability.h
CAPABILITIES: dict[str, int] = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11,
    "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
    "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}
NAMES = {number: name for name, number in CAPABILITIES.items()}

# Why each kept capability is needed; also what docs/security.md lists.
REASONS: dict[str, str] = {
    "NET_ADMIN": "routes, links, addresses, sysctls and nftables of the node and of pods",
    "SYS_ADMIN": "setns() into a pod's network namespace to configure its interface",
    "NET_BIND_SERVICE": "ExaBGP listens on the BGP port 179",
}

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def needed_capabilities(bgp_speaker: bool) -> frozenset[str]:
    """The capabilities the daemon and its children keep: ExaBGP's port only when it runs a BGP speaker."""
    keep = {"NET_ADMIN", "SYS_ADMIN"}
    if bgp_speaker:
        keep.add("NET_BIND_SERVICE")
    return frozenset(keep)


def mask(names: Iterable[str]) -> int:
    return sum(1 << CAPABILITIES[name] for name in names)


def names_in(bits: int) -> list[str]:
    """The capability names set in a mask, known ones by name, others as ``cap_N``."""
    return [NAMES.get(n, f"cap_{n}") for n in range(64) if bits >> n & 1]


@dataclass(frozen=True)
class CapabilitySets:
    """A thread's capability sets as /proc shows them (``CapInh``, ``CapPrm``, ``CapEff``, ``CapBnd``,
    ``CapAmb``)."""

    inheritable: int
    permitted: int
    effective: int
    bounding: int
    ambient: int

    @classmethod
    def parse(cls, status: str) -> CapabilitySets:
        fields = {key: int(value, 16) for key, _, value in
                  (line.partition(":\t") for line in status.splitlines()) if key.startswith("Cap")}
        return cls(fields.get("CapInh", 0), fields.get("CapPrm", 0), fields.get("CapEff", 0),
                   fields.get("CapBnd", 0), fields.get("CapAmb", 0))

    @classmethod
    def of(cls, pid: int | str = "self") -> CapabilitySets:
        return cls.parse(Path(f"/proc/{pid}/status").read_text())


@dataclass(frozen=True)
class DropPlan:
    """What to drop from the bounding set and what the permitted/effective sets become."""

    bounding_drops: tuple[int, ...]
    permitted: int  # also the new effective set; inheritable and ambient become empty

    @property
    def dropped_names(self) -> list[str]:
        return [NAMES.get(n, f"cap_{n}") for n in self.bounding_drops]


def plan_drop(current: CapabilitySets, keep: frozenset[str]) -> DropPlan:
    """Pure: drop every capability of the bounding set outside ``keep``; keep in permitted/effective only what
    is both kept and held now (capabilities can only ever be lost, never gained)."""
    wanted = mask(keep)
    drops = tuple(n for n in range(64) if current.bounding >> n & 1 and not wanted >> n & 1)
    return DropPlan(bounding_drops=drops, permitted=current.permitted & wanted)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def apply_plan(plan: DropPlan) -> None:
    """Apply a plan to the calling thread: OSError when the kernel refuses (e.g. no CAP_SETPCAP)."""
    libc = _libc()
    # Bounding set first: dropping from it needs CAP_SETPCAP, which the capset below takes away.
    for number in plan.bounding_drops:
        if libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_CAPBSET_DROP, {NAMES.get(number, number)}): {os.strerror(errno)}")
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(errno)}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    low, high = plan.permitted & 0xFFFFFFFF, plan.permitted >> 32
    data = (_CapData * 2)(_CapData(low, low, 0), _CapData(high, high, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"capset: {os.strerror(errno)}")


def drop_unneeded(bgp_speaker: bool, env: Mapping[str, str] | None = None) -> list[str]:
    """Drop every capability the daemon does not need (see :func:`needed_capabilities`) from this thread and
    from whatever it starts from now on; log what went. Returns the dropped names ([] when nothing could be or
    was dropped). Never raises: a daemon that cannot drop privileges still works, and says so."""
    env = os.environ if env is None else env
    if env.get("CALICO_KEEP_ALL_CAPABILITIES", "").lower() in ("1", "true", "yes"):
        log.warning("CALICO_KEEP_ALL_CAPABILITIES is set: the daemon keeps every capability it was started with")
        return []
    if threading.active_count() > 1:  # they would keep their capabilities: the drop would be only partial
        log.warning("capabilities not dropped: %d threads already run, and capabilities are per thread",
                    threading.active_count())
        return []
    keep = needed_capabilities(bgp_speaker)
    try:
        current = CapabilitySets.of()
    except OSError as exc:
        log.warning("capabilities not dropped: cannot read /proc/self/status: %s", exc.strerror)
        return []
    plan = plan_drop(current, keep)
    if plan.bounding_drops and not current.effective >> CAPABILITIES["SETPCAP"] & 1:
        log.warning("no CAP_SETPCAP: the bounding set stays, so programs the daemon starts may regain %s",
                    ",".join(plan.dropped_names))
        plan = DropPlan(bounding_drops=(), permitted=plan.permitted)
    if not plan.bounding_drops and plan.permitted == current.permitted:
        return []
    try:
        apply_plan(plan)
    except OSError as exc:
        log.warning("capabilities not dropped (%s): the daemon keeps %s", exc, ",".join(names_in(current.effective))
                    or "none")
        return []
    gone = names_in(current.bounding & ~mask(keep)) if plan.bounding_drops else \
        names_in(current.permitted & ~plan.permitted)
    log.info("dropped capabilities %s; kept %s", ",".join(gone) or "none",
             ", ".join(f"{name} ({REASONS[name]})" for name in sorted(keep)))
    return gone
