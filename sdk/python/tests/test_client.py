"""The Python SDK against a real kilnd with real guests (busybox image)."""

import os
import time
import urllib.request

import pytest

import kiln
from conftest import HTTPD_START_SH, Kilnd, context_tar


@pytest.fixture(scope="module")
def daemon():
    d = Kilnd()
    yield d.home
    d.stop()


def test_seed_shaped_flow(daemon, monkeypatch):
    monkeypatch.setenv("KILN_HOME", daemon)
    client = kiln.client("lambda-microvms", region_name="ignored")
    img = client.create_microvm_image(name="sdk-sandbox", codeArtifact={"bytes": context_tar(HTTPD_START_SH)},
                                      buildRoleArn="arn:aws:iam::123456789:role/ignored")
    assert img["status"] == "CREATING"
    client.wait_microvm_image("sdk-sandbox")
    assert any(i["name"] == "sdk-sandbox" for i in client.list_microvm_images()["images"])

    run = client.run_microvm(imageIdentifier="sdk-sandbox", executionRoleArn="arn:aws:iam::1:role/x",
                             idlePolicy={"maxIdleDurationSeconds": 300, "suspendedDurationSeconds": 1800,
                                         "autoResumeEnabled": True})
    vm_id = run["microvmId"]
    # Host or path style, as kilnd chose at start (test_endpoints.py covers which and why).
    assert run["endpoint"].startswith(vm_id + ".localhost") or run["endpoint"].endswith("/m/" + vm_id)
    client.wait_microvm(vm_id, "RUNNING")

    token = client.create_microvm_auth_token(microvmIdentifier=vm_id, expirationInMinutes=5,
                                             allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
    ingress = open(os.path.join(daemon, "kilnd.ingress")).read().strip()
    req = urllib.request.Request(f"http://{ingress}/index.html",
                                 headers={"Host": f"{vm_id}.localhost", "X-aws-proxy-auth": token,
                                          "X-aws-proxy-port": "8080"})
    assert urllib.request.urlopen(req, timeout=30).read() == b"hello from the sandbox\n"

    assert client.suspend_microvm(microvmIdentifier=vm_id)["state"] == "SUSPENDED"
    # The request auto-resumes it.
    assert urllib.request.urlopen(req, timeout=60).read() == b"hello from the sandbox\n"
    assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "RUNNING"
    assert [v["microvmId"] for v in client.list_microvms(state="RUNNING")["microvms"]] == [vm_id]

    # A fork: two more microVMs serving from the parent's running httpd, the parent serving on.
    forked = client.fork_microvm(microvmIdentifier=vm_id, count=2)
    assert forked["parentMicrovmId"] == vm_id and len(forked["microvms"]) == 2
    for clone in forked["microvms"]:
        client.wait_microvm(clone["microvmId"], "RUNNING")
        t = client.create_microvm_auth_token(microvmIdentifier=clone["microvmId"],
                                             allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
        creq = urllib.request.Request(f"http://{ingress}/index.html",
                                      headers={"Host": f"{clone['microvmId']}.localhost", "X-aws-proxy-auth": t,
                                               "X-aws-proxy-port": "8080"})
        assert urllib.request.urlopen(creq, timeout=60).read() == b"hello from the sandbox\n"
        assert client.terminate_microvm(microvmIdentifier=clone["microvmId"])["state"] == "TERMINATED"
    assert urllib.request.urlopen(req, timeout=60).read() == b"hello from the sandbox\n"
    with pytest.raises(kiln.KilnError) as err:
        client.fork_microvm(microvmIdentifier=vm_id, count=0)
    assert err.value.status == 400 and "count must be 1 to 100" in err.value.message

    # Save as image: a microVM of the new image serves from the saved httpd at once.
    saved = client.save_microvm_image(microvmIdentifier=vm_id, name="sdk-saved")
    assert saved["status"] == "CREATING" and saved["name"] == "sdk-saved"
    image = client.wait_image(saved["imageIdentifier"])
    assert image["status"] == "SUCCESSFUL" and image["sourceMicrovmId"] == vm_id, image
    warm = client.run_microvm(imageIdentifier="sdk-saved")["microvmId"]
    client.wait_microvm(warm, "RUNNING")
    t = client.create_microvm_auth_token(microvmIdentifier=warm,
                                         allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
    wreq = urllib.request.Request(f"http://{ingress}/index.html",
                                  headers={"Host": f"{warm}.localhost", "X-aws-proxy-auth": t,
                                           "X-aws-proxy-port": "8080"})
    assert urllib.request.urlopen(wreq, timeout=60).read() == b"hello from the sandbox\n"
    assert client.terminate_microvm(microvmIdentifier=warm)["state"] == "TERMINATED"
    with pytest.raises(kiln.KilnError) as err:
        client.save_microvm_image(microvmIdentifier=vm_id, name="sdk-sandbox")
    assert err.value.status == 409 and "Dockerfile" in err.value.message

    with pytest.raises(kiln.KilnError) as err:
        client.resume_microvm(microvmIdentifier=vm_id)
    assert err.value.code == "ConflictException" and err.value.status == 409
    with pytest.raises(kiln.KilnError) as err:
        client.delete_microvm_image("sdk-sandbox")
    assert err.value.status == 409

    # Egress connectors pass through; a bad one is a typed validation error before anything runs.
    closed = client.run_microvm(imageIdentifier="sdk-sandbox", connectors=[{"type": "none"}])["microvmId"]
    assert client.get_microvm(microvmIdentifier=closed)["connectors"] == [{"type": "none"}]
    client.terminate_microvm(microvmIdentifier=closed)
    with pytest.raises(kiln.KilnError) as err:
        client.run_microvm(imageIdentifier="sdk-sandbox", connectors=[{"type": "host-service", "name": "nope"}])
    assert err.value.status == 400 and "host-service" in err.value.message

    assert client.terminate_microvm(microvmIdentifier=vm_id)["state"] == "TERMINATED"
    assert not os.path.exists(os.path.join(daemon, "microvms", vm_id))
    with pytest.raises(kiln.KilnError) as err:
        client.get_microvm(microvmIdentifier="mvm-0000000000000000")
    assert err.value.code == "ResourceNotFoundException"


def test_bad_key_is_a_typed_error(daemon):
    addr = open(os.path.join(daemon, "kilnd.addr")).read().strip()
    bad = kiln.Client(endpoint=f"http://{addr}", api_key="0" * 64)
    with pytest.raises(kiln.KilnError) as err:
        bad.list_microvms()
    assert err.value.status == 401 and err.value.code == "UnauthorizedException"


def test_labels_filters_and_pages(daemon, monkeypatch):
    monkeypatch.setenv("KILN_HOME", daemon)
    client = kiln.client("lambda-microvms")
    client.create_microvm_image(name="sdk-labelled", codeArtifact={"bytes": context_tar(HTTPD_START_SH)},
                                labels={"team": "a"})
    client.wait_microvm_image("sdk-labelled")
    assert client.get_microvm_image("sdk-labelled")["labels"] == {"team": "a"}
    assert [i["name"] for i in client.list_microvm_images(labels=["team=a"])["images"]] == ["sdk-labelled"]
    assert client.update_microvm_image("sdk-labelled", {"team": None, "tier": "x"})["labels"] == {"tier": "x"}

    ids = [client.run_microvm(imageIdentifier="sdk-labelled", labels={"task": f"t-{n}", "batch": "b1"})["microvmId"]
           for n in range(3)]
    for vm_id in ids:
        client.wait_microvm(vm_id, "RUNNING")
    assert client.get_microvm(microvmIdentifier=ids[0])["labels"] == {"task": "t-0", "batch": "b1"}
    picked = client.list_microvms(labels=["batch=b1", "task=t-1"])["microvms"]
    assert [v["microvmId"] for v in picked] == [ids[1]]
    # Pages of one, followed by iter_microvms: each once, oldest first.
    first = client.list_microvms(labels=["batch=b1"], limit=1)
    assert len(first["microvms"]) == 1 and first["nextCursor"]
    assert [v["microvmId"] for v in client.iter_microvms(labels=["batch=b1"], limit=1)] == ids
    updated = client.update_microvm(microvmIdentifier=ids[2], labels={"batch": None, "keep": "yes"})
    assert updated["labels"] == {"task": "t-2", "keep": "yes"}
    assert [v["microvmId"] for v in client.iter_microvms(labels=["batch"])] == ids[:2]
    # Metrics of a running microVM: a history of samples, the newest also in GetMicrovm.
    deadline = time.time() + 30
    while not client.get_microvm_metrics(microvmIdentifier=ids[0])["samples"]:
        assert time.time() < deadline, "no metrics samples"
        time.sleep(0.2)
    history = client.get_microvm_metrics(microvmIdentifier=ids[0])
    assert history["intervalMs"] == 200 and history["samples"][-1]["hostMemoryBytes"] > 0, history
    assert "cpuPercent" in client.get_microvm(microvmIdentifier=ids[0])["metrics"]
    with pytest.raises(kiln.KilnError) as err:
        client.list_microvms(labels=["no good"])
    assert err.value.status == 400 and "label key" in err.value.message
    for vm_id in ids:
        client.terminate_microvm(microvmIdentifier=vm_id)
