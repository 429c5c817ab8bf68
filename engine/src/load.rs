//! Opening a model by path: a `.gguf` file, or a Hugging Face directory (`config.json`,
//! safetensors, `tokenizer.json`).

use crate::config::ModelConfig;
use crate::gguf::Gguf;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{EngineError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A model and its tokenizer.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Identifies the model's content (for KV snapshots): config, tensor table and the hash
    /// of every file it is read from.
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

/// Identifies what a model computes, for KV snapshots: the parsed config, the tensor table
/// (GGUF) and the full-content hash of every file the model is read from (weights, config,
/// tokenizer, chat template). Before, the file's size and first MiB were hashed, which for a
/// GGUF is metadata only: a file with other weights reused the first one's KV.
fn fingerprint(cfg: &ModelConfig, table: &str, files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("{cfg:?}").as_bytes());
    h.update(table.as_bytes());
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update(content_hash(f)?.to_le_bytes());
    }
    let d = h.finalize();
    Ok(d.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// XXH3-128 of a file's whole content, memoised in `$LONGCTX_HOME/hashes` under its device,
/// inode, size and modification time (hashing a 200 GB checkpoint takes a while; a changed
/// file has a new mtime). A cache that cannot be written only costs the hashing again.
pub fn content_hash(path: &Path) -> Result<u128> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| EngineError::io("reading", path, e))?;
    let key = format!(
        "{}-{}-{}-{}.{}",
        md.dev(),
        md.ino(),
        md.len(),
        md.mtime(),
        md.mtime_nsec()
    );
    let memo = crate::fetch::home().join("hashes").join(key);
    if let Some(h) = std::fs::read_to_string(&memo)
        .ok()
        .and_then(|s| u128::from_str_radix(s.trim(), 16).ok())
    {
        return Ok(h);
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    crate::fetch::for_each_chunk(path, |b| hasher.update(b))?;
    let h = hasher.digest128();
    if let Some(dir) = memo.parent() {
        longctx_kvstore::stale::remove_stale(dir, ".tmp-");
        let tmp = memo.with_extension(format!("tmp-{}", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, format!("{h:032x}")))
            .and_then(|_| std::fs::rename(&tmp, &memo));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(h)
}

/// The files of a Hugging Face directory a model is read from, sorted: weights, configs,
/// tokenizer and chat template.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|x| {
                    ["json", "safetensors", "jinja", "model", "txt"]
                        .iter()
                        .any(|e| x == *e)
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

pub fn load(path: &Path) -> Result<Loaded> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| EngineError::io("reading", &cfg_path, e))?;
        let cfg = ModelConfig::from_hf_json(&text)?;
        let weights = Weights::from_safetensors_dir(path)?;
        let tokenizer = Tokenizer::from_dir(path)?;
        let fingerprint = fingerprint(&cfg, "", &model_files(path)?)?;
        Ok(Loaded {
            model: Model::new(cfg, weights)?,
            tokenizer,
            fingerprint,
        })
    } else {
        let g = Gguf::open(path)?;
        let cfg = ModelConfig::from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let weights = Weights::from_gguf(&g)?;
        let table = format!("{:?}", g.tensors);
        let fingerprint = fingerprint(&cfg, &table, &[path.to_path_buf()])?;
        Ok(Loaded {
            model: Model::new(cfg, weights)?,
            tokenizer,
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two files of one size that differ only past their first MiB (a GGUF's metadata alone
    /// can be that long) hash differently; the memo follows a rewrite of the file.
    #[test]
    fn content_hash_sees_every_byte() {
        let dir = std::env::temp_dir().join(format!("longctx-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        let mut bytes = vec![1u8; 3 << 20];
        std::fs::write(&a, &bytes).unwrap();
        *bytes.last_mut().unwrap() = 2;
        std::fs::write(&b, &bytes).unwrap();
        let (ha, hb) = (content_hash(&a).unwrap(), content_hash(&b).unwrap());
        assert_ne!(ha, hb);
        assert_eq!(content_hash(&a).unwrap(), ha, "memoised");
        // Rewritten in place with the same size: a new mtime, a new hash.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&a, &bytes).unwrap();
        assert_eq!(content_hash(&a).unwrap(), hb);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
