"""The lab library: what tests that deploy containerlab topologies in network namespaces share.

``tests.lab.plugin`` holds the fixtures (registered in tests/conftest.py); the other modules are helpers by
subject: the deployed lab (``handle``), the CNI runtime and pods (``cni``), the node daemon (``daemon``), BGP
(``bgp``), traffic (``traffic``), the health endpoints (``health``) and the fault suite's report (``report``).
"""
