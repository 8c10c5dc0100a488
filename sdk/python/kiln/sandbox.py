"""``Sandbox``: a microVM for the length of a ``with`` block, and a request helper that sends
HTTP requests to the app inside it through kilnd's ingress, creating and refreshing the auth
token as needed::

    with kiln.Sandbox("python-sandbox") as sb:
        out = sb.post("/execute", json={"code": "print(1 + 1)"}).json()

The helper connects to the ingress address kilnd reports and names the microVM's endpoint in
``Host`` (and as the TLS server name when the ingress speaks TLS, trusting kilnd's own CA when
it has one), so it needs no name resolution or trust set-up in the process.
"""

from __future__ import annotations

import http.client
import json as _json
import socket
import ssl
import time
import urllib.parse
from typing import Any, Dict, Optional

from . import KilnError

# A token is replaced this long before it expires.
_REFRESH_MARGIN_SECONDS = 30


class Response:
    """What the app answered: ``status``, ``headers`` (lower-case names), ``content`` (bytes)."""

    def __init__(self, status: int, headers: Dict[str, str], content: bytes):
        self.status = self.status_code = status
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return _json.loads(self.content)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    def raise_for_status(self) -> "Response":
        """Raises :class:`KilnError` (with the ingress's ``code`` when it answered) unless 2xx/3xx."""
        if self.ok:
            return self
        try:
            err = self.json()
            code, message = err.get("code", "HttpError"), err.get("message", self.text)
        except (ValueError, AttributeError):
            code, message = "HttpError", self.text
        raise KilnError(self.status, code, message)

    def __repr__(self) -> str:
        return f"<Response [{self.status}]>"


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the ingress address, with the endpoint's name for SNI and verification."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


class Sandbox:
    """Runs a microVM of ``image`` on ``__enter__`` (waits until RUNNING) and terminates it on
    ``__exit__``. ``port`` is the app port requests go to by default (8080); ``run_kwargs`` are
    passed to ``run_microvm`` (``idlePolicy``, ``runHookPayload``, ``maxDurationSeconds``, …)."""

    def __init__(self, image: str, client=None, port: int = 8080, token_minutes: int = 5,
                 start_timeout: float = 180.0, request_timeout: float = 120.0, **run_kwargs):
        if client is None:
            from . import client as make_client

            client = make_client()
        self.client = client
        self.image = image
        self.port = port
        self.token_minutes = token_minutes
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.run_kwargs = run_kwargs
        self.microvm_id: Optional[str] = None
        self.endpoint: Optional[str] = None
        self._tokens: Dict[int, tuple] = {}
        self._tls_context: Optional[ssl.SSLContext] = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Sandbox":
        vm = self.client.run_microvm(imageIdentifier=self.image, **self.run_kwargs)
        self.microvm_id, self.endpoint = vm["microvmId"], vm["endpoint"]
        try:
            self.client.wait_microvm(self.microvm_id, "RUNNING", timeout=self.start_timeout)
        except BaseException:
            self.terminate()
            raise
        return self

    def terminate(self) -> None:
        """Terminates the microVM (all its memory, disk and processes); idempotent."""
        if self.microvm_id is None:
            return
        try:
            self.client.terminate_microvm(microvmIdentifier=self.microvm_id)
        except KilnError as e:
            if e.status not in (404, 409):
                raise
        self._tokens.clear()

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.terminate()

    def info(self) -> dict:
        """GetMicrovm for this sandbox (``state``, ``usage``, …)."""
        return self.client.get_microvm(microvmIdentifier=self.microvm_id)

    # -- files (see kiln.files; every method takes user=…) ----------------------------------
    def read_file(self, path: str, **kw) -> bytes:
        return self.client.read_file(self.microvm_id, path, **kw)

    def write_file(self, path: str, data, **kw) -> dict:
        return self.client.write_file(self.microvm_id, path, data, **kw)

    def list_files(self, path: str, **kw) -> dict:
        return self.client.list_files(self.microvm_id, path, **kw)

    def stat_file(self, path: str, **kw) -> dict:
        return self.client.stat_file(self.microvm_id, path, **kw)

    def make_directory(self, path: str, **kw) -> dict:
        return self.client.make_directory(self.microvm_id, path, **kw)

    def move_file(self, source: str, destination: str, **kw) -> dict:
        return self.client.move_file(self.microvm_id, source, destination, **kw)

    def remove_file(self, path: str, **kw) -> None:
        self.client.remove_file(self.microvm_id, path, **kw)

    def upload_directory(self, local_dir: str, path: str, **kw) -> dict:
        return self.client.upload_directory(self.microvm_id, local_dir, path, **kw)

    def download_directory(self, path: str, local_dir: str, **kw) -> list:
        return self.client.download_directory(self.microvm_id, path, local_dir, **kw)

    def watch_files(self, path: str, **kw):
        return self.client.watch_files(self.microvm_id, path, **kw)

    # -- processes (see kiln.processes) -----------------------------------------------------
    def start_process(self, command=None, **kw) -> dict:
        """``start_process(["python3", "app.py"])`` or ``start_process(shell="make -j2")``."""
        return self.client.start_process(self.microvm_id, command, **kw)

    def list_processes(self, **kw) -> dict:
        return self.client.list_processes(self.microvm_id, **kw)

    def get_process(self, pid: int, **kw) -> dict:
        return self.client.get_process(self.microvm_id, pid, **kw)

    def wait_process(self, pid: int, **kw) -> dict:
        return self.client.wait_process(self.microvm_id, pid, **kw)

    def process_output(self, pid: int, from_offset: int = 0):
        return self.client.process_output(self.microvm_id, pid, from_offset)

    def write_process_stdin(self, pid: int, data=b"", eof: bool = False) -> None:
        self.client.write_process_stdin(self.microvm_id, pid, data, eof)

    def signal_process(self, pid: int, signal="TERM") -> None:
        self.client.signal_process(self.microvm_id, pid, signal)

    def resize_process(self, pid: int, cols: int, rows: int) -> None:
        self.client.resize_process(self.microvm_id, pid, cols, rows)

    # -- tokens ----------------------------------------------------------------------------
    def token(self, port: Optional[int] = None, fresh: bool = False) -> str:
        """An auth token for ``port``, reused until shortly before it expires."""
        port = port or self.port
        cached = self._tokens.get(port)
        if fresh or cached is None or time.time() > cached[1] - _REFRESH_MARGIN_SECONDS:
            answer = self.client.create_microvm_auth_token(
                microvmIdentifier=self.microvm_id, expirationInMinutes=self.token_minutes,
                allowedPorts=[{"port": port}])
            cached = (answer["authToken"]["X-Kiln-Auth"], float(answer["expiresAt"]))
            self._tokens[port] = cached
        return cached[0]

    # -- requests --------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        info = self.client.ingress_info()
        host, _, port = info["listen"].rpartition(":")
        host = host.strip("[]")
        if host in ("0.0.0.0", "::"):
            host = urllib.parse.urlparse(self.client.endpoint).hostname or "127.0.0.1"
        if not info.get("tls"):
            return http.client.HTTPConnection(host, int(port), timeout=self.request_timeout)
        if self._tls_context is None:
            ctx = ssl.create_default_context()
            if info.get("caCertificate"):
                ctx.load_verify_locations(cadata=info["caCertificate"])
            self._tls_context = ctx
        server_name = self._authority().rsplit(":", 1)[0].strip("[]")
        return _PinnedHTTPSConnection(host, int(port), server_name, self._tls_context, self.request_timeout)

    def _authority(self) -> str:
        """The endpoint's host and port: all of a host-style endpoint (``ID.DOMAIN:PORT``),
        the part before ``/m/ID`` of a path-style one."""
        return self.endpoint.split("/", 1)[0]

    def _target(self, path: str) -> str:
        """``path`` under a path-style endpoint's ``/m/ID`` prefix (unchanged for host style)."""
        _, _, prefix = self.endpoint.partition("/")
        return f"/{prefix}{path}" if prefix else path

    def request(self, method: str, path: str, json: Any = None, data: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, port: Optional[int] = None) -> Response:
        """Sends a request to the app on ``port`` (default: the sandbox's) and returns its
        :class:`Response`. A 401 (token expired or revoked) is retried once with a new token."""
        if self.microvm_id is None:
            raise KilnError(400, "NotStarted", "the sandbox is not started: use it in a with block or call start()")
        body = data
        send_headers = dict(headers or {})
        if json is not None:
            body = _json.dumps(json).encode()
            send_headers.setdefault("Content-Type", "application/json")
        port = port or self.port
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._target(path), body=body, headers={
                    **send_headers, "Host": self._authority(), "X-Kiln-Auth": self.token(port, fresh=attempt == 1),
                    "X-Kiln-Port": str(port)})
                resp = conn.getresponse()
                answer = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
            finally:
                conn.close()
            if answer.status != 401:
                return answer
        return answer

    def get(self, path: str, **kwargs) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs) -> Response:
        return self.request("POST", path, json=json, **kwargs)
