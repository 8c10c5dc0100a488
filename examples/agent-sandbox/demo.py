"""The seed's demo end to end against a running kilnd, with the three checks of its prompts
done by the agent's own tool functions (tools.py), without an LLM:

1. the code runs in a VM: `os.uname()` and /etc/os-release from inside the sandbox show the
   guest's kernel and distribution, not this machine's;
2. state survives suspend: a file written with a timestamp is read back, identical, after the
   sandbox has gone idle, auto-suspended (memory and disk snapshotted) and been auto-resumed
   by the next request;
3. packages come from the image's snapshot: pandas builds a CSV's top product by revenue;

then the sandbox is destroyed and nothing of it is left.

kilnd must serve the ingress with its own certificate and accept a short idle policy:

    scripts/run.sh --ingress-tls-self-signed --ingress-domain kiln.localhost --min-idle-seconds 5
    python3 examples/agent-sandbox/demo.py --idle-seconds 5     # builds the image the first time

Exit status 0 when every check passed, 1 otherwise.
"""

import argparse
import io
import os
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kiln  # noqa: E402

CHECK_1 = """import os
u = os.uname()
print(f"sandbox kernel: {u.sysname} {u.release} {u.machine} (host name {u.nodename})")
print(open("/etc/os-release").read().strip())
"""

CHECK_2_WRITE = """from datetime import datetime, timezone
stamp = datetime.now(timezone.utc).isoformat()
with open("/workspace/state.txt", "w") as f:
    f.write(stamp)
print(stamp)
"""

CHECK_2_READ = 'print(open("/workspace/state.txt").read())'
# kiln's VM generation ID: new on every launch, resume and clone (the executor reseeds its
# own random state on /run and /resume when it changed).
GENERATION = 'print(open("/run/kiln/vmgenid").read())'

CHECK_3 = """import csv
rows = [("laptop", 1200.0, "north"), ("phone", 800.0, "south"), ("tablet", 450.0, "east"),
        ("laptop", 1350.0, "west"), ("monitor", 300.0, "north"), ("phone", 950.0, "east"),
        ("keyboard", 80.0, "south"), ("tablet", 500.0, "west"), ("monitor", 320.0, "south"),
        ("phone", 700.0, "north")]
with open("/workspace/sales.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["product", "revenue", "region"])
    w.writerows(rows)

import pandas as pd
df = pd.read_csv("/workspace/sales.csv")
totals = df.groupby("product")["revenue"].sum().sort_values(ascending=False)
print(f"rows: {len(df)}, pandas {pd.__version__}")
print(totals.to_string())
print(f"top product: {totals.index[0]} (revenue {totals.iloc[0]:.2f})")
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def build_image(client: "kiln.Client", name: str) -> None:
    """CreateMicrovmImage from a zip of the Dockerfile, executor.py and requirements.txt, as the
    seed packages it; the build log streams until the snapshot is taken."""
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as z:
        for f in ("Dockerfile", "executor.py", "requirements.txt"):
            z.write(os.path.join(HERE, f), f)
    started = client.create_microvm_image(name=name, codeArtifact={"bytes": blob.getvalue()},
                                          readyTimeoutSeconds=600)
    image_id = started["imageIdentifier"]
    say(f"building {name} as {image_id} (Debian + python3 + flask + pandas; minutes under emulation)")
    for line in client.get_microvm_image_logs(image_id, follow=True):
        say(f"  {line}")
    record = client.wait_microvm_image(image_id, timeout=60)
    say(f"image {record['imageIdentifier']}: {record['status']}")


def ensure_image(client: "kiln.Client", name: str, rebuild: bool) -> None:
    try:
        current = client.get_microvm_image(name)
    except kiln.KilnError as e:
        if e.status != 404:
            raise
        current = None
    if rebuild or current is None or current["status"] != "SUCCESSFUL":
        build_image(client, name)
    else:
        say(f"image {current['imageIdentifier']}: SUCCESSFUL (use --build to rebuild)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-seconds", type=int, default=60,
                        help="maxIdleDurationSeconds of the sandbox (kilnd's --min-idle-seconds must allow it)")
    parser.add_argument("--build", action="store_true", help="rebuild the image even if it exists")
    args = parser.parse_args()

    try:
        import tools
    except (OSError, kiln.KilnError) as e:
        say(f"cannot reach kilnd ({e}): start it with scripts/run.sh (see this file's docstring)")
        return 1
    client = tools.lambda_client
    if not client.ingress_info().get("tls"):
        say("kilnd's ingress speaks plain HTTP: restart it with "
            "--ingress-tls-self-signed --ingress-domain kiln.localhost for the seed's https:// endpoints")
        return 1
    ensure_image(client, tools.IMAGE_NAME, args.build)
    failures = []

    def check(ok: bool, what: str) -> None:
        say(f"{'PASS' if ok else 'FAIL'}: {what}")
        if not ok:
            failures.append(what)

    box = tools.create_sandbox(max_idle_seconds=args.idle_seconds)
    sandbox_id, endpoint = box["sandbox_id"], box["endpoint"]
    say(f"sandbox {sandbox_id} at {endpoint}")
    try:
        say("\n== 1. Is it an isolated VM? os.uname() and /etc/os-release from inside")
        out = tools.run_code(sandbox_id, endpoint, CHECK_1)
        say(out["stdout"].rstrip() + out["stderr"].rstrip())
        host = os.uname()
        say(f"host kernel:    {host.sysname} {host.release} {host.machine} (host name {host.nodename})")
        check(f" {host.release} " not in out["stdout"] and "Debian GNU/Linux 12" in out["stdout"],
              "the sandbox runs its own kernel and distribution")

        say(f"\n== 2. Does state survive suspend? (idle policy: {args.idle_seconds}s)")
        written = tools.run_code(sandbox_id, endpoint, CHECK_2_WRITE)["stdout"].strip()
        say(f"wrote /workspace/state.txt: {written}")
        generation = tools.run_code(sandbox_id, endpoint, GENERATION)["stdout"].strip()
        say(f"VM generation: {generation}")
        started = time.monotonic()
        deadline = started + args.idle_seconds + 180
        state = ""
        while time.monotonic() < deadline:
            state = client.get_microvm(microvmIdentifier=sandbox_id)["state"]
            if state == "SUSPENDED":
                break
            time.sleep(1)
        say(f"state after {time.monotonic() - started:.0f}s idle: {state}")
        check(state == "SUSPENDED", "the idle sandbox auto-suspended")
        started = time.monotonic()
        read = tools.run_code(sandbox_id, endpoint, CHECK_2_READ)["stdout"].strip()
        say(f"read back after auto-resume ({time.monotonic() - started:.1f}s): {read}")
        say(f"state now: {client.get_microvm(microvmIdentifier=sandbox_id)['state']}")
        check(read == written and written != "", "the same timestamp after suspend and resume")
        resumed = tools.run_code(sandbox_id, endpoint, GENERATION)["stdout"].strip()
        say(f"VM generation after the resume: {resumed}")
        check(resumed != generation and generation != "",
              "a resume is a new VM generation (the app reseeds what it holds)")

        home = os.environ.get("KILN_HOME", "/var/lib/kiln")
        vm_dir = os.path.join(home, "microvms", sandbox_id)
        local = os.path.isdir(vm_dir)  # kilnd on this machine: its files are visible

        say("\n== 3. Are packages preinstalled? pandas on a CSV")
        out = tools.run_code(sandbox_id, endpoint, CHECK_3)
        say(out["stdout"].rstrip() + out["stderr"].rstrip())
        check("top product: laptop (revenue 2550.00)" in out["stdout"], "pandas found the top product")
    finally:
        say(f"\n== destroy: {tools.destroy_sandbox(sandbox_id)}")
    vm = client.get_microvm(microvmIdentifier=sandbox_id)
    say(f"state: {vm['state']} ({vm.get('stateReason')})")
    check(vm["state"] == "TERMINATED", "the sandbox is terminated")
    try:
        client.create_microvm_auth_token(microvmIdentifier=sandbox_id, expirationInMinutes=1)
        check(False, "a terminated sandbox takes no more requests")
    except kiln.KilnError as e:
        check(e.status == 409, f"a terminated sandbox takes no more requests ({e.code})")
    if local:
        check(not os.path.exists(vm_dir), f"its memory, disk and files are gone ({vm_dir})")
    say("\nALL CHECKS PASSED" if not failures else f"\nFAILED: {failures}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
