"""Install the CNI plugins ``calico-py`` and ``calico-py-ipam`` into a CNI bin directory.

The C shim (shim.c) is built wherever a C compiler exists: a static binary starts in about a millisecond, an
interpreter in about fifteen, on every ADD and DEL. Without a compiler (or if the build fails) the Python shim
goes in instead, with an ``-IS`` shebang (one word: the kernel passes everything after the interpreter as a
single argument). Each name is written atomically (a temporary file in the directory, then a rename): a
runtime never sees a half-written plugin.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bgpd.cni.shim import version_answer

log = logging.getLogger(__name__)
SHIM_PY = Path(__file__).with_name("shim.py")
SHIM_C = Path(__file__).with_name("shim.c")
NAMES = ("calico-py", "calico-py-ipam")
CFLAGS = ("-std=c11", "-O2", "-s")
COMPILE_TIMEOUT = 120.0
Kind = Literal["c", "python", "auto"]


class InstallError(RuntimeError):
    """The C shim was asked for and could not be built."""


@dataclass(frozen=True)
class Installed:
    kind: Literal["c", "python"]
    how: str  # the compiler command line, or the Python shim's shebang
    paths: tuple[Path, ...]

    @property
    def name(self) -> str:
        return "C shim" if self.kind == "c" else "Python shim"

    def __str__(self) -> str:
        return f"{self.name} ({self.how})"


def install(dest: Path, python: str = "/usr/bin/python3", kind: Kind = "auto") -> Installed:
    """Write ``dest/calico-py`` and ``dest/calico-py-ipam``: the C shim (``kind="c"``, InstallError if it
    cannot be built), the Python shim (``kind="python"``; ``python`` must be a 3.11+ interpreter, the shim needs
    only its standard library), or the C shim when it builds and the Python one otherwise (``"auto"``)."""
    dest.mkdir(parents=True, exist_ok=True)
    built = None
    if kind != "python":
        try:
            built = build_c(dest)
        except InstallError as exc:
            if kind == "c":
                raise
            log.warning("installing the Python CNI shim (slower to start): %s", exc)
    if built is None:
        how = f"#!{python} -IS"
        body = SHIM_PY.read_text().split("\n", 1)[1]  # all but the shebang
        data = f"{how}\n{body}".encode()
    else:
        data, how = built
    paths = tuple(_write_atomic(dest / name, data) for name in NAMES)
    installed = Installed("c" if built else "python", how, paths)
    log.info("installed the CNI plugins in %s: %s", dest, installed)
    return installed


def build_c(workdir: Path) -> tuple[bytes, str]:
    """shim.c compiled with ``$CC`` (or ``cc``), static if the C library allows it: (the binary, the command).
    Built in ``workdir`` (the plugins' own directory, so it is not on a noexec mount) and run once to check it
    answers VERSION as the Python shim does."""
    try:
        compiler = shlex.split(os.environ.get("CC") or "cc")
    except ValueError as exc:
        raise InstallError(f"cannot parse $CC: {exc}") from None
    if not compiler or shutil.which(compiler[0]) is None:
        raise InstallError(f"no C compiler ({compiler[0] if compiler else '$CC is blank'}) on PATH")
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".calico-py.build.") as tmp:
        out = Path(tmp) / "calico-py"
        failures = []
        for link in (["-static"], []):  # static starts faster (no dynamic loader); not every libc ships libc.a
            argv = [*compiler, *CFLAGS, *link, "-o", str(out), str(SHIM_C)]
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                failures.append(f"{shlex.join(argv)}: {exc}")
                continue
            if result.returncode == 0:
                _check_binary(out)
                return out.read_bytes(), shlex.join([*compiler, *CFLAGS, *link])
            failures.append(f"{shlex.join(argv)}: exit {result.returncode}: {result.stderr.strip()[-500:]}")
    raise InstallError("cannot build shim.c: " + "; ".join(failures))


def _check_binary(binary: Path) -> None:
    try:
        result = subprocess.run([str(binary)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"the built shim does not run: {exc}") from None
    if result.returncode != 0 or result.stdout != version_answer():
        raise InstallError(f"the built shim answers VERSION with {result.stdout!r} (exit {result.returncode}), "
                           f"not {version_answer()!r}")


def _write_atomic(target: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
