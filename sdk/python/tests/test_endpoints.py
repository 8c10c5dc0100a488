"""Endpoints that work as returned: with kilnd's default settings (no flags about endpoints)
the seed's own line ``requests.post(f"http://{endpoint}/execute", ...)`` works on a host
whose resolver knows nothing of ``*.localhost``, and so does ``https://{endpoint}`` with a
TLS ingress whose CA the client trusts."""

import os

import pytest
import requests

import kiln
from conftest import Kilnd, context_tar


def _run(d: Kilnd):
    client = kiln.Client(endpoint=d.api, api_key=open(os.path.join(d.home, "api-key")).read().strip())
    client.create_microvm_image(name="executor", codeArtifact={"bytes": context_tar()})
    client.wait_microvm_image("executor")
    vm = client.run_microvm(imageIdentifier="executor")
    client.wait_microvm(vm["microvmId"], "RUNNING")
    token = client.create_microvm_auth_token(microvmIdentifier=vm["microvmId"], expirationInMinutes=5,
                                             allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
    return client, vm, token


def _resolves(name: str) -> bool:
    import socket

    try:
        return any(a[4][0] == "127.0.0.1" for a in socket.getaddrinfo(name, 1))
    except OSError:
        return False


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_the_seeds_line_works_with_the_default_settings(tls):
    extra = ("--ingress-tls-self-signed", "--ingress-domain", "kiln.localhost") if tls else ()
    d = Kilnd(*extra)
    try:
        client, vm, token = _run(d)
        endpoint = vm["endpoint"]
        style = client.ingress_info()["endpointStyle"]
        domain = "kiln.localhost" if tls else "localhost"
        assert style == ("host" if _resolves(f"kiln-endpoint-probe.{domain}") else "path")
        port = d.ingress.rsplit(":", 1)[1]
        if style == "path":
            assert endpoint == f"127.0.0.1:{port}/m/{vm['microvmId']}"
        # --- the seed's line, unchanged but for the scheme and the CA it trusts ---
        scheme = "https" if tls else "http"
        verify = os.path.join(d.home, "tls", "ca.pem") if tls else True
        out = requests.post(f"{scheme}://{endpoint}/execute", headers={"X-aws-proxy-auth": token},
                            json={"code": "echo $((6*7))"}, verify=verify, timeout=60)
        assert out.status_code == 200, out.text
        assert out.json()["stdout"] == "42\n"
        # The same with the CLI's way (curl without --resolve would do the same request).
        health = requests.get(f"{scheme}://{endpoint}/health", headers={"X-aws-proxy-auth": token},
                              verify=verify, timeout=60)
        assert health.json() == {"status": "ready"}
        # kiln.Sandbox speaks either style.
        with kiln.Sandbox("executor", client=client) as sb:
            assert sb.post("/execute", json={"code": "echo ok"}).json()["stdout"] == "ok\n"
        client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    finally:
        d.stop()
