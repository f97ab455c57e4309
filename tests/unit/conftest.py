"""Fixtures the unit tests share."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bgpd.cni.install import NAMES, install
from tests.cnishim import COMPILER


@pytest.fixture(scope="module", params=["c", "python"])
def plugins(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNI bin directory with calico-py and calico-py-ipam of one kind, installed as a node installs them."""
    if request.param == "c" and shutil.which(COMPILER[0]) is None:
        pytest.skip(f"no C compiler ({COMPILER[0]})")
    dest = tmp_path_factory.mktemp(f"cni-{request.param}")
    installed = install(dest, python=sys.executable, kind=request.param)
    assert installed.kind == request.param
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)
    return dest
