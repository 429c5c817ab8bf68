//! The forward pass of dense Llama and Llama 4 (text, MoE), one chunk of tokens at a time,
//! with the KV in the KV store. Every intermediate is named as in the Hugging Face modules
//! (`input_layernorm`, `q_proj`, ...), and `../shared/LLAMA4.md` lists the Llama 4 rules
//! followed here.

use crate::arch::{self, Role};
use crate::backend::{Backend, Cpu, FfnScratch, Widths, Workspace};
use crate::batch::Batch;
use crate::config::ModelConfig;
use crate::experts::{ExpertCache, ExpertStats, Made, Resident};
use crate::ops::{Copies, Linear};
use crate::weights::{ExpertWeights, FusedExpert, Tensor, Weights};
use crate::{EngineError, Result};
use longctx_kernels::{DType, Mask, QMatrix};
use longctx_kvstore::{Budgets, KvConfig, KvStore, Policy, Retention, SeqId};
use longctx_rope::Rope;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Decode's stacked quantised gate|up: one product, one parallel region, not two.
    gate_up_q: Option<QMatrix>,
}

/// Llama 4's routed experts, each an MLP of its own whose weights stay as the file stores
/// them (a GGUF's blocks, borrowed), and the shared expert every token passes through.
/// transformers' fused experts are split into `[out, in]` copies when first used.
struct Experts {
    router: Linear,
    routed: Vec<Expert>,
    shared: Mlp,
}

// One per layer, a few dozen per model: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Dense(Mlp),
    Moe(Experts),
}

struct Layer {
    input_layernorm: Vec<f32>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Vec<f32>,
    ffn: Ffn,
    /// Llama 4 NoPE layers: no RoPE, full causal attention, temperature tuning.
    rope: bool,
    /// Decode's stacked quantised Q|K|V (one product, one parallel region, not three).
    qkv_q: Option<QMatrix>,
}

/// A loaded model.
pub struct Model {
    pub cfg: ModelConfig,
    /// As stored; rows are dequantised as tokens look them up.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// The embeddings' transpose when tied.
    lm_head: Linear,
    /// The copies the products read (set by the `enable_*` calls).
    copies: Copies,
    /// Under `--expert-budget`: the routed experts resident now (the others stay in the file).
    experts: Option<ExpertCache<Mlp>>,
    /// The CPU steps' activations, kept between steps: two, for two steps at once (the
    /// scheduler's decode and prompt lanes).
    workspaces: [Mutex<Option<Workspace<Cpu>>>; 2],
    /// `--device cuda`: the backend every step runs on, and its activations.
    cuda: Option<std::sync::Arc<crate::backend::Cuda>>,
    cuda_workspace: Mutex<Option<Workspace<crate::backend::Cuda>>>,
}

/// Bytes one decode step reads ([`Model::decode_read_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecodeBytes {
    /// The weights its products stream, the LM head's included.
    pub weights: u64,
    /// The KV of every layer it attends to.
    pub kv: u64,
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

/// How the KV store of a model is set up.
#[derive(Clone, Debug)]
pub struct KvOptions {
    pub dtype: DType,
    pub block_tokens: usize,
    pub budgets: Budgets,
    pub policy: Policy,
    pub spill_dir: PathBuf,
    pub prefetch: usize,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions {
            dtype: DType::F32,
            block_tokens: 256,
            budgets: Budgets {
                device: u64::MAX,
                host: 0,
                disk: 0,
            },
            policy: Policy::KeepNewest,
            spill_dir: std::env::temp_dir().join("longctx-kv"),
            prefetch: 4,
        }
    }
}

impl KvOptions {
    /// These options with a host tier under the device tier (unbounded unless one is set),
    /// where a scheduler moves the KV of the requests it preempts.
    pub fn with_host_tier(mut self) -> KvOptions {
        if self.budgets.host == 0 {
            self.budgets.host = u64::MAX;
        }
        self
    }
}

/// Takes the tensor of `role` in layer `layer` (None: outside the layers) by the
/// architecture's table: its Hugging Face name and shape.
fn take(w: &mut Weights, cfg: &ModelConfig, layer: Option<usize>, role: Role) -> Result<Tensor> {
    let t = arch::tensor(cfg, layer, role).ok_or_else(|| {
        EngineError::Config(format!("a {:?} model has no {role:?} tensor", cfg.arch))
    })?;
    w.take(t.name(), &t.shape)
}

fn linear(w: &mut Weights, cfg: &ModelConfig, layer: usize, role: Role) -> Result<Linear> {
    Linear::from_out_in(take(w, cfg, Some(layer), role)?)
}

/// A layer's dense feed-forward or shared expert, by the roles of its three projections.
fn mlp(w: &mut Weights, cfg: &ModelConfig, layer: usize, roles: [Role; 3]) -> Result<Mlp> {
    Ok(Mlp {
        gate: linear(w, cfg, layer, roles[0])?,
        up: linear(w, cfg, layer, roles[1])?,
        down: linear(w, cfg, layer, roles[2])?,
        gate_up_q: None,
    })
}

/// The parts' quantised copies stacked into one (the forward pass reads only it): one copy
/// of those weights, not two.
fn stack(parts: &mut [&mut Linear]) -> Option<QMatrix> {
    let qs: Option<Vec<&QMatrix>> = parts.iter().map(|p| p.quant()).collect();
    let stacked = QMatrix::concat(&qs?).ok()?;
    for p in parts.iter_mut() {
        p.drop_quant();
    }
    Some(stacked)
}

impl Mlp {
    fn from_out_in(gate: Tensor, up: Tensor, down: Tensor) -> Result<Mlp> {
        Ok(Mlp {
            gate: Linear::from_out_in(gate)?,
            up: Linear::from_out_in(up)?,
            down: Linear::from_out_in(down)?,
            gate_up_q: None,
        })
    }

    /// Whether a product reads the stored weights in place (the stacked gate|up copy, when
    /// made, replaces the parts').
    fn reads_stored(&self) -> bool {
        let gate_up = match &self.gate_up_q {
            Some(_) => false,
            None => self.gate.reads_stored() || self.up.reads_stored(),
        };
        gate_up || self.down.reads_stored()
    }

    /// Frees the stored weights that no product reads (see [`Linear::drop_stored`]).
    fn drop_unread_stored(&mut self) {
        if self.gate_up_q.is_some() || !(self.gate.reads_stored() || self.up.reads_stored()) {
            self.gate.drop_stored();
            self.up.drop_stored();
        }
        if !self.down.reads_stored() {
            self.down.drop_stored();
        }
    }

    /// Bytes a one-row product of it reads (the stacked gate|up copy, when made, instead of
    /// the parts').
    fn row_read_bytes(&self) -> u64 {
        let gate_up = match &self.gate_up_q {
            Some(q) => q.bytes() as u64,
            None => self.gate.row_read_bytes() + self.up.row_read_bytes(),
        };
        gate_up + self.down.row_read_bytes()
    }

    fn linears(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }

    /// Makes the copies `copies` asks for (the fast path's gate|up stacked).
    fn prepare(&mut self, copies: Copies) -> Result<()> {
        for lin in self.linears() {
            lin.prepare(copies)?;
        }
        if copies == Copies::Quant {
            self.gate_up_q = stack(&mut [&mut self.gate, &mut self.up]);
        }
        Ok(())
    }
}

impl Resident for Mlp {
    /// Drops the file pages its stored weights borrow (a split fused expert borrows none).
    fn release(&self) {
        for l in [&self.gate, &self.up, &self.down] {
            l.stored().data.release_pages();
        }
    }
}

/// A routed expert: its weights where the file keeps them and, once made, the MLP the
/// products read. A GGUF's expert is made at load (it borrows the file); a fused
/// checkpoint's is split when first needed, so that under an expert budget (whose cache
/// holds the made ones instead) no expert is copied at load.
struct Expert {
    fused: Option<FusedExpert>,
    mlp: OnceLock<Mlp>,
}

impl Expert {
    fn new(w: ExpertWeights) -> Result<Expert> {
        Ok(match w {
            ExpertWeights::OutIn([g, u, d]) => Expert {
                fused: None,
                mlp: OnceLock::from(Mlp::from_out_in(g, u, d)?),
            },
            ExpertWeights::Fused(f) => Expert {
                fused: Some(f),
                mlp: OnceLock::new(),
            },
        })
    }

    /// A new MLP over the stored weights (split from the fused ones), with no copies.
    fn fresh(&self) -> Result<Mlp> {
        match (&self.fused, self.mlp.get()) {
            (Some(f), _) => {
                let [g, u, d] = f.split()?;
                Mlp::from_out_in(g, u, d)
            }
            (None, Some(m)) => Ok(Mlp {
                gate: m.gate.stored_copy()?,
                up: m.up.stored_copy()?,
                down: m.down.stored_copy()?,
                gate_up_q: None,
            }),
            (None, None) => unreachable!("an unfused expert is made at load"),
        }
    }

    /// The MLP the model keeps (without an expert budget).
    fn mlp(&self) -> Result<&Mlp> {
        if let Some(m) = self.mlp.get() {
            return Ok(m);
        }
        let m = self.fresh()?;
        Ok(self.mlp.get_or_init(|| m))
    }

    fn mlp_mut(&mut self) -> Result<&mut Mlp> {
        if self.mlp.get().is_none() {
            let m = self.fresh()?;
            let _ = self.mlp.set(m);
        }
        Ok(self.mlp.get_mut().expect("set above"))
    }

    /// The bytes the file stores for it.
    fn file_bytes(&self) -> Vec<&longctx_kernels::Blob> {
        match (&self.fused, self.mlp.get()) {
            (Some(f), _) => vec![&f.gate_up.data, &f.down.data],
            (None, Some(m)) => [&m.gate, &m.up, &m.down].map(|l| &l.stored().data).to_vec(),
            (None, None) => unreachable!("an unfused expert is made at load"),
        }
    }

    /// Drops the file pages it was read from.
    fn release_file(&self) {
        for b in self.file_bytes() {
            b.release_pages();
        }
    }

    /// Asks for its stored bytes ahead of their use.
    fn read_ahead(&self) {
        for b in self.file_bytes() {
            b.will_need();
        }
    }

    /// A new MLP prepared as `copies` asks: the expert brought in under `--expert-budget`
    /// (the same copies the model would have kept), and the bytes it holds.
    fn prepared_copy(&self, copies: Copies) -> Result<Made<Mlp>> {
        for b in self.file_bytes() {
            b.populate();
        }
        let mut m = self.fresh()?;
        m.prepare(copies)?;
        let read: u64 = self.file_bytes().iter().map(|b| b.len() as u64).sum();
        // A split fused expert owns its `[out, in]` copy: freed where the copies made serve
        // every product. Otherwise products that read the stored weights in place hold the
        // file's pages while the expert is resident; where only copies are read, they go now.
        let stored_read = m.reads_stored();
        if self.fused.is_some() {
            m.drop_unread_stored();
        }
        if self.fused.is_some() || !stored_read {
            self.release_file();
        }
        let copies_bytes: u64 = [&m.gate, &m.up, &m.down]
            .iter()
            .map(|l| l.copy_bytes())
            .sum::<u64>()
            + m.gate_up_q.as_ref().map_or(0, |q| q.bytes() as u64);
        let resident_bytes = if stored_read {
            copies_bytes + read
        } else {
            copies_bytes
        };
        Ok(Made {
            expert: m,
            resident_bytes,
            read_bytes: read,
        })
    }
}

impl Layer {
    /// Every MLP of the layer: the dense one, or the shared expert and (with `routed`) the
    /// routed experts (a fused checkpoint's split now).
    fn mlps(&mut self, routed: bool) -> Result<Vec<&mut Mlp>> {
        Ok(match &mut self.ffn {
            Ffn::Dense(m) => vec![m],
            Ffn::Moe(Experts {
                routed: experts,
                shared,
                ..
            }) => {
                let n = if routed { experts.len() } else { 0 };
                let mut all = experts
                    .iter_mut()
                    .take(n)
                    .map(|x| x.mlp_mut())
                    .collect::<Result<Vec<_>>>()?;
                all.push(shared);
                all
            }
        })
    }
}

impl Model {
    pub fn new(cfg: ModelConfig, mut w: Weights) -> Result<Model> {
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let kind = arch::layer_kind(&cfg, l);
            let ffn = match &cfg.moe {
                Some(m) if kind.moe => Ffn::Moe(Experts {
                    router: linear(&mut w, &cfg, l, Role::Router)?,
                    routed: w
                        .take_experts(l, m.experts, cfg.hidden, m.intermediate)?
                        .into_iter()
                        .map(Expert::new)
                        .collect::<Result<Vec<Expert>>>()?,
                    shared: mlp(
                        &mut w,
                        &cfg,
                        l,
                        [Role::SharedGate, Role::SharedUp, Role::SharedDown],
                    )?,
                }),
                _ => Ffn::Dense(mlp(&mut w, &cfg, l, [Role::Gate, Role::Up, Role::Down])?),
            };
            layers.push(Layer {
                input_layernorm: take(&mut w, &cfg, Some(l), Role::AttnNorm)?.to_f32()?,
                q_proj: linear(&mut w, &cfg, l, Role::Q)?,
                k_proj: linear(&mut w, &cfg, l, Role::K)?,
                v_proj: linear(&mut w, &cfg, l, Role::V)?,
                o_proj: linear(&mut w, &cfg, l, Role::O)?,
                post_attention_layernorm: take(&mut w, &cfg, Some(l), Role::FfnNorm)?.to_f32()?,
                ffn,
                rope: kind.rope,
                qkv_q: None,
            });
        }
        let embed = take(&mut w, &cfg, None, Role::Embed)?;
        let norm = take(&mut w, &cfg, None, Role::FinalNorm)?.to_f32()?;
        // Token lookups dequantise one row: rows must be whole blocks.
        embed.rows()?;
        let lm_head = if cfg.tie_embeddings {
            // Shares the embedding's stored bytes.
            Linear::from_out_in(embed.clone())?
        } else {
            let head = arch::tensor(&cfg, None, Role::LmHead).expect("every model has one");
            if !w.contains(head.name()) {
                return Err(EngineError::Weight {
                    name: head.name().into(),
                    reason: "missing, and the config does not tie it to the embeddings".into(),
                });
            }
            Linear::from_out_in(w.take(head.name(), &head.shape)?)?
        };
        Ok(Model {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            copies: Copies::Stored,
            experts: None,
            workspaces: [Mutex::new(None), Mutex::new(None)],
            cuda: None,
            cuda_workspace: Mutex::new(None),
        })
    }

    /// Keeps at most `bytes` of routed experts resident (prepared as the path's other weights
    /// are), reading the others from the mapped file when tokens are routed to them: call
    /// before the `enable_*` call of the path. An error for a model without routed experts.
    pub fn set_expert_budget(&mut self, bytes: u64) -> Result<()> {
        if !self.layers.iter().any(|l| matches!(l.ffn, Ffn::Moe(_))) {
            return Err(EngineError::Config(
                "an expert budget needs a model with routed experts (Llama 4 MoE); this one \
                 has none"
                    .into(),
            ));
        }
        if self.copies != Copies::Stored {
            return Err(EngineError::Config(
                "the expert budget is set before the weights are prepared".into(),
            ));
        }
        for l in &self.layers {
            if let Ffn::Moe(e) = &l.ffn {
                for x in &e.routed {
                    if x.mlp.get().is_some() && x.fused.is_some() {
                        return Err(EngineError::Config(
                            "the expert budget is set before the first forward pass".into(),
                        ));
                    }
                    x.release_file();
                }
            }
        }
        self.experts = Some(ExpertCache::new(bytes));
        Ok(())
    }

    /// What one decode step of one sequence at position `pos` reads, in bytes: the weights
    /// its products stream as prepared (copies, or the stored blocks), a MoE layer's router,
    /// shared expert and `top_k` times its mean routed expert, the LM head; and the KV it
    /// attends to in `kv` values (`pos + 1` keys, a chunked-local layer's own chunk's only).
    /// Under an expert budget a routed expert counts as stored. The measure of a decode
    /// step's bandwidth (`bench e2e`).
    pub fn decode_read_bytes(&self, pos: usize, kv: DType) -> DecodeBytes {
        let c = &self.cfg;
        let mut weights = self.lm_head.row_read_bytes();
        let mut keys = 0u64;
        for l in &self.layers {
            weights += match &l.qkv_q {
                Some(q) => q.bytes() as u64,
                None => [&l.q_proj, &l.k_proj, &l.v_proj]
                    .iter()
                    .map(|x| x.row_read_bytes())
                    .sum(),
            } + l.o_proj.row_read_bytes();
            weights += match &l.ffn {
                Ffn::Dense(m) => m.row_read_bytes(),
                Ffn::Moe(e) => {
                    let each: Vec<u64> = e
                        .routed
                        .iter()
                        .map(|x| match (&self.experts, x.mlp.get()) {
                            (None, Some(m)) => m.row_read_bytes(),
                            _ => x.file_bytes().iter().map(|b| b.len() as u64).sum(),
                        })
                        .collect();
                    let mean = each.iter().sum::<u64>() / each.len().max(1) as u64;
                    let top_k = c.moe.as_ref().map_or(1, |m| m.top_k) as u64;
                    e.router.row_read_bytes() + e.shared.row_read_bytes() + top_k * mean
                }
            };
            keys += match &c.llama4 {
                Some(l4) if l.rope && l4.chunk > 0 => (pos % l4.chunk + 1) as u64,
                _ => (pos + 1) as u64,
            };
        }
        // K and V, each `kv_heads` rows of `head_dim` values a key.
        let per_key = 2 * (c.kv_heads * kv.row_bytes(c.head_dim)) as u64;
        DecodeBytes {
            weights,
            kv: keys * per_key,
        }
    }

    /// What the expert budget did so far (None without one).
    pub fn expert_stats(&self) -> Option<ExpertStats> {
        self.experts.as_ref().map(|c| c.stats())
    }

    /// Every product reads f32 copies of the weights (input-major), made once: the exact
    /// path at full speed, 4 bytes a weight beside the mapped file.
    pub fn enable_f32_weights(&mut self) -> Result<()> {
        self.prepare(Copies::F32)
    }

    /// Decode (one-token) products read bf16 copies of the linear weights: about half the
    /// bytes per generated token, at bf16 rounding of the weights (prefill stays f32).
    pub fn enable_bf16_decode(&mut self) -> Result<()> {
        self.prepare(Copies::Bf16Decode)
    }

    /// Every product (decode steps and prompt chunks) reads block-quantised weights with
    /// int8 activations (llama.cpp's CPU scheme): a GGUF file's own blocks, every format
    /// from its own values (0.6 bytes a weight for SmolLM2's Q4_1; k-quants and IQ4_XS as
    /// 32-weight blocks, see `longctx_kernels::QMatrix::from_stored`), float weights
    /// quantised to 8 bits. The int8 kernel beats f32 tiles at every row count (2 threads,
    /// `longctx bench kernels --only gemm-q4`: 350-630 GOP/s at 4-160 rows; f32 tiles from
    /// the blocks 64-180 GFLOP/s at 64-512).
    pub fn enable_quant_decode(&mut self) -> Result<()> {
        self.prepare(Copies::Quant)
    }

    /// Makes every layer's copies (routed experts under a budget are made when used).
    fn prepare(&mut self, copies: Copies) -> Result<()> {
        let routed = self.experts.is_none();
        for l in &mut self.layers {
            for lin in [&mut l.q_proj, &mut l.k_proj, &mut l.v_proj, &mut l.o_proj] {
                lin.prepare(copies)?;
            }
            if copies == Copies::Quant {
                l.qkv_q = stack(&mut [&mut l.q_proj, &mut l.k_proj, &mut l.v_proj]);
            }
            for m in l.mlps(routed)? {
                m.prepare(copies)?;
            }
            // A fused checkpoint's split experts own their `[out, in]` copies: freed where the
            // copies just made serve every product.
            if let Ffn::Moe(e) = &mut l.ffn {
                for x in e.routed.iter_mut().filter(|x| x.fused.is_some()) {
                    if let Some(m) = x.mlp.get_mut() {
                        m.drop_unread_stored();
                    }
                }
            }
            // The router's products are small: f32 on the exact path, as stored otherwise.
            if let (Ffn::Moe(e), Copies::F32) = (&mut l.ffn, copies) {
                e.router.enable_f32()?;
            }
        }
        self.lm_head.prepare(copies)?;
        self.copies = copies;
        Ok(())
    }

    /// A KV store laid out for this model: chunked-local retention on Llama 4's RoPE layers.
    pub fn kv_store(&self, opts: &KvOptions) -> Result<KvStore> {
        let layers = self
            .layers
            .iter()
            .map(|l| match &self.cfg.llama4 {
                Some(l4) if l.rope => Retention::ChunkedLocal { chunk: l4.chunk },
                _ => Retention::Full,
            })
            .collect();
        Ok(KvStore::new(KvConfig {
            block_tokens: opts.block_tokens,
            h_kv: self.cfg.kv_heads,
            d: self.cfg.head_dim,
            dtype: opts.dtype,
            layers,
            budgets: opts.budgets,
            policy: opts.policy,
            spill_dir: opts.spill_dir.clone(),
        })?)
    }

    /// Runs `tokens` (at positions `pos0..`) through the model, appending their KV to `seq`
    /// (which must hold exactly `pos0` tokens), and returns the logits asked for
    /// (`[1 or n, vocab]`). `rope` overrides the config's schedule (long-context scaling).
    /// A batch of one ([`Model::forward_batch`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        tokens: &[u32],
        pos0: usize,
        store: &KvStore,
        seq: SeqId,
        want: Logits,
        rope: Option<&Rope>,
        prefetch: usize,
    ) -> Result<Vec<f32>> {
        let mut b = Batch::new();
        b.push(seq, tokens, pos0, want);
        Ok(self
            .forward_batch(&b, store, rope, prefetch)?
            .pop()
            .unwrap_or_default())
    }

    /// One step over many sequences: every entry's tokens go through the products together,
    /// each entry's attention reads its own sequence. Returns each entry's logits as
    /// [`Model::forward`] would (`[1 or n, vocab]`, empty for an entry without tokens).
    /// Entries must name different sequences, each holding exactly its `pos0` tokens.
    pub fn forward_batch(
        &self,
        batch: &Batch,
        store: &KvStore,
        rope: Option<&Rope>,
        prefetch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        for (i, e) in batch.entries.iter().enumerate() {
            if batch.entries[..i].iter().any(|o| o.seq == e.seq) {
                return Err(EngineError::Batch(format!(
                    "sequence {:?} appears twice in one step",
                    e.seq
                )));
            }
            // Positions come from pos0: a step that does not continue its sequence would
            // rotate and mask its tokens as if they were elsewhere.
            let held = store.len(e.seq, 0)?;
            if held != e.pos0 {
                return Err(EngineError::Batch(format!(
                    "sequence {:?} holds {held} tokens but the step starts at position {}",
                    e.seq, e.pos0
                )));
            }
        }
        // The whole pass on a thread of the pool: its ~150 parallel regions a token then
        // start from a worker's own queue instead of each being injected from outside and
        // waited for across threads (what dominates a decode step's overhead on 2 threads).
        if let Some(cuda) = &self.cuda {
            return step_in(
                self,
                cuda.as_ref(),
                std::slice::from_ref(&self.cuda_workspace),
                batch.rows(),
                |ws| self.step(cuda.as_ref(), ws, batch, store, rope, prefetch),
            );
        }
        if rayon::current_thread_index().is_some() {
            self.forward_in_pool(batch, store, rope, prefetch)
        } else {
            rayon::scope(|_| self.forward_in_pool(batch, store, rope, prefetch))
        }
    }

    /// Runs every later step on `cuda` (`--device cuda`). The model must hold its weights
    /// as stored (no `enable_*` copies: the backend uploads its own) and no expert budget
    /// (the backend keys its uploads by the weights' addresses, which a budget's copies
    /// reuse).
    pub fn use_cuda(&mut self, cuda: crate::backend::Cuda) -> Result<()> {
        if self.experts.is_some() {
            return Err(EngineError::Unsupported(
                "--expert-budget with --device cuda: the CUDA backend keeps every expert on \
                 the GPU"
                    .into(),
            ));
        }
        if self.copies != Copies::Stored {
            return Err(EngineError::Unsupported(
                "the CUDA backend reads the stored weights: prepare no CPU copies".into(),
            ));
        }
        self.cuda = Some(std::sync::Arc::new(cuda));
        Ok(())
    }

    /// Whether the steps run on the CUDA backend.
    pub fn on_cuda(&self) -> bool {
        self.cuda.is_some()
    }

    /// The device the steps run on, in words.
    pub fn device(&self) -> String {
        match &self.cuda {
            Some(c) => format!("CUDA backend, {}", c.gpu().info),
            None => "CPU backend".into(),
        }
    }

    /// The widths this model's workspace is sized by.
    fn widths(&self) -> Widths {
        let c = &self.cfg;
        Widths {
            hidden: c.hidden,
            q: c.heads * c.head_dim,
            kv: c.kv_heads * c.head_dim,
            heads: c.heads,
            inter: c
                .intermediate
                .max(c.moe.as_ref().map_or(0, |m| m.intermediate)),
            experts: c.moe.as_ref().map_or(0, |m| m.experts),
            vocab: c.vocab,
        }
    }

    /// The CPU step on the model's own workspace ([`step_in`]).
    fn forward_in_pool(
        &self,
        batch: &Batch,
        store: &KvStore,
        rope: Option<&Rope>,
        prefetch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        step_in(self, &Cpu, &self.workspaces, batch.rows(), |ws| {
            self.step(&Cpu, ws, batch, store, rope, prefetch)
        })
    }

    /// A workspace on `be` for steps of up to `rows` rows of this model.
    pub fn workspace<B: Backend>(&self, be: &B, rows: usize) -> Result<Workspace<B>> {
        Workspace::new(be, self.widths(), rows)
    }

    /// `tokens` prefilled on `be` in one step (every row's logits), then `decode` greedy
    /// steps of one token (the last row's): every logit, in order. What compares one backend
    /// with another on a whole model.
    pub fn run_on<B: Backend>(
        &self,
        be: &B,
        tokens: &[u32],
        decode: usize,
        kv: &KvOptions,
    ) -> Result<Vec<f32>> {
        let store = self.kv_store(kv)?;
        let seq = store.create_seq();
        let mut ws = self.workspace(be, tokens.len())?;
        let mut one = |toks: &[u32], pos0: usize, want: Logits| -> Result<Vec<f32>> {
            let mut b = Batch::new();
            b.push(seq, toks, pos0, want);
            Ok(self
                .step(be, &mut ws, &b, &store, None, kv.prefetch)?
                .pop()
                .unwrap_or_default())
        };
        let mut all = one(tokens, 0, Logits::All)?;
        let vocab = self.cfg.vocab;
        for i in 0..decode {
            let last = &all[all.len() - vocab..];
            let next = (0..vocab)
                .max_by(|a, b| last[*a].total_cmp(&last[*b]))
                .unwrap_or(0) as u32;
            all.extend(one(&[next], tokens.len() + i, Logits::Last)?);
        }
        Ok(all)
    }

    /// One step of the forward pass on backend `be`, in `ws` (sized for at least the batch's
    /// rows).
    pub fn step<B: Backend>(
        &self,
        be: &B,
        ws: &mut Workspace<B>,
        batch: &Batch,
        store: &KvStore,
        rope: Option<&Rope>,
        prefetch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let n = batch.rows();
        if n == 0 {
            return Ok(vec![vec![]; batch.entries.len()]);
        }
        if ws.rows < n {
            return Err(EngineError::Batch(format!(
                "a step of {n} rows in a workspace for {}",
                ws.rows
            )));
        }
        let offs = batch.offsets();
        let pos_of = |r: usize| batch.position(r);
        let (h, hd) = (c.hidden, c.head_dim);
        let (qd, kd) = (c.heads * hd, c.kv_heads * hd);
        let rope = rope.unwrap_or(&c.rope);
        let tokens: Vec<u32> = batch
            .entries
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        be.embed(&self.embed, &tokens, &mut ws.x)?;
        finite(be, &ws.x, (n, h), &pos_of, || "the token embedding".into())?;
        for (l, layer) in self.layers.iter().enumerate() {
            be.rms_norm(
                &ws.x,
                Some(&layer.input_layernorm),
                c.rms_eps,
                (n, h),
                &mut ws.normed,
            )?;
            match &layer.qkv_q {
                Some(w) => {
                    be.stacked(w, &ws.normed, n, &mut ws.qkv)?;
                    be.split_qkv(&ws.qkv, n, (qd, kd), &mut ws.q, &mut ws.k, &mut ws.v)?;
                }
                _ => {
                    be.linear(&layer.q_proj, &ws.normed, n, &mut ws.q)?;
                    be.linear(&layer.k_proj, &ws.normed, n, &mut ws.k)?;
                    be.linear(&layer.v_proj, &ws.normed, n, &mut ws.v)?;
                }
            }
            let mut mask = Mask::Causal;
            for (i, e) in batch.entries.iter().enumerate() {
                let (r0, r1) = (offs[i], offs[i + 1]);
                if r0 == r1 {
                    continue;
                }
                if layer.rope {
                    let seq_len = e.pos0 + (r1 - r0);
                    let (pos0, lay) = (e.pos0, c.rope_layout);
                    be.rope(&mut ws.q, r0..r1, (c.heads, hd), pos0, rope, seq_len, lay)?;
                    be.rope(
                        &mut ws.k,
                        r0..r1,
                        (c.kv_heads, hd),
                        pos0,
                        rope,
                        seq_len,
                        lay,
                    )?;
                }
                if let Some(l4) = &c.llama4 {
                    if !layer.rope && l4.temperature_tuning {
                        ws.scales.clear();
                        ws.scales.extend((0..r1 - r0).map(|j| {
                            let pos = (e.pos0 + j) as f64;
                            (1.0 + l4.attn_scale * ((pos + 1.0) / l4.floor_scale).floor().ln_1p())
                                as f32
                        }));
                        be.scale_rows(&mut ws.q, qd, r0, &ws.scales)?;
                    }
                }
            }
            if let Some(l4) = &c.llama4 {
                if layer.rope {
                    mask = Mask::ChunkedLocal { chunk: l4.chunk };
                    if l4.qk_norm {
                        be.rms_norm_in_place(&mut ws.q, c.rms_eps, (n * c.heads, hd))?;
                        be.rms_norm_in_place(&mut ws.k, c.rms_eps, (n * c.kv_heads, hd))?;
                    }
                }
            }
            for (i, e) in batch.entries.iter().enumerate() {
                let (r0, r1) = (offs[i], offs[i + 1]);
                if r0 < r1 {
                    be.append_kv(store, e.seq, l, &ws.k, &ws.v, r0..r1, kd)?;
                }
            }
            be.attend(
                store,
                batch,
                &offs,
                l,
                &ws.q,
                (c.heads, hd),
                mask,
                prefetch,
                &mut ws.attn,
                &mut ws.lse,
            )?;
            be.linear(&layer.o_proj, &ws.attn, n, &mut ws.o)?;
            be.add(&mut ws.x, &ws.o, n * h)?;
            finite(be, &ws.x, (n, h), &pos_of, || {
                format!("layer {l}'s attention")
            })?;
            be.rms_norm(
                &ws.x,
                Some(&layer.post_attention_layernorm),
                c.rms_eps,
                (n, h),
                &mut ws.normed,
            )?;
            match &layer.ffn {
                Ffn::Dense(m) => dense_mlp(be, m, &ws.normed, n, &mut ws.o, &mut ws.ffn)?,
                Ffn::Moe(e) => {
                    let m = c.moe.as_ref().expect("MoE config");
                    let routed = Routed {
                        layer: l,
                        cache: self.experts.as_ref(),
                        copies: self.copies,
                    };
                    moe(be, ws, e, &routed, m.top_k, n, h)?;
                }
            }
            be.add(&mut ws.x, &ws.o, n * h)?;
            finite(be, &ws.x, (n, h), &pos_of, || {
                format!("layer {l}'s feed-forward")
            })?;
            if let (Some(cache), Some(next)) = (&self.experts, self.layers.get(l + 1)) {
                self.read_ahead(be, ws, cache, l + 1, next, n)?;
            }
        }
        // The rows whose logits are wanted, in entry order.
        let mut picked = vec![];
        for (i, e) in batch.entries.iter().enumerate() {
            let (r0, r1) = (offs[i], offs[i + 1]);
            match (e.want, r0 < r1) {
                (_, false) => {}
                (Logits::Last, true) => picked.push((r1 - 1, 1.0)),
                (Logits::All, true) => picked.extend((r0..r1).map(|r| (r, 1.0))),
            }
        }
        let m = picked.len();
        be.gather(&ws.x, h, &picked, &mut ws.o)?;
        be.rms_norm(&ws.o, Some(&self.norm), c.rms_eps, (m, h), &mut ws.normed)?;
        ws.logits_for(be, m, c.vocab)?;
        let logits = &mut ws.logits;
        be.linear(&self.lm_head, &ws.normed, m, logits)?;
        finite(be, logits, (m, c.vocab), &|i| pos_of(picked[i].0), || {
            "the final norm or lm_head".into()
        })?;
        let mut out = Vec::with_capacity(batch.entries.len());
        let mut at = 0;
        for (i, e) in batch.entries.iter().enumerate() {
            let rows = match (e.want, offs[i] < offs[i + 1]) {
                (_, false) => 0,
                (Logits::Last, true) => 1,
                (Logits::All, true) => offs[i + 1] - offs[i],
            };
            let mut host = vec![0f32; rows * c.vocab];
            if rows > 0 {
                be.download_rows(logits, at * c.vocab, &mut host)?;
            }
            out.push(host);
            at += rows;
        }
        Ok(out)
    }
}

impl Model {
    /// Asks for the file pages of the experts layer `l` (`next`) will likely use: its router
    /// applied to its input before attention (the residual stream changes little across one
    /// attention sublayer), so the reads overlap that attention.
    fn read_ahead<B: Backend>(
        &self,
        be: &B,
        ws: &mut Workspace<B>,
        cache: &ExpertCache<Mlp>,
        l: usize,
        next: &Layer,
        n: usize,
    ) -> Result<()> {
        let (Ffn::Moe(e), Some(m)) = (&next.ffn, &self.cfg.moe) else {
            return Ok(());
        };
        let h = self.cfg.hidden;
        be.rms_norm(
            &ws.x,
            Some(&next.post_attention_layernorm),
            self.cfg.rms_eps,
            (n, h),
            &mut ws.normed,
        )?;
        let mut wanted = vec![false; e.routed.len()];
        route(be, ws, e, n, m.top_k, |_, ex, _| wanted[ex] = true)?;
        for (ex, _) in wanted.iter().enumerate().filter(|(_, w)| **w) {
            if !cache.contains((l, ex)) {
                e.routed[ex].read_ahead();
                cache.note_read_ahead((l, ex));
            }
        }
        Ok(())
    }
}

/// Where a layer's routed experts come from: the model's own, or the budget's cache.
struct Routed<'a> {
    layer: usize,
    cache: Option<&'a ExpertCache<Mlp>>,
    copies: Copies,
}

/// Runs `step` in the first free workspace of `slots`, made at the first step and remade for
/// a larger one (`rows` rows); a step that finds every slot in use, which tests make, gets
/// one of its own.
fn step_in<B: Backend, T>(
    model: &Model,
    be: &B,
    slots: &[Mutex<Option<Workspace<B>>>],
    rows: usize,
    step: impl FnOnce(&mut Workspace<B>) -> Result<T>,
) -> Result<T> {
    let mut held = slots.iter().find_map(|s| s.try_lock().ok());
    let mut own = None;
    let slot: &mut Option<Workspace<B>> = match held.as_deref_mut() {
        Some(slot) => slot,
        None => &mut own,
    };
    if slot.as_ref().is_none_or(|ws| ws.rows < rows) {
        // The old one goes first: the two are never held at once.
        *slot = None;
        *slot = Some(model.workspace(be, rows)?);
    }
    step(slot.as_mut().expect("made above"))
}

/// An error naming `at` if `x` (`rows` rows of `width`, row r at position `pos_of(r)`)
/// holds a NaN or an infinity. Checked once per sublayer on the residual stream, not inside
/// kernels: a NaN weight or an overflow then stops the pass where it first appears instead
/// of sampling garbage from NaN logits.
fn finite<B: Backend>(
    be: &B,
    x: &B::Buf,
    shape: (usize, usize),
    pos_of: &dyn Fn(usize) -> usize,
    at: impl FnOnce() -> String,
) -> Result<()> {
    match be.non_finite_row(x, shape)? {
        None => Ok(()),
        Some(row) => Err(EngineError::NonFinite {
            at: at(),
            pos: pos_of(row),
        }),
    }
}

/// `out = down(silu(gate(x)) * up(x))` for `n` rows.
fn dense_mlp<B: Backend>(
    be: &B,
    m: &Mlp,
    x: &B::Buf,
    n: usize,
    out: &mut B::Buf,
    s: &mut FfnScratch<B>,
) -> Result<()> {
    let inter = m.gate.out;
    match &m.gate_up_q {
        Some(w) => {
            be.stacked(w, x, n, &mut s.gate_up)?;
            be.silu_mul_stacked(&s.gate_up, (n, inter), &mut s.gate)?;
            be.linear(&m.down, &s.gate, n, out)
        }
        _ => {
            be.linear(&m.gate, x, n, &mut s.gate)?;
            be.linear(&m.up, x, n, &mut s.up)?;
            be.silu_mul(&s.gate, &s.up, n * inter, &mut s.gate_up)?;
            be.linear(&m.down, &s.gate_up, n, out)
        }
    }
}

/// Llama 4 MoE on `ws.normed` into `ws.o`: router logits, top-k, sigmoid of the chosen
/// logits (no softmax), each chosen expert applied to the input scaled by its score, plus
/// the shared expert. Tokens are grouped by expert so each active expert is one product of
/// its rows.
fn moe<B: Backend>(
    be: &B,
    ws: &mut Workspace<B>,
    e: &Experts,
    routed: &Routed,
    top_k: usize,
    n: usize,
    h: usize,
) -> Result<()> {
    dense_mlp(be, &e.shared, &ws.normed, n, &mut ws.o, &mut ws.ffn)?;
    let mut groups: Vec<Vec<(usize, f32)>> = vec![vec![]; e.routed.len()];
    route(be, ws, e, n, top_k, |t, ex, logit| {
        groups[ex].push((t, 1.0 / (1.0 + (-logit).exp())))
    })?;
    let mut rows = Vec::with_capacity(n);
    for (ex, toks) in groups.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let m = toks.len();
        be.gather(&ws.normed, h, toks, &mut ws.expert_in)?;
        match routed.cache {
            None => dense_mlp(
                be,
                e.routed[ex].mlp()?,
                &ws.expert_in,
                m,
                &mut ws.expert_out,
                &mut ws.ffn,
            )?,
            Some(cache) => {
                let expert = cache.get((routed.layer, ex), || {
                    e.routed[ex].prepared_copy(routed.copies)
                })?;
                dense_mlp(
                    be,
                    &expert,
                    &ws.expert_in,
                    m,
                    &mut ws.expert_out,
                    &mut ws.ffn,
                )?;
            }
        }
        rows.clear();
        rows.extend(toks.iter().map(|(t, _)| *t));
        be.scatter_add(&ws.expert_out, h, &rows, &mut ws.o)?;
    }
    Ok(())
}

/// The router on each of the `n` rows of `ws.normed`: `chosen(row, expert, logit)` for each
/// of the row's `top_k` experts (what the MoE computes, and what the read-ahead predicts).
fn route<B: Backend>(
    be: &B,
    ws: &mut Workspace<B>,
    e: &Experts,
    n: usize,
    top_k: usize,
    mut chosen: impl FnMut(usize, usize, f32),
) -> Result<()> {
    let experts = e.routed.len();
    be.linear(&e.router, &ws.normed, n, &mut ws.router)?;
    if ws.host.len() < n * experts {
        ws.host.resize(n * experts, 0.0);
    }
    let logits = &mut ws.host[..n * experts];
    be.download(&ws.router, logits)?;
    let mut top = Vec::with_capacity(top_k);
    for (t, row) in logits.chunks_exact(experts).enumerate() {
        top_k_of(row, top_k, &mut top);
        for &ex in &top {
            chosen(t, ex, row[ex]);
        }
    }
    Ok(())
}

/// The indices of the `k` largest of `row` in torch.topk's order: larger first, ties to the
/// lower index (a NaN counts as the largest, as `total_cmp` orders it). k passes, no sort:
/// k is 1 for Scout and small for every Llama 4.
fn top_k_of(row: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    for _ in 0..k.min(row.len()) {
        let mut best: Option<usize> = None;
        for (i, v) in row.iter().enumerate() {
            if out.contains(&i) {
                continue;
            }
            if best.is_none_or(|b| v.total_cmp(&row[b]).is_gt()) {
                best = Some(i);
            }
        }
        out.extend(best);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{random_model, random_tensors, tiny_llama4_config, tiny_llama_config};
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn tiny_llama() -> ModelConfig {
        tiny_llama_config(3, 4, 2, false)
    }

    #[test]
    fn a_decode_step_reads_the_weights_it_streams_and_its_layers_kv() {
        let mut cfg = tiny_llama4_config();
        // A short chunk, so that the chunked layers' KV wraps within a few positions.
        cfg.llama4.as_mut().expect("llama 4").chunk = 16;
        let mut m = random_model(cfg.clone(), 7).expect("model");
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let moe = cfg.moe.clone().expect("moe");
        // Stored f32: per layer q, k, v, o, the router, the shared expert and top_k experts.
        let layer = h * hd * (2 * cfg.heads + 2 * cfg.kv_heads)
            + moe.experts * h
            + (1 + moe.top_k) * 3 * h * moe.intermediate;
        let stored = 4 * (cfg.layers * layer + cfg.vocab * h) as u64;
        let rope: Vec<bool> = (0..cfg.layers)
            .map(|l| arch::layer_kind(&cfg, l).rope)
            .collect();
        assert!(rope.contains(&true) && rope.contains(&false));
        for pos in [0usize, 5, 15, 16, 40] {
            let b = m.decode_read_bytes(pos, DType::BF16);
            assert_eq!(b.weights, stored, "pos {pos}");
            // A chunked layer attends to its chunk's keys so far, a global one to all.
            let keys: usize = rope
                .iter()
                .map(|&r| if r { pos % 16 + 1 } else { pos + 1 })
                .sum();
            assert_eq!(b.kv, (keys * 2 * cfg.kv_heads * hd * 2) as u64, "pos {pos}");
            let q8 = m.decode_read_bytes(pos, DType::Q8_0);
            assert_eq!(q8.kv, (keys * 2 * cfg.kv_heads * hd / 32 * 36) as u64);
        }
        // The fast path streams its block-quantised copies: about 1.06 bytes a weight, not 4.
        m.enable_quant_decode().expect("quant");
        let q = m.decode_read_bytes(0, DType::BF16).weights;
        assert!(q * 3 < stored && q * 4 > stored, "{q} of {stored}");
    }

    #[test]
    fn top_k_is_torch_topk_order_ties_to_the_lower_index() {
        let mut out = vec![];
        top_k_of(&[0.5, 2.0, -1.0, 2.0, 1.0], 3, &mut out);
        assert_eq!(out, [1, 3, 4]);
        top_k_of(&[0.5], 1, &mut out);
        assert_eq!(out, [0]);
        // k beyond the row: every index once, never a repeat.
        top_k_of(&[1.0, 3.0], 4, &mut out);
        assert_eq!(out, [1, 0]);
        // A NaN logit is chosen (and then poisons its token's output), not skipped silently.
        top_k_of(&[1.0, f32::NAN, 3.0], 1, &mut out);
        assert_eq!(out, [1]);
        // Against a full sort on random rows of every Llama 4 width.
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        for e in [1, 3, 16, 128] {
            let row: Vec<f32> = (0..e).map(|_| rng.random_range(-4i32..4) as f32).collect();
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
            for k in [1, 2, e.min(4)] {
                top_k_of(&row, k, &mut out);
                assert_eq!(out, idx[..k.min(e)], "e {e} k {k} row {row:?}");
            }
        }
    }

    /// Runs 5 prompt tokens then one decode step through a model whose tensor `name` has
    /// element `at` set to `value`; the error of the first failing pass.
    fn run_with(cfg: ModelConfig, name: &str, at: usize, value: f32, quant: bool) -> String {
        let mut map = random_tensors(&cfg, 7);
        let t = map.get_mut(name).expect(name);
        let mut vals = t.to_f32().unwrap();
        vals[at] = value;
        *t = Tensor::new(t.shape.clone(), vals);
        let mut model = Model::new(cfg, Weights::from_map(map)).unwrap();
        if quant {
            model.enable_quant_decode().unwrap();
        }
        let opts = KvOptions {
            dtype: if quant { DType::BF16 } else { DType::F32 },
            ..KvOptions::default()
        };
        let store = model.kv_store(&opts).unwrap();
        let seq = store.create_seq();
        let step =
            |toks: &[u32], pos0| model.forward(toks, pos0, &store, seq, Logits::All, None, 0);
        match step(&[1, 2, 3, 4, 5], 0).and_then(|_| step(&[6], 5)) {
            Ok(_) => "no error".into(),
            Err(e) => e.to_string(),
        }
    }

    /// The tiny Llama 4 of `tests/reference/llama4_tiny_a` (4 experts top-1 in every layer,
    /// chunked and NoPE attention), its weights mapped from the safetensors file.
    fn mapped_llama4() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/reference/llama4_tiny_a");
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let cfg = ModelConfig::from_hf_json(&cfg).unwrap();
        Model::new(cfg, Weights::from_safetensors_dir(&dir).unwrap()).unwrap()
    }

    /// The mapped reference Llama 4, or for the quantised copies (whose blocks need widths
    /// of whole 32s, which the reference's 48 is not) a random one of the same layer and
    /// expert counts, held in memory.
    /// The test Llama 4s: random with transformers' fused experts (widths whole blocks of
    /// 32), the same with GGUF-like per-expert tensors, or the committed mapped one (hidden
    /// 48: its fast path keeps bf16 copies where rows are not whole blocks).
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        Fused,
        Split,
        Mapped,
    }

    fn llama4_for(layout: Layout) -> Model {
        match layout {
            Layout::Fused => random_model(crate::random::tiny_llama4_config(), 11).unwrap(),
            Layout::Split => {
                let cfg = crate::random::tiny_llama4_config();
                let map = random_tensors(&cfg, 11);
                Model::new(cfg, Weights::from_map(split_experts(map))).unwrap()
            }
            Layout::Mapped => mapped_llama4(),
        }
    }

    /// The fused experts of transformers' layout as GGUF-like per-expert `[out, in]`
    /// tensors.
    fn split_experts(mut map: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
        let cfg = crate::random::tiny_llama4_config();
        for l in 0..cfg.layers {
            let name = |role| {
                crate::arch::tensor(&cfg, Some(l), role)
                    .unwrap()
                    .hf
                    .unwrap()
            };
            let (gu_name, dn_name) = (name(Role::ExpertsGateUp), name(Role::ExpertsDown));
            let (gu, dn) = (map.remove(&gu_name).unwrap(), map.remove(&dn_name).unwrap());
            let (e, h, i) = (gu.shape[0], gu.shape[1], gu.shape[2] / 2);
            let mut w = Weights::from_map(BTreeMap::from([(gu_name, gu), (dn_name, dn)]));
            for (x, ex) in w.take_experts(l, e, h, i).unwrap().into_iter().enumerate() {
                let ExpertWeights::Fused(ex) = ex else {
                    panic!("fused")
                };
                for (t, proj) in
                    ex.split()
                        .unwrap()
                        .into_iter()
                        .zip(["gate_proj", "up_proj", "down_proj"])
                {
                    map.insert(crate::weights::expert_name(l, x, proj), t);
                }
            }
        }
        map
    }

    /// Prompt logits then `steps` greedy decode steps' logits, all concatenated.
    fn run_greedy(model: &Model, prompt: &[u32], steps: usize, kv: DType) -> Vec<f32> {
        let opts = KvOptions {
            dtype: kv,
            ..KvOptions::default()
        };
        let store = model.kv_store(&opts).unwrap();
        let seq = store.create_seq();
        let mut all = model
            .forward(prompt, 0, &store, seq, Logits::All, None, 0)
            .unwrap();
        let vocab = model.cfg.vocab;
        for i in 0..steps {
            let last = &all[all.len() - vocab..];
            let next = (0..vocab)
                .max_by(|a, b| last[*a].total_cmp(&last[*b]))
                .unwrap() as u32;
            let l = model
                .forward(
                    &[next],
                    prompt.len() + i,
                    &store,
                    seq,
                    Logits::Last,
                    None,
                    0,
                )
                .unwrap();
            all.extend(l);
        }
        all
    }

    /// Under an expert budget the routed experts are read from the mapped file when used and
    /// dropped when the budget needs room: the logits are the same to the bit as with every
    /// expert resident, on each numeric path, and the statistics add up.
    #[test]
    fn an_expert_budget_changes_no_logit_and_keeps_its_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let prompt: Vec<u32> = (0..37).map(|_| rng.random_range(3..300)).collect();
        // transformers' fused experts (split when used) and GGUF-like per-expert tensors.
        for (copies, kv, layout) in [
            (Copies::Quant, DType::BF16, Layout::Fused),
            (Copies::Quant, DType::BF16, Layout::Split),
            (Copies::Quant, DType::BF16, Layout::Mapped),
            (Copies::F32, DType::F32, Layout::Mapped),
            (Copies::Bf16Decode, DType::F32, Layout::Mapped),
            (Copies::Stored, DType::F32, Layout::Mapped),
        ] {
            let mut all = llama4_for(layout);
            all.prepare(copies).unwrap();
            let want = run_greedy(&all, &prompt, 6, kv);
            assert!(all.expert_stats().is_none());
            // One expert's prepared bytes: a budget of two keeps two of a layer's four.
            let one = {
                let Ffn::Moe(e) = &all.layers[0].ffn else {
                    panic!("layer 0 is MoE")
                };
                e.routed[0].prepared_copy(copies).unwrap().resident_bytes
            };
            for budget in [0, 2 * one, 64 * one] {
                let mut m = llama4_for(layout);
                m.set_expert_budget(budget).unwrap();
                m.prepare(copies).unwrap();
                let got = run_greedy(&m, &prompt, 6, kv);
                assert!(
                    got == want,
                    "{copies:?} {layout:?} budget {budget}: logits differ"
                );
                let s = m.expert_stats().unwrap();
                let uses = s.hits + s.misses;
                // 4 layers x (the prompt's experts + one a decode step).
                assert!(uses >= 4 * 7, "{copies:?} {layout:?} {s:?}");
                assert!(
                    s.resident_peak_bytes <= budget.max(one),
                    "{copies:?} {layout:?} {s:?}"
                );
                assert!(s.bytes_read > 0 && s.read_ahead_used <= s.read_ahead);
                match budget {
                    0 => assert_eq!(s.hits, 0, "nothing kept: {s:?}"),
                    // Room for every expert: each is read once, the rest are hits.
                    b if b == 64 * one => assert!(s.misses <= 16 && s.hits > 0, "{s:?}"),
                    _ => assert!(s.misses > 0, "{s:?}"),
                }
            }
        }
        // A dense model has no experts to budget; a budget set after the copies is refused.
        let mut dense = random_model(tiny_llama(), 1).unwrap();
        let e = dense.set_expert_budget(1 << 20).unwrap_err().to_string();
        assert!(e.contains("routed experts"), "{e}");
        let mut m = mapped_llama4();
        m.enable_bf16_decode().unwrap();
        assert!(m.set_expert_budget(1 << 20).is_err());
    }

    /// The generic step on the CPU backend is `forward` itself; on a GPU, the same model
    /// within bf16's bound of it (skipped without one).
    #[test]
    fn every_backend_runs_the_whole_model_as_the_cpu_forward() {
        use crate::backend::{Cpu, Cuda};
        let models = [
            ("llama", random_model(tiny_llama(), 3).unwrap()),
            ("llama4 fused", llama4_for(Layout::Fused)),
            ("llama4 split", llama4_for(Layout::Split)),
            ("llama4 mapped", llama4_for(Layout::Mapped)),
        ];
        let prompt = [1u32, 5, 9, 2, 7, 3, 8];
        let kv = KvOptions::default();
        for (name, m) in &models {
            let want = run_greedy(m, &prompt, 3, DType::F32);
            let got = m.run_on(&Cpu, &prompt, 3, &kv).unwrap();
            assert_eq!(got, want, "{name}: the CPU backend's step is forward");
        }
        let gpu = match Cuda::new(0, None) {
            Ok(g) => g,
            Err(e) => {
                longctx_kernels::testing::skipped(
                    "every_backend_runs_the_whole_model_as_the_cpu_forward (cuda)",
                    &e.to_string(),
                );
                return;
            }
        };
        for (name, m) in &models {
            let want = m.run_on(&Cpu, &prompt, 0, &kv).unwrap();
            let got = m.run_on(&gpu, &prompt, 0, &kv).unwrap();
            let err = crate::backend::check::rel_error(&got, &want);
            assert!(err < 3e-2, "{name}: cuda logits {err:.2e} from the CPU's");
        }
    }

    #[test]
    fn a_nan_weight_stops_the_pass_at_the_layer_it_enters() {
        let d = tiny_llama();
        let e = run_with(
            d.clone(),
            "model.layers.1.mlp.down_proj.weight",
            5,
            f32::NAN,
            false,
        );
        assert!(e.contains("layer 1's feed-forward at position 0"), "{e}");
        // A weight every token reads: the first position fails.
        let e = run_with(
            d.clone(),
            "model.layers.0.self_attn.v_proj.weight",
            0,
            f32::NAN,
            false,
        );
        assert!(e.contains("layer 0's attention at position 0"), "{e}");
        // An infinite weight, not only NaN.
        let e = run_with(
            d.clone(),
            "model.layers.2.self_attn.o_proj.weight",
            3,
            f32::INFINITY,
            false,
        );
        assert!(e.contains("layer 2's attention"), "{e}");
        // A token embedding row: only the position holding that token fails.
        let e = run_with(
            d.clone(),
            "model.embed_tokens.weight",
            3 * 64 + 1,
            f32::NAN,
            false,
        );
        assert!(e.contains("the token embedding at position 2"), "{e}");
        let e = run_with(d.clone(), "lm_head.weight", 9, f32::INFINITY, false);
        assert!(e.contains("the final norm or lm_head"), "{e}");
        // The fast path (8-bit weight blocks, bf16 KV) is checked the same way.
        let e = run_with(
            d.clone(),
            "model.layers.2.mlp.up_proj.weight",
            11,
            f32::NAN,
            true,
        );
        assert!(e.contains("layer 2's feed-forward"), "{e}");
        // Llama 4: the shared expert every token passes through.
        let name = "model.layers.3.feed_forward.shared_expert.down_proj.weight";
        let e = run_with(tiny_llama4_config(), name, 2, f32::NAN, false);
        assert!(e.contains("layer 3's feed-forward"), "{e}");
        // A healthy model passes.
        let e = run_with(d, "model.layers.1.mlp.down_proj.weight", 5, 0.01, true);
        assert_eq!(e, "no error");
    }
}
