"""End-to-end tests: topologies deployed in network namespaces (root)."""

from collections.abc import Iterator

import pytest

from tests.e2e.test_cni import Pods
from tests.labfixture import lab  # noqa: F401 - the fixture


@pytest.fixture
def pods() -> Iterator[Pods]:
    """Pod network namespaces for one test, deleted afterwards (test_cni.py's own also asserts the deletion)."""
    made = Pods()
    yield made
    made.cleanup()
