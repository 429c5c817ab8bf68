//! Run-time compilation with NVRTC, cached per variant and architecture in memory and on disk
//! (the file name hashes the source, the options, NVRTC's version and the driver's, so a
//! changed kernel or toolkit never loads stale PTX).

use super::source::{stable_hash, Variant};
use super::GpuError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Is libnvrtc loadable? (cudarc panics on a call when it is not.)
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version (major, minor); NVRTC must be present.
pub fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked by the callers) and the pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// Compiles variants to PTX for one virtual architecture (`compute_90`, ...).
pub struct Compiler {
    arch: String,
    cache_dir: Option<PathBuf>,
    /// Mixed into the disk cache key.
    versions: String,
    memo: Mutex<HashMap<Variant, Arc<String>>>,
}

impl Compiler {
    pub fn new(
        arch: &str,
        cache_dir: Option<PathBuf>,
        driver_version: i32,
    ) -> Result<Compiler, GpuError> {
        if !nvrtc_present() {
            return Err(GpuError::NoNvrtc);
        }
        let (major, minor) = nvrtc_version();
        Ok(Compiler {
            arch: arch.to_string(),
            cache_dir,
            versions: format!("nvrtc {major}.{minor} driver {driver_version}"),
            memo: Mutex::new(HashMap::new()),
        })
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The options every kernel is compiled with.
    pub fn options(&self) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", self.arch),
            "--std=c++17".into(),
            "-lineinfo".into(),
        ]
    }

    /// The PTX of `variant`, from memory, the disk cache, or NVRTC.
    pub fn ptx(&self, variant: Variant) -> Result<Arc<String>, GpuError> {
        if let Some(p) = self
            .memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&variant)
        {
            return Ok(p.clone());
        }
        let src = variant.source();
        let options = self.options();
        let key = stable_hash(&[
            src.as_bytes(),
            options.join(" ").as_bytes(),
            self.versions.as_bytes(),
        ]);
        let file = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}-{}-{key:016x}.ptx", variant.name(), self.arch)));
        let cached = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok());
        let ptx = match cached {
            Some(p) if p.contains(".entry") => p,
            _ => {
                let p = self.compile(variant, &src, options)?;
                if let Some(f) = &file {
                    // A cache that cannot be written only costs a recompile next run.
                    let _ = write_atomic(f, &p);
                }
                p
            }
        };
        let ptx = Arc::new(ptx);
        self.memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(variant, ptx.clone());
        Ok(ptx)
    }

    fn compile(
        &self,
        variant: Variant,
        src: &str,
        options: Vec<String>,
    ) -> Result<String, GpuError> {
        let opts = CompileOptions {
            options,
            name: Some(format!("{}.cu", variant.name())),
            ..Default::default()
        };
        let fail = |log: String| GpuError::Compile {
            kernel: variant.name(),
            arch: self.arch.clone(),
            log,
        };
        match compile_ptx_with_opts(src, opts) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(CompileError::CompileError { log, .. }) => {
                Err(fail(log.to_string_lossy().into_owned()))
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
