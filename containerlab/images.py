"""Which local command stands in for a container image when a lab runs in namespaces.

A containerlab node names an image; with no container engine the runner starts the Debian binary of the same
daemon inside the node's network namespace instead. The table is matched on the image's repository name (the
last path component, without the tag), so ``quay.io/frrouting/frr:8.4.4`` and ``frrouting/frr`` agree.

Templates may use ``{node}`` (node name), ``{state}`` (the node's private directory under the lab's run
directory: sockets, pid files, data), ``{mgmt_ip}`` (the node's management address) and ``{bind:/path}`` (the
host file bound to that container path by the node's ``binds:``; the node must bind it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Daemon:
    """How to run one daemon of an image: argv template and the Debian package that provides it."""

    argv: tuple[str, ...]
    package: str


@dataclass(frozen=True)
class ImageSpec:
    name: str
    repositories: tuple[str, ...]
    daemons: tuple[Daemon, ...] = ()
    required_binds: tuple[str, ...] = ()
    description: str = ""
    # The user the daemons drop to: their state directory is handed to it (FRR refuses to run as root).
    state_owner: str | None = None
    # Environment the runner adds (templates as for argv), e.g. where a daemon keeps its state.
    env: tuple[tuple[str, str], ...] = ()


IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec(
        name="calico-py-node",
        repositories=("calico-py-node", "calico-py"),
        daemons=(Daemon(("calico-py-node",), "calico-py (this project, from the venv)"),),
        description="our node daemon; settings from the node's env: (NODENAME, IP, AS, ETCD_ENDPOINTS, ...)",
        env=(("CALICO_STATE_DIR", "{state}"), ("CALICO_LOG_FILE", "{state}/calico-py-node.log"),
             ("CALICO_SECRETS_DIR", "{state}/secrets")),
    ),
    ImageSpec(
        name="etcd",
        repositories=("etcd",),
        # Settings go through etcd's own ETCD_* variables, not flags (a flag would shadow the variable): a node's
        # env: overrides any of them. A member is addressed by its management address, so a cluster is declared
        # by giving each member node the same ETCD_INITIAL_CLUSTER (member names are node names); without it a
        # node is a cluster of one.
        daemons=(Daemon(("etcd",), "etcd-server"),),
        env=(("ETCD_NAME", "{node}"), ("ETCD_DATA_DIR", "{state}/etcd"),
             ("ETCD_LISTEN_CLIENT_URLS", "http://0.0.0.0:2379"),
             ("ETCD_ADVERTISE_CLIENT_URLS", "http://{mgmt_ip}:2379"),
             ("ETCD_LISTEN_PEER_URLS", "http://{mgmt_ip}:2380"),
             ("ETCD_INITIAL_ADVERTISE_PEER_URLS", "http://{mgmt_ip}:2380"),
             ("ETCD_INITIAL_CLUSTER", "{node}=http://{mgmt_ip}:2380")),
        description="etcd serving clients on the management network, port 2379; one member unless the node's env: "
                    "sets ETCD_INITIAL_CLUSTER (peers on port 2380 of their management addresses)",
    ),
    ImageSpec(
        name="bird",
        repositories=("bird", "bird2"),
        daemons=(Daemon(("bird", "-f", "-c", "{bind:/etc/bird/bird.conf}", "-s", "{state}/bird.ctl",
                         "-P", "{state}/bird.pid"), "bird2"),),
        required_binds=("/etc/bird/bird.conf",),
        description="BIRD 2; control socket {state}/bird.ctl (birdc -s ...)",
    ),
    ImageSpec(
        name="frr",
        repositories=("frr",),
        daemons=(
            Daemon(("/usr/lib/frr/zebra", "-N", "{ns}", "-u", "frr", "-g", "frr",
                    "-i", "{state}/zebra.pid", "-z", "{state}/zserv.api", "--vty_socket", "{state}",
                    "-f", "/dev/null"), "frr"),
            Daemon(("/usr/lib/frr/bgpd", "-N", "{ns}", "-u", "frr", "-g", "frr",
                    "-i", "{state}/bgpd.pid", "-z", "{state}/zserv.api", "--vty_socket", "{state}",
                    "-f", "{bind:/etc/frr/frr.conf}"), "frr"),
        ),
        required_binds=("/etc/frr/frr.conf",),
        description="FRR zebra + bgpd as user frr; vtysh --vty_socket {state}",
        state_owner="frr",
    ),
    ImageSpec(
        name="gobgp",
        repositories=("gobgp",),
        daemons=(Daemon(("gobgpd", "-f", "{bind:/etc/gobgp/gobgp.toml}", "-t", "toml",
                         "--api-hosts", "127.0.0.1:50051"), "gobgpd"),),
        required_binds=("/etc/gobgp/gobgp.toml",),
        description="GoBGP; API on 127.0.0.1:50051 inside the node's namespace",
    ),
    ImageSpec(
        name="plain",
        repositories=("alpine", "debian", "ubuntu", "busybox", "network-multitool", "netshoot", "linux"),
        description="no daemon: a host or router configured by exec: commands",
    ),
)


def spec_for(image: str) -> ImageSpec | None:
    """The spec whose repository matches the image, or None (the runner then runs no daemon and warns)."""
    repository = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    for spec in IMAGES:
        if repository in spec.repositories:
            return spec
    return None
