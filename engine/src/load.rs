//! Opening a model by path: a `.gguf` file, or a Hugging Face directory (`config.json`,
//! safetensors, `tokenizer.json`).

use crate::config::ModelConfig;
use crate::gguf::Gguf;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{EngineError, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// A model and its tokenizer.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Identifies the weights (for KV snapshots): a hash of the file's size and first MiB.
    pub fingerprint: String,
}

impl Loaded {
    /// Tokens that end an answer: the config's EOS ids and the tokenizer's.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stop = self.model.cfg.eos.clone();
        stop.extend(self.tokenizer.eos.as_ref().map(|e| e.0));
        stop.sort_unstable();
        stop.dedup();
        stop
    }
}

fn fingerprint(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| EngineError::io("opening", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| EngineError::io("reading", path, e))?
        .len();
    let mut head = vec![0u8; (1 << 20).min(len as usize)];
    f.read_exact(&mut head)
        .map_err(|e| EngineError::io("reading", path, e))?;
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    h.update(&head);
    let d = h.finalize();
    Ok(d.iter().take(12).map(|b| format!("{b:02x}")).collect())
}

pub fn load(path: &Path) -> Result<Loaded> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| EngineError::io("reading", &cfg_path, e))?;
        let cfg = ModelConfig::from_hf_json(&text)?;
        let weights = Weights::from_safetensors_dir(path)?;
        let tokenizer = Tokenizer::from_dir(path)?;
        let first = ["model.safetensors", "model.safetensors.index.json"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.exists())
            .unwrap_or(cfg_path);
        Ok(Loaded {
            model: Model::new(cfg, weights)?,
            tokenizer,
            fingerprint: fingerprint(&first)?,
        })
    } else {
        let g = Gguf::open(path)?;
        let cfg = ModelConfig::from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let weights = Weights::from_gguf(&g)?;
        Ok(Loaded {
            model: Model::new(cfg, weights)?,
            tokenizer,
            fingerprint: fingerprint(path)?,
        })
    }
}
