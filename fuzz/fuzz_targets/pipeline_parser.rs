//! Fuzzes the runner's pipeline-file parser, `surveil_runner::pipeline::
//! parse`, with arbitrary bytes: it must never panic; a pipeline it accepts
//! must hold every guarantee the runner relies on (at least one task,
//! unique non-blank names, a non-blank `run`, a timeout above zero, env
//! names that are non-empty and free of `=`); a refusal must name the file
//! and give a plausible position. It reads no file and runs nothing.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use surveil_runner::pipeline::{MAX_PIPELINE_BYTES, parse};

/// Deliberately not `.surveil.toml`: a message that hard-coded the default
/// name instead of the one it was given would be caught.
const FILE: &str = "sub dir/pipe.toml";

fuzz_target!(|data: &[u8]| {
    match parse(data, FILE) {
        Ok(pipeline) => {
            assert!(data.len() <= MAX_PIPELINE_BYTES);
            let text = std::str::from_utf8(data).expect("an accepted pipeline is UTF-8");
            assert!(!text.contains('\0'), "an accepted pipeline has no NUL");
            assert!(!pipeline.tasks.is_empty(), "accepted with no tasks");
            let mut names = HashSet::new();
            for task in &pipeline.tasks {
                assert!(!task.name.trim().is_empty(), "blank name accepted");
                assert!(names.insert(&task.name), "duplicate name {:?}", task.name);
                assert!(!task.run.trim().is_empty(), "blank run accepted");
                assert!(!task.timeout.is_zero(), "zero timeout accepted");
                for key in task.env.keys() {
                    assert!(!key.is_empty() && !key.contains('='), "env name {key:?}");
                }
            }
        }
        Err(err) => {
            assert_eq!(err.file, FILE);
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("{FILE}: ")),
                "message does not name the file: {message:?}"
            );
            assert!(!err.problem.trim().is_empty(), "empty problem: {message:?}");
            if let Some((line, column)) = err.position {
                assert!(line >= 1 && column >= 1, "{message:?}");
                // Lines are counted in the input: never past its last line.
                let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
                assert!(line <= lines, "line {line} of {lines}: {message:?}");
                assert!(
                    message.starts_with(&format!("{FILE}: line {line}, column {column}: ")),
                    "{message:?}"
                );
            }
        }
    }
});
