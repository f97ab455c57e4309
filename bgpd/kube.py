"""Every Kubernetes API call calico-py makes, behind one small synchronous adapter.

Built on the official ``kubernetes`` client (CoreV1Api: configuration, TLS, auth, URLs), each ``Kube`` with its own
``Configuration`` and ``ApiClient`` rather than the client's global default, so two can coexist (a test's fake API
and a real cluster, say). Responses are read as JSON (``_preload_content=False``) and turned into the two frozen
dataclasses below: only the fields we use, and no pydantic model validation to trip over on a large pod list.

Callers run these methods in a thread (``asyncio.to_thread``); every call has a timeout, and every failure becomes
a :class:`KubeError` whose message names what failed and what to check. Pointing tests at a real cluster is a
matter of ``KUBECONFIG`` (see docs/kubernetes.md).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
# The client itself is imported on first use: a node without Kubernetes never pays its 0.3 s and 46 MiB.

DEFAULT_TIMEOUT = 10.0
LIST_PAGE_SIZE = 500  # pages of a list call: bounded memory and request time on a large cluster
NETWORK_UNAVAILABLE = "NetworkUnavailable"


class KubeError(Exception):
    """A Kubernetes API call or the client's configuration failed; the message says what and what to do."""


@dataclass(frozen=True)
class KubePod:
    namespace: str
    name: str
    uid: str
    node: str | None
    labels: dict[str, str]
    annotations: dict[str, str]
    phase: str


@dataclass(frozen=True)
class KubeNode:
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    internal_ip: str | None
    external_ip: str | None


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def pod_from_json(obj: Mapping[str, Any]) -> KubePod:
    meta = _metadata(obj)
    return KubePod(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
                   node=(obj.get("spec") or {}).get("nodeName") or None, labels=dict(meta.get("labels") or {}),
                   annotations=dict(meta.get("annotations") or {}),
                   phase=(obj.get("status") or {}).get("phase") or "Unknown")


def node_from_json(obj: Mapping[str, Any]) -> KubeNode:
    meta = _metadata(obj)
    addresses = (obj.get("status") or {}).get("addresses") or []

    def first(kind: str) -> str | None:  # dual-stack nodes list one address per family; the first is primary
        return next((a.get("address") for a in addresses if a.get("type") == kind), None)

    return KubeNode(name=meta.get("name", ""), labels=dict(meta.get("labels") or {}),
                    annotations=dict(meta.get("annotations") or {}), internal_ip=first("InternalIP"),
                    external_ip=first("ExternalIP"))


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def network_condition(unavailable: bool, reason: str, message: str) -> dict[str, str]:
    """The Node condition calico-node sets (``CalicoIsUp`` / ``CalicoIsDown`` are its reasons)."""
    now = _now_rfc3339()
    return {"type": NETWORK_UNAVAILABLE, "status": "True" if unavailable else "False", "reason": reason,
            "message": message, "lastTransitionTime": now, "lastHeartbeatTime": now}


def _api_message(exc: ApiException) -> str:
    """The API server's own words (the ``message`` of its Status object) when it sent one."""
    try:
        status = json.loads(exc.body or "")
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"])
    return str(exc.reason or "no reason given").replace("\n", " ")


_HINTS = {401: "check the credentials in KUBECONFIG or the service account token", 404: "it does not exist",
          403: "check the RBAC rules of this service account (see deploy/)"}


class Kube:
    """The Kubernetes API as calico-py uses it. Build with :meth:`from_env` (or directly from a Configuration)."""

    def __init__(self, configuration: client.Configuration, timeout: float = DEFAULT_TIMEOUT) -> None:
        from kubernetes import client

        self.server = configuration.host
        self.timeout = timeout
        self._api_client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api_client)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Kube | None:
        """``KUBECONFIG`` set: that file (its current context). Else inside a pod (``KUBERNETES_SERVICE_HOST``
        set): the service account. Else None: no Kubernetes here."""
        kubeconfig = env.get("KUBECONFIG")
        if not kubeconfig and not env.get("KUBERNETES_SERVICE_HOST"):
            return None
        from kubernetes import client, config
        from kubernetes.config import incluster_config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            if kubeconfig:
                if not any(os.path.isfile(p) for p in kubeconfig.split(os.pathsep) if p):
                    raise KubeError(f"KUBECONFIG={kubeconfig}: no such file; give the path of a kubeconfig")
                config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                        persist_config=False)
            else:
                incluster_config.InClusterConfigLoader(
                    token_filename=incluster_config.SERVICE_TOKEN_FILENAME,
                    cert_filename=incluster_config.SERVICE_CERT_FILENAME, environ=env).load_and_set(configuration)
        except (ConfigException, OSError, ValueError, TypeError) as exc:
            where = f"KUBECONFIG={kubeconfig}" if kubeconfig else "the in-cluster service account"
            raise KubeError(f"cannot load Kubernetes configuration from {where}: {_one_line(exc)}") from None
        return cls(configuration)

    def close(self) -> None:
        self._api_client.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(self, what: str, method: Callable[..., Any], *args: Any, missing_ok: bool = False,
              **kwargs: Any) -> Any:
        """One API call, its JSON body decoded; None for a 404 when ``missing_ok``."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            response = method(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
            try:
                return json.loads(response.data)
            finally:
                response.release_conn()
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            if not exc.status:  # the client's own failure (TLS, say): no HTTP status
                raise KubeError(f"Kubernetes API at {self.server}: {what} failed: {_one_line(exc.reason)}") from None
            hint = _HINTS.get(exc.status, "check the API server")
            raise KubeError(f"Kubernetes API at {self.server}: {what} failed with HTTP {exc.status}: "
                            f"{_api_message(exc)}; {hint}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"Kubernetes API at {self.server}: {what} failed: {_transport_reason(exc)}; check that "
                            "the API server is reachable (KUBECONFIG, KUBERNETES_SERVICE_HOST)") from None
        except ValueError as exc:
            raise KubeError(f"Kubernetes API at {self.server}: {what} answered with invalid JSON: "
                            f"{_one_line(exc)}") from None

    def _list(self, what: str, method: Callable[..., Any]) -> Iterator[Mapping[str, Any]]:
        """Every item of a list call, page by page (``limit`` / ``continue``)."""
        token: str | None = None
        while True:
            page = self._call(what, method, limit=LIST_PAGE_SIZE, **({"_continue": token} if token else {}))
            yield from page.get("items") or []
            token = _metadata(page).get("continue")
            if not token:
                return

    # ------------------------------------------------------------------ the API calls we make

    def get_pod(self, namespace: str, name: str) -> KubePod | None:
        found = self._call(f"GET pod {namespace}/{name}", self._core.read_namespaced_pod, name, namespace,
                           missing_ok=True)
        return pod_from_json(found) if found is not None else None

    def namespace_annotations(self, name: str) -> dict[str, str]:
        found = self._call(f"GET namespace {name}", self._core.read_namespace, name, missing_ok=True)
        return dict(_metadata(found).get("annotations") or {}) if found is not None else {}

    def get_node(self, name: str) -> KubeNode | None:
        found = self._call(f"GET node {name}", self._core.read_node, name, missing_ok=True)
        return node_from_json(found) if found is not None else None

    def list_pods(self) -> list[KubePod]:
        return [pod_from_json(o) for o in self._list("LIST pods", self._core.list_pod_for_all_namespaces)]

    def list_nodes(self) -> list[KubeNode]:
        return [node_from_json(o) for o in self._list("LIST nodes", self._core.list_node)]

    def set_network_unavailable(self, node: str, unavailable: bool, reason: str, message: str) -> None:
        """Set the node's NetworkUnavailable condition as calico-node does: a strategic-merge patch of the status
        subresource, whose conditions merge by ``type``, so the kubelet's own conditions stay."""
        body = {"status": {"conditions": [network_condition(unavailable, reason, message)]}}
        self._call(f"PATCH node {node} status", self._core.patch_node_status, node, body,
                   _content_type="application/strategic-merge-patch+json")


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _transport_reason(exc: Exception) -> str:
    """``Connection refused`` rather than urllib3's paragraph about connection pools and retries."""
    import urllib3

    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
    text = _one_line(reason)
    return text.split("): ", 1)[-1]  # drop the "HTTPConnection(host=..., port=...)" prefix
