//! The CUDA backend: the same attention semantics as the CPU kernel (masks at absolute
//! positions, GQA, output and LSE) on NVIDIA GPUs, plus the small ops of a Llama forward pass
//! and cuBLAS GEMMs.
//!
//! Kernel sources are `.cu` files under `kernels/`, embedded with `include_str!` and compiled
//! at run time with NVRTC for the device's architecture ([`nvrtc::Compiler`]; PTX cached in
//! memory and on disk). Everything goes through cudarc with dynamic loading, so a binary
//! built here runs on machines with no CUDA at all: [`probe`] looks for libcuda before any
//! other call (cudarc panics on a missing library) and says in one line why there is no GPU.

mod attention;
mod check;
pub mod nvrtc;
mod ops;
pub mod source;

pub use attention::KvLayout;
pub use check::{
    bench_attention, fresh_seed, self_test, BenchCase, CheckRow, Scope, SelfTest, CHECK_LSE_TOL,
    CHECK_TOL,
};
pub use source::{Family, GpuDType, Variant, HEAD_DIMS};

use crate::KernelError;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// What can go wrong on the GPU path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No usable GPU: the reason, in words.
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// libnvrtc could not be loaded.
    #[error("NVRTC (libnvrtc.so) not found: put CUDA's lib directory on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("compiling {kernel} for {arch} failed: {log}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
    },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// `what` (= `value`) is past `max`, the most the kernel's integer type holds.
pub(crate) fn too_big(op: &'static str, what: &str, value: usize, max: u64) -> GpuError {
    GpuError::Kernel(KernelError::Unsupported {
        op,
        reason: format!("{what} = {value} is more than the GPU kernels take ({max})"),
    })
}

/// A size in a launch argument's integer type (`i32`, `u32`, `i64`), or `Unsupported`: a
/// bare `as` would wrap a length of 2^31 or more into a negative or small one.
pub(crate) fn narrow<T>(op: &'static str, what: &str, value: usize) -> Result<T, GpuError>
where
    T: TryFrom<usize> + num_max::Max,
{
    T::try_from(value).map_err(|_| too_big(op, what, value, T::MAX_U64))
}

/// A grid's x dimension, which CUDA caps at 2^31 - 1.
pub(crate) fn grid_x(op: &'static str, what: &str, value: usize) -> Result<u32, GpuError> {
    narrow::<i32>(op, what, value).map(|v| v as u32)
}

/// A grid's y dimension, which CUDA caps at 65,535.
pub(crate) fn grid_y(op: &'static str, what: &str, value: usize) -> Result<u32, GpuError> {
    if value > 65_535 {
        return Err(too_big(op, what, value, 65_535));
    }
    Ok(value as u32)
}

mod num_max {
    /// The largest value of a launch argument's integer type, for the error message.
    pub trait Max {
        const MAX_U64: u64;
    }
    impl Max for i32 {
        const MAX_U64: u64 = i32::MAX as u64;
    }
    impl Max for i64 {
        const MAX_U64: u64 = i64::MAX as u64;
    }
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

/// The device a [`Gpu`] runs on.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub multiprocessors: usize,
    pub memory_bytes: usize,
    /// The driver's CUDA version, e.g. 13000.
    pub driver_version: i32,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {}: {} (sm_{}{}, {} SMs, {:.0} GiB, driver CUDA {}.{})",
            self.ordinal,
            self.name,
            self.cc.0,
            self.cc.1,
            self.multiprocessors,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10
        )
    }
}

/// Is there a usable GPU? Looks for libcuda first (cudarc panics when it is missing), then
/// asks the driver. `Err` carries the reason in words.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, GpuError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuError::NoGpu(
            "libcuda.so (the NVIDIA driver) is not installed".into(),
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| GpuError::NoGpu(format!("the CUDA driver found no device ({e})")))?;
    if count <= 0 {
        return Err(GpuError::NoGpu("the CUDA driver reports 0 devices".into()));
    }
    if ordinal >= count as usize {
        return Err(GpuError::NoGpu(format!(
            "device {ordinal} asked for, {count} present"
        )));
    }
    let ctx = CudaContext::new(ordinal)?;
    info_of(&ctx)
}

fn info_of(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, GpuError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let mut driver_version = 0i32;
    // SAFETY: the driver library is loaded (probed) and the pointer is valid.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name()?,
        cc: ctx.compute_capability()?,
        multiprocessors: ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
        memory_bytes: ctx.total_mem()?,
        driver_version,
    })
}

/// The 16-bit element types the kernels take on the device.
pub trait GpuElem: DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Send + Sync {
    const DTYPE: GpuDType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl GpuElem for half::bf16 {
    const DTYPE: GpuDType = GpuDType::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl GpuElem for half::f16 {
    const DTYPE: GpuDType = GpuDType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// One GPU: its context and stream, the compiled modules, and a cuBLAS handle made on first
/// use.
pub struct Gpu {
    pub info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    compiler: nvrtc::Compiler,
    modules: Mutex<HashMap<Variant, Arc<CudaModule>>>,
    blas: OnceLock<cudarc::cublas::CudaBlas>,
}

impl Gpu {
    /// Opens device `ordinal`. `cache_dir`: where compiled PTX is kept between runs (None:
    /// memory only).
    pub fn new(ordinal: usize, cache_dir: Option<PathBuf>) -> Result<Gpu, GpuError> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal)?;
        let info = info_of(&ctx)?;
        let arch = format!("compute_{}{}", info.cc.0, info.cc.1);
        let compiler = nvrtc::Compiler::new(&arch, cache_dir, info.driver_version)?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            info,
            ctx,
            stream,
            compiler,
            modules: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Entry point `entry` of `variant`, compiling and loading the module on first use.
    pub fn function(&self, variant: Variant, entry: &str) -> Result<CudaFunction, GpuError> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(&variant) {
                Some(m) => m.clone(),
                None => {
                    let ptx = self.compiler.ptx(variant)?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str()))?;
                    modules.insert(variant, m.clone());
                    m
                }
            }
        };
        Ok(module.load_function(entry)?)
    }

    pub(crate) fn blas(&self) -> Result<&cudarc::cublas::CudaBlas, GpuError> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::Blas("libcublas.so not found".into()));
        }
        let b = cudarc::cublas::CudaBlas::new(self.stream.clone())
            .map_err(|e| GpuError::Blas(e.to_string()))?;
        Ok(self.blas.get_or_init(|| b))
    }

    /// Waits for the stream's work.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}

#[cfg(test)]
mod tests;
