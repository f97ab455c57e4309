"""CNI 1.x types: the request (environment + stdin config), errors with the spec's codes, and results.

Pure and standard-library only: the shim imports it (it must start fast), the daemon validates with it.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# Error codes from the CNI spec (SPEC.md "Error"); 100+ are ours.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
IPAM_EXHAUSTED = 100  # ours: no address could be allocated
INTERNAL = 999


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
        obj: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            obj["details"] = self.details
        return obj


CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
IFNAME = re.compile(r"^[^/:\s]{1,15}$")


@dataclass(frozen=True)
class Request:
    """One CNI invocation, validated."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str
    config: dict[str, Any]

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion", CURRENT_VERSION))

    @property
    def network(self) -> str:
        return str(self.config.get("name", ""))

    @property
    def handle_id(self) -> str:
        """Calico's IPAM handle: ``<network>.<container id>``."""
        return f"{self.network}.{self.container_id}"

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


@dataclass(frozen=True)
class Netns:
    """CNI_NETNS as the shim found it, opening it with the runtime's privileges: ``fd`` is the daemon's descriptor
    of that namespace (received over the socket, valid for the one request), ``error`` the errno of the shim's
    open when it failed. ``path`` is for messages only: the daemon never opens a path a runtime gave."""

    path: str = ""
    fd: int | None = None
    error: int = 0


NO_NETNS = Netns()


def netns_error(netns: Netns) -> CNIError | None:
    """The spec's error for an ADD or CHECK whose CNI_NETNS the shim could not open (None if it could): a
    namespace that is gone is an unknown container (code 3), anything else an I/O failure naming the errno."""
    if netns.fd is not None:
        return None
    if not netns.path:
        return CNIError(INVALID_ENVIRONMENT, "CNI_NETNS is missing")
    if netns.error == errno.ENOENT:
        return CNIError(UNKNOWN_CONTAINER, f"network namespace {netns.path} does not exist")
    return CNIError(IO_FAILURE, f"cannot open network namespace {netns.path}: {os.strerror(netns.error)}",
                    "opened by the calico-py plugin with the container runtime's privileges")


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``K1=V1;K2=V2``."""
    result = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS item {item!r} is not KEY=VALUE")
        result[key] = value
    return result


def _config_error(field_name: str, what: str, value: Any) -> CNIError:
    shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:60]}..."
    return CNIError(INVALID_NETWORK_CONFIG, f"network configuration field {field_name} must be {what}, not {shown}")


def check_config(config: dict[str, Any]) -> None:
    """The fields of the network configuration the daemon reads have the shape it reads them in (a bad one is
    the runtime's or the operator's mistake, answered with code 7, never an internal error)."""
    ipam = config.get("ipam")
    if ipam is not None and not isinstance(ipam, dict):
        raise _config_error("ipam", "an object", ipam)
    ipam = ipam or {}
    if "type" in ipam and not isinstance(ipam["type"], str):
        raise _config_error("ipam.type", "a plugin name", ipam["type"])
    pools = ipam.get("ipv4_pools")
    if pools is not None and (not isinstance(pools, list) or not all(isinstance(p, str) and p for p in pools)):
        raise _config_error("ipam.ipv4_pools", "a list of pool names or CIDRs", pools)
    for key in ("assign_ipv4", "assign_ipv6"):
        if key in ipam and str(ipam[key]).lower() not in ("true", "false"):
            raise _config_error(f"ipam.{key}", '"true" or "false"', ipam[key])
    mtu = config.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int | str) or not str(mtu).isdecimal()
                            or not (int(mtu) == 0 or 68 <= int(mtu) <= 65535)):
        raise _config_error("mtu", "a whole number from 68 to 65535 (0: the node's default)", mtu)
    attachments = config.get("cni.dev/valid-attachments")
    if attachments is not None and not isinstance(attachments, list):
        raise _config_error("cni.dev/valid-attachments", "a list of attachments", attachments)


def parse_request(env: dict[str, str], stdin: bytes | str) -> Request:
    """Validate a request the way the spec orders it: command, config (version), then the environment."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    try:
        config = json.loads(stdin or b"{}") if command != "VERSION" or stdin else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODE_FAILURE, f"network configuration on stdin is not valid JSON: {exc}") from None
    except RecursionError:
        raise CNIError(DECODE_FAILURE, "network configuration on stdin is nested too deeply to be a network "
                                       "configuration") from None
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network configuration on stdin must be a JSON object")
    version = str(config.get("cniVersion", CURRENT_VERSION if command == "VERSION" else ""))
    if command != "VERSION":
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported "
                                                 f"(supported: {', '.join(SUPPORTED_VERSIONS)})")
        if not isinstance(config.get("name"), str) or not config["name"]:
            raise CNIError(INVALID_NETWORK_CONFIG, "network configuration has no name")
        check_config(config)
    needs_container = command in ("ADD", "DEL", "CHECK")
    container_id = env.get("CNI_CONTAINERID", "")
    netns = env.get("CNI_NETNS", "")
    ifname = env.get("CNI_IFNAME", "")
    if needs_container:
        if not CONTAINER_ID.match(container_id):
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID {container_id!r} is missing or not "
                                                "alphanumeric (with . _ -)")
        if not IFNAME.match(ifname):
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_IFNAME {ifname!r} is missing or not a valid interface name")
        if command in ("ADD", "CHECK") and not netns:
            raise CNIError(INVALID_ENVIRONMENT, "CNI_NETNS is missing")
    return Request(command=command, container_id=container_id, netns=netns, ifname=ifname,
                   args=parse_args(env.get("CNI_ARGS", "")), path=env.get("CNI_PATH", ""), config=config)


def version_result(cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    sandbox: str = ""


@dataclass
class Result:
    """A CNI ADD result (1.x shape; 0.3/0.4 get ``version`` per IP)."""

    interfaces: list[Interface] = field(default_factory=list)
    ips: list[tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, int, str | None]] = field(
        default_factory=list)  # (address, interface index, gateway)
    routes: list[tuple[str, str | None]] = field(default_factory=list)  # (dst, gw)
    dns: dict[str, Any] = field(default_factory=dict)

    def to_json(self, cni_version: str) -> dict[str, Any]:
        legacy = cni_version.startswith("0.")
        ips = []
        for address, index, gateway in self.ips:
            entry: dict[str, Any] = {"address": str(address), "interface": index}
            if gateway:
                entry["gateway"] = gateway
            if legacy:
                entry["version"] = str(address.version)
            ips.append(entry)
        interfaces = []
        for interface in self.interfaces:
            item = {"name": interface.name, "mac": interface.mac}
            if interface.sandbox:
                item["sandbox"] = interface.sandbox
            interfaces.append(item)
        routes = [{"dst": dst, **({"gw": gw} if gw else {})} for dst, gw in self.routes]
        return {"cniVersion": cni_version, "interfaces": interfaces, "ips": ips, "routes": routes,
                "dns": self.dns}
