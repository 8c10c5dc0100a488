"""Over HTTPS with kilnd's own CA (--ingress-tls-self-signed): the seed's three tool functions
unchanged but for how the client is made, and the Sandbox context manager."""

import os
import urllib.request

import pytest
import requests

import kiln
from kiln import ingress
from conftest import Kilnd, context_tar

IDLE = {"maxIdleDurationSeconds": 300, "suspendedDurationSeconds": 1800, "autoResumeEnabled": True}


@pytest.fixture(scope="module")
def kilnd():
    # Host-style endpoints, which route_endpoints exists for (path style needs no help: see
    # test_endpoints.py).
    d = Kilnd("--ingress-tls-self-signed", "--ingress-domain", "kiln.localhost", "--endpoint-style", "host")
    c = kiln.Client(endpoint=d.api, api_key=open(os.path.join(d.home, "api-key")).read().strip())
    c.create_microvm_image(name="executor", codeArtifact={"bytes": context_tar()})
    c.wait_microvm_image("executor")
    yield d
    d.stop()


@pytest.fixture
def home(kilnd, monkeypatch):
    monkeypatch.setenv("KILN_HOME", kilnd.home)
    for var in ("KILN_ENDPOINT", "KILN_API_KEY", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(var, raising=False)
    yield kilnd.home
    ingress.uninstall()


def test_the_seeds_tool_functions_work_over_https_unchanged(home):
    # --- the seed's agent code; only the next line differs (boto3.client → kiln.client) ---
    lambda_client = kiln.client("lambda-microvms", region_name="us-east-1", route_endpoints=True)
    SANDBOX_IMAGE_ARN = "executor"
    SANDBOX_ROLE_ARN = "arn:aws:iam::123456789:role/MicroVMExecutionRole"

    def create_sandbox() -> dict:
        response = lambda_client.run_microvm(
            imageIdentifier=SANDBOX_IMAGE_ARN,
            executionRoleArn=SANDBOX_ROLE_ARN,
            idlePolicy={
                "maxIdleDurationSeconds": 300,
                "suspendedDurationSeconds": 1800,
                "autoResumeEnabled": True,
            },
        )
        return {
            "sandbox_id": response["microvmId"],
            "endpoint": f"https://{response['endpoint']}",
        }

    def run_code(sandbox_id: str, endpoint: str, code: str) -> dict:
        token_response = lambda_client.create_microvm_auth_token(
            microvmIdentifier=sandbox_id,
            expirationInMinutes=5,
            allowedPorts=[{"port": 8080}],
        )
        token = token_response["authToken"]["X-aws-proxy-auth"]

        resp = requests.post(
            f"{endpoint}/execute",
            headers={
                "X-aws-proxy-auth": token,
                "X-aws-proxy-port": "8080",
            },
            json={"code": code, "timeout": 60},
        )
        return resp.json()

    def destroy_sandbox(sandbox_id: str) -> str:
        lambda_client.terminate_microvm(microvmIdentifier=sandbox_id)
        return "Sandbox terminated. All state destroyed."
    # --- end of the seed's code ---

    box = create_sandbox()
    vm_id, endpoint = box["sandbox_id"], box["endpoint"]
    port = lambda_client.ingress_info()["port"]
    assert endpoint == f"https://{vm_id}.kiln.localhost:{port}"

    out = run_code(vm_id, endpoint, "uname -s; cat /etc/os-release")
    assert out["exit_code"] == 0, out
    assert out["stdout"].startswith("Linux\n") and "kiln busybox" in out["stdout"], out
    out = run_code(vm_id, endpoint, "echo 1700000000 > /workspace/state.txt")
    assert out["exit_code"] == 0, out
    assert run_code(vm_id, endpoint, "cat /workspace/state.txt")["stdout"] == "1700000000\n"

    # urllib (http.client + ssl's default context) works the same way.
    token = lambda_client.create_microvm_auth_token(microvmIdentifier=vm_id, expirationInMinutes=5,
                                                    allowedPorts=[{"port": 8080}])["authToken"]["X-aws-proxy-auth"]
    req = urllib.request.Request(f"{endpoint}/health", headers={"X-aws-proxy-auth": token})
    assert urllib.request.urlopen(req, timeout=60).read() == b'{"status": "ready"}'

    # Without the routing and the trust, the same call cannot even connect.
    ingress.uninstall()
    with pytest.raises(requests.exceptions.ConnectionError):
        run_code(vm_id, endpoint, "true")
    lambda_client.route_endpoints()
    with pytest.raises(requests.exceptions.SSLError):
        _untrusted(endpoint, token)

    assert destroy_sandbox(vm_id).startswith("Sandbox terminated")
    assert lambda_client.get_microvm(microvmIdentifier=vm_id)["state"] == "TERMINATED"
    assert not os.path.exists(os.path.join(home, "microvms", vm_id))


def _untrusted(endpoint: str, token: str):
    """The request with requests' own CA bundle only: kilnd's CA is what makes it verify."""
    import certifi

    requests.post(f"{endpoint}/execute", json={"code": "true"}, verify=certifi.where(),
                  headers={"X-aws-proxy-auth": token})


def test_sandbox_context_manager_handles_tokens_and_cleans_up(home):
    client = kiln.client()  # no routing: Sandbox connects to the ingress itself
    with kiln.Sandbox("executor", client=client, idlePolicy=IDLE) as sb:
        vm_id = sb.microvm_id
        assert sb.info()["state"] == "RUNNING"
        assert sb.post("/execute", json={"code": "echo $((6*7))"}).json()["stdout"] == "42\n"
        assert sb.post("/echo", json={"a": [1, 2], "b": "x"}).json() == {"a": [1, 2], "b": "x"}
        assert sb.get("/health").json() == {"status": "ready"}
        first = sb.token()
        assert sb.token() == first, "a token is reused while it is valid"
        # Revoked tokens: the helper gets a 401, takes a new token and retries.
        client.revoke_microvm_auth_tokens(microvmIdentifier=vm_id)
        assert sb.get("/health").status == 200
        assert sb.token() != first
    assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "TERMINATED"
    assert not os.path.exists(os.path.join(home, "microvms", vm_id))

    # An exception inside the block still terminates the microVM.
    with pytest.raises(RuntimeError):
        with kiln.Sandbox("executor", client=client) as sb:
            vm_id = sb.microvm_id
            raise RuntimeError("boom")
    assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "TERMINATED"
    with pytest.raises(kiln.KilnError) as err:
        sb.get("/health").raise_for_status()
    assert err.value.status in (401, 404, 409, 502), err.value


def test_sandbox_files_round_trip(home, tmp_path):
    client = kiln.client()
    with kiln.Sandbox("executor", client=client, idlePolicy=IDLE) as sb:
        data = os.urandom(3 << 20)
        entry = sb.write_file("/tmp/work/blob.bin", data, mode="0600", createParents=True)
        assert (entry["size"], entry["mode"], entry["kind"]) == (len(data), "0600", "file")
        assert sb.read_file("/tmp/work/blob.bin") == data
        # A file object streams; str is UTF-8.
        src = tmp_path / "notes.txt"
        src.write_text("first line\n")
        with open(src, "rb") as f:
            sb.write_file("/tmp/work/notes.txt", f)
        assert sb.read_file("/tmp/work/notes.txt") == b"first line\n"
        assert sb.post("/execute", json={"code": "cat /tmp/work/notes.txt"}).json()["stdout"] == "first line\n"

        assert sb.make_directory("/tmp/work/a/b")["kind"] == "directory"
        names = [e["name"] for e in sb.list_files("/tmp/work")["entries"]]
        assert names == ["a", "blob.bin", "notes.txt"]
        assert sb.move_file("/tmp/work/notes.txt", "/tmp/work/a/notes.txt")["path"] == "/tmp/work/a/notes.txt"
        with pytest.raises(kiln.KilnError) as err:
            sb.stat_file("/tmp/work/notes.txt")
        assert err.value.status == 404, err.value

        # A directory up and back down as tar.
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "x.txt").write_bytes(b"one")
        (tree / "sub" / "y.txt").write_bytes(b"two")
        assert sb.upload_directory(str(tree), "/tmp/tree")["kind"] == "directory"
        back = tmp_path / "back"
        written = sb.download_directory("/tmp/tree", str(back))
        assert sorted(written) == ["sub/y.txt", "x.txt"], written
        assert (back / "sub" / "y.txt").read_bytes() == b"two"

        # A watch sees a file appear; closing the generator ends it.
        events = sb.watch_files("/tmp/work")
        sb.post("/execute", json={"code": "touch /tmp/work/new"})
        first = next(events)
        assert (first["kind"], first["path"]) == ("create", "/tmp/work/new"), first
        events.close()

        sb.remove_file("/tmp/work", recursive=True)
        with pytest.raises(kiln.KilnError) as err:
            sb.list_files("/tmp/work")
        assert err.value.status == 404


def test_sandbox_processes(home):
    client = kiln.client()
    with kiln.Sandbox("executor", client=client, idlePolicy=IDLE) as sb:
        # Output arrives while the process still runs; stdin goes in and closes.
        p = sb.start_process(shell="echo ready; read line; echo got:$line; sleep 1; echo late >&2",
                             stdin=True, tag="py")
        out = sb.process_output(p["pid"])
        chunks = iter(out)
        first = next(chunks)
        assert (first.stream, first.offset, first.data) == ("stdout", 0, b"ready\n"), first
        assert sb.get_process(p["pid"])["running"] is True
        sb.write_process_stdin(p["pid"], "hi\n", eof=True)
        rest = list(chunks)
        assert b"".join(c.data for c in rest) == b"got:hi\nlate\n", rest
        assert rest[-1].stream == "stderr"
        assert (out.exit["exitCode"], out.exit["running"]) == (0, False), out.exit
        # Replay from an offset, after the exit.
        assert sb.process_output(p["pid"], from_offset=6).read_all() == b"got:hi\nlate\n"

        # A terminal that is resized, and a signal.
        t = sb.start_process(shell="stty size; read x; stty size", pty=(100, 30))
        term = iter(sb.process_output(t["pid"]))
        text = ""
        while "30 100" not in text:
            text += next(term).data.decode()
        sb.resize_process(t["pid"], 120, 50)
        sb.write_process_stdin(t["pid"], "\n")
        text = "".join(c.data.decode() for c in term)
        assert "50 120" in text, text
        s = sb.start_process(["sleep", "600"])
        sb.signal_process(s["pid"], "INT")
        assert sb.wait_process(s["pid"], timeout=60)["signal"] == 2

        listed = sb.list_processes(tag="py")["processes"]
        assert [x["pid"] for x in listed] == [p["pid"]], listed
        with pytest.raises(kiln.KilnError) as err:
            sb.get_process(999999)
        assert err.value.status == 404, err.value
        with pytest.raises(kiln.KilnError) as err:
            sb.start_process()
        assert err.value.status == 400 and "command" in str(err.value), err.value
