//! Codebase Q&A: a repository's files packed into the model's chat template within a token
//! budget, prefilled once, and the prefilled KV saved as a snapshot keyed by the model and the
//! packed files, so a second question on an unchanged repository skips the prefill.
//!
//! The prompt is cut in two: a prefix (system message and files, the same for every
//! question while the files fit) and a suffix (the question and the template's tail). Only
//! the prefix's KV is snapshotted.

use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A file the walk kept.
#[derive(Clone, Debug)]
pub struct RepoFile {
    /// Path relative to the repository root, with `/` separators.
    pub path: String,
    pub text: String,
}

/// Why a file was not read.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Bytes read from a repository in all, whatever the files claim: past it the remaining
/// files are skipped (a repository of `/` once read 8.6 GB in 45 s).
pub const MAX_TOTAL_BYTES: u64 = 512 << 20;

/// Pseudo-filesystems whose files are not text and may report size 0 yet never end.
const PSEUDO: [&str; 3] = ["/proc", "/sys", "/dev"];

fn is_pseudo(p: &Path) -> bool {
    PSEUDO.iter().any(|d| p.starts_with(d))
}

/// Walks `root` honouring .gitignore (and .ignore, hidden files skipped), keeping UTF-8 text
/// files up to `max_bytes` (read at most that far, whatever size a file reports), at most
/// [`MAX_TOTAL_BYTES`] in all, never crossing into another filesystem or reading /proc, /sys
/// or /dev; `include`/`exclude` are globs (gitignore syntax) over relative paths.
pub fn collect_files(
    root: &Path,
    include: &[String],
    exclude: &[String],
    max_bytes: u64,
) -> Result<(Vec<RepoFile>, Vec<Skipped>)> {
    let meta = std::fs::metadata(root).map_err(|e| EngineError::io("reading", root, e))?;
    let canonical = root
        .canonicalize()
        .map_err(|e| EngineError::io("reading", root, e))?;
    if is_pseudo(&canonical) {
        return Err(EngineError::Input(format!(
            "{} is a pseudo-filesystem (/proc, /sys, /dev), not a repository",
            root.display()
        )));
    }
    if !meta.is_dir() {
        return Err(EngineError::Input(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut ov = ignore::overrides::OverrideBuilder::new(root);
    for g in include {
        ov.add(g)
            .map_err(|e| EngineError::Input(format!("--include {g}: {e}")))?;
    }
    for g in exclude {
        ov.add(&format!("!{g}"))
            .map_err(|e| EngineError::Input(format!("--exclude {g}: {e}")))?;
    }
    let ov = ov
        .build()
        .map_err(|e| EngineError::Input(format!("globs: {e}")))?;
    let walk = ignore::WalkBuilder::new(root)
        .overrides(ov)
        .require_git(false)
        .same_file_system(true)
        .sort_by_file_path(|a, b| a.cmp(b))
        .build();
    let (mut files, mut skipped) = (vec![], vec![]);
    let mut total = 0u64;
    for entry in walk {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                skipped.push(Skipped {
                    path: String::new(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .replace('\\', "/");
        let skip = |reason: String| Skipped {
            path: rel.clone(),
            reason,
        };
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        if size > max_bytes {
            skipped.push(skip(format!(
                "{size} bytes, over the {max_bytes}-byte limit"
            )));
            continue;
        }
        // A symlink or bind mount can still lead into a pseudo-filesystem.
        if entry.path().canonicalize().is_ok_and(|c| is_pseudo(&c)) {
            skipped.push(skip("a pseudo-filesystem file".into()));
            continue;
        }
        let room = MAX_TOTAL_BYTES.saturating_sub(total);
        if room == 0 {
            skipped.push(skip(format!(
                "past the {MAX_TOTAL_BYTES}-byte total read limit"
            )));
            continue;
        }
        // Read at most one byte past the limit: the reported size can lie (0 for files
        // that never end) and a file can grow while read.
        let limit = max_bytes.min(room);
        let mut bytes = Vec::new();
        let read = std::fs::File::open(entry.path()).and_then(|f| {
            std::io::Read::read_to_end(&mut std::io::Read::take(f, limit + 1), &mut bytes)
        });
        if let Err(e) = read {
            skipped.push(skip(format!("unreadable: {e}")));
            continue;
        }
        total += bytes.len() as u64;
        if bytes.len() as u64 > limit {
            skipped.push(skip(format!("over the {limit}-byte limit when read")));
            continue;
        }
        if bytes.iter().take(8192).any(|b| *b == 0) {
            skipped.push(skip("binary".into()));
            continue;
        }
        match String::from_utf8(bytes) {
            Ok(text) if !text.trim().is_empty() => files.push(RepoFile { path: rel, text }),
            Ok(_) => skipped.push(skip("empty".into())),
            Err(_) => skipped.push(skip("not UTF-8 text".into())),
        }
    }
    Ok((files, skipped))
}

/// A file as packed into a prompt: its path, a hash of its text, and the tokens of its
/// block (counted alone; in the prompt a boundary may merge differently).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackedFile {
    pub path: String,
    pub hash: String,
    pub tokens: usize,
}

/// What a snapshot of `ask` holds, saved beside it as [`INDEX_FILE`]: the fingerprint of the
/// model and KV layout, the files in prompt order, and the prefix's tokens, so a later
/// question finds the longest cached prefix of its own prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackIndex {
    pub fingerprint: String,
    pub files: Vec<PackedFile>,
    pub tokens: Vec<u32>,
}

pub const INDEX_FILE: &str = "ask.json";

fn text_hash(text: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// A packed prompt.
#[derive(Clone, Debug)]
pub struct Packed {
    /// System message and files: the part whose KV is snapshotted.
    pub prefix: Vec<u32>,
    /// The question and the template's tail.
    pub suffix: Vec<u32>,
    /// The files in prompt order.
    pub included: Vec<PackedFile>,
    /// Files that did not fit or share no word with the question, most relevant first.
    pub left_out: Vec<String>,
    /// Every file fits: the prefix is the same for every question.
    pub whole_repository: bool,
    /// Leading files taken from a cached prompt (0: a fresh packing).
    pub kept_from_cache: usize,
}

const SYSTEM: &str = "You answer questions about a software repository. Its files follow, \
each under a header with its path. Answer from the files; name the files you rely on.";
const MARK: &str = "\u{1}QUESTION\u{1}";

/// What prefilling a token costs against relevance when a cached prompt could be reused:
/// 1000 tokens weigh as much as this fraction of the best file's worth (`worth`). At
/// 0.1, the best file is worth recomputing 10K tokens, a file half as relevant 2.5K.
pub const PREFILL_COST_PER_1K: f64 = 0.1;

/// Files less relevant than this fraction of the best one are left out even where they fit:
/// they lengthen the prefill and distract a small model.
pub const MIN_RELEVANCE: f64 = 0.1;

fn file_block(f: &RepoFile) -> String {
    format!("### {}\n```\n{}\n```\n\n", f.path, f.text.trim_end())
}

/// The prompt around `files`, cut at the question: (prefix, question and the rest). `system`
/// (`ask --system`) follows ask's own system message, which says how the files are laid out.
fn render(
    tok: &Tokenizer,
    files: &[&RepoFile],
    question: &str,
    system: Option<&str>,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let system = match system {
        Some(s) => format!("{SYSTEM}\n\n{s}"),
        None => SYSTEM.to_string(),
    };
    let mut body = String::from("Repository files:\n\n");
    for f in files {
        body.push_str(&file_block(f));
    }
    body.push_str("Question: ");
    body.push_str(MARK);
    let text = match tok.chat_template {
        Some(_) => tok.render_chat(&[("system", &system), ("user", &body)])?,
        None => format!("{system}\n\n{body}\n\nAnswer:"),
    };
    let (pre, post) = text
        .split_once(MARK)
        .ok_or_else(|| EngineError::Tokenizer("the chat template dropped the question".into()))?;
    let prefix = tok.encode(pre)?;
    let mut suffix_tok = tok.encode(&format!("{question}{post}"))?;
    // The tokenizer adds BOS to each encode when it is configured to: only the prefix keeps it.
    if tok.add_bos && suffix_tok.first() == tok.bos.as_ref().map(|b| &b.0) {
        suffix_tok.remove(0);
    }
    Ok((prefix, suffix_tok))
}

/// A candidate packing: files in prompt order, and how many lead from a cached prompt.
struct Plan {
    order: Vec<usize>,
    kept: usize,
    utility: f64,
}

/// What a file of relevance `r` (1 for the best) adds to a packing: its square, so one
/// file that answers the question outweighs several that share a word with it (as a sum of
/// relevance, a cached prompt holding the answer was once cut for four files of 0.3 each).
fn worth(r: f64) -> f64 {
    r * r
}

/// The best plan within `room` tokens: a fresh one (the most relevant files by `rel`, each
/// costing `cost(i)` tokens) or one starting with the first files of a prior packing
/// (`(file, tokens)` each, their KV cached) followed by the most relevant others; see [`pack`].
fn choose(
    rel: &[f64],
    cost: &mut impl FnMut(usize) -> Result<usize>,
    room: usize,
    priors: &[Vec<(usize, usize)>],
) -> Result<Plan> {
    let mut by_rank: Vec<usize> = (0..rel.len()).collect();
    by_rank.sort_by(|a, b| rel[*b].total_cmp(&rel[*a]).then(a.cmp(b)));
    // The most relevant files not in `taken` within `left` tokens, least relevant first, with
    // their relevance and tokens.
    let mut fill = |taken: &[usize], left: usize| -> Result<(Vec<usize>, f64, usize)> {
        let (mut out, mut value, mut used) = (vec![], 0.0, 0usize);
        for &i in &by_rank {
            if rel[i] < MIN_RELEVANCE {
                break;
            }
            if taken.contains(&i) {
                continue;
            }
            let c = cost(i)?;
            if c <= left - used {
                used += c;
                value += worth(rel[i]);
                out.push(i);
            }
        }
        out.reverse();
        Ok((out, value, used))
    };
    let price = |tokens: usize| PREFILL_COST_PER_1K * tokens as f64 / 1000.0;
    let (order, value, used) = fill(&[], room)?;
    let mut plan = Plan {
        order,
        kept: 0,
        utility: value - price(used),
    };
    for prior in priors {
        let mut kept: Vec<usize> = vec![];
        let (mut kept_tokens, mut kept_value) = (0usize, 0.0);
        for &(i, tokens) in prior {
            if kept_tokens + tokens > room {
                break;
            }
            kept.push(i);
            kept_tokens += tokens;
            kept_value += worth(rel[i]);
            let (more, value, used) = fill(&kept, room - kept_tokens)?;
            let utility = kept_value + value - price(used);
            // Ties go to the longer reuse.
            if utility >= plan.utility {
                plan = Plan {
                    order: kept.iter().chain(&more).copied().collect(),
                    kept: kept.len(),
                    utility,
                };
            }
        }
    }
    Ok(plan)
}

/// Packs files so that prompt plus `reserve` answer tokens fit `budget` tokens.
///
/// Where every file fits, all go in path order: the prefix is the same for every question and
/// its KV serves them all. Otherwise files are ranked by BM25 ([`super::rank`]) and the
/// packing weighs relevance against prefill: each prompt in `cached` (file lists of earlier
/// packings whose KV is on disk, in their order) may lend its first files, unchanged, as a
/// prefix whose KV is reused, followed by the most relevant files not among them; a fresh
/// packing takes the most relevant files. The plan with the most worth (the sum of its
/// files' squared relevance), less [`PREFILL_COST_PER_1K`] per thousand tokens to compute,
/// wins. New files go in increasing relevance, the most relevant last, nearest the question.
/// `system` is added to ask's own system message.
pub fn pack(
    tok: &Tokenizer,
    files: &[RepoFile],
    question: &str,
    budget: usize,
    reserve: usize,
    cached: &[Vec<PackedFile>],
    system: Option<&str>,
) -> Result<Packed> {
    let (empty_prefix, q_only) = render(tok, &[], question, system)?;
    let empty = empty_prefix.len() + q_only.len();
    // Saturating: a reserve near usize::MAX must not wrap past the check (then every sum
    // below is at most the budget).
    if empty.saturating_add(reserve) > budget {
        return Err(EngineError::PromptTooLong {
            prompt: empty,
            new: reserve,
            limit: budget,
        });
    }
    let room = budget - empty - reserve;
    let hashes: Vec<String> = files.iter().map(|f| text_hash(&f.text)).collect();
    let mut costs: Vec<Option<usize>> = vec![None; files.len()];
    // No tokenizer makes tokens of more than 64 bytes on average: a file longer than that
    // many bytes per token of room cannot fit, and is not tokenized (a 200 MB file once took
    // 13 GB to tokenize for an 8K-token budget).
    let mut cost = |i: usize| -> Result<usize> {
        if files[i].text.len() as u64 > 64 * room as u64 {
            return Ok(usize::MAX);
        }
        if costs[i].is_none() {
            costs[i] = Some(tok.encode(&file_block(&files[i]))?.len());
        }
        Ok(costs[i].expect("set above"))
    };

    // Code and prose rarely average more than 16 bytes a token: past that the repository
    // cannot fit, and is not tokenized whole.
    let total_bytes: u64 = files.iter().map(|f| f.text.len() as u64).sum();
    let mut whole = total_bytes <= 16 * room as u64;
    if whole {
        let mut sum = 0usize;
        for i in 0..files.len() {
            sum = sum.saturating_add(cost(i)?);
        }
        whole = sum <= room;
    }
    let scores = super::rank::Index::new(files).scores(question);
    let best = scores.iter().cloned().fold(0.0, f64::max);
    // A question sharing no word with any file takes files in path order.
    let rel: Vec<f64> = scores
        .iter()
        .map(|s| if best > 0.0 { s / best } else { MIN_RELEVANCE })
        .collect();

    let plan = if whole {
        Plan {
            order: (0..files.len()).collect(),
            kept: 0,
            utility: 0.0,
        }
    } else {
        let by_path: std::collections::HashMap<&str, usize> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.as_str(), i))
            .collect();
        // Each cached prompt's leading files still in the repository, unchanged.
        let priors: Vec<Vec<(usize, usize)>> = cached
            .iter()
            .map(|prior| {
                prior
                    .iter()
                    .map_while(|pf| {
                        let i = *by_path.get(pf.path.as_str())?;
                        (hashes[i] == pf.hash).then_some((i, pf.tokens))
                    })
                    .collect()
            })
            .collect();
        choose(&rel, &mut cost, room, &priors)?
    };
    let mut order = plan.order;
    let mut by_rank: Vec<usize> = (0..files.len()).filter(|i| !order.contains(i)).collect();
    by_rank.sort_by(|a, b| rel[*b].total_cmp(&rel[*a]).then(a.cmp(b)));
    let mut left_out: Vec<String> = by_rank.iter().map(|i| files[*i].path.clone()).collect();
    loop {
        let refs: Vec<&RepoFile> = order.iter().map(|i| &files[*i]).collect();
        let (prefix, suffix) = render(tok, &refs, question, system)?;
        if prefix.len() + suffix.len() + reserve <= budget || order.is_empty() {
            let mut included = vec![];
            for &i in &order {
                included.push(PackedFile {
                    path: files[i].path.clone(),
                    hash: hashes[i].clone(),
                    tokens: cost(i)?,
                });
            }
            return Ok(Packed {
                prefix,
                suffix,
                included,
                left_out,
                whole_repository: whole && order.len() == files.len(),
                kept_from_cache: plan.kept.min(order.len()),
            });
        }
        // Token boundaries between blocks moved the total: drop the least relevant new file
        // (the first after the kept ones), else the last kept one.
        let at = if order.len() > plan.kept {
            plan.kept
        } else {
            order.len() - 1
        };
        let dropped = order.remove(at);
        left_out.insert(0, files[dropped].path.clone());
    }
}

/// The longest run of leading tokens `a` and `b` share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The cached packings under `kv_root` made for `fingerprint`, with their folders.
pub fn cached_packings(kv_root: &Path, fingerprint: &str) -> Vec<(PathBuf, PackIndex)> {
    let Ok(rd) = std::fs::read_dir(kv_root) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let dir = e.path();
            let bytes = std::fs::read(dir.join(INDEX_FILE)).ok()?;
            let ix: PackIndex = serde_json::from_slice(&bytes).ok()?;
            (ix.fingerprint == fingerprint && dir.join(longctx_kvstore::SNAPSHOT_FILE).exists())
                .then_some((dir, ix))
        })
        .collect()
}

/// Writes `ix` beside the snapshot in `dir` (under a temporary name, then renamed).
pub fn write_index(dir: &Path, ix: &PackIndex) -> Result<()> {
    let tmp = dir.join(format!("{INDEX_FILE}.tmp-{}", std::process::id()));
    let path = dir.join(INDEX_FILE);
    let json = serde_json::to_vec(ix).map_err(|e| EngineError::Config(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| EngineError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| EngineError::io("writing", &path, e))
}

/// Where the KV of a packed prefix is kept: `$LONGCTX_HOME/kv/<sha256 of model and tokens>`.
pub fn snapshot_dir(home: &Path, fingerprint: &str, prefix: &[u32]) -> PathBuf {
    let mut h = Sha256::new();
    h.update(fingerprint.as_bytes());
    for t in prefix {
        h.update(t.to_le_bytes());
    }
    let key: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    home.join("kv").join(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc, /sys and /dev are refused as repositories, and a link into them is skipped
    /// (`ask --repo /proc/self` once read 4.3 GB of pagemap in 6 s: it reports size 0).
    #[test]
    fn pseudo_filesystems_are_never_read() {
        for root in ["/proc/self", "/sys", "/dev", "/proc"] {
            let e = collect_files(Path::new(root), &[], &[], 4096).unwrap_err();
            assert!(e.to_string().contains("pseudo-filesystem"), "{root}: {e}");
        }
        let d = tmp_repo();
        std::os::unix::fs::symlink("/proc/self/pagemap", d.join("src/pagemap.rs")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("src/zero.rs")).unwrap();
        let (files, skipped) = collect_files(&d, &[], &[], 1 << 30).unwrap();
        // Links are not followed by the walk at all.
        assert!(
            files
                .iter()
                .all(|f| !f.path.contains("pagemap") && !f.path.contains("zero")),
            "{skipped:?}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tmp_repo() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "longctx-ask-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(d.join("src")).unwrap();
        std::fs::create_dir_all(d.join("target")).unwrap();
        std::fs::write(d.join(".gitignore"), "target/\n*.log\n").unwrap();
        std::fs::write(
            d.join("src/ring.rs"),
            "fn merge_partial_results() { /* lse */ }\n",
        )
        .unwrap();
        std::fs::write(d.join("src/kv.rs"), "struct BlockTable;\n").unwrap();
        std::fs::write(d.join("target/big.rs"), "ignored\n").unwrap();
        std::fs::write(d.join("run.log"), "ignored\n").unwrap();
        std::fs::write(d.join("blob.bin"), [0u8, 1, 2, 3]).unwrap();
        std::fs::write(d.join("huge.txt"), "x".repeat(5000)).unwrap();
        d
    }

    #[test]
    fn the_walk_honours_gitignore_globs_and_skips_binary_and_huge_files() {
        let d = tmp_repo();
        let (files, skipped) = collect_files(&d, &[], &[], 4096).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["src/kv.rs", "src/ring.rs"]);
        let why = |p: &str| {
            skipped
                .iter()
                .find(|s| s.path == p)
                .map(|s| s.reason.clone())
        };
        assert_eq!(why("blob.bin").as_deref(), Some("binary"));
        assert!(why("huge.txt").unwrap().contains("limit"));
        let (files, _) = collect_files(&d, &[], &["src/kv.rs".into()], 4096).unwrap();
        assert_eq!(files.len(), 1);
        let (files, _) = collect_files(&d, &["*.txt".into()], &[], 1 << 20).unwrap();
        assert_eq!(files.len(), 1);
        assert!(collect_files(&d.join("nope"), &[], &[], 10).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn plan(
        rel: &[f64],
        costs: &[usize],
        room: usize,
        priors: &[Vec<usize>],
    ) -> (Vec<usize>, usize) {
        let priors: Vec<Vec<(usize, usize)>> = priors
            .iter()
            .map(|p| p.iter().map(|i| (*i, costs[*i])).collect())
            .collect();
        let p = choose(rel, &mut |i| Ok(costs[i]), room, &priors).unwrap();
        (p.order, p.kept)
    }

    /// Fresh: the most relevant files that fit, the most relevant last; files sharing
    /// (almost) no word with the question stay out.
    #[test]
    fn a_fresh_packing_takes_the_most_relevant_files_most_relevant_last() {
        let rel = [0.2, 1.0, 0.05, 0.6, 0.5];
        let costs = [100, 400, 50, 300, 350];
        assert_eq!(plan(&rel, &costs, 1000, &[]), (vec![0, 3, 1], 0));
        assert_eq!(plan(&rel, &costs, 10_000, &[]), (vec![0, 4, 3, 1], 0));
    }

    /// A cached prompt is reused whole when its files serve the new question; where the new
    /// question's best file is missing, the cached prompt is cut to make room for it, not
    /// thrown away; and a cache of unrelated files that costs little to replace is dropped.
    #[test]
    fn a_cached_prompt_lends_its_prefix_while_relevance_allows() {
        let costs = [1000, 1000, 1000, 1000, 1000, 1000];
        // The earlier question packed 0, 1, 2 (in that order). The new one likes 1 and 2
        // most, 0 a little: the whole cached prompt is kept.
        let rel = [0.1, 0.9, 1.0, 0.0, 0.0, 0.0];
        assert_eq!(
            plan(&rel, &costs, 3000, &[vec![0, 1, 2]]),
            (vec![0, 1, 2], 3)
        );
        // The new question's best file (5) is not cached: keep 0 and 1, then 5.
        let rel = [0.1, 0.3, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(
            plan(&rel, &costs, 3000, &[vec![0, 1, 2]]),
            (vec![0, 1, 5], 2)
        );
        // A cached prompt holding the best file is not cut for several files that merely
        // share words with the question (as a sum of relevance it was: 0.5 + 1 + 2 x 0.45
        // beats 0.5 + 0.5 + 1).
        let rel = [0.5, 0.5, 1.0, 0.45, 0.45, 0.45, 0.45];
        let costs = [1000, 1000, 1000, 500, 500, 500, 500];
        assert_eq!(
            plan(&rel, &costs, 3000, &[vec![0, 1, 2]]),
            (vec![0, 1, 2], 3)
        );
        let costs = [1000, 1000, 1000, 1000, 1000, 1000];
        // Two cached prompts: the one sharing more with the question wins.
        let rel = [0.0, 0.0, 0.0, 1.0, 0.8, 0.0];
        assert_eq!(
            plan(&rel, &costs, 2000, &[vec![0, 1], vec![3, 4]]),
            (vec![3, 4], 2)
        );
        // Nothing cached shares a word with the question: a fresh packing.
        let rel = [0.0, 0.0, 0.0, 1.0, 0.8, 0.0];
        assert_eq!(plan(&rel, &costs, 2000, &[vec![0, 1]]), (vec![4, 3], 0));
    }
}
