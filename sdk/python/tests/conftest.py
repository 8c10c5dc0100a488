"""Shared fixtures: a real kilnd process on a throw-away KILN_HOME, and build contexts."""

import io
import os
import subprocess
import tarfile
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
KILND = os.path.join(REPO, "target", "debug", "kilnd")

# One HTTP request per connection (busybox nc -e): the lifecycle hooks answer 200.
HOOK_SH = """#!/bin/sh
read -r m p v
while IFS= read -r l; do l=$(printf '%s' "$l" | tr -d '\\r'); [ -z "$l" ] && break; done
printf 'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok'
"""

# A shell stand-in for the seed's executor (busybox has no Python): POST /execute with
# {"code": "..."} runs the code with sh and answers {"stdout", "stderr", "exit_code"};
# GET /health answers {"status": "ready"}; POST /echo answers its body. The code must not
# contain double quotes.
EXECUTOR_SH = r"""#!/bin/sh
read -r method path version
len=0
while IFS= read -r l; do l=$(printf '%s' "$l" | tr -d '\r'); [ -z "$l" ] && break
  case "$l" in [Cc]ontent-[Ll]ength:*) len=$(echo "${l#*:}" | tr -d ' ');; esac; done
body=""; if [ "$len" -gt 0 ] 2>/dev/null; then body=$(head -c "$len"); fi
esc() { sed 's/\\/\\\\/g; s/"/\\"/g' | awk '{printf "%s\\n", $0}'; }
case "$method $path" in
  "POST /execute")
    code=$(printf '%s' "$body" | sed -n 's/.*"code": *"\([^"]*\)".*/\1/p' | sed 's/\\n/\n/g')
    mkdir -p /workspace; cd /workspace
    out=$(sh -c "$code" 2>/tmp/stderr); rc=$?
    json="{\"stdout\": \"$(printf '%s' "$out" | esc)\", \"stderr\": \"$(esc </tmp/stderr)\", \"exit_code\": $rc}";;
  "GET /health") json='{"status": "ready"}';;
  "POST /echo") json="$body";;
  *) json='{"error": "not found"}';;
esac
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#json}" "$json"
"""

# The app of test_client: busybox httpd on 8080.
START_SH = """#!/bin/sh
mkdir -p /www && echo 'hello from the sandbox' > /www/index.html
httpd -p 8080 -h /www
exec nc -ll -p 9000 -e /srv/hook.sh
"""

# The seed's shape: the executor on 8080.
EXECUTOR_START_SH = """#!/bin/sh
nc -ll -p 8080 -e /srv/executor.sh &
exec nc -ll -p 9000 -e /srv/hook.sh
"""

DOCKERFILE = "FROM busybox\nCOPY hook.sh start.sh executor.sh /srv/\nEXPOSE 8080\nCMD [\"/srv/start.sh\"]\n"


def context_tar(start: str = START_SH) -> bytes:
    """A busybox image running ``start`` (default: httpd on 8080), with the hooks on 9000."""
    files = {"Dockerfile": DOCKERFILE, "hook.sh": HOOK_SH, "start.sh": start, "executor.sh": EXECUTOR_SH}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Kilnd:
    """kilnd with a low idle floor on a fresh home (removed by stop()) or on ``home`` (kept)."""

    def __init__(self, *extra: str, home: str = None):
        self.keep = home is not None
        self.home = home or tempfile.mkdtemp(prefix="kiln-sdk-test-")
        os.makedirs(self.home, exist_ok=True)
        for stale in ("kilnd.addr", "kilnd.ingress"):
            if os.path.exists(os.path.join(self.home, stale)):
                os.remove(os.path.join(self.home, stale))
        self.log = open(os.path.join(self.home, "kilnd.log"), "a")
        self.proc = subprocess.Popen(
            [KILND, "--home", self.home, "--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0",
             "--min-idle-seconds", "1", "--tick-ms", "200", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(self.home, "kilnd.addr")):
            assert self.proc.poll() is None, open(os.path.join(self.home, "kilnd.log")).read()
            assert time.time() < deadline, "kilnd did not start"
            time.sleep(0.05)
        self.api = "http://" + open(os.path.join(self.home, "kilnd.addr")).read().strip()
        self.ingress = open(os.path.join(self.home, "kilnd.ingress")).read().strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)
        if not self.keep:
            subprocess.run(["rm", "-rf", self.home])
