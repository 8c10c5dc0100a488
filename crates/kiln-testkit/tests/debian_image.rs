//! The Debian path end to end: the Debian minimal base (mmdebstrap from the host's apt
//! sources), a RUN that installs Python with apt and a package with pip (network egress
//! from the build VM), an HTTP app whose /ready returns 200, and a clone that answers on
//! its app port. The slowest test of the suite (several minutes under TCG).

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_image::{BuildSpec, ImageStatus};
use kiln_testkit::TestBuilder;
use kiln_vmm::Template;

const APP: &str = r#"import json, os, six
from http.server import BaseHTTPRequestHandler, HTTPServer
from threading import Thread

class Hooks(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
        self.wfile.write(b"ready")
    def log_message(self, *args):
        pass

class App(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"six": six.__version__, "python": os.sys.version.split()[0]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

Thread(target=HTTPServer(("127.0.0.1", 9000), Hooks).serve_forever, daemon=True).start()
HTTPServer(("0.0.0.0", 8080), App).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_image_with_apt_and_pip_answers_on_its_app_port() {
    let tb = TestBuilder::new();
    let ctx = tb.context(
        "debian-app",
        &[
            (
                "Dockerfile",
                "FROM debian:12\n\
                 RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip\n\
                 COPY requirements.txt /tmp/\n\
                 RUN pip install --no-cache-dir --break-system-packages -r /tmp/requirements.txt\n\
                 WORKDIR /srv\n\
                 COPY app.py .\n\
                 EXPOSE 8080\n\
                 CMD [\"python3\", \"app.py\"]\n",
            ),
            ("requirements.txt", "six\n"),
            ("app.py", APP),
        ],
    );
    let mut spec = BuildSpec::new("pyapp", &ctx);
    spec.ready_timeout = std::time::Duration::from_secs(120);
    let record = tb.builder.build(spec).await.unwrap();
    assert_eq!(
        record.status,
        ImageStatus::Successful,
        "{:?}\n{:?}",
        record.reason,
        record.log_tail
    );

    let template = Template::open(record.template.as_ref().unwrap()).unwrap();
    let vm = kiln_testkit::launch_from(&template, tb.scratch.path(), "py-clone").await;
    let answer = vm
        .agent()
        .http(kiln_image::build::hook_get(8080, "/"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let body = String::from_utf8_lossy(&answer.body).into_owned();
    assert!(
        body.contains("\"six\"") && body.contains("\"python\": \"3.11"),
        "{body}"
    );
    assert!(vm.ok("cat /etc/os-release").await.contains("bookworm"));
    vm.destroy().await;
}
