//! The tokenizer (Hugging Face `tokenizers`), from a `tokenizer.json` or rebuilt from GGUF
//! metadata exactly as transformers rebuilds it when it loads a GGUF file, and chat templates
//! rendered with minijinja.

use crate::gguf::{Gguf, Metadata, Value};
use crate::{EngineError, Result};
use std::collections::HashMap;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

/// Llama 3's split (`tokenizer.ggml.pre` = `llama-bpe` and kin): numbers in runs of 1-3 digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's: combining marks count as letters.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's tekken: words split at case changes, single digits.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's (Llama 4's `llama4`): case-aware words with their contractions, 1-3 digits.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split a byte-level vocabulary was learned with, by the GGUF's `tokenizer.ggml.pre`, as
/// transformers (5.24) maps it; `None`: GPT-2's own split (SmolLM2's `smollm`, and any name
/// not listed, as transformers does).
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

fn tk_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// GPT-2's byte-to-character map (printable stand-ins for every byte).
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap()))
        .collect()
}

impl Tokenizer {
    /// From a `tokenizer.json` (and, when present beside it, `tokenizer_config.json` for the
    /// chat template and the BOS rule).
    pub fn from_dir(dir: &std::path::Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::Tokenizer(format!(
                "{} is missing: a Hugging Face model directory needs its tokenizer.json; copy \
                 it from the model's repository into {} (or give --model a .gguf file, which \
                 carries its tokenizer)",
                path.display(),
                dir.display()
            )));
        }
        let inner = HfTokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let tok = |k: &str| -> Option<(u32, String)> {
            let s = match cfg.get(k)? {
                serde_json::Value::String(s) => s.clone(),
                v => v.get("content")?.as_str()?.to_string(),
            };
            Some((inner.token_to_id(&s)?, s))
        };
        Ok(Tokenizer {
            bos: tok("bos_token"),
            eos: tok("eos_token"),
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: cfg
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(String::from),
            inner,
        })
    }

    /// From GGUF metadata, as transformers rebuilds it: byte-level BPE
    /// (`tokenizer.ggml.model = gpt2`, see `byte_level_bpe`) or SentencePiece pieces
    /// (`llama`, see `sentencepiece_bpe`); any other kind is a clear error.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        Tokenizer::from_gguf_metadata(&g.metadata)
    }

    /// [`Tokenizer::from_gguf`] on the metadata alone (what it reads; also what the fuzz
    /// target feeds).
    pub fn from_gguf_metadata(g: &Metadata) -> Result<Tokenizer> {
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap_or("");
        let tokens = gguf_strings(g, "tokenizer.ggml.tokens")?;
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let (inner, add_bos_default) = match model {
            "gpt2" => (byte_level_bpe(g, &tokens, &types)?, false),
            // llama.cpp (and transformers after it) add BOS to a SentencePiece vocabulary
            // that does not say otherwise.
            "llama" => (sentencepiece_bpe(g, &tokens, &types)?, true),
            _ => {
                return Err(EngineError::Unsupported(format!(
                    "GGUF tokenizer model {model:?}: this build rebuilds byte-level BPE (gpt2) and \
                     SentencePiece BPE (llama) tokenizers; use a Hugging Face directory with \
                     tokenizer.json"
                )))
            }
        };
        let id = |k: &str| -> Option<(u32, String)> {
            let i = g.get(k)?.as_u64()? as usize;
            Some((i as u32, tokens.get(i)?.clone()))
        };
        Ok(Tokenizer {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(add_bos_default),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(String::from),
            inner,
        })
    }
    /// Token ids of `text` as transformers' `tokenizer(text)` gives them (special tokens in the
    /// text are matched whole; BOS prepended when the tokenizer says so).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tk_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            if let Some((b, _)) = &self.bos {
                ids.push(*b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tk_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders a chat (`(role, content)` pairs) with the model's template, ending with the
    /// assistant's turn opened.
    pub fn render_chat(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| EngineError::Tokenizer("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template("chat", template).map_err(tk_err)?;
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|(r, c)| minijinja::context! { role => *r, content => *c })
            .collect();
        let tpl = env.get_template("chat").map_err(tk_err)?;
        tpl.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            eos_token => self.eos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
        })
        .map_err(tk_err)
    }
}

/// The string array `k` of a GGUF's metadata.
fn gguf_strings(g: &Metadata, k: &str) -> Result<Vec<String>> {
    g.get(k)
        .and_then(Value::as_array)
        .ok_or_else(|| EngineError::Tokenizer(format!("GGUF lacks {k}")))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(String::from)
                .ok_or_else(|| EngineError::Tokenizer(format!("{k} holds a non-string")))
        })
        .collect()
}

/// Byte-level BPE (`tokenizer.ggml.model = gpt2`) as transformers rebuilds it: the file's
/// merges, its control tokens special and user-defined ones plain added tokens, the split its
/// `tokenizer.ggml.pre` names (see [`split_regex`]) and GPT-2's decoder.
fn byte_level_bpe(g: &Metadata, tokens: &[String], types: &[u64]) -> Result<HfTokenizer> {
    let merges = gguf_strings(g, "tokenizer.ggml.merges")?;
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.values().copied().collect();
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // A token outside the byte alphabet is spelled byte by byte (as transformers does).
        let key = if t.chars().all(|c| alphabet.contains(&c)) {
            t.clone()
        } else {
            t.bytes().map(|b| spelling[&b]).collect()
        };
        vocab.insert(key, i as u32);
    }
    let mut inner = HfTokenizer::new(bpe(vocab, parse_merges(&merges)?, false)?);
    let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str);
    match pre.and_then(split_regex) {
        Some(re) => {
            // The family's split, then bytes to the BPE alphabet with no split of its own.
            let split = Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tk_err)?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])));
        }
        None => {
            inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
    }
    inner.with_decoder(Some(ByteLevel::default()));
    // A token marked control but spelled outside the byte alphabet is a llama.cpp mislabel
    // (transformers skips it too: it would grow the vocabulary past the model's).
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    inner.add_special_tokens(&added(tokens, types, CONTROL, true, spelled));
    inner.add_tokens(&added(tokens, types, USER_DEFINED, false, spelled));
    Ok(inner)
}

/// SentencePiece pieces (`tokenizer.ggml.model = llama`: Llama 1/2, Mistral) as transformers
/// rebuilds them: a BPE with byte fallback (`<0x0A>` pieces) whose merges come from the file,
/// or, as such files have none, from the pieces' scores ([`merges_from_scores`]); Metaspace
/// with the prefix space on the first word only; the control and unknown tokens special, the
/// user-defined ones whole.
fn sentencepiece_bpe(g: &Metadata, tokens: &[String], types: &[u64]) -> Result<HfTokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let merges = if g.get("tokenizer.ggml.merges").is_some() {
        parse_merges(&gguf_strings(g, "tokenizer.ggml.merges")?)?
    } else {
        let scores: Vec<f64> = g
            .get("tokenizer.ggml.scores")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                EngineError::Tokenizer("GGUF has neither tokenizer.ggml.merges nor scores".into())
            })?
            .iter()
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| EngineError::Tokenizer("a piece score is not a number".into()))
            })
            .collect::<Result<_>>()?;
        if scores.len() != tokens.len() {
            return Err(EngineError::Tokenizer(format!(
                "{} piece scores for {} pieces",
                scores.len(),
                tokens.len()
            )));
        }
        merges_from_scores(tokens, &vocab, &scores)
    };
    let mut inner = HfTokenizer::new(bpe(vocab, merges, true)?);
    inner.with_pre_tokenizer(Some(Metaspace::new(
        '\u{2581}',
        PrependScheme::First,
        false,
    )));
    inner.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(tk_err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ])));
    let unk = g
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .map(|i| i as usize);
    let mut special = added(tokens, types, CONTROL, true, |_| true);
    special.extend(
        unk.and_then(|i| tokens.get(i))
            .map(|t| AddedToken::from(t.clone(), true).normalized(false)),
    );
    inner.add_special_tokens(&special);
    inner.add_tokens(&added(tokens, types, USER_DEFINED, false, |_| true));
    Ok(inner)
}

/// A BPE model; `byte_fallback`: SentencePiece's, unknown bytes as `<0xNN>` pieces and
/// consecutive unknowns fused.
fn bpe(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    byte_fallback: bool,
) -> Result<BPE> {
    BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .byte_fallback(byte_fallback)
        .fuse_unk(byte_fallback)
        .build()
        .map_err(tk_err)
}

fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| EngineError::Tokenizer(format!("merge {m:?} has no space")))
        })
        .collect()
}

/// Merges implied by SentencePiece pieces and their scores, as transformers'
/// `generate_merges` derives them: every split of a piece into two pieces of the vocabulary,
/// ranked by the whole piece's score (best first), then by the lengths of the two parts
/// (longer first), ties in vocabulary order.
fn merges_from_scores(
    tokens: &[String],
    vocab: &HashMap<String, u32>,
    scores: &[f64],
) -> Vec<(String, String)> {
    // dict(zip(tokens, scores)): a repeated piece keeps its first place and its last score.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        if score.insert(t.as_str(), *s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    // A crafted file's megabyte-long "piece" would cost its length squared to split; real
    // pieces are short (SentencePiece's trainer caps them at 16 characters by default).
    for piece in order.into_iter().filter(|p| p.len() <= MAX_SPLIT_PIECE) {
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
            .map(|(l, r)| (l, r, score[piece]))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[*l], vocab[*r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Descending and stable, as Python's sorted(..., reverse=True).
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// Pieces longer than this (bytes) are not split into merges.
const MAX_SPLIT_PIECE: usize = 1024;

/// GGUF token types (llama.cpp's `llama_token_type`) that become added tokens.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The tokens of GGUF type `kind` that `keep` accepts, as added tokens matched whole in the
/// text (`special`: control tokens, skipped when decoding; otherwise user-defined ones like
/// `<think>`).
fn added(
    tokens: &[String],
    types: &[u64],
    kind: u64,
    special: bool,
    keep: impl Fn(&str) -> bool,
) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(t, ty)| **ty == kind && keep(t))
        .map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false))
        .collect()
}

#[cfg(test)]
mod tests {
    /// A model directory without its tokenizer names the file it lacks (once only "No such
    /// file or directory").
    #[test]
    fn a_missing_tokenizer_json_is_named() {
        let dir = std::env::temp_dir().join(format!("longctx-notok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = super::Tokenizer::from_dir(&dir).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json is missing"), "{e}");
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let e = super::Tokenizer::from_dir(&dir).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
