"""deploy/: the Kubernetes manifests an operator applies.

Every document is deserialized into the kubernetes client's typed model and serialized back: the deserializer
silently drops fields it does not know, so a round trip that loses something is a misspelled or misplaced field.
kubernetes-validate (JSON schemas of the API, strict: no unexpected properties) and ``kubectl kustomize`` check
them again where installed. The rest are the policy facts the manifest's comments promise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from bgpd.config import Config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFEST = DEPLOY / "calico-py.yaml"
NAMESPACE = "calico-py-system"
IMAGE = "ghcr.io/calico-py/calico-py"
KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Deployment"}


def documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc is not None]


DOCS = documents()


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def model_class(doc: dict[str, Any]) -> str:
    """The kubernetes client's class for a document: apps/v1 DaemonSet -> V1DaemonSet."""
    return doc["apiVersion"].split("/")[-1].capitalize() + doc["kind"]


DAEMONSET = one("DaemonSet", "calico-py-node")
DEPLOYMENT = one("Deployment", "calico-py-kube-controllers")
CONFIGMAP = one("ConfigMap", "calico-py-config")
NODE_POD = DAEMONSET["spec"]["template"]["spec"]
NODE = next(c for c in NODE_POD["containers"] if c["name"] == "calico-py-node")
INSTALL_CNI = next(c for c in NODE_POD["initContainers"] if c["name"] == "install-cni")
CONTROLLER_POD = DEPLOYMENT["spec"]["template"]["spec"]
CONTROLLER = CONTROLLER_POD["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def python_sources() -> str:
    """Every Python file of the project's packages (not tests, not the venv): where the settings are read."""
    skip = {".venv", "tests", "bench", "build", "deploy"}
    return "\n".join(p.read_text() for p in sorted(ROOT.rglob("*.py"))
                     if not skip.intersection(p.relative_to(ROOT).parts[:1]))


# --- schema ------------------------------------------------------------------------------------------------------


def test_every_kind_is_there_in_order() -> None:
    assert {d["kind"] for d in DOCS} == KINDS
    assert DOCS[0]["kind"] == "Namespace"  # first: everything else lives in it


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_round_trip_through_the_typed_model(doc: dict[str, Any]) -> None:
    api = ApiClient()
    model = api._ApiClient__deserialize(doc, model_class(doc))  # type: ignore[attr-defined]
    assert type(model).__name__ == model_class(doc)
    assert api.sanitize_for_serialization(model) == doc


def test_round_trip_catches_a_misspelled_field() -> None:
    """The check above is only worth something if a typo changes the result."""
    bad = json.loads(json.dumps(DAEMONSET))
    bad["spec"]["template"]["spec"]["hostNetwrok"] = True
    api = ApiClient()
    assert api.sanitize_for_serialization(api._ApiClient__deserialize(bad, "V1DaemonSet")) != bad  # type: ignore[attr-defined]


def test_kubernetes_validate_strict() -> None:
    validator = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                                    "(pip install kubernetes-validate: the API's JSON schemas, strict mode)")
    for doc in DOCS:
        validator.validate(doc, validator.utils.latest_version(), strict=True)


def test_kustomize_build_keeps_every_object() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize deploy/` not checked")
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    assert set(built) == {(d["kind"], d["metadata"]["name"]) for d in DOCS}
    for (_, _), doc in built.items():
        if doc["kind"] in ("DaemonSet", "Deployment"):
            pod = doc["spec"]["template"]["spec"]
            for container in pod.get("initContainers", []) + pod["containers"]:
                assert container["image"].startswith(IMAGE + ":")


def test_kustomization_lists_the_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == ["calico-py.yaml"]
    assert kustomization["namespace"] == NAMESPACE
    assert [i["name"] for i in kustomization["images"]] == [IMAGE]


# --- objects and labels ------------------------------------------------------------------------------------------


def test_every_object_and_pod_is_labelled() -> None:
    for doc in DOCS:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "calico-py", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/name"]
    for workload in (DAEMONSET, DEPLOYMENT):
        template = workload["spec"]["template"]["metadata"]["labels"]
        assert template["app.kubernetes.io/part-of"] == "calico-py"
        assert workload["spec"]["selector"]["matchLabels"].items() <= template.items()


def test_namespaced_objects_are_in_the_namespace() -> None:
    for doc in DOCS:
        if doc["kind"] in ("ServiceAccount", "ConfigMap", "DaemonSet", "Deployment"):
            assert doc["metadata"]["namespace"] == NAMESPACE
        else:
            assert "namespace" not in doc["metadata"]


def test_one_image_everywhere() -> None:
    containers = NODE_POD["initContainers"] + NODE_POD["containers"] + CONTROLLER_POD["containers"]
    assert {c["image"] for c in containers} == {f"{IMAGE}:0.1.0"}


# --- RBAC --------------------------------------------------------------------------------------------------------


def rules(name: str) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in one("ClusterRole", name)["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def test_node_role_is_the_least_set() -> None:
    read = {("", r, v) for r in ("nodes", "pods") for v in ("get", "list", "watch")}
    assert rules("calico-py-node") == read | {("", "namespaces", "get"), ("", "nodes/status", "patch")}


def test_controller_role_only_reads_pods_and_nodes() -> None:
    assert rules("calico-py-kube-controllers") == {("", r, v) for r in ("pods", "nodes")
                                                    for v in ("get", "list", "watch")}


def test_no_wildcards_and_no_secrets() -> None:
    for doc in DOCS:
        if doc["kind"] != "ClusterRole":
            continue
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert "secrets" not in rule["resources"]
            assert not rule.get("nonResourceURLs")


def test_bindings_bind_each_role_to_its_service_account() -> None:
    accounts = {d["metadata"]["name"] for d in DOCS if d["kind"] == "ServiceAccount"}
    for name in ("calico-py-node", "calico-py-kube-controllers"):
        binding = one("ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
        assert name in accounts
    assert NODE_POD["serviceAccountName"] == "calico-py-node"
    assert CONTROLLER_POD["serviceAccountName"] == "calico-py-kube-controllers"


# --- the node DaemonSet ------------------------------------------------------------------------------------------


def test_runs_on_every_node() -> None:
    assert {"operator": "Exists"} in NODE_POD["tolerations"]  # no key, no effect: every taint
    assert NODE_POD["priorityClassName"] == "system-node-critical"
    assert NODE_POD["hostNetwork"] is True
    assert "hostPID" not in NODE_POD
    assert NODE["securityContext"] == {"privileged": True}


def test_rolling_update_one_node_at_a_time() -> None:
    assert DAEMONSET["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_nodename_is_the_kubernetes_node_name() -> None:
    assert env_of(NODE)["NODENAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_probes_ask_the_daemon() -> None:
    """No HTTP health endpoint exists yet: both probes run `calicoctl-py node status` (exit 1: no daemon)."""
    assert "calicoctl-py" in console_scripts()
    for probe in ("livenessProbe", "readinessProbe"):
        assert NODE[probe]["exec"]["command"] == ["calicoctl-py", "node", "status"]
    assert NODE["livenessProbe"]["failureThreshold"] * NODE["livenessProbe"]["periodSeconds"] >= 60


def test_resources() -> None:
    assert NODE["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def test_node_env_is_known_to_the_daemon() -> None:
    sources = python_sources()
    for name in env_of(NODE):
        assert f'"{name}"' in sources, f"{name}: no Python source of the project reads it"


def node_environment(nodename: str = "node-1") -> dict[str, str]:
    """The node container's environment as the kubelet would build it from this manifest."""
    env = {}
    for name, item in env_of(NODE).items():
        if "value" in item:
            env[name] = item["value"]
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == "calico-py-config"
            env[name] = CONFIGMAP["data"][ref["key"]]
        else:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
            env[name] = nodename
    return env


def test_the_daemon_accepts_the_defaults() -> None:
    config = Config.from_env(node_environment())
    assert config.nodename == "node-1"
    assert config.mtu is None  # empty veth_mtu: automatic
    assert config.networking_backend == "bird"
    assert config.ip == "autodetect" and config.ip_autodetection_method == "kubernetes-internal-ip"
    assert config.default_pool is not None
    assert config.default_pool["spec"]["cidr"] == CONFIGMAP["data"]["ipv4pool_cidr"]
    assert config.ip6 == "none" and config.default_pool6 is None  # IPv4 only unless the ConfigMap says so


def test_the_dual_stack_settings_the_configmap_describes_are_accepted() -> None:
    env = node_environment() | {"IP6": "autodetect", "CALICO_IPV6POOL_CIDR": "fd00:10:244::/64"}
    config = Config.from_env(env)
    assert config.ip6 == "autodetect"
    assert config.default_pool6 is not None and config.default_pool6["spec"]["blockSize"] == 122


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["volumes"]}


def test_every_mount_has_its_volume() -> None:
    for pod in (NODE_POD, CONTROLLER_POD):
        names = set(volumes(pod))
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert set(mounts(container)) <= names, container["name"]


def test_host_paths() -> None:
    host = {name: v["hostPath"]["path"] for name, v in volumes(NODE_POD).items() if "hostPath" in v}
    assert host == {"lib-modules": "/lib/modules", "xtables-lock": "/run/xtables.lock",
                    "state-dir": "/var/run/calico-py", "netns-dir": "/var/run/netns", "cni-bin-dir": "/opt/cni/bin",
                    "cni-net-dir": "/etc/cni/net.d"}
    node = mounts(NODE)
    assert node["lib-modules"]["readOnly"] is True
    assert node["netns-dir"]["mountPropagation"] == "HostToContainer"
    assert node["state-dir"]["mountPath"] == env_of(NODE)["CALICO_STATE_DIR"]["value"]
    assert set(mounts(INSTALL_CNI)) == {"cni-bin-dir", "cni-net-dir"}


def test_secrets_are_optional_read_only_references() -> None:
    for pod, container in ((NODE_POD, NODE), (CONTROLLER_POD, CONTROLLER)):
        for name, volume in volumes(pod).items():
            if "secret" in volume:
                assert volume["secret"]["optional"] is True
                assert volume["secret"]["defaultMode"] in (0o400, 0o440)
                assert mounts(container)[name]["readOnly"] is True
    assert volumes(NODE_POD)["etcd-certs"]["secret"]["secretName"] == "calico-py-etcd-certs"
    assert volumes(CONTROLLER_POD)["etcd-certs"]["secret"]["secretName"] == "calico-py-etcd-certs"
    assert volumes(NODE_POD)["bgp-secrets"]["secret"]["secretName"] == "calico-py-bgp-secrets"
    assert mounts(NODE)["bgp-secrets"]["mountPath"] == env_of(NODE)["CALICO_SECRETS_DIR"]["value"]


def test_etcd_tls_files_are_inside_the_secret_mount() -> None:
    env = node_environment()
    for container in (NODE, CONTROLLER):
        certs = mounts(container)["etcd-certs"]["mountPath"]
        for name in ("ETCD_CA_CERT_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"):
            assert env_of(container)[name] == env_of(NODE)[name]
            assert env[name].startswith(certs + "/")


# --- CNI installation --------------------------------------------------------------------------------------------


def test_conflist() -> None:
    conflist = json.loads(CONFIGMAP["data"]["cni_network_config"])
    assert conflist["cniVersion"] == "1.0.0"
    assert conflist["name"] == "k8s-pod-network"
    first, *rest = conflist["plugins"]
    assert first == {"type": "calico-py", "ipam": {"type": "calico-py-ipam"}}
    assert rest == [{"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]


def test_install_cni_writes_atomically() -> None:
    script = INSTALL_CNI["command"][-1]
    assert INSTALL_CNI["command"][:2] == ["/bin/sh", "-ec"]
    # Every variable the script is given is used, and comes from the ConfigMap.
    for name, item in env_of(INSTALL_CNI).items():
        assert f"${name}" in script or f'"{name}"' in script
        assert item["valueFrom"]["configMapKeyRef"]["name"] == "calico-py-config"
    # Each file lands under a temporary name in its own directory, then moves over the real one.
    assert "mv -f /host/opt/cni/bin/.$name.tmp /host/opt/cni/bin/$name" in script
    assert "mv -f /host/etc/cni/net.d/.10-calico-py.conflist.tmp /host/etc/cni/net.d/10-calico-py.conflist" in script
    assert "for name in calico-py calico-py-ipam;" in script


def test_plugins_are_prebuilt_in_the_image() -> None:
    """The init container copies what the Containerfile built: same directory, the project's plugin names."""
    from bgpd.cni.install import NAMES

    containerfile = (DEPLOY / "Containerfile").read_text()
    built = re.search(r"install\(Path\('([^']+)'\), kind='c'\)", containerfile)
    assert built, "the Containerfile no longer prebuilds the C shim"
    assert f"cp {built.group(1)}/$name " in INSTALL_CNI["command"][-1]
    assert f"for name in {' '.join(NAMES)};" in INSTALL_CNI["command"][-1]
    runtime = containerfile.rsplit("FROM ", 1)[1]
    assert "gcc" not in runtime.split("ENTRYPOINT")[0].split("COPY")[0]  # no compiler in the running image
    assert 'ENTRYPOINT ["calico-py-node"]' in containerfile
    assert console_scripts()["calico-py-node"]


# --- the controller Deployment -----------------------------------------------------------------------------------


def test_controller_deployment() -> None:
    assert DEPLOYMENT["spec"]["replicas"] == 1
    assert DEPLOYMENT["spec"]["strategy"] == {"type": "Recreate"}
    assert "hostNetwork" not in CONTROLLER_POD
    assert CONTROLLER["command"] == ["calico-py-kube-controllers"]
    assert CONTROLLER_POD["securityContext"]["runAsNonRoot"] is True
    assert {t.get("key") for t in CONTROLLER_POD["tolerations"]} >= {"node-role.kubernetes.io/control-plane"}
    assert env_of(CONTROLLER)["CONTROLLER_GC_GRACE"]["value"] == "300"
    assert env_of(CONTROLLER)["ETCD_ENDPOINTS"]["valueFrom"]["configMapKeyRef"]["key"] == "etcd_endpoints"


def test_controller_env_is_known_to_the_controller() -> None:
    target = console_scripts().get("calico-py-kube-controllers", "")
    if not target or importlib.util.find_spec(target.split(":")[0]) is None:
        pytest.skip("calico-py-kube-controllers (console script and module) is not there yet: its settings "
                    "cannot be checked")
    sources = python_sources()
    for name in env_of(CONTROLLER):
        assert f'"{name}"' in sources, f"{name}: no Python source of the project reads it"


def test_config_map_keys_exist() -> None:
    keys = set(CONFIGMAP["data"])
    for container in (NODE, INSTALL_CNI, CONTROLLER):
        for item in env_of(container).values():
            ref = item.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in keys, f"{container['name']}: {ref['key']}"
                assert "optional" not in ref  # a missing key must stop the pod, not run it half-configured
