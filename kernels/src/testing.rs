//! Reporting a test that cannot run on this machine (a GPU test without a GPU, a no-GPU test
//! with one): Rust's harness has no run-time skip, so such a test returns early and says so
//! here. `scripts/test.sh` points `LONGCTX_SKIPPED` at a file, lists its lines and counts
//! them as skipped, not passed, in its closing line.

use std::io::Write;

/// Prints `skipped: <test>: <reason>` and appends it to the file `$LONGCTX_SKIPPED` if set.
pub fn skipped(test: &str, reason: &str) {
    let line = format!("skipped: {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("LONGCTX_SKIPPED") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        // One write of one line: concurrent test binaries append whole lines.
        if let Ok(mut f) = file {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}
