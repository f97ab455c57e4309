"""etcd with TLS and client certificates (a CA generated for the test, a real etcd with ``--client-cert-auth``):
calicoctl-py from the environment and from calicoctl.cfg, and the datastore client the node daemon and IPAM use.
Every misconfiguration gives one line naming what is wrong and what to do, a non-zero exit, and writes nothing."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgpd.config import Config
from ipam.allocator import IPAM
from ipam.datastore import Datastore, EtcdConfig
from ipam.errors import DatastoreError
from tests.etcdserver import EtcdCluster, TestPKI, etcd_available, etcdctl, make_test_pki, wipe_all_keys
from tests.integration.ipamhelpers import add_pool

pytestmark = pytest.mark.etcd
CLI = shutil.which("calicoctl-py", path=str(Path(sys.executable).parent)) or "calicoctl-py"
POOL = ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tls-pool}\n"
        "spec: {cidr: 10.77.0.0/16, blockSize: 26}\n")
POOL_KEY = "/calico/resources/v3/projectcalico.org/ippools/tls-pool"
CLI_TIMEOUT = 60  # generous for a loaded CI machine; the CLI itself gives up on etcd after 3 s


@dataclasses.dataclass
class TLSEtcd:
    pki: TestPKI
    cluster: EtcdCluster
    plain: EtcdCluster  # an etcd without TLS, for https:// against a plain server

    @property
    def endpoint(self) -> str:
        return self.cluster.endpoints[0]

    def good_env(self) -> dict[str, str]:
        return {"ETCD_ENDPOINTS": self.endpoint, "ETCD_CA_CERT_FILE": str(self.pki.ca_cert),
                "ETCD_CERT_FILE": str(self.pki.client_cert), "ETCD_KEY_FILE": str(self.pki.client_key)}

    def stored_keys(self) -> list[str]:
        """Every key in the TLS etcd, read with etcdctl as the good client (not through our own client)."""
        out = etcdctl([self.endpoint], "get", "", "--from-key=true", "--keys-only", tls=self.pki).stdout
        return [line for line in out.splitlines() if line]


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSEtcd]:
    if not etcd_available() or not shutil.which("openssl"):
        pytest.skip("needs etcd (Debian etcd-server) and the openssl command")
    base = tmp_path_factory.mktemp("etcd-tls")
    pki = make_test_pki(base / "pki")
    with EtcdCluster(1, base / "tls", tls=pki) as cluster, EtcdCluster(1, base / "plain") as plain:
        yield TLSEtcd(pki, cluster, plain)


@pytest.fixture
def etcd(tls_etcd: TLSEtcd) -> TLSEtcd:
    wipe_all_keys([tls_etcd.endpoint], tls=tls_etcd.pki)
    return tls_etcd


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_") and k != "GRPC_VERBOSITY"}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**clean, **env}, cwd=cwd,
                          timeout=CLI_TIMEOUT, check=False)


def test_calicoctl_from_the_environment_writes_and_reads_over_tls(etcd: TLSEtcd, tmp_path: Path) -> None:
    (tmp_path / "pool.yaml").write_text(POOL)
    applied = cli("apply", "-f", "pool.yaml", env=etcd.good_env(), cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert POOL_KEY in etcd.stored_keys()
    listed = cli("get", "ippool", "-o", "wide", env=etcd.good_env(), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "tls-pool" in listed.stdout and "10.77.0.0/16" in listed.stdout


def test_calicoctl_from_its_config_file_over_tls(etcd: TLSEtcd, tmp_path: Path) -> None:
    config = tmp_path / "calicoctl.cfg"
    config.write_text("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\nspec:\n"
                      f"  datastoreType: etcdv3\n  etcdEndpoints: {etcd.endpoint}\n"
                      f"  etcdCACertFile: {etcd.pki.ca_cert}\n  etcdCertFile: {etcd.pki.client_cert}\n"
                      f"  etcdKeyFile: {etcd.pki.client_key}\n")
    (tmp_path / "pool.yaml").write_text(POOL)
    applied = cli("-c", str(config), "apply", "-f", "pool.yaml", env={}, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    shown = cli("-c", str(config), "ipam", "show", env={}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "10.77.0.0/16" in shown.stdout


async def test_ipam_and_the_daemon_settings_work_over_tls(etcd: TLSEtcd) -> None:
    # The daemon builds its datastore client from the same variables, through its own settings.
    config = Config.from_env({"NODENAME": "node-tls", **etcd.good_env()})
    assert config.etcd.cert_file == str(etcd.pki.client_cert)
    async with Datastore(config.etcd) as store:
        await add_pool(store, "tls-pool", "10.77.0.0/16", 26)
        result = await IPAM(store).auto_assign("pod-tls", "node-tls")
        assert len(result.ipv4) == 1 and str(result.ipv4[0]).startswith("10.77.")
    assert any(key.startswith("/calico/ipam/v2/handle/pod-tls") for key in etcd.stored_keys())


def bad_configs(etcd: TLSEtcd, tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Each misconfiguration: its environment, and what the one-line error must say."""
    pki, good = etcd.pki, etcd.good_env()
    (tmp_path / "mismatched.key").write_bytes(pki.other_client_key.read_bytes())
    return {
        "client cert from another CA": ({**good, "ETCD_CERT_FILE": str(pki.other_client_cert),
                                         "ETCD_KEY_FILE": str(pki.other_client_key)},
                                        "rejected the client certificate"),
        "no client cert": ({k: v for k, v in good.items() if k not in ("ETCD_CERT_FILE", "ETCD_KEY_FILE")},
                           "requires a client certificate: set ETCD_CERT_FILE"),
        "wrong CA": ({**good, "ETCD_CA_CERT_FILE": str(pki.other_ca_cert)},
                     "server certificate does not verify against ETCD_CA_CERT_FILE"),
        "missing CA file": ({**good, "ETCD_CA_CERT_FILE": str(tmp_path / "absent.crt")},
                            f"cannot read ETCD_CA_CERT_FILE (etcdCACertFile) {tmp_path / 'absent.crt'}: no such"),
        "missing key file": ({**good, "ETCD_KEY_FILE": str(tmp_path / "absent.key")},
                             "cannot read ETCD_KEY_FILE (etcdKeyFile)"),
        "key of another cert": ({**good, "ETCD_KEY_FILE": str(tmp_path / "mismatched.key")}, "are not a pair"),
        "CA file not PEM": ({**good, "ETCD_CA_CERT_FILE": str(tmp_path / "mismatched.key")},
                            "holds no PEM CA certificate"),
        "http against https": ({**good, "ETCD_ENDPOINTS": etcd.endpoint.replace("https://", "http://")},
                               "serves TLS: use https:// in ETCD_ENDPOINTS"),
        "https against http": ({**good, "ETCD_ENDPOINTS": etcd.plain.endpoints[0].replace("http://", "https://")},
                               "does not speak TLS: use http://"),
    }


CASES = ["client cert from another CA", "no client cert", "wrong CA", "missing CA file", "missing key file",
         "key of another cert", "CA file not PEM", "http against https", "https against http"]


@pytest.mark.parametrize("case", CASES)
def test_a_tls_misconfiguration_is_one_clear_line_and_writes_nothing(etcd: TLSEtcd, tmp_path: Path,
                                                                     case: str) -> None:
    env, expected = bad_configs(etcd, tmp_path)[case]
    (tmp_path / "pool.yaml").write_text(POOL)
    result = cli("apply", "-f", "pool.yaml", env=env, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert lines[0].startswith("calicoctl-py: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert etcd.stored_keys() == [], "a refused command wrote to etcd"


async def test_the_datastore_client_names_a_rejected_certificate_without_waiting_for_failover(
        etcd: TLSEtcd) -> None:
    config = EtcdConfig.parse(etcd.endpoint, ca_cert_file=str(etcd.pki.ca_cert),
                              cert_file=str(etcd.pki.other_client_cert), key_file=str(etcd.pki.other_client_key))
    config = dataclasses.replace(config, failover_timeout=30.0)
    began = time.monotonic()
    async with Datastore(config) as store:
        with pytest.raises(DatastoreError, match="rejected the client certificate"):
            await store.get("/calico/ipam/v2/config")
    # A certificate problem does not heal by retrying: the daemon is told before its 30 s failover budget.
    assert time.monotonic() - began < 15.0


async def test_one_endpoint_with_a_tls_problem_fails_over_to_a_good_one(etcd: TLSEtcd) -> None:
    # The plain etcd listed as https:// first: its handshake fails, the TLS member behind it serves the request.
    config = EtcdConfig.parse([etcd.plain.endpoints[0].replace("http://", "https://"), etcd.endpoint],
                              ca_cert_file=str(etcd.pki.ca_cert), cert_file=str(etcd.pki.client_cert),
                              key_file=str(etcd.pki.client_key))
    async with Datastore(config) as store:
        await store.put("/calico-py-test/failover", b"1")
        assert store.endpoint == etcd.endpoint
    assert "/calico-py-test/failover" in etcd.stored_keys()
