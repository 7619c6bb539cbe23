//! Helpers shared by the `djinn` command-line tests (`tests/cli.rs`, `tests/engine_run.rs`).

use std::path::PathBuf;
use std::process::Command;

/// The `djinn` binary cargo built for these tests.
pub fn djinn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_djinn"))
}

/// An empty scratch path, unique to this test process: `<tmp>/djinn-<suite>-<name>-<pid>`.
pub fn temp(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("djinn-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `djinn args` and asserts it exits with code 2 and `needle` in its error output.
pub fn fails_with(args: &[&str], needle: &str) {
    let out = djinn().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected `{needle}` in: {stderr}"
    );
}

/// Runs `cmd`, asserts it succeeds (showing all its output if not) and returns its stdout.
#[allow(dead_code)] // not every test binary including this file runs a command this way
pub fn stdout_of_success(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
