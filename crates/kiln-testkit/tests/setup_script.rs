//! The set-up's own decisions, tested through the very code `scripts/setup.sh` runs: its
//! functions (`scripts/setup-lib.sh`) and the script itself, on a fake host. The fake host is
//! a directory of stand-in commands (`dpkg-query`, `apt-cache`, `apt-get`, the tools) that is
//! the whole PATH, besides the few real utilities the scripts use; apt's sources and
//! os-release come from files in it. Nothing on the real host is read or changed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
/// Real utilities the scripts call, linked into the fake PATH.
const REAL: &[&str] = &[
    "bash",
    "sh",
    "sed",
    "awk",
    "tr",
    "cat",
    "head",
    "mv",
    "mkdir",
    "chmod",
    "dirname",
    "rm",
    "grep",
    "env",
    "sort",
    "cut",
    "sha256sum",
    "mktemp",
];
const DEB822: &str = "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
const QEMU10: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const QEMU7: &str = "1:7.2+dfsg-7+deb12u18+b3";

struct FakeHost {
    dir: tempfile::TempDir,
}

impl FakeHost {
    /// A bare Debian 12: nothing of kiln's installed, QEMU 7.2 in bookworm and 10.0.2 in
    /// bookworm-backports (once enabled), a deb822 source for bookworm.
    fn bare_bookworm() -> FakeHost {
        let host = FakeHost {
            dir: tempfile::tempdir().unwrap(),
        };
        let bin = host.bin();
        std::fs::create_dir_all(&bin).unwrap();
        for tool in REAL {
            if let Some(real) = which(tool) {
                std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
            }
        }
        host.file(
            "os-release",
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\n",
        );
        host.file("apt/sources.list.d/debian.sources", DEB822);
        host.file("dpkg-state", "");
        host.file("apt.log", "");
        host.policy(
            "qemu-system-x86",
            QEMU7,
            &[(QEMU10, "bookworm-backports"), (QEMU7, "bookworm")],
        );
        // dpkg-query -W -f=... PKG: from the state file ("pkg version" lines).
        host.tool(
            "dpkg-query",
            r#"pkg=${!#}; v=$(awk -v p="$pkg" '$1 == p { print $2 }' "$FAKE/dpkg-state")
               [ -n "$v" ] || exit 1; echo "install ok installed $v""#,
        );
        host.tool(
            "apt-cache",
            r#"[ "$1" = policy ] && cat "$FAKE/policy-$2" 2>/dev/null; exit 0"#,
        );
        host.tool("apt-get", r#"echo "apt-get $*" >> "$FAKE/apt.log""#);
        host.tool("id", "echo 0");
        host
    }

    /// Every tool kiln needs, working, at QEMU 10.0.2.
    fn with_working_tools(self) -> FakeHost {
        self.qemu("qemu-system-x86_64", "10.0.2");
        self.qemu("qemu-img", "10.0.2");
        self.file("firmware/qboot.rom", "qboot");
        for t in [
            "mke2fs",
            "cpio",
            "mmdebstrap",
            "dpkg-deb",
            "xz",
            "zstd",
            "ip",
        ] {
            self.tool(t, "exit 0");
        }
        self.tool("busybox", "exit 0");
        self.tool("ldd", r#"echo "	not a dynamic executable" >&2; exit 1"#);
        self.tool(
            "python3",
            r#"[ "$1" = --version ] && echo "Python 3.11.2"; exit 0"#,
        );
        self
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn file(&self, rel: &str, text: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(rel)).unwrap_or_default()
    }

    fn tool(&self, name: &str, body: &str) {
        let p = self.bin().join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn remove_tool(&self, name: &str) {
        std::fs::remove_file(self.bin().join(name)).unwrap();
    }

    fn qemu(&self, name: &str, version: &str) {
        self.tool(
            name,
            &format!(r#"echo "{name} version {version} (Debian 1:{version}+ds-2)""#),
        );
    }

    fn installed(&self, lines: &[(&str, &str)]) {
        let text: String = lines.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
        self.file("dpkg-state", &text);
    }

    /// `apt-cache policy PKG` output: the candidate and a version table.
    fn policy(&self, pkg: &str, candidate: &str, table: &[(&str, &str)]) {
        let mut text =
            format!("{pkg}:\n  Installed: (none)\n  Candidate: {candidate}\n  Version table:\n");
        for (v, suite) in table {
            let prio = if suite.ends_with("-backports") {
                100
            } else {
                500
            };
            text.push_str(&format!(
                "     {v} {prio}\n        {prio} http://mirror.invalid/debian {suite}/main amd64 Packages\n"
            ));
        }
        self.file(&format!("policy-{pkg}"), &text);
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin().join("bash"));
        c.arg(program)
            .env_clear()
            .env("PATH", self.bin())
            .env("FAKE", self.dir.path())
            .env("KILN_APT_SOURCES_DIR", self.dir.path().join("apt"))
            .env("KILN_OS_RELEASE", self.dir.path().join("os-release"))
            .env(
                "KILN_QEMU_FIRMWARE",
                self.dir.path().join("firmware/qboot.rom"),
            )
            .env("KILN_BUSYBOX", self.bin().join("busybox"))
            .env("KILN_HOME", self.dir.path().join("home"));
        c
    }

    /// Runs `script` in bash with setup-lib.sh sourced: (success, stdout).
    fn lib(&self, script: &str) -> (bool, String) {
        let file = self.dir.path().join("call.sh");
        std::fs::write(
            &file,
            format!("set -euo pipefail\n. {REPO}/scripts/setup-lib.sh\n{script}\n"),
        )
        .unwrap();
        let out = self.command(file.to_str().unwrap()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn lines(&self, script: &str) -> Vec<String> {
        let (ok, out) = self.lib(script);
        assert!(ok, "{script} failed: {out}");
        out.lines().map(str::to_string).collect()
    }
}

/// What a check case does to a working fake host.
type Breakage = dyn Fn(&FakeHost);

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

#[test]
fn a_bare_debian_12_gets_qemu_10_from_backports_derived_from_its_own_source() {
    let host = FakeHost::bare_bookworm();
    assert_eq!(host.lines("kiln_codename"), ["bookworm"]);
    assert_eq!(
        host.lines("kiln_qemu_packages_to_install"),
        ["qemu-system-x86", "qemu-utils", "qemu-system-data"]
    );
    assert!(host
        .lines("kiln_base_packages_to_install")
        .contains(&"mmdebstrap".to_string()));
    assert_eq!(
        host.lines("kiln_qemu_suite bookworm"),
        ["bookworm-backports"]
    );
    assert!(!host.lib("kiln_suite_enabled bookworm-backports").0);
    // The entry copies the host's own URIs, components and key: no mirror name of kiln's.
    assert_eq!(
        host.lines("kiln_backports_entry bookworm bookworm-backports"),
        [
            "Types: deb",
            "URIs: http://mirror.invalid/debian",
            "Suites: bookworm-backports",
            "Components: main contrib",
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
        ]
    );
}

#[test]
fn one_line_sources_and_an_enabled_backports_suite_are_understood() {
    let host = FakeHost::bare_bookworm();
    std::fs::remove_file(host.dir.path().join("apt/sources.list.d/debian.sources")).unwrap();
    host.file(
        "apt/sources.list",
        "# old style\ndeb [arch=amd64 signed-by=/etc/keys/deb.gpg] http://mirror.invalid/debian bookworm main non-free-firmware\ndeb http://mirror.invalid/debian-security bookworm-security main\n",
    );
    assert_eq!(
        host.lines("kiln_backports_entry bookworm bookworm-backports"),
        [
            "Types: deb",
            "URIs: http://mirror.invalid/debian",
            "Suites: bookworm-backports",
            "Components: main non-free-firmware",
            "Signed-By: /etc/keys/deb.gpg",
        ]
    );
    assert!(!host.lib("kiln_suite_enabled bookworm-backports").0);
    host.file(
        "apt/sources.list.d/backports.list",
        "deb http://mirror.invalid/debian bookworm-backports main\n",
    );
    assert!(host.lib("kiln_suite_enabled bookworm-backports").0);
    // No source for the main suite at all: nothing to derive from.
    std::fs::remove_file(host.dir.path().join("apt/sources.list")).unwrap();
    assert!(
        !host
            .lib("kiln_backports_entry bookworm bookworm-backports")
            .0
    );
}

#[test]
fn qemu_is_installed_until_all_three_packages_are_10_at_one_version() {
    let host = FakeHost::bare_bookworm();
    let all = ["qemu-system-x86", "qemu-utils", "qemu-system-data"];
    // A host with QEMU 7.2: upgraded.
    host.installed(&[
        ("qemu-system-x86", QEMU7),
        ("qemu-utils", QEMU7),
        ("qemu-system-data", QEMU7),
    ]);
    assert_eq!(host.lines("kiln_qemu_packages_to_install"), all);
    // The machine image's state: qemu-utils 10 from backports, no emulator.
    host.installed(&[("qemu-utils", QEMU10)]);
    assert_eq!(host.lines("kiln_qemu_packages_to_install"), all);
    // Two builds of 10 side by side: brought to one.
    host.installed(&[
        ("qemu-system-x86", QEMU10),
        ("qemu-utils", "1:10.0.2+ds-2+deb13u2~bpo12+1"),
        ("qemu-system-data", QEMU10),
    ]);
    assert_eq!(host.lines("kiln_qemu_packages_to_install"), all);
    // Done: nothing to do, and a second run stays quiet.
    host.installed(&[
        ("qemu-system-x86", QEMU10),
        ("qemu-utils", QEMU10),
        ("qemu-system-data", QEMU10),
    ]);
    assert!(host.lines("kiln_qemu_packages_to_install").is_empty());
    // Where the default suite already has QEMU 10 (Debian 13), no backports.
    host.policy(
        "qemu-system-x86",
        "1:10.0.2+ds-2",
        &[("1:10.0.2+ds-2", "trixie")],
    );
    assert!(host.lines("kiln_qemu_suite trixie").is_empty());
}

#[test]
fn the_checks_after_installing_name_what_is_wrong_and_the_fix() {
    let host = FakeHost::bare_bookworm().with_working_tools();
    let (ok, out) = host.lib("kiln_verify bookworm-backports");
    assert!(ok, "{out}");
    assert!(
        out.contains("ok qemu-system-x86_64 10.0.2") && out.contains("ok busybox"),
        "{out}"
    );
    assert!(!out.contains("fail"), "{out}");

    let cases: [(&str, &Breakage, &str); 5] = [
        ("missing mke2fs", &|h| h.remove_tool("mke2fs"), "fail mke2fs not installed -- apt-get install -y e2fsprogs"),
        (
            "an old emulator",
            &|h| h.qemu("qemu-system-x86_64", "7.2.15"),
            "fail qemu-system-x86_64 is version 7.2.15; kiln needs 10.x -- apt-get install -y -t bookworm-backports qemu-system-x86 qemu-utils qemu-system-data",
        ),
        (
            "qemu-img of another version",
            &|h| h.qemu("qemu-img", "10.0.3"),
            "fail qemu-img is version 10.0.3, qemu-system-x86_64 is 10.0.2; they must be the same",
        ),
        (
            "a dynamic busybox",
            &|h| h.tool("ldd", "echo '	libc.so.6 => /lib/libc.so.6'"),
            "is not statically linked (the guest has no libc for it) -- apt-get install -y busybox-static",
        ),
        (
            "python3 without venv",
            &|h| h.tool("python3", "exit 1"),
            "fail python3-venv 'python3 -m venv' cannot work (no venv/ensurepip module) -- apt-get install -y python3-venv",
        ),
    ];
    for (what, break_it, expected) in cases {
        let host = FakeHost::bare_bookworm().with_working_tools();
        break_it(&host);
        let (ok, out) = host.lib("kiln_verify bookworm-backports");
        assert!(!ok, "{what}: the checks must fail: {out}");
        assert!(out.contains(expected), "{what}: {out}");
    }
    let host = FakeHost::bare_bookworm().with_working_tools();
    std::fs::remove_file(host.dir.path().join("firmware/qboot.rom")).unwrap();
    let (ok, out) = host.lib("kiln_verify bookworm-backports");
    assert!(
        !ok && out.contains("fail firmware") && out.contains("(qboot) is missing"),
        "{out}"
    );
}

#[test]
fn setup_sh_enables_backports_installs_and_stops_on_a_failed_check() {
    let host = FakeHost::bare_bookworm().with_working_tools();
    host.remove_tool("mmdebstrap");
    let out = host
        .command(&format!("{REPO}/scripts/setup.sh"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // The suite, from the host's own source.
    let written = host.read("apt/sources.list.d/kiln-backports.sources");
    assert!(
        written.contains("URIs: http://mirror.invalid/debian\nSuites: bookworm-backports\n"),
        "{written}"
    );
    // apt: lists, the new suite's lists, QEMU from backports (all three), then the rest.
    let log: Vec<String> = host.read("apt.log").lines().map(str::to_string).collect();
    assert_eq!(log[0], "apt-get update -qq");
    assert_eq!(log[1], "apt-get update -qq");
    assert_eq!(
        log[2],
        "apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils qemu-system-data"
    );
    assert!(
        log[3].starts_with("apt-get install -y -qq --no-install-recommends e2fsprogs"),
        "{log:?}"
    );
    // After installing, the check names what is still missing and the fix, and stops.
    assert!(
        stderr.contains(
            "setup: mmdebstrap: not installed\n       fix: apt-get install -y mmdebstrap"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("set-up is incomplete"), "{stderr}");
    assert!(
        !host.dir.path().join("home/assets/kernel").exists(),
        "stopped before building"
    );
}

#[test]
fn the_pvh_kernel_is_extracted_from_debians_bzimage_and_nothing_else_passes() {
    let dir = tempfile::tempdir().unwrap();
    let extract = |from: &Path, to: &Path| {
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                ". {REPO}/scripts/setup-lib.sh; kiln_extract_pvh \"$0\" \"$1\""
            ))
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success()
    };
    // The real guest kernel that set-up fetched.
    let bzimage = kiln_vmm::GuestAssets::default_dir().join("kernel/vmlinuz");
    let out = dir.path().join("vmlinux");
    assert!(
        extract(&bzimage, &out),
        "Debian's kernel carries a PVH entry"
    );
    let elf = std::fs::read(&out).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert!(elf.len() > std::fs::metadata(&bzimage).unwrap().len() as usize);
    // Not a kernel: refused, nothing written.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"\xfd7zXZ\x00 but not really xz").unwrap();
    let none = dir.path().join("none");
    assert!(!extract(&junk, &none));
    assert!(!none.exists() && !dir.path().join("none.tmp").exists());
}
