//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets call: cheap, no fuzzer needed, and a crash fails the test.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

fn replay(target: &str, run: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
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

#[test]
fn corpus_proto_frame() {
    replay("proto_frame", kiln_proto::fuzzing::frame);
}
