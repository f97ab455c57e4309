"""A picture of a topology, like ``containerlab graph``: Graphviz DOT, rendered to PNG/SVG by ``dot``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from containerlab.images import spec_for
from containerlab.netns import LabError
from containerlab.topology import Topology

SHAPES = {"bridge": "box3d", "calico-py-node": "box", "etcd": "cylinder", "bird": "octagon", "frr": "octagon",
          "gobgp": "octagon", "plain": "ellipse"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(topology: Topology) -> str:
    lines = [f"graph {_quote(topology.name)} {{", "  graph [overlap=false, splines=true];",
             "  node [fontname=Helvetica, fontsize=10];", "  edge [fontname=Helvetica, fontsize=8];"]
    mgmt = topology.mgmt_addresses()
    groups: dict[str, list[str]] = {}
    for node in topology.nodes.values():
        spec = spec_for(node.image) if node.kind == "linux" else None
        kind = "bridge" if node.kind == "bridge" else (spec.name if spec else "plain")
        label = f"{node.name}\\n{node.image or node.kind}" + (f"\\n{mgmt[node.name].ip}" if node.name in mgmt else "")
        lines.append(f"  {_quote(node.name)} [shape={SHAPES.get(kind, 'ellipse')}, label={_quote(label)}];")
        if node.group:
            groups.setdefault(node.group, []).append(node.name)
    for index, (group, members) in enumerate(groups.items()):
        lines.append(f"  subgraph cluster_{index} {{ label={_quote(group)}; "
                     + " ".join(_quote(m) + ";" for m in members) + " }")
    for link in topology.links:
        lines.append(f"  {_quote(link.a.node)} -- {_quote(link.b.node)} "
                     f"[taillabel={_quote(link.a.interface)}, headlabel={_quote(link.b.interface)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(topology: Topology, output: Path) -> None:
    """Write ``output``: .dot as text, .png or .svg through Graphviz."""
    dot = to_dot(topology)
    if output.suffix == ".dot":
        output.write_text(dot)
        return
    if output.suffix not in (".png", ".svg"):
        raise LabError(f"graph output {output}: use a .dot, .png or .svg file name")
    binary = shutil.which("dot")
    if binary is None:
        raise LabError("rendering a picture needs Graphviz (apt-get install graphviz); or write a .dot file")
    result = subprocess.run([binary, f"-T{output.suffix[1:]}", "-o", str(output)], input=dot, text=True,
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise LabError(f"dot failed: {result.stderr.strip()}")
