"""End-to-end tests: topologies deployed in network namespaces (root)."""

from tests.labfixture import lab  # noqa: F401 - the fixture
