//! Codebase Q&A: a repository's files packed into the model's chat template within a token
//! budget, prefilled once, and the prefilled KV saved as a snapshot keyed by the model and the
//! packed files, so a second question on an unchanged repository skips the prefill.
//!
//! The prompt is cut in two: a prefix (system message and files, the same for every
//! question while the files fit) and a suffix (the question and the template's tail). Only
//! the prefix's KV is snapshotted.

use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};
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
        return Err(EngineError::Config(format!(
            "{} is a pseudo-filesystem (/proc, /sys, /dev), not a repository",
            root.display()
        )));
    }
    if !meta.is_dir() {
        return Err(EngineError::Config(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut ov = ignore::overrides::OverrideBuilder::new(root);
    for g in include {
        ov.add(g)
            .map_err(|e| EngineError::Config(format!("--include {g}: {e}")))?;
    }
    for g in exclude {
        ov.add(&format!("!{g}"))
            .map_err(|e| EngineError::Config(format!("--exclude {g}: {e}")))?;
    }
    let ov = ov
        .build()
        .map_err(|e| EngineError::Config(format!("globs: {e}")))?;
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

/// Words too common in questions to say anything about a file.
const STOP: &[&str] = &[
    "the", "and", "for", "with", "how", "does", "what", "which", "where", "when", "why", "who",
    "are", "this", "that", "from", "into", "its", "can", "you", "use", "used", "work", "works",
];

fn words(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| w.len() > 2)
        .map(|w| w.to_lowercase())
        .filter(|w| !STOP.contains(&w.as_str()))
}

/// How relevant a file looks to a question: question words found in its path count most,
/// then in its text (per occurrence, dampened), over the log of its size.
pub fn relevance(question: &str, file: &RepoFile) -> f64 {
    let path = file.path.to_lowercase();
    let text = file.text.to_lowercase();
    let mut score = 0.0;
    for w in words(question) {
        if path.contains(&w) {
            score += 5.0;
        }
        let hits = text.matches(&w).take(50).count();
        score += (1.0 + hits as f64).ln();
    }
    score / (2.0 + (file.text.len() as f64).ln())
}

/// A packed prompt.
#[derive(Clone, Debug)]
pub struct Packed {
    /// System message and files: the part whose KV is snapshotted.
    pub prefix: Vec<u32>,
    /// The question and the template's tail.
    pub suffix: Vec<u32>,
    pub included: Vec<String>,
    /// Files that did not fit, most relevant first.
    pub left_out: Vec<String>,
}

const SYSTEM: &str = "You answer questions about a software repository. Its files follow, \
each under a header with its path. Answer from the files; name the files you rely on.";
const MARK: &str = "\u{1}QUESTION\u{1}";

fn file_block(f: &RepoFile) -> String {
    format!("### {}\n```\n{}\n```\n\n", f.path, f.text.trim_end())
}

fn render(tok: &Tokenizer, files: &[&RepoFile], question: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut body = String::from("Repository files:\n\n");
    for f in files {
        body.push_str(&file_block(f));
    }
    body.push_str("Question: ");
    body.push_str(MARK);
    let text = match tok.chat_template {
        Some(_) => tok.render_chat(&[("system", SYSTEM), ("user", &body)])?,
        None => format!("{SYSTEM}\n\n{body}\n\nAnswer:"),
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

/// Packs the files (most relevant first when they do not all fit) so that prompt plus
/// `reserve` answer tokens fit `budget` tokens. Included files appear in path order, so the
/// prefix of an unchanged repository is the same for every question that includes them all.
pub fn pack(
    tok: &Tokenizer,
    files: &[RepoFile],
    question: &str,
    budget: usize,
    reserve: usize,
) -> Result<Packed> {
    let (_, q_only) = render(tok, &[], question)?;
    let empty = render(tok, &[], question)?.0.len() + q_only.len();
    // Saturating: a reserve near usize::MAX must not wrap past the check (then every sum
    // below is at most the budget).
    if empty.saturating_add(reserve) > budget {
        return Err(EngineError::PromptTooLong {
            prompt: empty,
            new: reserve,
            limit: budget,
        });
    }
    let mut order: Vec<usize> = (0..files.len()).collect();
    let scores: Vec<f64> = files.iter().map(|f| relevance(question, f)).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
    // Greedy by estimated size, then checked on the real prompt.
    let mut chosen: Vec<usize> = vec![];
    let mut used = empty + reserve;
    let mut left_out = vec![];
    for &i in &order {
        // No tokenizer makes tokens of more than 64 bytes on average: a file longer than
        // that many bytes per token left cannot fit, and is not tokenized (a 200 MB file once
        // took 13 GB to tokenize for an 8K-token budget).
        if files[i].text.len() as u64 > 64 * budget.saturating_sub(used) as u64 {
            left_out.push(files[i].path.clone());
            continue;
        }
        let cost = tok.encode(&file_block(&files[i]))?.len();
        if used + cost <= budget {
            used += cost;
            chosen.push(i);
        } else {
            left_out.push(files[i].path.clone());
        }
    }
    loop {
        let mut by_path = chosen.clone();
        by_path.sort();
        let refs: Vec<&RepoFile> = by_path.iter().map(|i| &files[*i]).collect();
        let (prefix, suffix) = render(tok, &refs, question)?;
        if prefix.len() + suffix.len() + reserve <= budget || chosen.is_empty() {
            return Ok(Packed {
                prefix,
                suffix,
                included: refs.iter().map(|f| f.path.clone()).collect(),
                left_out,
            });
        }
        // Token boundaries between blocks moved the total: drop the least relevant.
        let dropped = chosen.pop().expect("not empty");
        left_out.insert(0, files[dropped].path.clone());
    }
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

    #[test]
    fn relevance_prefers_files_that_mention_the_question() {
        let a = RepoFile {
            path: "src/ring.rs".into(),
            text: "merge partial results by lse".into(),
        };
        let b = RepoFile {
            path: "src/kv.rs".into(),
            text: "block table".into(),
        };
        let q = "How does ring attention merge partial results?";
        assert!(relevance(q, &a) > relevance(q, &b));
    }
}
