//! Replays the fuzz targets' corpora (`services/core/fuzz/corpus/<target>/`,
//! inputs the fuzzers found interesting, and every input that once crashed
//! one) through the same entry points, on the stable toolchain, in seconds.
//! `scripts/fuzz` runs the fuzzers themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn every_corpus_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in stampede_core::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: empty corpus");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "{name}: {} panicked", input.display());
        }
    }
}
