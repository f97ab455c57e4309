"""Install the CNI plugins as fast-starting executables: the shim with an ``-IS`` shebang (one word: the kernel
passes everything after the interpreter as a single argument), written atomically under both names (a runtime
never sees a half-written plugin)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SHIM = Path(__file__).with_name("shim.py")
NAMES = ("calico-py", "calico-py-ipam")


def install(dest: Path, python: str = "/usr/bin/python3") -> list[Path]:
    """Write ``dest/calico-py`` and ``dest/calico-py-ipam``. ``python`` must be a 3.11+ interpreter; the shim
    needs nothing beyond its standard library."""
    body = SHIM.read_text().split("\n", 1)[1]
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in NAMES:
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        with os.fdopen(fd, "w") as out:
            out.write(f"#!{python} -IS\n{body}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest / name)
        written.append(dest / name)
    return written
