//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets call (each crate's `fuzzing` module): cheap, no fuzzer needed,
//! and a crash fails the test. kilnd is where all these parsers meet, so the replay is here.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_vmm::kiln_net;

/// A fuzz entry point: untrusted bytes in, no panic out.
type Entry = fn(&[u8]);

/// Every fuzz target and its entry point, as in `fuzz/fuzz_targets/`.
const TARGETS: &[(&str, Entry)] = &[
    ("dns", kiln_net::fuzzing::dns),
    ("link", kiln_net::fuzzing::link),
    ("connectors", kiln_net::fuzzing::connectors),
    ("backend_event", kiln_net::fuzzing::backend_event),
    ("proto_frame", kiln_proto::fuzzing::frame),
    ("dockerfile", kiln_image::fuzzing::dockerfile),
    ("context_tar", kiln_image::fuzzing::context_tar),
    ("context_zip", kiln_image::fuzzing::context_zip),
    ("token", kiln_proxy::fuzzing::token),
    ("host", kiln_proxy::fuzzing::host),
    ("path", kiln_proxy::fuzzing::path),
    ("rest_body", kiln_api::fuzzing::rest_body),
    ("qmp", kiln_vmm::fuzzing::qmp),
    ("memdiff", kiln_vmm::fuzzing::memdiff),
    ("smaps", kiln_vmm::fuzzing::smaps),
];

fn fuzz_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

#[test]
fn every_corpus_input_goes_through_its_target_without_a_crash() {
    for (target, run) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            inputs += 1;
        }
        assert!(
            inputs > 0,
            "the {target} corpus in {} is empty",
            dir.display()
        );
    }
}

#[test]
fn every_fuzz_target_is_replayed_here() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.trim_end_matches(".rs").to_string()
        })
        .collect();
    on_disk.sort();
    let mut here: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    here.sort();
    assert_eq!(
        on_disk, here,
        "fuzz/fuzz_targets and this replay list differ"
    );
}
