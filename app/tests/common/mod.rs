//! Helpers shared by the CLI integration tests: reading and judging a `hutch` run.
#![allow(dead_code)] // Each test crate uses its own subset.

use std::process::Output;

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "failed: {}\n{}", stdout(o), stderr(o));
}

#[track_caller]
pub fn assert_error(o: &Output, needles: &[&str]) {
    assert!(!o.status.success(), "unexpectedly succeeded: {}", stdout(o));
    let err = stderr(o);
    assert!(err.starts_with("hutch: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
}
