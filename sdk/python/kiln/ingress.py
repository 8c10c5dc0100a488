"""Making ``https://<microvmId>.<domain>:<port>`` (a microVM's ``endpoint``) work unchanged in
this Python process, for code written against the seed's service such as::

    requests.post(f"https://{endpoint}/execute", headers={"X-aws-proxy-auth": token}, json=...)

``kiln.client(route_endpoints=True)`` calls :func:`install` with what kilnd's ``GET /v1/ingress``
says. Exactly two things are changed, both process-wide:

1. **Name resolution**: ``socket.getaddrinfo`` is wrapped so that the ingress domain and every
   name under it (``<microvmId>.<domain>``) resolve to the ingress's address. Other names are
   passed through untouched. ``requests``/``urllib3``, ``http.client`` and ``urllib`` all
   resolve through it; the URL, the TLS server name (SNI) and the ``Host`` header keep the
   endpoint's name, which is what kilnd's ingress routes by. Why: ``*.localhost`` and private
   domains do not resolve to kilnd through the system resolver.
2. **Trust** (only when kilnd serves its own certificate, ``kilnd --ingress-tls-self-signed``):
   a CA bundle file is written holding the CAs already trusted plus kilnd's CA, and the
   environment variables ``REQUESTS_CA_BUNDLE`` (read by ``requests`` on every request) and
   ``SSL_CERT_FILE`` (read by OpenSSL's default verify paths, so ``urllib``/``http.client`` and
   ``ssl.create_default_context()``) point at it. Why: kilnd's CA is private to this machine.
   Child processes inherit the two variables.

:func:`uninstall` undoes both.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import ssl
import tempfile
from typing import Dict, Optional

_original_getaddrinfo = socket.getaddrinfo
_routes: Dict[str, str] = {}
_saved_env: Dict[str, Optional[str]] = {}
_bundle_dir: Optional[str] = None


def _route_for(host) -> Optional[str]:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return None
    name = host.rstrip(".").lower()
    for domain, target in _routes.items():
        if name == domain or name.endswith("." + domain):
            return target
    return None


def _getaddrinfo(host, port, *args, **kwargs):
    target = _route_for(host)
    return _original_getaddrinfo(target if target is not None else host, port, *args, **kwargs)


def route(domain: str, address: str) -> None:
    """Resolve ``domain`` and every ``*.domain`` to ``address`` (an IP or host name)."""
    _routes[domain.rstrip(".").lower()] = address
    socket.getaddrinfo = _getaddrinfo


def _read(path: Optional[str]) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return text if text.endswith("\n") else text + "\n"


def trust(ca_pem: str) -> str:
    """Adds ``ca_pem`` to what ``requests`` and the ``ssl`` module trust; returns the bundle path."""
    global _bundle_dir
    if _bundle_dir is None:
        _bundle_dir = tempfile.mkdtemp(prefix="kiln-ca-")
        atexit.register(shutil.rmtree, _bundle_dir, True)
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        _saved_env.setdefault(var, os.environ.get(var))
    # What each library trusted before: requests its bundle (certifi), OpenSSL its default file.
    requests_base = _saved_env["REQUESTS_CA_BUNDLE"]
    if requests_base is None:
        try:
            import certifi  # requests' own default

            requests_base = certifi.where()
        except ImportError:
            requests_base = None
    paths = ssl.get_default_verify_paths()
    openssl_base = _saved_env["SSL_CERT_FILE"] or paths.openssl_cafile
    for var, base in (("REQUESTS_CA_BUNDLE", requests_base), ("SSL_CERT_FILE", openssl_base)):
        bundle = os.path.join(_bundle_dir, var.lower() + ".pem")
        with open(bundle, "w", encoding="utf-8") as f:
            f.write(_read(base) + ca_pem.strip() + "\n")
        os.environ[var] = bundle
    return os.path.join(_bundle_dir, "ssl_cert_file.pem")


def install(info: dict, api_host: str) -> None:
    """Applies kilnd's ``GET /v1/ingress`` answer (``domain``, ``listen``, ``tls``, ``caCertificate``)."""
    host = (info.get("listen") or "").rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = api_host
    route(info["domain"], host)
    if info.get("tls") and info.get("caCertificate"):
        trust(info["caCertificate"])


def uninstall() -> None:
    """Restores ``socket.getaddrinfo`` and the two environment variables."""
    _routes.clear()
    socket.getaddrinfo = _original_getaddrinfo
    for var, value in _saved_env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    _saved_env.clear()
