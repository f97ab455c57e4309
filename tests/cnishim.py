"""What the CNI shim tests share: the tools they run the shims with and a configuration (the installed shims are
the ``plugins`` fixture of tests/unit/conftest.py)."""

from __future__ import annotations

import os
import shlex
import shutil

import pytest

UNSHARE = shutil.which("unshare") or "unshare"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                               reason="needs root and util-linux unshare (SO_PEERCRED check, unshare --net)")
COMPILER = shlex.split(os.environ.get("CC") or "cc")
NO_COMPILER = pytest.mark.skipif(shutil.which(COMPILER[0]) is None, reason=f"no C compiler ({COMPILER[0]})")
CONF = b'{"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico-py"}'
