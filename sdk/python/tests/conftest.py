"""Shared fixtures: a real kilnd process on a throw-away KILN_HOME, and build contexts."""

import io
import os
import subprocess
import tarfile
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
KILND = os.path.join(REPO, "target", "debug", "kilnd")

# examples/busybox-executor: the seed executor's HTTP shape on busybox (seconds to build).
EXECUTOR_DIR = os.path.join(REPO, "examples", "busybox-executor")

# The app of test_client instead: busybox httpd on 8080.
HTTPD_START_SH = """#!/bin/sh
mkdir -p /www && echo 'hello from the sandbox' > /www/index.html
httpd -p 8080 -h /www
exec nc -ll -p 9000 -e /srv/hook.sh
"""


def context_tar(start: str = None) -> bytes:
    """examples/busybox-executor as a tar, its start.sh replaced by ``start`` when given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(os.listdir(EXECUTOR_DIR)):
            data = open(os.path.join(EXECUTOR_DIR, name), "rb").read()
            if name == "start.sh" and start is not None:
                data = start.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Kilnd:
    """kilnd on a fresh home (removed by stop()) or on ``home`` (kept), with a low idle
    floor unless ``low_idle_floor`` is False (then kilnd's default: the spec's minimum)."""

    def __init__(self, *extra: str, home: str = None, low_idle_floor: bool = True):
        self.keep = home is not None
        self.home = home or tempfile.mkdtemp(prefix="kiln-sdk-test-")
        os.makedirs(self.home, exist_ok=True)
        for stale in ("kilnd.addr", "kilnd.ingress"):
            if os.path.exists(os.path.join(self.home, stale)):
                os.remove(os.path.join(self.home, stale))
        self.log = open(os.path.join(self.home, "kilnd.log"), "a")
        self.proc = subprocess.Popen(
            [KILND, "--home", self.home, "--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0",
             *(("--min-idle-seconds", "1") if low_idle_floor else ()), "--tick-ms", "200",
             # Guests outlive kilnd by default; a test's go with it.
             "--on-shutdown", "terminate", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(self.home, "kilnd.addr")):
            assert self.proc.poll() is None, open(os.path.join(self.home, "kilnd.log")).read()
            assert time.time() < deadline, "kilnd did not start"
            time.sleep(0.05)
        addr = open(os.path.join(self.home, "kilnd.addr")).read().strip()
        self.api = addr if "://" in addr else "http://" + addr
        self.ingress = open(os.path.join(self.home, "kilnd.ingress")).read().strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)
        if not self.keep:
            subprocess.run(["rm", "-rf", self.home])
