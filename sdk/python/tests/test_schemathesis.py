"""schemathesis (from PyPI) against a live kilnd with the checked-in spec/openapi.yaml: every
check, a fixed seed and example count, and a real image and microVM for the operations that
take an id (spec/schemathesis.toml). Any failure fails the test with schemathesis's report."""

import os
import re
import shutil
import subprocess
import sys

import kiln
from conftest import REPO, Kilnd, context_tar

SPEC = os.path.join(REPO, "spec", "openapi.yaml")
CONFIG = os.path.join(REPO, "spec", "schemathesis.toml")
SEED = "20261202"
EXAMPLES = "10"


def schemathesis() -> str:
    found = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert found, "schemathesis is not installed in the test venv (scripts/test.sh installs it)"
    return found


def test_the_live_api_conforms_to_its_spec(tmp_path):
    # kilnd's default idle floor: the spec's minimum (60 s) is what kilnd enforces.
    d = Kilnd(low_idle_floor=False)
    try:
        client = kiln.Client(endpoint=d.api, api_key=open(os.path.join(d.home, "api-key")).read().strip())
        client.create_microvm_image(name="st", codeArtifact={"bytes": context_tar()})
        image = client.wait_microvm_image("st")
        vm = client.run_microvm(imageIdentifier="st")
        files = client.run_microvm(imageIdentifier="st")
        client.wait_microvm(vm["microvmId"], "RUNNING")
        client.wait_microvm(files["microvmId"], "RUNNING")
        env = dict(os.environ, KILN_ST_MICROVM=vm["microvmId"], KILN_ST_FILES=files["microvmId"],
                   KILN_ST_IMAGE=image["imageIdentifier"])
        key = open(os.path.join(d.home, "api-key")).read().strip()
        run = subprocess.run(
            [schemathesis(), "--no-color", "--config-file", CONFIG, "run", SPEC, "--url", d.api,
             "-H", f"Authorization: Bearer {key}", "--checks", "all", "--seed", SEED,
             "--max-examples", EXAMPLES, "--workers", "1", "--generation-database", "none",
             "--report-dir", str(tmp_path)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        report = run.stdout + run.stderr
        (tmp_path / "schemathesis.txt").write_text(report)
        print(report[report.find("SUMMARY"):])
        # The failures section first: the summary alone does not say which request failed.
        assert run.returncode == 0, report[max(0, report.find("FAILURES")):][:60000]
        # It really tested: every operation, and many cases.
        cases = re.search(r"(\d+) generated, (\d+) passed", report)
        assert cases and int(cases.group(2)) >= 200, report[-3000:]
        # Every operation but StreamEvents (an SSE stream never ends; the config disables it).
        selected = re.search(r"Selected: (\d+)/(\d+)", report)
        assert selected and int(selected.group(2)) - int(selected.group(1)) == 1, report[-3000:]
        assert f"Tested: {selected.group(1)}" in report, report[-3000:]
        # kilnd is still whole after everything schemathesis sent (which may have terminated
        # the microVM, then deleted or rebuilt the image: the order follows the generator).
        assert d.proc.poll() is None, "kilnd died"
        assert client.get_microvm(microvmIdentifier=vm["microvmId"])["microvmId"] == vm["microvmId"]
        assert isinstance(client.list_microvm_images()["images"], list)
    finally:
        d.stop()
