"""A fake Kubernetes API server for tests: the few endpoints calico-py calls, with real Kubernetes JSON objects.

No kube-apiserver can run here, so tests point the real ``kubernetes`` client (through :mod:`bgpd.kube`) at this
server with a kubeconfig it writes. Setting ``KUBECONFIG`` to a real cluster's file runs the same code against the
real thing.

What it fakes (HTTP, 127.0.0.1, a random port):

- ``GET /api/v1/namespaces/{ns}/pods/{name}``, ``GET /api/v1/pods`` (PodList, all namespaces),
  ``GET /api/v1/namespaces/{name}``, ``GET /api/v1/nodes`` (NodeList), ``GET /api/v1/nodes/{name}``;
- ``PATCH /api/v1/nodes/{name}/status`` with ``application/strategic-merge-patch+json`` or
  ``application/merge-patch+json``: the patch's ``status`` is merged into the Node's, ``status.conditions`` merged
  by ``type`` (the strategic-merge key of NodeCondition), other lists replaced; the patched Node is returned;
- objects as the API server shapes them (``apiVersion``, ``kind``, ``metadata.uid`` / ``resourceVersion`` /
  ``creationTimestamp``); lists with ``apiVersion``, ``kind`` and ``metadata.resourceVersion``; one
  resourceVersion counter for every write;
- errors as real ``Status`` objects: 404 for unknown objects and paths, 405 for other methods, 415 for other
  patch types, and any code a test asks for with :meth:`FakeKube.fail_requests`.

What it does not fake: watch, authentication and authorization (the kubeconfig has no credentials), label and
field selectors, ``limit`` / ``continue`` (a list is always one page, no ``continue``), other resources and API
groups, writes other than the status patch (tests change objects through the Python methods below), admission,
validation and defaulting of objects, resourceVersion preconditions, TLS.
"""

from __future__ import annotations

import copy
import datetime
import http.server
import json
import re
import tempfile
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

PAUSE_IMAGE = "registry.k8s.io/pause:3.9"
_PATCH_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")
# (regex over the path, resource plural, handler key)
_ROUTES = [
    (re.compile(r"^/api/v1/pods$"), "pods", "list"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)$"), "pods", "get"),
    (re.compile(r"^/api/v1/namespaces/(?P<name>[^/]+)$"), "namespaces", "get"),
    (re.compile(r"^/api/v1/nodes$"), "nodes", "list"),
    (re.compile(r"^/api/v1/nodes/(?P<name>[^/]+)$"), "nodes", "get"),
    (re.compile(r"^/api/v1/nodes/(?P<name>[^/]+)/status$"), "nodes", "patch-status"),
]
_KINDS = {"pods": "Pod", "namespaces": "Namespace", "nodes": "Node"}


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, name: str | None = None,
                  kind: str | None = None) -> dict[str, Any]:
    """A ``Status`` as the API server returns it with an error."""
    status: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason, "code": code}
    if name is not None:
        status["details"] = {"name": name, "kind": kind}
    return status


def merge_status(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch ``patch`` into ``current`` (null deletes); a ``conditions`` list merges by ``type``."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif key == "conditions" and isinstance(value, list):
            by_type = {c.get("type"): c for c in merged.get("conditions") or []}
            for condition in value:
                by_type[condition.get("type")] = {**by_type.get(condition.get("type"), {}), **condition}
            merged["conditions"] = list(by_type.values())
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_status(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Failure(Exception):
    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(status["message"])
        self.status = status


class FakeKube:
    """``with FakeKube() as kube:`` serves the API until the block ends; ``kube.kubeconfig`` points at it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {plural: {} for plural in _KINDS}
        self._resource_version = 1000
        self._forced_failure: int | None = None
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type), in arrival order
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.kubeconfig = ""
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeKube:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        self._tempdir = tempfile.TemporaryDirectory(prefix="kubefake-")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # Handler threads are joined on close (HTTP/1.0: one request per connection, so each ends promptly).
        server.daemon_threads = False
        server.block_on_close = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kubefake", daemon=True)
        self._thread.start()
        path = Path(self._tempdir.name) / "kubeconfig"
        path.write_text(json.dumps(self.kubeconfig_dict()))  # JSON is YAML: the client reads it as is
        self.kubeconfig = str(path)

    def kubeconfig_dict(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}

    def close(self) -> None:
        if self._server is not None:
            if self._thread is not None:
                self._server.shutdown()
                self._thread.join()
            self._server.server_close()
            self._server = self._thread = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    # ------------------------------------------------------------------ objects

    def _store(self, plural: str, namespace: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._resource_version += 1
            meta = obj["metadata"]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _timestamp())
            meta["resourceVersion"] = str(self._resource_version)
            self._objects[plural][(namespace, name)] = obj
            return copy.deepcopy(obj)

    def _delete(self, plural: str, namespace: str, name: str) -> None:
        with self._lock:
            self._resource_version += 1
            self._objects[plural].pop((namespace, name), None)

    def add_namespace(self, name: str, annotations: dict[str, str] | None = None,
                      labels: dict[str, str] | None = None) -> dict[str, Any]:
        obj = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
                            "annotations": dict(annotations or {})},
               "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        return self._store("namespaces", "", name, obj)

    def delete_namespace(self, name: str) -> None:
        self._delete("namespaces", "", name)

    def add_pod(self, namespace: str, name: str, node: str | None = None, labels: dict[str, str] | None = None,
                annotations: dict[str, str] | None = None, uid: str | None = None,
                phase: str = "Running") -> dict[str, Any]:
        """Add (or replace) a Pod; ``node`` None leaves it unscheduled (``Pending``)."""
        spec: dict[str, Any] = {"containers": [{"name": "main", "image": PAUSE_IMAGE}], "restartPolicy": "Always"}
        if node is not None:
            spec["nodeName"] = node
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                            "annotations": dict(annotations or {}), **({"uid": uid} if uid else {})},
               "spec": spec, "status": {"phase": phase if node is not None else "Pending"}}
        return self._store("pods", namespace, name, obj)

    def delete_pod(self, namespace: str, name: str) -> None:
        self._delete("pods", namespace, name)

    def add_node(self, name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                 internal_ip: str | None = None, external_ip: str | None = None) -> dict[str, Any]:
        addresses = [{"type": kind, "address": ip} for kind, ip in (("InternalIP", internal_ip),
                                                                     ("ExternalIP", external_ip)) if ip]
        now = _timestamp()
        obj = {"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                            "annotations": dict(annotations or {})},
               "spec": {},
               "status": {"addresses": [*addresses, {"type": "Hostname", "address": name}],
                          "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                          "message": "kubelet is posting ready status",
                                          "lastHeartbeatTime": now, "lastTransitionTime": now}]}}
        return self._store("nodes", "", name, obj)

    def delete_node(self, name: str) -> None:
        self._delete("nodes", "", name)

    def node_status(self, name: str) -> dict[str, dict[str, Any]]:
        """The node's stored conditions by type, e.g. ``node_status("n1")["NetworkUnavailable"]["status"]``."""
        with self._lock:
            node = self._objects["nodes"][("", name)]
            return {c["type"]: copy.deepcopy(c) for c in node["status"].get("conditions") or []}

    def fail_requests(self, code: int | None) -> None:
        """Answer every request with a Status of this HTTP code (e.g. 500, 403) until called with None."""
        with self._lock:
            self._forced_failure = code

    # ------------------------------------------------------------------ serving

    def handle(self, method: str, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request; the HTTP handler below only moves bytes."""
        self.requests.append((method, path, content_type))
        try:
            with self._lock:
                if self._forced_failure is not None:
                    code = self._forced_failure
                    raise _Failure(status_object(code, "InternalError" if code >= 500 else "Forbidden",
                                                 f"fake API server told to fail with {code}"))
                for pattern, plural, action in _ROUTES:
                    match = pattern.match(path)
                    if match is not None:
                        return 200, self._serve(method, plural, action, match.groupdict(), content_type, body)
            raise _Failure(status_object(404, "NotFound", "the server could not find the requested resource"))
        except _Failure as failure:
            return failure.status["code"], failure.status

    def _serve(self, method: str, plural: str, action: str, params: dict[str, str], content_type: str,
               body: bytes) -> dict[str, Any]:
        wanted = "PATCH" if action == "patch-status" else "GET"
        if method != wanted:
            raise _Failure(status_object(405, "MethodNotAllowed", f"{method} is not supported by this fake"))
        objects = self._objects[plural]
        if action == "list":
            kind = _KINDS[plural]
            return {"apiVersion": "v1", "kind": f"{kind}List",
                    "metadata": {"resourceVersion": str(self._resource_version)},
                    "items": [copy.deepcopy(o) for _, o in sorted(objects.items())]}
        key = (params.get("ns", ""), params["name"])
        found = objects.get(key)
        if found is None:
            raise _Failure(status_object(404, "NotFound", f'{plural} "{params["name"]}" not found',
                                         name=params["name"], kind=plural))
        if action == "patch-status":
            if content_type.split(";")[0].strip() not in _PATCH_TYPES:
                raise _Failure(status_object(415, "UnsupportedMediaType",
                                             f"the body of the request was in an unknown format: {content_type}"))
            patch = json.loads(body or b"{}")
            found["status"] = merge_status(found.get("status") or {}, patch.get("status") or {})
            self._resource_version += 1
            found["metadata"]["resourceVersion"] = str(self._resource_version)
        return copy.deepcopy(found)


def _handler_for(fake: FakeKube) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _respond(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            code, answer = fake.handle(self.command, path, self.headers.get("Content-Type") or "", body)
            payload = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _respond

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read fake.requests instead

    return Handler
