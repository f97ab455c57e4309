"""calico-py-lab: containerlab's deploy / destroy / inspect / exec / graph, for network namespaces."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from containerlab import demo, graph
from containerlab.lab import Lab, NodeStatus, run_root
from containerlab.netns import LabError
from containerlab.topology import TopologyError, load


def _table(rows: list[NodeStatus]) -> str:
    header = ["NODE", "KIND", "IMAGE", "NETNS", "MGMT IPv4", "ADDRESSES", "PROCESSES", "STATE"]
    body = []
    for r in rows:
        addresses = " ".join(f"{i}={','.join(a)}" for i, a in sorted(r.addresses.items()) if a and i != "eth0")
        body.append([r.node, r.kind, r.image, r.netns, r.mgmt_ipv4, addresses or "-",
                     " ".join(r.processes) or "-", r.state])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calico-py-lab", description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where lab state lives (default $CALICO_PY_LAB_RUN_DIR or {run_root()})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("deploy", "create the lab (idempotent)"), ("destroy", "remove every namespace, link and "
                       "process of the lab"), ("inspect", "show nodes, addresses, processes"),
                       ("exec", "run a command in a node"), ("graph", "draw the topology"),
                       ("demo", "deploy, then pods on every calico-py node, node status and a ping matrix")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("-t", "--topo", required=True, type=Path, help="topology file (*.clab.yml)")
        cmd.add_argument("--name", help="override the lab name of the file")
        if name == "inspect":
            cmd.add_argument("-o", "--format", choices=("table", "json"), default="table")
        if name == "destroy":
            cmd.add_argument("--node", help="destroy only this node (deploy brings it back)")
        if name == "exec":
            cmd.add_argument("--node", required=True)
            cmd.add_argument("argv", nargs=argparse.REMAINDER, help="-- command and arguments")
        if name == "graph":
            cmd.add_argument("-o", "--output", type=Path, help=".dot, .png or .svg (default: DOT on stdout)")
    args = parser.parse_args(argv)
    try:
        topology = load(args.topo, args.name)
        lab = Lab(topology, args.run_dir)
        if args.command in ("deploy", "demo"):
            report = lab.deploy()
            for warning in report.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            print(f"lab {topology.name} deployed in {report.seconds:.2f}s: {len(report.created_nodes)} nodes "
                  f"created, {report.created_links} links created, {len(report.started)} daemons started")
            print(_table(lab.inspect()))
            if args.command == "demo":
                return demo.run(lab)
        elif args.command == "destroy" and args.node:
            seconds = lab.destroy_node(args.node)
            print(f"node {args.node} of lab {topology.name} destroyed in {seconds:.2f}s")
        elif args.command == "destroy":
            seconds = lab.destroy()
            print(f"lab {topology.name} destroyed in {seconds:.2f}s")
        elif args.command == "inspect":
            rows = lab.inspect()
            if args.format == "json":
                print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
            else:
                print(_table(rows))
        elif args.command == "exec":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                parser.error("exec needs a command after --")
            result = lab.exec(args.node, command)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return int(result.returncode)
        elif args.command == "graph":
            if args.output:
                graph.render(topology, args.output)
                print(f"wrote {args.output}")
            else:
                sys.stdout.write(graph.to_dot(topology))
    except (TopologyError, LabError) as exc:
        print(f"calico-py-lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
