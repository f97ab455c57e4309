"""The node's address when IP=autodetect (IP6=autodetect): Calico's IP_AUTODETECTION_METHOD
(IP6_AUTODETECTION_METHOD): first-found, can-reach=DEST, interface=REGEX, skip-interface=REGEX, cidr=CIDR."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from pyroute2 import IPRoute

# Interfaces first-found never picks (Calico's list, plus ours).
EXCLUDED = re.compile(r"^(lo|docker.*|cbr.*|dummy.*|virbr.*|lxcbr.*|veth.*|cali.*|tunl.*|flannel.*|kube-ipvs.*"
                      r"|cni.*|vxlan.*|vxlan-v6.*|wireguard.*|mgmt.*)$")

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Candidate = tuple[str, Interface]


def choose(candidates: Sequence[Candidate], method: str) -> Interface | None:
    """Pure choice among (interface, address) pairs in kernel order; can-reach is resolved by the caller."""
    usable = [(name, address) for name, address in candidates if not address.ip.is_loopback
              and not address.ip.is_link_local]
    if method.startswith("interface="):
        pattern = re.compile(method.split("=", 1)[1])
        usable = [c for c in usable if pattern.fullmatch(c[0])]
    elif method.startswith("skip-interface="):
        pattern = re.compile(method.split("=", 1)[1])
        usable = [c for c in usable if not pattern.fullmatch(c[0]) and not EXCLUDED.match(c[0])]
    elif method.startswith("cidr="):
        networks = [ipaddress.ip_network(c.strip()) for c in method.split("=", 1)[1].split(",")]
        usable = [c for c in usable if any(c[1].version == n.version and c[1].ip in n for n in networks)
                  and not EXCLUDED.match(c[0])]
    else:
        usable = [c for c in usable if not EXCLUDED.match(c[0])]
    return usable[0][1] if usable else None


def detect(method: str, version: int = 4) -> Interface | None:
    """The node's address of that IP version (IP=autodetect, IP6=autodetect: link-local IPv6 never counts)."""
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        candidates = [(names.get(a["index"], "?"), ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/"
                                                                          f"{a['prefixlen']}"))
                      for a in ipr.get_addr(family=2 if version == 4 else 10)]
        if method.startswith("can-reach="):
            target = method.split("=", 1)[1]
            try:
                route = ipr.route("get", dst=str(ipaddress.ip_address(target)))[0]
            except Exception:
                return None
            source = route.get_attr("RTA_PREFSRC")
            return next((a for _, a in candidates if str(a.ip) == source), None)
    return choose(candidates, method)
