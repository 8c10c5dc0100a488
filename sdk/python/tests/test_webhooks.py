"""Webhooks with the Python SDK against a real kilnd: a receiver on loopback (http.server)
gets a microVM's lifecycle as signed deliveries that kiln.verify_webhook accepts, and
rejects when tampered with or replayed."""

import http.server
import json
import os
import threading
import time

import pytest

import kiln
from conftest import HTTPD_START_SH, Kilnd, context_tar


def test_deliveries_verify_with_the_sdk():
    got = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(({"Kiln-Signature": self.headers["Kiln-Signature"]}, body))  # names are case-blind
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = Kilnd("--allow-private-webhook-targets")
    try:
        client = kiln.Client(endpoint=d.api, api_key=open(os.path.join(d.home, "api-key")).read().strip())
        hook = client.create_webhook(f"http://127.0.0.1:{server.server_port}/in", events=["microvm"])
        assert hook["webhookId"].startswith("wh-") and len(hook["secret"]) == 64
        assert "secret" not in client.list_webhooks()["webhooks"][0]
        nodes = client.list_nodes()
        assert [n["name"] for n in nodes["nodes"]] == [nodes["thisNode"]] and nodes["nodes"][0]["reachable"]
        with pytest.raises(kiln.KilnError) as err:
            client.drain_node(nodes["thisNode"])
        assert err.value.status == 409 and "draining is for a cluster" in err.value.message
        with pytest.raises(kiln.KilnError) as err:
            client.remove_node(nodes["thisNode"])
        assert err.value.status == 409 and "no node to remove" in err.value.message
        client.create_microvm_image(name="wh", codeArtifact={"bytes": context_tar(HTTPD_START_SH)})
        client.wait_microvm_image("wh")
        vm = client.run_microvm(imageIdentifier="wh")["microvmId"]
        client.wait_microvm(vm, "RUNNING")
        deadline = time.time() + 30
        while not any(json.loads(b)["event"].get("toState") == "RUNNING" for _, b in got):
            assert time.time() < deadline, got
            time.sleep(0.1)
        for headers, body in got:
            payload = kiln.verify_webhook(hook["secret"], body, headers["Kiln-Signature"])
            assert payload["webhookId"] == hook["webhookId"] and payload["event"]["kind"] == "microvm"
            assert payload["event"]["microvmId"] == vm
        headers, body = got[-1]
        with pytest.raises(ValueError, match="does not match"):
            kiln.verify_webhook(hook["secret"], body + b" ", headers["Kiln-Signature"])
        with pytest.raises(ValueError, match="replay"):
            kiln.verify_webhook(hook["secret"], body, headers["Kiln-Signature"], now=time.time() + 3600)
        log = client.list_webhook_deliveries(hook["webhookId"])["deliveries"]
        assert log and all(x["status"] == "delivered" for x in log), log
        client.delete_webhook(hook["webhookId"])
        assert client.list_webhooks()["webhooks"] == []
        client.terminate_microvm(microvmIdentifier=vm)
    finally:
        d.stop()
        server.shutdown()
