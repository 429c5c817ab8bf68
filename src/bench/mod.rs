//! `longctx bench ...`: measurements printed as a table or as JSON.

mod batched;
mod e2e;
mod gpu;
mod kernels;
mod kvstore;
mod peer;
mod ring;
mod scaling;
mod serving;
mod timing;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Attention kernels (prefill and decode, f32 and bf16) and the memory bandwidth beside them.
    Kernels(kernels::Args),
    /// The KV store: streaming from the disk tier, and attention over a KV mostly on disk.
    Kvstore(kvstore::Args),
    /// Ring attention over P simulated devices: per-step compute and transfer, efficiency, balance.
    Ring(ring::Args),
    /// Many sequences at once through the scheduler: prefill, decode (S_TG) and whole-run
    /// tokens/s at each concurrency, as llama-batched-bench reports them.
    Batched(batched::Args),
    /// A server's users' view: prefix-cache reuse on a document, and latency under load.
    Serving(serving::Args),
    /// The default model end to end: prefill and decode tokens/s at 2K and 8K of context.
    E2e(e2e::Args),
    /// The CUDA kernels: self-test against the CPU kernel, and flash-attention timings.
    Gpu(gpu::Args),
    /// Chunked prefill at growing context lengths: time, tokens/s, peak RSS, KV per tier.
    Scaling(Box<scaling::Args>),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels(args) => kernels::run(args),
        BenchCommand::Kvstore(args) => kvstore::run(args),
        BenchCommand::Ring(args) => ring::run(args),
        BenchCommand::E2e(args) => e2e::run(args),
        BenchCommand::Batched(args) => batched::run(args),
        BenchCommand::Serving(args) => serving::run(args),
        BenchCommand::Scaling(args) => scaling::run(*args),
        BenchCommand::Gpu(args) => gpu::run(args),
    }
}
