//! Test helpers shared by the workspace: one way for a test to skip when something it needs
//! (a tool, /dev/kvm, a file system feature) is missing.
//!
//! Outside CI a skip prints `SKIP: COMPONENT: REASON` and the test returns (passes). Under
//! `CI=true` a skip is a failure (the test panics), so a change of CI machine cannot hide a
//! test, unless `HUTCH_TEST_ABSENT` (comma-separated component names) says the component is
//! absent there on purpose: `HUTCH_TEST_ABSENT=iasl,kvm cargo test`.
//!
//! ```no_run
//! #[test]
//! fn converts_with_qemu_img() {
//!     if !testkit::require_tool("qemu-img") {
//!         return;
//!     }
//!     // ... the test proper
//! }
//! ```

use std::io::Write;
use std::path::Path;

/// The variable listing components absent on purpose (comma-separated names).
pub const ABSENT_ENV: &str = "HUTCH_TEST_ABSENT";

/// What a skip of `component` must do in this environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipPolicy {
    /// Not in CI: say SKIP and let the test pass.
    Allowed,
    /// In CI, and the component is listed in `HUTCH_TEST_ABSENT`.
    AbsentOnPurpose,
    /// In CI and not listed: the skip fails the test.
    Forbidden,
}

/// The policy for a skip of `component` given the values of `CI` and `HUTCH_TEST_ABSENT`.
pub fn policy(component: &str, ci: Option<&str>, absent: Option<&str>) -> SkipPolicy {
    let listed = absent
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .any(|name| !name.is_empty() && name.eq_ignore_ascii_case(component));
    if ci != Some("true") {
        SkipPolicy::Allowed
    } else if listed {
        SkipPolicy::AbsentOnPurpose
    } else {
        SkipPolicy::Forbidden
    }
}

/// Skips the calling test because `component` is missing (`reason` says how it was seen); the
/// caller returns right after. Panics (fails the test) under `CI=true` unless
/// `HUTCH_TEST_ABSENT` lists `component`.
pub fn skip(component: &str, reason: &str) {
    let ci = std::env::var("CI").ok();
    let absent = std::env::var(ABSENT_ENV).ok();
    match policy(component, ci.as_deref(), absent.as_deref()) {
        SkipPolicy::Allowed => say(&format!("SKIP: {component}: {reason}")),
        SkipPolicy::AbsentOnPurpose => {
            say(&format!("SKIP: {component}: {reason} (absent on purpose: {ABSENT_ENV})"))
        }
        SkipPolicy::Forbidden => panic!(
            "{component} is required in CI ({reason}); if it is absent on purpose, add it to \
             {ABSENT_ENV}"
        ),
    }
}

/// True when `tool` is an executable on `PATH`; otherwise skips (see [`skip`]) and returns
/// false, so the test can `return`. The component's name is the tool's.
pub fn require_tool(tool: &str) -> bool {
    if find_on_path(tool, std::env::var_os("PATH").as_deref()) {
        return true;
    }
    skip(tool, &format!("{tool} not found on PATH"));
    false
}

/// True when every tool is on `PATH`; skips on the first missing one.
pub fn require_tools(tools: &[&str]) -> bool {
    tools.iter().all(|tool| require_tool(tool))
}

/// Whether an executable file named `tool` is in one of `path`'s directories.
fn find_on_path(tool: &str, path: Option<&std::ffi::OsStr>) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let is_executable =
        |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if tool.contains('/') {
        return is_executable(Path::new(tool));
    }
    path.is_some_and(|path| std::env::split_paths(path).any(|dir| is_executable(&dir.join(tool))))
}

/// Writes a line to the process's stderr directly: libtest captures `eprintln!` of passing
/// tests, which would hide the skip (tools/test-all.sh counts these lines).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_ci_a_skip_is_allowed() {
        assert_eq!(policy("qemu-img", None, None), SkipPolicy::Allowed);
        assert_eq!(policy("qemu-img", Some("false"), None), SkipPolicy::Allowed);
    }

    #[test]
    fn in_ci_a_skip_is_forbidden_unless_the_component_is_listed_absent() {
        assert_eq!(policy("iasl", Some("true"), None), SkipPolicy::Forbidden);
        assert_eq!(policy("iasl", Some("true"), Some("kvm")), SkipPolicy::Forbidden);
        assert_eq!(policy("iasl", Some("true"), Some("kvm, iasl")), SkipPolicy::AbsentOnPurpose);
        assert_eq!(policy("iasl", Some("true"), Some("IASL")), SkipPolicy::AbsentOnPurpose);
        // Part of a name is not the name.
        assert_eq!(policy("iasl", Some("true"), Some("ias,,")), SkipPolicy::Forbidden);
    }

    #[test]
    fn tools_are_found_on_path_only_when_executable() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let tool = dir.join("some-tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir]).unwrap();
        assert!(!find_on_path("some-tool", Some(&path)), "not executable yet");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(find_on_path("some-tool", Some(&path)));
        assert!(!find_on_path("other-tool", Some(&path)));
        assert!(!find_on_path("some-tool", None));
        assert!(find_on_path(tool.to_str().unwrap(), None), "a path is checked as it is");
    }

    #[test]
    fn sh_is_a_tool_here() {
        assert!(require_tool("sh"));
    }

    /// A skip on its own; run by [`a_skip_fails_in_ci_unless_the_component_is_absent_on_purpose`]
    /// in a child process (`--ignored`), never by itself.
    #[test]
    #[ignore = "run in a child process by the test below"]
    fn a_deliberate_skip() {
        skip("testkit-demo", "this component never exists");
    }

    #[test]
    fn a_skip_fails_in_ci_unless_the_component_is_absent_on_purpose() {
        let run = |env: &[(&str, &str)]| {
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args(["--ignored", "--exact", "tests::a_deliberate_skip", "--nocapture"]);
            cmd.env_remove("CI").env_remove(ABSENT_ENV).envs(env.iter().copied());
            let out = cmd.output().unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let (ok, err) = run(&[]);
        assert!(ok && err.contains("SKIP: testkit-demo: this component never exists"), "{err}");
        let (ok, err) = run(&[("CI", "true")]);
        assert!(!ok && err.contains("testkit-demo is required in CI"), "{err}");
        let (ok, err) = run(&[("CI", "true"), (ABSENT_ENV, "kvm,testkit-demo")]);
        assert!(ok && err.contains("absent on purpose"), "{err}");
    }
}

/// A small deterministic generator (xorshift64) for tests that drive a device or a format
/// with pseudo-random input: the same seed gives the same run, so a failure reproduces.
/// The seed must not be 0 (xorshift stays at 0).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // Not an iterator: it never ends.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Fills `buf` with generated bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
