//! Inverse-frequency schedules, computed in f64 by the formulas of transformers'
//! `modeling_rope_utils.py` (which computes them in f32: the goldens agree to ~1e-7).

use crate::RopeError;
use std::f64::consts::PI;

/// A frequency scaling and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    /// `inv_i = theta^(-2i/d)`.
    Default,
    /// Positions interpolated: `inv_i / factor`.
    Linear { factor: f64 },
    /// Static NTK-aware: `theta' = theta * factor^(d / (d - 2))`.
    Ntk { factor: f64 },
    /// Dynamic NTK: the NTK base recomputed from the current length `L`:
    /// `theta' = theta * (factor * L / max_pos - (factor - 1))^(d / (d - 2))`,
    /// `L = max(seq_len, max_pos)`, with `max_pos` the config's `max_position_embeddings`.
    Dynamic { factor: f64, max_pos: usize },
    /// YaRN (Peng et al., 2023): interpolation and extrapolation blended per dimension by
    /// a linear ramp between the correction dims of `beta_fast` and `beta_slow`; cos/sin
    /// multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_pos: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    /// Llama 3.1 (and Llama 4 Scout, where low == high and the smooth band is empty).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_pos: usize,
    },
    /// Per-pair divisors of the base frequencies, `inv_i / f_i`: llama.cpp's `rope_freqs`
    /// tensor, which `convert_hf_to_gguf.py` writes in place of llama3's parameters (one
    /// factor per rotated pair).
    Factors(Vec<f64>),
}

/// A model's RoPE: base, rotated dimensions and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub head_dim: usize,
    /// Dimensions rotated (`head_dim * partial_rotary_factor`); the rest pass through.
    pub rotary_dim: usize,
    pub scaling: Scaling,
}

impl Rope {
    pub fn new(theta: f64, head_dim: usize, scaling: Scaling) -> Result<Rope, RopeError> {
        let r = Rope {
            theta,
            head_dim,
            rotary_dim: head_dim,
            scaling,
        };
        r.validate()?;
        Ok(r)
    }

    /// Rotates only the first `rotary_dim` dimensions of each head (partial rotary), checked
    /// as [`Rope::new`] checks a head dim: even, at least 4, at most the head dim.
    pub fn with_rotary_dim(mut self, rotary_dim: usize) -> Result<Rope, RopeError> {
        self.rotary_dim = rotary_dim;
        self.validate()?;
        Ok(self)
    }

    pub(crate) fn validate(&self) -> Result<(), RopeError> {
        let bad = |m: String| Err(RopeError::Invalid(m));
        if !(self.theta > 1.0 && self.theta.is_finite()) {
            return bad(format!(
                "rope_theta {} must be a finite number > 1",
                self.theta
            ));
        }
        if self.rotary_dim < 4
            || !self.rotary_dim.is_multiple_of(2)
            || self.rotary_dim > self.head_dim
        {
            return bad(format!(
                "rotary dim {} must be even, >= 4 and <= head_dim {}",
                self.rotary_dim, self.head_dim
            ));
        }
        let factor = match &self.scaling {
            Scaling::Default => 1.0,
            Scaling::Linear { factor } | Scaling::Ntk { factor } => *factor,
            Scaling::Dynamic { factor, max_pos } => {
                if *max_pos == 0 {
                    return bad("dynamic NTK needs max_position_embeddings > 0".into());
                }
                *factor
            }
            Scaling::Yarn {
                factor,
                original_max_pos,
                ..
            } => {
                if *original_max_pos == 0 {
                    return bad("YaRN needs original_max_position_embeddings > 0".into());
                }
                *factor
            }
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_pos,
            } => {
                if *original_max_pos == 0 || *low_freq_factor <= 0.0 || *high_freq_factor <= 0.0 {
                    return bad(
                        "llama3 needs positive frequency factors and original length".into(),
                    );
                }
                if high_freq_factor < low_freq_factor {
                    return bad(format!(
                        "llama3 high_freq_factor {high_freq_factor} < low_freq_factor {low_freq_factor}"
                    ));
                }
                *factor
            }
            Scaling::Factors(f) => {
                if f.len() != self.rotary_dim / 2 {
                    return bad(format!(
                        "{} RoPE frequency factors for {} rotated pairs",
                        f.len(),
                        self.rotary_dim / 2
                    ));
                }
                match f.iter().find(|x| !(**x > 0.0 && x.is_finite())) {
                    Some(x) => *x,
                    None => 1.0,
                }
            }
        };
        if !(factor > 0.0 && factor.is_finite()) {
            return bad(format!(
                "scaling factor {factor} must be a finite number > 0"
            ));
        }
        Ok(())
    }

    /// The base frequencies `theta^(-2i/dim)` for a base `theta`.
    fn base_inv_freq(theta: f64, dim: usize) -> Vec<f64> {
        (0..dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / dim as f64))
            .collect()
    }

    /// Inverse frequencies (`rotary_dim / 2` of them) for a sequence of `seq_len` positions;
    /// `seq_len` matters only to dynamic NTK.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f64> {
        let dim = self.rotary_dim;
        let exp = dim as f64 / (dim as f64 - 2.0);
        match self.scaling {
            Scaling::Default => Self::base_inv_freq(self.theta, dim),
            Scaling::Factors(ref f) => Self::base_inv_freq(self.theta, dim)
                .into_iter()
                .zip(f)
                .map(|(v, f)| v / f)
                .collect(),
            Scaling::Linear { factor } => Self::base_inv_freq(self.theta, dim)
                .into_iter()
                .map(|f| f / factor)
                .collect(),
            Scaling::Ntk { factor } => Self::base_inv_freq(self.theta * factor.powf(exp), dim),
            Scaling::Dynamic { factor, max_pos } => {
                let l = seq_len.max(max_pos) as f64;
                let base = self.theta * (factor * l / max_pos as f64 - (factor - 1.0)).powf(exp);
                Self::base_inv_freq(base, dim)
            }
            Scaling::Yarn {
                factor,
                original_max_pos,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let (d, base) = (dim as f64, self.theta);
                let correction_dim = |rot: f64| {
                    d * (original_max_pos as f64 / (rot * 2.0 * PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001; // as transformers: no division by zero in the ramp
                }
                Self::base_inv_freq(base, dim)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extra)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (extra / factor) * (1.0 - extrapolation) + extra * extrapolation
                    })
                    .collect()
            }
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_pos,
            } => {
                let orig = original_max_pos as f64;
                let (low_wl, high_wl) = (orig / low_freq_factor, orig / high_freq_factor);
                Self::base_inv_freq(self.theta, dim)
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else if high_freq_factor == low_freq_factor {
                            // Empty band (Scout): only wl == low_wl lands here; keep f, as
                            // the high-frequency side does.
                            f
                        } else {
                            let smooth = (orig / wl - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The factor cos and sin are multiplied by (YaRN's mscale; 1 for the others).
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            Scaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }
}

/// YaRN's default attention factor, `0.1 * mscale * ln(factor) + 1` (1 for factor <= 1).
pub(crate) fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// Dynamic NTK as transformers runs it: frequencies recomputed when the sequence grows past
/// the longest seen so far, and reset to the original ones when a sequence shorter than
/// `max_position_embeddings` follows a longer one.
#[derive(Clone, Debug)]
pub struct DynamicNtk {
    rope: Rope,
    cached_len: usize,
    original_len: usize,
    inv_freq: Vec<f64>,
}

impl DynamicNtk {
    pub fn new(rope: Rope) -> Result<DynamicNtk, RopeError> {
        let Scaling::Dynamic { max_pos, .. } = rope.scaling else {
            return Err(RopeError::Invalid(
                "DynamicNtk needs a dynamic scaling".into(),
            ));
        };
        let inv_freq = rope.inv_freq(max_pos);
        Ok(DynamicNtk {
            rope,
            cached_len: max_pos,
            original_len: max_pos,
            inv_freq,
        })
    }

    /// The frequencies for a forward pass whose largest position is `max_position`.
    pub fn update(&mut self, max_position: usize) -> &[f64] {
        let seq_len = max_position + 1;
        if seq_len > self.cached_len {
            self.inv_freq = self.rope.inv_freq(seq_len);
            self.cached_len = seq_len;
        }
        if seq_len < self.original_len && self.cached_len > self.original_len {
            self.inv_freq = self.rope.inv_freq(self.original_len);
            self.cached_len = self.original_len;
        }
        &self.inv_freq
    }
}
