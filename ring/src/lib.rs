//! longctx-ring: ring attention over ranks.
//!
//! It owns sequence partitions (contiguous, zigzag, striped: [`partition`]), the prefill
//! ring in which KV shards travel from rank to rank while each rank computes with the kernels
//! crate's flash attention and merges partial results by log-sum-exp ([`ring_attention`];
//! Liu et al., "Ring Attention with Blockwise Transformers", 2023; zigzag balancing as in
//! ring-flash-attention), sharded decode ([`ring_decode`]), the transports behind one small
//! trait ([`Transport`]: ranks as threads in one process, NCCL between processes, and a wrapper that models a link's
//! latency and bandwidth), and the timeline of a ring from measured step times
//! ([`schedule`]), for benchmarking rings larger than the machine.
//!
//! Every rank works on absolute positions, so the result equals the single-device kernel's
//! for every mask, partition and rank count; the tests check that to 1e-5.
//!
//! [`bootstrap`] reads a multi-process group from torchrun's environment variables and runs a
//! TCP rendezvous (tokio) through which rank 0 hands out the NCCL unique id, on which
//! [`nccl::Nccl`] builds the NCCL transport (cudarc's `nccl` module; one GPU per rank).

mod attend;
pub mod bootstrap;
mod decode;
mod error;
pub mod nccl;
pub mod partition;
mod prefill;
pub mod schedule;
mod transport;

pub use attend::{attend_runs, calls, pairs, AttnSpec, Call};
pub use decode::ring_decode;
pub use error::RingError;
pub use partition::{layout, Partition, Run};
pub use prefill::{ring_attention, steps_needed, RankResult, StepStat};
pub use transport::{Delayed, InProcess, LinkModel, Transport};

#[cfg(test)]
mod tests;
