"""The lab fixtures, a pytest plugin (registered in tests/conftest.py).

``lab`` deploys topologies for one test; ``module_lab`` for every test of a module that shares them (tests that
only read a lab, or add and remove pods, and leave it as they found it). Both destroy what they deployed, also
when a test failed. ``pods`` makes pod namespaces for one test and deletes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab.cni import Pods
from tests.lab.handle import Deployer


def _deployer() -> Iterator[Deployer]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    deploy = Deployer()
    try:
        yield deploy
    finally:
        deploy.destroy_all()


@pytest.fixture
def lab() -> Iterator[Deployer]:
    """``lab("mesh3.clab.yml")`` deploys that topology for this test (containerlab/topologies unless a path)."""
    yield from _deployer()


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Deployer]:
    """``module_lab(...)`` deploys a topology the module's tests share; destroyed after the module's last test."""
    yield from _deployer()


@pytest.fixture
def pods() -> Iterator[Pods]:
    """Pod network namespaces for one test, every one deleted afterwards (the deletion is asserted)."""
    made = Pods()
    yield made
    errors = made.cleanup()
    assert not errors, f"could not delete pod namespaces: {errors}"
