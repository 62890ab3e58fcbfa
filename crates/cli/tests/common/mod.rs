//! Running the `effnet` binary from the integration tests.

use std::process::Command;

/// Runs `effnet ARGS`; returns (success, stdout, stderr).
pub fn effnet(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(args)
        .output()
        .expect("effnet runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
