"""Security in a lab (tests/faults/data/security.clab.yml: two calico-py nodes, BIRD peers bird1 with the MD5
password and bird2 without): TCP-MD5 from a mounted secret, capabilities of the running daemons, and the local
sockets refusing users other than root. And a second lab whose etcd serves TLS only, to clients with a certificate
from a CA made by the test: the daemon and the CNI path work with the right certificate; a daemon with a
certificate from another CA stops with one line saying so."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bgpd.cni.shim import encode_request
from bgpd.privileges import CapabilitySets, mask, names_in, needed_capabilities
from tests.etcdserver import make_test_pki
from tests.eventually import eventually
from tests.lab.bgp import CLI, place_pods, sessions
from tests.lab.cni import Pods
from tests.lab.daemon import daemon_log, daemon_process
from tests.lab.handle import Deployer, LabHandle
from tests.lab.report import FaultRecord
from tests.lab.traffic import interrupt, pod_ping

DATA = Path(__file__).resolve().parent / "data"
PASSWORD = "md5-s3cret-47"  # what bird1.conf holds
ETCD = "http://172.20.47.2:2379"
NODES = ("node1", "node2")
BIRD1, BIRD2 = "10.0.47.1", "10.0.47.2"
NOBODY = "65534"


class Capture:
    """tcpdump of BGP on a node's eth1 into a pcap file, for as long as the ``with`` block lasts (stopped by the
    PID we started, and reaped)."""

    def __init__(self, handle: LabHandle, node: str, pcap: Path) -> None:
        self.argv = ["ip", "netns", "exec", handle.netns(node), "tcpdump", "-i", "eth1", "-U", "-n", "-w", str(pcap),
                     "tcp port 179"]
        self.pcap = pcap
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        self._process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # tcpdump says "listening on" once its capture is open: only then can nothing be missed.
        assert self._process.stderr is not None
        line = self._process.stderr.readline().decode()
        assert "listening on" in line, f"tcpdump did not start: {line}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        interrupt(self._process)

    def read(self, *extra: str) -> list[str]:
        # No check: while the capture runs, its last packet may be half written ("truncated dump file").
        result = subprocess.run(["tcpdump", "-r", str(self.pcap), "-n", "-v", *extra], capture_output=True,
                                text=True, timeout=60, check=False)
        return result.stdout.splitlines()


@pytest.fixture(scope="module")
def security_lab(module_lab: Deployer, tmp_path_factory: pytest.TempPathFactory) -> tuple[LabHandle, list[str]]:
    """The lab with its BGPPeers applied and the password secret mounted on both nodes; also the tcpdump of
    node1's BGP traffic from before the peers were configured until every session that can come up is up."""
    handle = module_lab(DATA / "security.clab.yml")
    for node in NODES:
        secret = handle.lab.run_dir / node / "secrets" / "bgp-passwords"
        secret.mkdir(parents=True, exist_ok=True)
        for key in ("bird1", "bird2"):  # bird2 has no password configured: the nodes' MD5 must keep it out
            (secret / key).write_text(PASSWORD + "\n")
    with Capture(handle, "node1", tmp_path_factory.mktemp("pcap") / "bgp.pcap") as capture:
        applied = handle.exec("node1", "env", f"ETCD_ENDPOINTS={ETCD}", CLI, "apply", "-f",
                              str(DATA / "security" / "calico-bgp.yaml"))
        assert applied.returncode == 0, applied.stderr
        for node, other in (("node1", "10.0.47.12"), ("node2", "10.0.47.11")):
            handle.wait_for(lambda node=node, other=other: {BIRD1, other} <= set(sessions(handle, node)), 90,
                            f"{node} to have Established sessions to bird1 (MD5) and to the other node")
        # node1's ExaBGP keeps trying bird2: wait for one of its SYNs, which must go unanswered.
        eventually(lambda: any(f"> {BIRD2}.179" in line for line in capture.read()), 60, "a SYN from node1 to bird2",
                   every=0.2)
    return handle, capture.read("-M", PASSWORD)


def bird(handle: LabHandle, node: str, *command: str) -> str:
    return handle.exec(node, "birdc", "-s", str(handle.lab.run_dir / node / "bird.ctl"), *command).stdout


def test_md5_password_from_a_secret_establishes_with_bird_and_every_segment_is_signed(
        security_lab: tuple[LabHandle, list[str]], fault_report: FaultRecord) -> None:
    handle, packets = security_lab
    fault_report.fault = "BGP peer with TCP-MD5 from a Secret (BIRD), and one without the password"
    fault_report.runs = 1
    # bird1 holds the password: both nodes are Established with it, on both sides.
    protocols = bird(handle, "bird1", "show", "protocols")
    for node in NODES:
        assert BIRD1 in sessions(handle, node)
        assert re.search(rf"^{node}\s+BGP\s.*Established", protocols, re.MULTILINE), protocols
    # The kernel signs every segment between node1 and bird1, and tcpdump verifies it with the password.
    with_bird1 = [line for line in packets if f"{BIRD1}.179 >" in line or f"> {BIRD1}.179" in line]
    assert with_bird1, "no BGP segment between node1 and bird1 captured"
    unsigned = [line for line in with_bird1 if "md5 valid" not in line]
    assert not unsigned, "segments without a valid TCP-MD5 signature:\n" + "\n".join(unsigned[:5])
    # bird2 has no password: node1's SYNs carry MD5, bird2's kernel drops them, nothing ever answers.
    to_bird2 = [line for line in packets if f"> {BIRD2}.179" in line]
    assert to_bird2 and all("md5" in line for line in to_bird2), to_bird2[:5]
    assert not [line for line in packets if f"{BIRD2}.179 > 10.0.47.11" in line], "bird2 answered node1"
    unexpected = handle.exec("bird2", "nstat", "-asz", "TcpExtTCPMD5Unexpected").stdout
    assert int(re.search(r"TcpExtTCPMD5Unexpected\s+(\d+)", unexpected).group(1)) > 0, unexpected  # type: ignore[union-attr]
    for node in NODES:
        assert BIRD2 not in sessions(handle, node)
        row = next(line for line in handle.exec(node, CLI, "node", "status").stdout.splitlines()
                   if line.startswith(BIRD2))
        assert "TCP-MD5 on" in row, row
    assert "Established" not in bird(handle, "bird2", "show", "protocols")
    fault_report.notes = (f"{len(with_bird1)} segments node1-bird1, all with a valid MD5 signature; "
                          f"{len(to_bird2)} SYNs to bird2 unanswered (its kernel: TCPMD5Unexpected)")


def test_the_daemons_run_with_only_the_capabilities_they_need_and_still_plumb_pods(
        security_lab: tuple[LabHandle, list[str]], pods: Pods, tmp_path: Path) -> None:
    handle, _ = security_lab
    kept = mask(needed_capabilities(bgp_speaker=True))
    for node in NODES:
        daemon = CapabilitySets.of(daemon_process(handle, node).pid)
        assert daemon.bounding == daemon.effective == daemon.permitted == kept, names_in(daemon.bounding)
        assert daemon.inheritable == daemon.ambient == 0
        exabgp_pid = int((handle.lab.run_dir / node / "exabgp.pid").read_text())
        exabgp = CapabilitySets.of(exabgp_pid)
        assert exabgp.bounding == kept and exabgp.effective & ~kept == 0, names_in(exabgp.effective)
        assert "dropped capabilities" in daemon_log(handle, node)
    # With that set, the daemons still plumb pods (setns into the pod's namespace, veths, routes) and the pods
    # reach each other across nodes over the routes BGP distributed.
    placed = place_pods(handle, pods, tmp_path, NODES, "cap")
    assert pod_ping(placed["node1"][0], placed["node2"][1], timeout=60), "pod on node1 cannot reach node2's"
    assert pod_ping(placed["node2"][0], placed["node1"][1], timeout=30), "pod on node2 cannot reach node1's"
    # ExaBGP, started with the reduced set, announces the new blocks to the MD5 peer too.
    handle.wait_for(lambda: bird(handle, "bird1", "show", "route").count("10.244.") >= 2, 30,
                    "bird1 to learn both nodes' blocks")


LOCAL_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])
sock.settimeout(20)
answer = b""
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    sock.shutdown(socket.SHUT_WR)
    while chunk := sock.recv(65536):
        answer += chunk
except (ConnectionResetError, BrokenPipeError):
    print("reset")
else:
    print(repr(answer))
"""
# What ExaBGP's relay would send for a route learned from node2: if the daemon took it from anyone, a local user
# could steer pod traffic.
FORGED_UPDATE = ('{"type": "update", "neighbor": {"address": {"local": "10.0.47.11", "peer": "10.0.47.12"}, '
                 '"message": {"update": {"attribute": {"origin": "igp"}, "announce": {"ipv4 unicast": '
                 '{"10.0.47.99": ["10.244.250.0/26"]}}}}}}\n')


def as_nobody(handle: LabHandle, node: str, socket_name: str, payload: bytes) -> subprocess.CompletedProcess[str]:
    """Send ``payload`` to the abstract socket from a process of uid 65534 (nobody) inside the node; prints the
    answer's repr, or "reset"."""
    return handle.exec(node, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                       "/usr/bin/python3", "-I", "-c", LOCAL_CLIENT, socket_name, payload.hex())


def test_local_sockets_refuse_a_user_other_than_root(security_lab: tuple[LabHandle, list[str]]) -> None:
    handle, _ = security_lab
    log_before = len(daemon_log(handle, "node1"))
    # The CNI socket: a non-root user on the node gets a CNI error, not a pod.
    cni = as_nobody(handle, "node1", "calico-py-cni", encode_request("calico-py", {"CNI_COMMAND": "VERSION"}, b"{}"))
    assert cni.returncode == 0, cni.stderr
    assert "only root may call" in cni.stdout, cni.stdout
    # The ExaBGP API socket: the connection is closed at once, the forged route never reaches the kernel.
    api = as_nobody(handle, "node1", "calico-py-exabgp", FORGED_UPDATE.encode())
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() in ("b''", "reset"), api.stdout
    handle.wait_for(lambda: "refused a connection to the ExaBGP API socket from uid 65534" in
                    daemon_log(handle, "node1")[log_before:], 10, "the daemon to log the refusal")
    assert "10.244.250.0" not in handle.exec("node1", "ip", "route").stdout
    # ExaBGP's own connection was not replaced: sessions stay up and routes still flow.
    assert {BIRD1, "10.0.47.12"} <= set(sessions(handle, "node1"))


TLS_ETCD = "172.20.48.2"


def tls_topology(directory: Path) -> Path:
    """security-tls: etcd with TLS and --client-cert-auth on the management network; node1 with the good client
    certificate, node2 with one from another CA. Certificates are made for this run, so the file is too."""
    pki = make_test_pki(directory / "pki", server_ips=("127.0.0.1", TLS_ETCD))
    etcd_env = {"ETCD_LISTEN_CLIENT_URLS": "https://0.0.0.0:2379",
                "ETCD_ADVERTISE_CLIENT_URLS": f"https://{TLS_ETCD}:2379", "ETCD_CERT_FILE": str(pki.server_cert),
                "ETCD_KEY_FILE": str(pki.server_key), "ETCD_TRUSTED_CA_FILE": str(pki.ca_cert),
                "ETCD_CLIENT_CERT_AUTH": "true"}
    nodes = {"etcd": {"kind": "linux", "image": "quay.io/coreos/etcd:v3.4.23", "mgmt-ipv4": TLS_ETCD, "env": etcd_env},
             "lan": {"kind": "bridge"}}
    for index, (cert, key) in enumerate(((pki.client_cert, pki.client_key),
                                         (pki.other_client_cert, pki.other_client_key)), start=1):
        nodes[f"node{index}"] = {
            "kind": "linux", "image": "ghcr.io/calico-py/calico-py-node:latest",
            "env": {"NODENAME": f"node{index}", "IP": f"10.0.48.1{index}", "ETCD_ENDPOINTS": f"https://{TLS_ETCD}:2379",
                    "ETCD_CA_CERT_FILE": str(pki.ca_cert), "ETCD_CERT_FILE": str(cert), "ETCD_KEY_FILE": str(key),
                    "CALICO_IPV4POOL_CIDR": "10.244.0.0/16", "CALICO_NETWORKING_BACKEND": "bird"},
            "exec": [f"ip addr add 10.0.48.1{index}/24 dev eth1", "ip route add default dev eth1 metric 4096"]}
    document = {"name": "security-tls", "mgmt": {"network": "security-tls-mgmt", "ipv4-subnet": "172.20.48.0/24"},
                "topology": {"nodes": nodes, "links": [{"endpoints": ["node1:eth1", "lan:eth1"]},
                                                       {"endpoints": ["node2:eth1", "lan:eth2"]}]}}
    path = directory / "security-tls.clab.yml"
    path.write_text(json.dumps(document, indent=1))  # JSON is YAML
    return path


def test_the_daemon_and_the_cni_path_work_against_etcd_with_client_certificates(
        lab: Deployer, pods: Pods, tmp_path: Path) -> None:
    handle = lab(tls_topology(tmp_path))
    handle.wait_for(lambda: " ready node=node1" in daemon_log(handle, "node1"), 60, "node1's daemon to be ready")
    # A pod on node1: its address comes from IPAM over TLS, and its WorkloadEndpoint is in etcd.
    placed = place_pods(handle, pods, tmp_path, ("node1",), "tls")
    pki = tmp_path / "pki"
    stored = handle.exec("node1", "etcdctl", f"--endpoints=https://{TLS_ETCD}:2379", f"--cacert={pki / 'ca.crt'}",
                         f"--cert={pki / 'client.crt'}", f"--key={pki / 'client.key'}", "get", "/calico/",
                         "--prefix", "--keys-only")
    assert stored.returncode == 0, stored.stderr
    assert "/calico/resources/v3/projectcalico.org/nodes/node1" in stored.stdout
    assert any("workloadendpoints" in key and "tls" in key for key in stored.stdout.split()), stored.stdout
    assert placed["node1"][1].startswith("10.244.")
    # node2's certificate comes from another CA: etcd refuses it, the daemon says so in one line and stops.
    handle.wait_for(lambda: not daemon_process(handle, "node2").alive(), 60, "node2's daemon to stop")
    errors = [line for line in daemon_log(handle, "node2").splitlines() if line.startswith("calico-py-node: ")]
    assert len(errors) == 1 and "rejected the client certificate" in errors[0], daemon_log(handle, "node2")[-2000:]
    assert "Traceback" not in daemon_log(handle, "node2")
    assert "/calico/resources/v3/projectcalico.org/nodes/node2" not in stored.stdout
