"""Python client for kiln's control API (kilnd), shaped like boto3's ``lambda-microvms``
client so code written for the seed's service works by changing only how the client is made::

    import kiln
    client = kiln.client()            # instead of boto3.client("lambda-microvms", ...)
    vm = client.run_microvm(imageIdentifier="python-sandbox", idlePolicy={...})

Only the standard library is used. Arguments the seed passes that kiln does not need
(``executionRoleArn``, ``buildRoleArn``, ``baseImageArn``) are accepted and ignored.

The seed's ``requests.post(f"https://{endpoint}/execute", headers={"X-aws-proxy-auth": token}, ...)``
works unchanged with ``kiln.client("lambda-microvms", route_endpoints=True)`` against a kilnd
started with ``--ingress-tls-self-signed --ingress-domain kiln.localhost``: the endpoint's
names resolve to kilnd's ingress inside this process and kilnd's CA is trusted. Exactly what
that changes in the process (``socket.getaddrinfo``, ``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``)
and why is written in :mod:`kiln.ingress`.

:class:`Sandbox` is a context manager: a microVM for the length of a ``with`` block, with a
request helper that handles auth tokens.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

__all__ = ["Client", "KilnError", "Sandbox", "client"]


class KilnError(Exception):
    """An error answered by kilnd: ``code`` (e.g. ``ConflictException``), ``message``, ``status``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message


def _error(e: "urllib.error.HTTPError") -> KilnError:
    payload = e.read()
    try:
        err = json.loads(payload)
        return KilnError(e.code, err.get("code", "Error"), err.get("message", ""))
    except (ValueError, AttributeError):
        return KilnError(e.code, "Error", payload.decode(errors="replace"))


def _home() -> str:
    return os.environ.get("KILN_HOME", "/var/lib/kiln")


def _query(**params) -> str:
    """``?a=1&label=x&label=y`` of the parameters given (lists repeat their key)."""
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            pairs.append((key, str(v)))
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


from .files import FilesMixin  # noqa: E402  (needs KilnError, _error and _query above)
from .processes import OutputChunk, ProcessOutput, ProcessesMixin  # noqa: E402,F401


class Client(FilesMixin, ProcessesMixin):
    """kilnd's control API; the files API's methods are in :class:`kiln.files.FilesMixin`, the
    processes API's in :class:`kiln.processes.ProcessesMixin`."""

    def __init__(self, endpoint: Optional[str] = None, api_key: Optional[str] = None, timeout: float = 60.0,
                 route_endpoints: bool = False):
        """``route_endpoints=True``: make ``https://{endpoint}`` of a microVM reachable from this
        process as it is (see :mod:`kiln.ingress` for exactly what is patched)."""
        home = _home()
        if endpoint is None:
            endpoint = os.environ.get("KILN_ENDPOINT")
        if endpoint is None:
            addr = os.path.join(home, "kilnd.addr")
            if os.path.exists(addr):
                # "host:port", or with its scheme when kilnd serves the API over TLS.
                text = open(addr).read().strip()
                endpoint = text if "://" in text else "http://" + text
            else:
                endpoint = "http://127.0.0.1:7070"
        if api_key is None:
            api_key = os.environ.get("KILN_API_KEY")
        if api_key is None:
            with open(os.path.join(home, "api-key")) as f:
                api_key = f.read().strip()
        self.endpoint = endpoint.rstrip("/")
        self._key = api_key
        # An API certificate from a private CA (kilnd --api-tls-cert): KILN_API_CA names it.
        ca = os.environ.get("KILN_API_CA")
        self._ssl = ssl.create_default_context(cafile=ca) if ca else None
        self.timeout = timeout
        self._ingress: Optional[dict] = None
        if route_endpoints:
            self.route_endpoints()

    # -- transport -------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None, ctype: str = "application/json") -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._key}")
        if data is not None:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                text = resp.read()
        except urllib.error.HTTPError as e:
            raise _error(e) from None
        if not text:
            return {}
        try:
            return json.loads(text)
        except ValueError:
            return text.decode(errors="replace")

    # -- ingress ---------------------------------------------------------------------------
    def ingress_info(self) -> dict:
        """kilnd's ``GET /v1/ingress``: ``domain``, ``port``, ``listen``, ``tls``, ``caCertificate``."""
        if self._ingress is None:
            self._ingress = self._call("GET", "/v1/ingress")
        return self._ingress

    def route_endpoints(self) -> dict:
        """Resolve ``<microvmId>.<domain>`` to kilnd's ingress in this process and trust kilnd's
        CA (when it serves its own certificate); returns the ingress info. See :mod:`kiln.ingress`."""
        from . import ingress

        info = self.ingress_info()
        ingress.install(info, urllib.parse.urlparse(self.endpoint).hostname or "127.0.0.1")
        return info

    # -- images ----------------------------------------------------------------------------
    def create_microvm_image(self, name: str, codeArtifact: dict, memorySizeMib: int = 512, vcpus: int = 1,
                             hookPort: int = 9000, readyTimeoutSeconds: int = 60, buildArgs: Optional[dict] = None,
                             baseImageArn: Optional[str] = None, buildRoleArn: Optional[str] = None,
                             connectors: Optional[list] = None, labels: Optional[dict] = None, **_ignored) -> dict:
        """``codeArtifact``: ``{"uri": "file:///path/ctx.zip"}``, ``{"path": "ctx.zip"}`` or ``{"bytes": b"..."}``
        (a zip or tar of the build context). ``labels``: ``{"team": "a"}``. Returns
        ``{"imageIdentifier", "name", "status"}``."""
        if "bytes" in codeArtifact:
            blob = codeArtifact["bytes"]
        else:
            path = codeArtifact.get("path") or urllib.parse.urlparse(codeArtifact["uri"]).path
            with open(path, "rb") as f:
                blob = f.read()
        art = self._call("POST", "/v1/artifacts", raw=blob, ctype="application/octet-stream")
        body = {"name": name, "codeArtifact": {"artifactId": art["artifactId"]}, "memorySizeMib": memorySizeMib,
                "vcpus": vcpus, "hookPort": hookPort, "readyTimeoutSeconds": readyTimeoutSeconds,
                "buildArgs": buildArgs or {}}
        if connectors is not None:
            body["connectors"] = connectors
        if labels is not None:
            body["labels"] = labels
        return self._call("POST", "/v1/images", body)

    def get_microvm_image(self, imageIdentifier: str) -> dict:
        return self._call("GET", f"/v1/images/{urllib.parse.quote(imageIdentifier)}")

    def list_microvm_images(self, status: Optional[str] = None, labels: Optional[list] = None,
                            limit: Optional[int] = None, cursor: Optional[str] = None) -> dict:
        """One page (``limit``, at most 1000; ``cursor`` from the previous page's ``nextCursor``),
        filtered by ``status`` and ``labels`` (``["team=a", "env"]``: all must match)."""
        return self._call("GET", "/v1/images" + _query(status=status, label=labels, limit=limit, cursor=cursor))

    def update_microvm_image(self, imageIdentifier: str, labels: dict) -> dict:
        """Sets labels (a value) and removes them (``None``); the others are kept."""
        return self._call("PATCH", f"/v1/images/{urllib.parse.quote(imageIdentifier)}", {"labels": labels})

    def delete_microvm_image(self, imageIdentifier: str) -> dict:
        return self._call("DELETE", f"/v1/images/{urllib.parse.quote(imageIdentifier)}")

    def get_microvm_image_logs(self, imageIdentifier: str, follow: bool = False):
        """The build log, line by line; with ``follow``, streamed until the build ends."""
        path = f"/v1/images/{urllib.parse.quote(imageIdentifier)}/logs?follow={'true' if follow else 'false'}"
        req = urllib.request.Request(self.endpoint + path)
        req.add_header("Authorization", f"Bearer {self._key}")
        try:
            resp = urllib.request.urlopen(req, timeout=None if follow else self.timeout, context=self._ssl)
        except urllib.error.HTTPError as e:
            raise _error(e) from None
        with resp:
            for line in resp:
                yield line.decode("utf-8", errors="replace").rstrip("\n")

    def wait_microvm_image(self, imageIdentifier: str, timeout: float = 600.0) -> dict:
        """Polls until the image is SUCCESSFUL (returned) or FAILED (raises)."""
        deadline = time.time() + timeout
        while True:
            img = self.get_microvm_image(imageIdentifier)
            if img["status"] == "SUCCESSFUL":
                return img
            if img["status"] == "FAILED":
                raise KilnError(409, "ImageBuildFailed", img.get("statusReason") or "build failed")
            if time.time() > deadline:
                raise KilnError(408, "Timeout", f"image {imageIdentifier} still {img['status']}")
            time.sleep(0.5)

    # -- microVMs --------------------------------------------------------------------------
    def run_microvm(self, imageIdentifier: str, idlePolicy: Optional[dict] = None, runHookPayload: Optional[str] = None,
                    maxDurationSeconds: Optional[int] = None, executionRoleArn: Optional[str] = None,
                    connectors: Optional[list] = None, labels: Optional[dict] = None, **_ignored) -> dict:
        """``connectors``: egress, e.g. ``[{"type": "none"}]``; kilnd's default is ``internet``.
        ``labels``: ``{"task": "t-42"}``, returned everywhere and matched by ``list_microvms``."""
        body: dict = {"imageIdentifier": imageIdentifier}
        if labels is not None:
            body["labels"] = labels
        if connectors is not None:
            body["connectors"] = connectors
        if idlePolicy is not None:
            body["idlePolicy"] = idlePolicy
        if runHookPayload is not None:
            body["runHookPayload"] = runHookPayload
        if maxDurationSeconds is not None:
            body["maxDurationSeconds"] = maxDurationSeconds
        return self._call("POST", "/v1/microvms", body)

    def get_microvm(self, microvmIdentifier: str) -> dict:
        return self._call("GET", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}")

    def list_microvms(self, state: Optional[str] = None, imageIdentifier: Optional[str] = None,
                      labels: Optional[list] = None, limit: Optional[int] = None,
                      cursor: Optional[str] = None) -> dict:
        """One page, oldest first (``limit``, at most 1000; ``cursor`` from the previous page's
        ``nextCursor``), filtered by ``state``, image and ``labels`` (``["team=a", "env"]``:
        all must match). :meth:`iter_microvms` follows the pages."""
        return self._call("GET", "/v1/microvms" + _query(state=state, imageIdentifier=imageIdentifier,
                                                          label=labels, limit=limit, cursor=cursor))

    def iter_microvms(self, **filters):
        """Every microVM :meth:`list_microvms` would page through, one at a time."""
        cursor = None
        while True:
            page = self.list_microvms(cursor=cursor, **filters)
            yield from page["microvms"]
            cursor = page.get("nextCursor")
            if not cursor:
                return

    def get_microvm_metrics(self, microvmIdentifier: str, sinceMs: Optional[int] = None) -> dict:
        """GetMicrovmMetrics: ``{"microvmId", "intervalMs", "samples": [{"atMs", "cpuPercent",
        "hostMemoryBytes", "guestMemoryTotalBytes", …}]}``, oldest first (the newest is also
        ``get_microvm(...)["metrics"]``)."""
        return self._call("GET", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/metrics"
                          + _query(sinceMs=sinceMs))

    # -- webhooks --------------------------------------------------------------------------
    def create_webhook(self, url: str, events: Optional[list] = None, description: Optional[str] = None) -> dict:
        """Registers ``url`` for lifecycle events (``["microvm", "image", "egress", "adopted"]``,
        all by default). The answer's ``secret`` (shown once) checks deliveries: see
        :func:`verify_webhook`."""
        body: dict = {"url": url}
        if events is not None:
            body["events"] = events
        if description is not None:
            body["description"] = description
        return self._call("POST", "/v1/webhooks", body)

    def list_nodes(self) -> dict:
        """ListNodes: the kilnd nodes sharing the database (this one alone without a cluster)."""
        return self._call("GET", "/v1/nodes")

    def drain_node(self, name: str) -> dict:
        """DrainNode: the node suspends its microVMs and hands them to other nodes."""
        return self._call("POST", f"/v1/nodes/{urllib.parse.quote(name)}/drain")

    def undrain_node(self, name: str) -> dict:
        """UndrainNode: the node takes microVMs again."""
        return self._call("POST", f"/v1/nodes/{urllib.parse.quote(name)}/undrain")

    def remove_node(self, name: str) -> None:
        """RemoveNode: forgets a node that is gone for good and holds no microVM."""
        self._call("DELETE", f"/v1/nodes/{urllib.parse.quote(name)}")

    def list_webhooks(self) -> dict:
        return self._call("GET", "/v1/webhooks")

    def delete_webhook(self, webhookId: str) -> None:
        self._call("DELETE", f"/v1/webhooks/{urllib.parse.quote(webhookId)}")

    def list_webhook_deliveries(self, webhookId: str) -> dict:
        """The newest 100 deliveries, newest first (``status``: delivered, retrying, failed)."""
        return self._call("GET", f"/v1/webhooks/{urllib.parse.quote(webhookId)}/deliveries")

    def update_microvm(self, microvmIdentifier: str, labels: dict) -> dict:
        """UpdateMicrovm: sets labels (a value) and removes them (``None``); the others are kept."""
        return self._call("PATCH", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}", {"labels": labels})

    def suspend_microvm(self, microvmIdentifier: str) -> dict:
        return self._call("POST", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/suspend", {})

    def resume_microvm(self, microvmIdentifier: str) -> dict:
        return self._call("POST", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/resume", {})

    def terminate_microvm(self, microvmIdentifier: str) -> dict:
        return self._call("POST", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/terminate", {})

    def fork_microvm(self, microvmIdentifier: str, count: int = 1) -> dict:
        """ForkMicrovm: ``count`` (1 to 100) copies of a RUNNING microVM, memory, processes and
        disk as they were at one instant, each with its own identity. Returns
        ``{"parentMicrovmId", "microvms": [{"microvmId", "endpoint", "state"}]}``; the clones
        are on their way to RUNNING (``wait_microvm``)."""
        return self._call("POST", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/fork", {"count": count})

    def save_microvm_image(self, microvmIdentifier: str, name: str, labels: Optional[dict] = None) -> dict:
        """SaveMicrovmImage ("save as image"): a RUNNING microVM's memory, processes and disk
        become image ``name``; the microVM runs on. Returns ``{"imageIdentifier", "name",
        "status": "CREATING"}`` once its state is captured (``wait_image`` waits for
        SUCCESSFUL); ``run_microvm`` launches from it like any image."""
        body: dict = {"name": name}
        if labels is not None:
            body["labels"] = labels  # default: the microVM's
        return self._call("POST", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/image", body)

    def wait_image(self, imageIdentifier: str, timeout: float = 600.0) -> dict:
        """Returns the image once it is no longer CREATING (SUCCESSFUL or FAILED)."""
        deadline = time.time() + timeout
        while True:
            image = self.get_microvm_image(imageIdentifier)
            if image["status"] != "CREATING":
                return image
            if time.time() > deadline:
                raise KilnError(408, "Timeout", f"image {imageIdentifier} is still CREATING")
            time.sleep(0.25)

    def wait_microvm(self, microvmIdentifier: str, state: str = "RUNNING", timeout: float = 120.0) -> dict:
        """Returns the microVM once it is in ``state``. kilnd answers when the state changes
        (``waitFor``), so nothing polls; each request waits within the client's own timeout."""
        deadline = time.time() + timeout
        path = f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}"
        while True:
            left = deadline - time.time()
            wait = int(max(1, min(left, self.timeout / 2, 60)))
            vm = self._call("GET", f"{path}?waitFor={urllib.parse.quote(state)}&timeoutSeconds={wait}")
            if vm["state"] == state:
                return vm
            if vm["state"] == "TERMINATED":
                raise KilnError(409, "Terminated", vm.get("stateReason") or "terminated")
            if time.time() > deadline:
                raise KilnError(408, "Timeout", f"microVM {microvmIdentifier} is {vm['state']}, not {state}")

    def create_microvm_auth_token(self, microvmIdentifier: str, expirationInMinutes: int = 5,
                                  allowedPorts: Optional[list] = None) -> dict:
        """Returns ``{"authToken": {"X-aws-proxy-auth": ..., "X-Kiln-Auth": ...}, "expiresAt", "tokenId", "endpoint"}``."""
        return self._call("POST", "/v1/auth-tokens", {"microvmIdentifier": microvmIdentifier,
                                                      "expirationInMinutes": expirationInMinutes,
                                                      "allowedPorts": allowedPorts or [{"port": 8080}]})

    def revoke_microvm_auth_tokens(self, microvmIdentifier: str) -> dict:
        """Revokes every token issued so far for the microVM (immediately)."""
        return self._call("POST", f"/v1/microvms/{urllib.parse.quote(microvmIdentifier)}/revoke-tokens", {})


def verify_webhook(secret: str, body: bytes, signature: str, tolerance_seconds: int = 300,
                   now: Optional[float] = None) -> dict:
    """Checks a delivery's ``Kiln-Signature`` header (``t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
    "<t>.<body>")>``) against the raw body and returns the parsed payload; raises ``ValueError``
    for a wrong signature or a timestamp more than ``tolerance_seconds`` away (a replay)."""
    import hashlib
    import hmac

    try:
        fields = dict(part.split("=", 1) for part in signature.split(","))
        t, v1 = int(fields["t"]), fields["v1"]
    except (KeyError, ValueError):
        raise ValueError(f"not a Kiln-Signature: {signature!r}") from None
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_seconds:
        raise ValueError(f"the delivery is {int(abs(now - t))} s away from now: refused as a replay")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, v1):
        raise ValueError("the signature does not match the body")
    return json.loads(body)


def client(*_service: str, **kwargs) -> Client:
    """``kiln.client()`` (or ``kiln.client("lambda-microvms", region_name=...)``, extra arguments
    ignored). Keyword arguments of :class:`Client` (``endpoint``, ``api_key``, ``timeout``,
    ``route_endpoints``) are passed on."""
    known = {k: v for k, v in kwargs.items() if k in ("endpoint", "api_key", "timeout", "route_endpoints")}
    return Client(**known)


from .sandbox import Sandbox  # noqa: E402  (needs KilnError and client above)
