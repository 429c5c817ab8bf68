//! The prefill driver.

use longctx_kvstore::{KvError, KvStore, SeqId, SnapshotMeta, Tier};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A model the driver can feed.
pub trait ChunkModel {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Runs `tokens` at positions `pos0..` through every layer, appending their KV to `seq`
    /// (which holds exactly `pos0` tokens), and returns the logits of the last token.
    fn forward_chunk(
        &self,
        tokens: &[u32],
        pos0: usize,
        store: &KvStore,
        seq: SeqId,
    ) -> Result<Vec<f32>, Self::Error>;
    /// Activation bytes a chunk of `chunk` tokens needs (the planner's input).
    fn activation_bytes(&self, chunk: usize) -> u64;
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefillError {
    #[error("model: {0}")]
    Model(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("cancelled after {done} of {total} tokens{}", .checkpoint.as_ref().map(|p| format!("; resume from the checkpoint in {}", p.display())).unwrap_or_default())]
    Cancelled {
        done: usize,
        total: usize,
        checkpoint: Option<PathBuf>,
    },
    #[error("activation budget of {budget} bytes is below one token's {per_token} bytes")]
    Budget { budget: u64, per_token: u64 },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("nothing to prefill: the prompt is empty")]
    Empty,
}

/// How chunks are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    Fixed(usize),
    /// The largest chunk whose activations fit this many bytes.
    Budget(u64),
}

/// Where and how often to checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    pub dir: PathBuf,
    /// A checkpoint after every this many chunks.
    pub every: usize,
    /// Identifies the model (a checkpoint of another model is never resumed).
    pub fingerprint: String,
}

#[derive(Clone, Debug)]
pub struct PrefillOptions {
    pub chunking: Chunking,
    pub checkpoints: Option<Checkpoints>,
}

/// A progress event, after each chunk.
#[derive(Clone, Debug)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    /// Tokens per second over this run (resumed tokens excluded).
    pub tokens_per_s: f64,
    pub eta_s: f64,
    /// KV bytes in the device, host and disk tiers.
    pub kv_bytes: [u64; 3],
    pub chunk: usize,
}

/// The result of a prefill.
#[derive(Debug)]
pub struct Prefilled {
    pub seq: SeqId,
    /// Logits after the last prompt token.
    pub logits: Vec<f32>,
    /// Tokens taken from a checkpoint rather than computed.
    pub resumed_from: usize,
    pub chunk: usize,
    pub seconds: f64,
    /// Why periodic checkpoints stopped, if one could not be written (a full or read-only
    /// disk): the prefill itself went on without them.
    pub checkpoint_error: Option<String>,
}

/// The chunk a budget allows: activations grow linearly with the chunk, so the largest
/// multiple of 16 (or any size below 16) that fits.
pub fn plan_chunk<M: ChunkModel>(
    model: &M,
    budget: u64,
    total: usize,
) -> Result<usize, PrefillError> {
    let per_token = model.activation_bytes(1).max(1);
    if budget < per_token {
        return Err(PrefillError::Budget { budget, per_token });
    }
    let (mut lo, mut hi) = (1usize, total.max(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if model.activation_bytes(mid) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(if lo >= 16 { lo / 16 * 16 } else { lo })
}

#[derive(Serialize, Deserialize)]
struct Mark {
    position: usize,
    total: usize,
    fingerprint: String,
}

const MARK: &str = "prefill.json";

fn write_mark(dir: &Path, mark: &Mark) -> Result<(), PrefillError> {
    let err = |e: std::io::Error| PrefillError::Checkpoint {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let tmp = dir.join(format!("{MARK}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(mark).expect("serialises")).map_err(err)?;
    std::fs::rename(&tmp, dir.join(MARK)).map_err(err)
}

/// Resumes from a checkpoint made for this prompt and model, if there is one that loads.
fn resume(store: &KvStore, tokens: &[u32], ck: &Checkpoints) -> Option<(SeqId, usize)> {
    let text = std::fs::read_to_string(ck.dir.join(MARK)).ok()?;
    let mark: Mark = serde_json::from_str(&text).ok()?;
    if mark.fingerprint != ck.fingerprint || mark.position == 0 || mark.position >= tokens.len() {
        return None;
    }
    let meta = SnapshotMeta {
        fingerprint: &ck.fingerprint,
        tokens: &tokens[..mark.position],
    };
    // A checkpoint of another prompt or a torn one fails to load: start over.
    let seq = store.load_snapshot(&ck.dir, &meta).ok()?;
    Some((seq, mark.position))
}

/// Feeds `tokens` through `model` into a new sequence of `store`, chunk by chunk. Calls
/// `progress` after every chunk; stops with [`PrefillError::Cancelled`] (after writing a
/// checkpoint, when checkpoints are on) once `cancel` is set.
pub fn prefill<M: ChunkModel>(
    model: &M,
    store: &KvStore,
    tokens: &[u32],
    opts: &PrefillOptions,
    cancel: &AtomicBool,
    mut progress: impl FnMut(&Progress),
) -> Result<Prefilled, PrefillError> {
    let total = tokens.len();
    if total == 0 {
        return Err(PrefillError::Empty);
    }
    let chunk = match opts.chunking {
        Chunking::Fixed(c) => c.max(1),
        Chunking::Budget(b) => plan_chunk(model, b, total)?,
    };
    let (seq, start) = match &opts.checkpoints {
        Some(ck) => resume(store, tokens, ck).unwrap_or_else(|| (store.create_seq(), 0)),
        None => (store.create_seq(), 0),
    };
    let t0 = Instant::now();
    let mut pos = start;
    let mut chunks = 0;
    let mut logits = vec![];
    let mut checkpoint_error = None;
    let checkpoint = |pos: usize| -> Result<(), PrefillError> {
        if let Some(ck) = &opts.checkpoints {
            let meta = SnapshotMeta {
                fingerprint: &ck.fingerprint,
                tokens: &tokens[..pos],
            };
            store.save_snapshot(seq, &ck.dir, &meta)?;
            write_mark(
                &ck.dir,
                &Mark {
                    position: pos,
                    total,
                    fingerprint: ck.fingerprint.clone(),
                },
            )?;
        }
        Ok(())
    };
    while pos < total {
        if cancel.load(Ordering::Relaxed) {
            let mut written = None;
            // Only where checkpoints still work; a failed one leaves nothing to resume from.
            if pos > start && checkpoint_error.is_none() && checkpoint(pos).is_ok() {
                written = opts.checkpoints.as_ref().map(|c| c.dir.clone());
            }
            return Err(PrefillError::Cancelled {
                done: pos,
                total,
                checkpoint: written,
            });
        }
        let end = (pos + chunk).min(total);
        logits = model
            .forward_chunk(&tokens[pos..end], pos, store, seq)
            .map_err(|e| PrefillError::Model(Box::new(e)))?;
        pos = end;
        chunks += 1;
        if let Some(ck) = &opts.checkpoints {
            if checkpoint_error.is_none() && ck.every > 0 && chunks % ck.every == 0 && pos < total {
                // A checkpoint is insurance, not the job: one that cannot be written turns
                // the rest off and the prefill goes on.
                if let Err(e) = checkpoint(pos) {
                    checkpoint_error = Some(e.to_string());
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let rate = (pos - start) as f64 / secs;
        let u = store.usage();
        progress(&Progress {
            done: pos,
            total,
            tokens_per_s: rate,
            eta_s: (total - pos) as f64 / rate.max(1e-9),
            kv_bytes: [
                u.bytes[Tier::Device as usize],
                u.bytes[Tier::Host as usize],
                u.bytes[Tier::Disk as usize],
            ],
            chunk,
        });
    }
    Ok(Prefilled {
        seq,
        logits,
        resumed_from: start,
        chunk,
        seconds: t0.elapsed().as_secs_f64(),
        checkpoint_error,
    })
}
