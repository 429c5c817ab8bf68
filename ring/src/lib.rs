//! longctx-ring: ring attention over ranks.
//!
//! It will own sequence partitions (contiguous, zigzag, striped), the prefill ring in which
//! KV shards travel from rank to rank while each rank computes with the kernels crate and
//! merges partial results by log-sum-exp (Liu et al., "Ring Attention with Blockwise
//! Transformers", 2023; zigzag balancing as in ring-flash-attention), sharded decode, and the
//! transports behind one small trait: in-process ranks as threads, and NCCL through cudarc.
//! Nothing is implemented yet: see the ring attention issue.
