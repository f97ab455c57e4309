"""calicoctl-py: the operator's CLI, in calicoctl's shapes.

Exit codes: 0 ok, 1 user error (bad input, refused change, an etcd TLS misconfiguration such as a rejected client
certificate, problems found by ``ipam check``), 2 datastore unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import NoReturn

import yaml

from calicoctl_py.commands import ipam as ipam_commands
from calicoctl_py.commands import node as node_commands
from calicoctl_py.commands import resources
from calicoctl_py.commands.resources import UserError
from ipam.datastore import Datastore, EtcdConfig
from ipam.errors import DatastoreError, DatastoreUnavailable, IPAMError

DEFAULT_CONFIG = Path("/etc/calico/calicoctl.cfg")


def datastore_config(path: Path | None) -> EtcdConfig:
    """From ``--config`` (calicoctl.cfg's CalicoAPIConfig), else the ETCD_* environment, else the default file."""
    if path is None and not os.environ.get("ETCD_ENDPOINTS") and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is None:
        return EtcdConfig.from_env()
    try:
        doc = yaml.safe_load(resources.utf8_text(path.read_bytes(), str(path))) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read config {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected kind CalicoAPIConfig with spec.datastoreType etcdv3")
    spec = doc.get("spec") or {}
    if doc.get("kind") != "CalicoAPIConfig" or spec.get("datastoreType", "etcdv3") != "etcdv3":
        raise UserError(f"{path}: expected kind CalicoAPIConfig with spec.datastoreType etcdv3")
    return EtcdConfig.parse(spec.get("etcdEndpoints") or "", ca_cert_file=spec.get("etcdCACertFile"),
                            cert_file=spec.get("etcdCertFile"), key_file=spec.get("etcdKeyFile"))


EXIT_USER_ERROR = 1
EXIT_DATASTORE_UNAVAILABLE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as user errors: exit code 2 means the datastore is unreachable."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    top = ArgumentParser(prog="calicoctl-py", description="Manage calico-py resources and IPAM.")
    top.add_argument("-c", "--config", type=Path, help="calicoctl.cfg-style file (default: ETCD_* environment)")
    sub = top.add_subparsers(dest="command", required=True)
    for verb, text in (("create", "create resources (refused if one exists)"), ("apply", "create or update"),
                       ("replace", "update (refused if one does not exist)")):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("-f", "--filename", required=True, help="YAML/JSON file, or - for stdin")
    delete = sub.add_parser("delete", help="delete resources: -f FILE, or KIND NAME")
    delete.add_argument("-f", "--filename")
    delete.add_argument("kind", nargs="?")
    delete.add_argument("name", nargs="?")
    delete.add_argument("--force", action="store_true", help="delete a pool that still has allocations")
    get = sub.add_parser("get", help="show resources")
    get.add_argument("kind")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json"), default="table")

    ipam = sub.add_parser("ipam", help="IP address management").add_subparsers(dest="ipam_command", required=True)
    show = ipam.add_parser("show", help="pool utilisation")
    show.add_argument("--show-blocks", action="store_true")
    show.add_argument("--ip", help="who holds this address")
    check = ipam.add_parser("check", help="consistency check")
    check.add_argument("-o", "--output", type=Path, help="write a report for ipam release --from-report")
    release = ipam.add_parser("release", help="release addresses")
    release.add_argument("--ip")
    release.add_argument("--from-report", type=Path)
    release.add_argument("--force", "--yes", dest="force", action="store_true",
                         help="release without asking for confirmation")
    configure = ipam.add_parser("configure", help="IPAM settings")
    configure.add_argument("--strictaffinity", choices=("true", "false"), required=True)
    configure.add_argument("--max-blocks-per-host", type=int, help="0: no cap")

    node = sub.add_parser("node", help="the local node daemon").add_subparsers(dest="node_command", required=True)
    node.add_parser("status", help="the daemon's state and BGP peers")
    diags = node.add_parser("diags", help="collect a diagnostics tarball")
    diags.add_argument("--log-dir", type=Path, default=Path("."), help="where to write the tarball")
    return top


def needs_datastore(args: argparse.Namespace) -> bool:
    return args.command != "node"


async def dispatch(args: argparse.Namespace, store: Datastore | None) -> int:
    if args.command in ("create", "apply", "replace"):
        assert store is not None
        for line in await resources.write(store, resources.read_documents(args.filename), args.command):
            print(line)
    elif args.command == "delete":
        assert store is not None
        if args.filename:
            lines = await resources.delete_documents(store, resources.read_documents(args.filename), args.force)
        elif args.kind and args.name:
            lines = await resources.delete(store, [(args.kind, args.name)], args.force)
        else:
            raise UserError("delete needs -f FILE or KIND NAME")
        for line in lines:
            print(line)
    elif args.command == "get":
        assert store is not None
        await resources.get(store, args.kind, args.name, args.output)
    elif args.command == "ipam":
        assert store is not None
        return await ipam_command(args, store)
    elif args.command == "node":
        return await node_commands.run(args)
    return 0


async def ipam_command(args: argparse.Namespace, store: Datastore) -> int:
    if args.ipam_command == "show":
        if args.ip:
            await ipam_commands.show_ip(store, resources.ip_arg(args.ip))
        else:
            await ipam_commands.show(store, args.show_blocks)
    elif args.ipam_command == "check":
        return await ipam_commands.run_check(store, args.output)
    elif args.ipam_command == "release":
        if bool(args.ip) == bool(args.from_report):
            raise UserError("ipam release needs exactly one of --ip ADDR or --from-report FILE")
        if args.ip:
            await ipam_commands.release_ip(store, resources.ip_arg(args.ip))
        else:
            await ipam_commands.release_from_report(store, args.from_report, args.force)
    elif args.ipam_command == "configure":
        await ipam_commands.configure(store, args.strictaffinity == "true", args.max_blocks_per_host)
    return 0


async def run(args: argparse.Namespace) -> int:
    if not needs_datastore(args):
        return await dispatch(args, None)
    config = datastore_config(args.config)
    # A CLI should not sit for the daemon's 30 s failover budget before saying etcd is away.
    config = dataclasses.replace(config, failover_timeout=3.0, request_timeout=3.0)
    async with Datastore(config) as store:
        return await dispatch(args, store)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except DatastoreUnavailable as exc:
        print(f"calicoctl-py: {exc}", file=sys.stderr)
        return EXIT_DATASTORE_UNAVAILABLE
    except (UserError, DatastoreError, IPAMError) as exc:
        print(f"calicoctl-py: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
