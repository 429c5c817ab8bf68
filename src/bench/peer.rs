//! The peer measured beside us: llama.cpp's `llama-bench`, run as a child process on the same
//! GGUF file, its JSON-lines output read back, and its peak resident memory (`VmHWM`, as our
//! side's) sampled while it runs.

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A peer named on the command line: `llama.cpp=PATH`, PATH being the `llama-bench` binary or
/// a llama.cpp folder with `build/bin/llama-bench` in it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub bench: PathBuf,
    /// llama.cpp's KV cache type (`-ctk`/`-ctv`) matching ours; `None` keeps its f16 default.
    pub cache_type: Option<&'static str>,
}

impl Peer {
    pub fn parse(spec: &str) -> Result<Peer> {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--peer {spec}: expected llama.cpp=PATH (the llama-bench binary or a llama.cpp folder)");
        };
        ensure!(
            name == "llama.cpp",
            "--peer {spec}: unknown peer {name:?} (the one known peer is llama.cpp)"
        );
        let path = Path::new(path);
        let bench = if path.is_dir() {
            ["build/bin/llama-bench", "bin/llama-bench", "llama-bench"]
                .iter()
                .map(|p| path.join(p))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "--peer {spec}: no llama-bench in {} (looked in build/bin/, bin/ and the folder itself)",
                        path.display()
                    )
                })?
        } else {
            ensure!(
                path.is_file(),
                "--peer {spec}: {} does not exist",
                path.display()
            );
            path.to_path_buf()
        };
        Ok(Peer {
            name: name.to_string(),
            bench,
            cache_type: None,
        })
    }

    /// The peer with the KV cache type nearest ours: q8 as its q8_0 (the same blocks), f32 as
    /// f32, bf16 as its default f16 (the same bytes a value); llama.cpp has no FP8 cache, so
    /// fp8 meets its q8_0 (8 bits a value too).
    pub fn with_kv(mut self, dtype: longctx_kernels::DType) -> Peer {
        use longctx_kernels::DType;
        self.cache_type = match dtype {
            DType::Q8_0 | DType::F8E4M3 => Some("q8_0"),
            DType::F32 => Some("f32"),
            DType::BF16 | DType::F16 => None,
        };
        self
    }

    /// Prefill of `tokens` from an empty context: tokens/s and the child's peak RSS (MiB).
    pub fn prefill(&self, model: &Path, threads: usize, tokens: usize) -> Result<(f64, f64)> {
        let n = tokens.to_string();
        self.run(model, threads, &["-p", &n, "-n", "0"], (tokens, 0, 0))
    }

    /// `steps` decode steps after a context of `depth` tokens: tokens/s and peak RSS (MiB).
    pub fn decode(
        &self,
        model: &Path,
        threads: usize,
        depth: usize,
        steps: usize,
    ) -> Result<(f64, f64)> {
        let (d, n) = (depth.to_string(), steps.to_string());
        self.run(
            model,
            threads,
            &["-p", "0", "-n", &n, "-d", &d],
            (0, steps, depth),
        )
    }

    /// One `llama-bench` test (flash attention on, one repetition, as BENCHMARKS.md's peer
    /// runs), its `avg_ts` for the test `(n_prompt, n_gen, n_depth)`.
    fn run(
        &self,
        model: &Path,
        threads: usize,
        test: &[&str],
        want: (usize, usize, usize),
    ) -> Result<(f64, f64)> {
        let t = threads.to_string();
        let mut args = vec!["-m", path_str(model)?, "-t", &t, "-fa", "1", "-r", "1"];
        if let Some(c) = self.cache_type {
            args.extend_from_slice(&["-ctk", c, "-ctv", c]);
        }
        args.extend_from_slice(test);
        args.extend_from_slice(&["-o", "jsonl"]);
        let mut child = Command::new(&self.bench)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bench.display()))?;
        // Both pipes drained on threads (a chatty child must not block on a full pipe) while
        // this thread samples the child's memory.
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("piped")));
        let err = drain(Box::new(child.stderr.take().expect("piped")));
        let (status, peak_kib) = wait_sampling_peak_rss(&mut child)?;
        let (out, err) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        if !status.success() {
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            bail!(
                "{} {} failed ({status}): {}",
                self.bench.display(),
                args.join(" "),
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            );
        }
        let ts = avg_ts(&out, want)
            .with_context(|| format!("{} {}", self.bench.display(), args.join(" ")))?;
        Ok((ts, peak_kib as f64 / 1024.0))
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// `avg_ts` of the JSON line whose `n_prompt`, `n_gen`, `n_depth` are `want`.
pub fn avg_ts(jsonl: &str, want: (usize, usize, usize)) -> Result<f64> {
    let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64());
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("llama-bench printed a line that is not JSON: {line:.80}"))?;
        let got = (
            field(&v, "n_prompt"),
            field(&v, "n_gen"),
            field(&v, "n_depth").or(Some(0)),
        );
        if got
            == (
                Some(want.0 as u64),
                Some(want.1 as u64),
                Some(want.2 as u64),
            )
        {
            return v
                .get("avg_ts")
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite() && *x > 0.0)
                .context("its result has no positive avg_ts");
        }
    }
    bail!(
        "no result for n_prompt {}, n_gen {}, n_depth {} in its output",
        want.0,
        want.1,
        want.2
    )
}

/// Waits for the child, sampling its peak RSS (`VmHWM` of `/proc/PID/status`, in KiB) every
/// 20 ms until it exits. Not the kernel's `ru_maxrss` of the child: that one also counts the
/// address space the child was spawned in (ours, up to the exec), which would report our own
/// peak as the peer's. A peer's peak comes with loading its model and KV, long before it exits.
fn wait_sampling_peak_rss(
    child: &mut std::process::Child,
) -> Result<(std::process::ExitStatus, u64)> {
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        // Read only before the child is reaped (try_wait reaps it), so the PID is still its.
        if let Some(kib) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        }) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().context("waiting for llama-bench")? {
            return Ok((status, peak));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_of_the_asked_test_is_read() {
        let out = r#"{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 812.5, "samples_ts": [ 812.5 ]}
{"n_prompt": 0, "n_gen": 16, "n_depth": 512, "avg_ts": 41.25, "samples_ts": [ 41.25 ]}
"#;
        assert_eq!(avg_ts(out, (512, 0, 0)).unwrap(), 812.5);
        assert_eq!(avg_ts(out, (0, 16, 512)).unwrap(), 41.25);
        let e = avg_ts(out, (0, 16, 1024)).unwrap_err().to_string();
        assert!(e.contains("n_depth 1024"), "{e}");
        assert!(avg_ts("not json\n", (1, 0, 0)).is_err());
        assert!(avg_ts(
            r#"{"n_prompt": 1, "n_gen": 0, "n_depth": 0, "avg_ts": 0}"#,
            (1, 0, 0)
        )
        .is_err());
    }

    #[test]
    fn peer_specs_are_checked() {
        let dir = std::env::temp_dir().join(format!("longctx-peer-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("build/bin")).unwrap();
        std::fs::write(dir.join("build/bin/llama-bench"), "").unwrap();
        let p = Peer::parse(&format!("llama.cpp={}", dir.display())).unwrap();
        assert_eq!(p.bench, dir.join("build/bin/llama-bench"));
        assert!(Peer::parse("vllm=/x")
            .unwrap_err()
            .to_string()
            .contains("unknown peer"));
        assert!(Peer::parse("/x")
            .unwrap_err()
            .to_string()
            .contains("expected llama.cpp=PATH"));
        let e = Peer::parse("llama.cpp=/nonexistent/llama-bench")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
