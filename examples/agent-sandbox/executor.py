"""Runs inside the microVM. Port 8080: `POST /execute` runs the Python code it is given in a
subprocess (working directory /workspace) and answers its output; `GET /health`. Port 9000:
kiln's lifecycle hooks (`/ready` at bake time, then `/run`, `/suspend`, `/resume`,
`/terminate`), which kiln never exposes through the ingress."""

import logging
import os
import random
import subprocess
import sys
import threading
import time
import uuid

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

WORK_DIR = "/workspace"
APP_PORT, HOOK_PORT = 8080, 9000
os.makedirs(WORK_DIR, exist_ok=True)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("executor")

# Per-microVM state: set by /run, never at build time (every microVM of the image starts
# from the same snapshot, so anything made during the bake would be shared by all of them).
instance = {"id": None, "payload": None, "warm": False, "generation": None}

# kiln's VM generation ID: new on every launch, resume and clone (kiln's agent writes it
# before any hook runs). The kernel's RNG is reseeded by then; what the app holds itself
# (PRNG state, ids, keys) is reseeded here whenever the generation changed.
VMGENID = "/run/kiln/vmgenid"


def reseed():
    try:
        generation = open(VMGENID).read().strip()
    except OSError:
        generation = None
    if generation != instance["generation"]:
        random.seed()  # from os.urandom, which the agent reseeded for this generation
        instance["generation"] = generation
        log.info("new VM generation %s: reseeded", generation)

app = Flask("executor")


@app.post("/execute")
def execute():
    body = request.get_json(force=True, silent=True) or {}
    code, timeout = body.get("code", ""), float(body.get("timeout", 30))
    log.info("execute: %d characters, timeout %ss", len(code), timeout)
    script = os.path.join(WORK_DIR, "run.py")
    with open(script, "w") as f:
        f.write(code)
    try:
        done = subprocess.run([sys.executable, script], cwd=WORK_DIR, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return jsonify(stdout="", stderr=f"timed out after {timeout:g}s", exit_code=-1), 408
    return jsonify(stdout=done.stdout, stderr=done.stderr, exit_code=done.returncode)


@app.get("/health")
def health():
    return jsonify(status="ready", instance=instance["id"], generation=instance["generation"])


hooks = Flask("hooks")


@hooks.get("/ready")
def ready():
    # Ready once pandas has been imported once: its files are then in the page cache that
    # the image's snapshot keeps, so the first import in every microVM is quick.
    return ("ready", 200) if instance["warm"] else ("warming up", 503)


@hooks.post("/run")
def run_hook():
    reseed()
    instance["id"] = uuid.uuid4().hex
    instance["payload"] = request.get_data(as_text=True)
    log.info("run: instance %s", instance["id"])
    return jsonify(instance=instance["id"])


@hooks.post("/suspend")
def suspend_hook():
    os.sync()  # flush /workspace before memory and disk are checkpointed
    log.info("suspend")
    return jsonify(ok=True)


@hooks.post("/resume")
def resume_hook():
    reseed()
    log.info("resume")
    return jsonify(ok=True)


@hooks.post("/terminate")
def terminate_hook():
    log.info("terminate")
    return jsonify(ok=True)


def warm_up():
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import pandas"], check=False)
    instance["warm"] = True
    log.info("warm: pandas imported in %.1fs", time.monotonic() - started)


if __name__ == "__main__":
    threading.Thread(target=warm_up, daemon=True).start()
    threading.Thread(target=make_server("0.0.0.0", HOOK_PORT, hooks, threaded=True).serve_forever,
                     daemon=True).start()
    app.run(host="0.0.0.0", port=APP_PORT, threaded=True)
