"""examples/agent-sandbox/demo.py against a real kilnd: the seed's demo end to end (a Debian
image with python3, flask and pandas; the three checks; destroy).

The bake is the slow part (apt and pip under emulation), so kilnd's home for this test is kept
in target/kiln-demo-home: an unchanged example reuses the image; a changed one is rebuilt with
its unchanged steps from the layer cache."""

import hashlib
import os
import subprocess
import sys

import kiln
from conftest import REPO, Kilnd

EXAMPLE = os.path.join(REPO, "examples", "agent-sandbox")
HOME = os.path.join(REPO, "target", "kiln-demo-home")


def example_digest() -> str:
    h = hashlib.sha256()
    for f in ("Dockerfile", "executor.py", "requirements.txt"):
        h.update(f.encode() + b"\0" + open(os.path.join(EXAMPLE, f), "rb").read() + b"\0")
    return h.hexdigest()


def forget_a_stale_image(client: kiln.Client) -> None:
    """Deletes the image when the example changed since it was built (or a build failed)."""
    stamp = os.path.join(HOME, "example.sha256")
    digest = example_digest()
    known = open(stamp).read().strip() if os.path.exists(stamp) else ""
    for vm in client.list_microvms()["microvms"]:
        if vm["state"] != "TERMINATED":  # left by an interrupted run
            client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    try:
        image = client.get_microvm_image("python-sandbox")
    except kiln.KilnError:
        image = None
    if image and (known != digest or image["status"] != "SUCCESSFUL"):
        client.delete_microvm_image(image["imageIdentifier"])
    with open(stamp, "w") as f:
        f.write(digest)


def test_the_seeds_demo_runs_end_to_end():
    d = Kilnd("--ingress-tls-self-signed", "--ingress-domain", "kiln.localhost", home=HOME)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("KILN_ENDPOINT", "KILN_API_KEY")}
        env["KILN_HOME"] = HOME
        client = kiln.Client(endpoint=d.api, api_key=open(os.path.join(HOME, "api-key")).read().strip())
        forget_a_stale_image(client)
        run = subprocess.run([sys.executable, os.path.join(EXAMPLE, "demo.py"), "--idle-seconds", "3"],
                             env=env, capture_output=True, text=True, timeout=3600)
        out = run.stdout
        print(out, run.stderr)
        assert run.returncode == 0, out + run.stderr
        # 1: the guest's kernel and distribution, not the host's.
        host = os.uname()
        assert "sandbox kernel: Linux " in out and f"sandbox kernel: Linux {host.release} " not in out
        assert 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in out
        # 2: suspended while idle, resumed by the request, the same timestamp.
        assert "PASS: the idle sandbox auto-suspended" in out
        written = next(l for l in out.splitlines() if l.startswith("wrote /workspace/state.txt: "))
        read = next(l for l in out.splitlines() if l.startswith("read back after auto-resume"))
        assert written.split(": ", 1)[1] == read.split(": ", 1)[1] != ""
        # A resume is a new VM generation, which the app sees (and reseeds on).
        assert "PASS: a resume is a new VM generation" in out
        # 3: pandas from the image.
        assert "top product: laptop (revenue 2550.00)" in out
        # Destroyed, nothing left.
        assert "state: TERMINATED" in out and "PASS: its memory, disk and files are gone" in out
        assert "ALL CHECKS PASSED" in out
        vm_id = next(l for l in out.splitlines() if l.startswith("sandbox mvm-")).split()[1]
        assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "TERMINATED"
        assert not os.path.exists(os.path.join(HOME, "microvms", vm_id))
    finally:
        d.stop()
