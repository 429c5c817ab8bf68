//! Which files of a repository answer a question: Okapi BM25 (Robertson and Zaragoza, "The
//! Probabilistic Relevance Framework: BM25 and Beyond", 2009) over three fields of each file,
//! weighted as BM25F does: its path, the names it defines (`fn`, `struct`, `enum`, `trait`,
//! `mod`, `impl`, `type`, `def`, `class`, ...) and its text. A question word found in a path
//! or a definition says more than one in passing, so those fields count [`PATH_WEIGHT`] and
//! [`SYMBOL_WEIGHT`] times a word of text.
//!
//! Words are identifiers split as programmers write them (`load_snapshot` is
//! `load_snapshot`, `load` and `snapshot`; `KvStore` is `kvstore`, `kv` and `store`), lower
//! case, with a plural `s` dropped, so "snapshots" finds `snapshot`.
//!
//! A question asks how the code works, which the code answers better than its tests: a Rust
//! file's `#[cfg(test)]` part is not indexed, and test files (under `tests/`, `tests.rs`,
//! `*_test.*`, `test_*.py`) score [`TEST_FILE_WEIGHT`] of what they would.

use super::ask::RepoFile;
use std::collections::HashMap;

/// How much a path word counts beside a word of text.
pub const PATH_WEIGHT: f64 = 4.0;
/// How much a defined name counts beside a word of text.
pub const SYMBOL_WEIGHT: f64 = 3.0;
/// What a test file's score counts.
pub const TEST_FILE_WEIGHT: f64 = 0.5;
/// BM25's term-frequency saturation and length normalisation (the usual values).
const K1: f64 = 1.2;
const B: f64 = 0.75;

/// Words too common in questions (or in code) to say anything about a file.
const STOP: &[&str] = &[
    "the", "and", "for", "with", "how", "does", "what", "which", "where", "when", "why", "who",
    "are", "this", "that", "from", "into", "its", "can", "you", "use", "used", "work", "works",
    "there", "their", "them", "then", "than", "was", "were", "has", "have", "had", "not", "but",
    "all", "any", "one", "out", "get", "let", "mut", "pub", "self", "fn", "is", "it", "in", "of",
    "to", "a", "an", "on", "or", "be", "by", "as", "at", "if", "do", "i",
];

/// Keywords after which a name is defined.
const DEFINERS: &[&str] = &[
    "fn",
    "struct",
    "enum",
    "trait",
    "mod",
    "impl",
    "type",
    "const",
    "static",
    "union",
    "macro_rules!",
    "def",
    "class",
    "func",
    "function",
    "interface",
    "module",
];

/// Lower case, a plural `s` dropped ("results" -> "result"; "classes" -> "classe" is close
/// enough, the same both ways); `None` for a stop word.
fn stem(w: &str) -> Option<String> {
    let w = w.to_lowercase();
    if STOP.contains(&w.as_str()) {
        return None;
    }
    let keep = ["ss", "us", "is"].iter().any(|e| w.ends_with(e));
    let s = if w.len() > 3 && w.ends_with('s') && !keep {
        w[..w.len() - 1].to_string()
    } else {
        w
    };
    (!STOP.contains(&s.as_str())).then_some(s)
}

/// Splits an identifier at `_`, `-` and lower-to-upper case changes.
fn parts(ident: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut start = 0;
    let b = ident.as_bytes();
    for i in 1..b.len() {
        let cut = (b[i] == b'_' || b[i] == b'-')
            || (b[i].is_ascii_uppercase() && b[i - 1].is_ascii_lowercase());
        if cut {
            out.push(&ident[start..i]);
            start = if b[i] == b'_' || b[i] == b'-' {
                i + 1
            } else {
                i
            };
        }
    }
    out.push(&ident[start..]);
    out.retain(|p| !p.is_empty());
    out
}

/// Calls `f` with every word of `text`: each identifier whole, and its parts when it has
/// several.
pub fn for_each_word(text: &str, mut f: impl FnMut(String)) {
    for ident in text.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
        let ident = ident.trim_matches('_');
        if ident.len() < 2 || ident.len() > 64 || ident.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let ps = parts(ident);
        if ps.len() > 1 {
            for p in &ps {
                if let Some(s) = stem(p).filter(|s| s.len() > 1) {
                    f(s);
                }
            }
        }
        if let Some(s) = stem(ident) {
            f(s);
        }
    }
}

/// The words of a question, each once.
pub fn query_words(question: &str) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for_each_word(question, |w| {
        if !out.contains(&w) {
            out.push(w)
        }
    });
    out
}

/// The names a file defines: the identifier after a defining keyword (`fn merge_into`,
/// `pub struct KvStore`, `impl Runner`, `class Tokenizer`).
fn symbols(text: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut prev: Option<&str> = None;
    for tok in text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!')) {
        if tok.is_empty() {
            continue;
        }
        if prev.is_some_and(|p| DEFINERS.contains(&p)) && !DEFINERS.contains(&tok) {
            out.push(tok.trim_end_matches('!'));
        }
        prev = Some(tok);
    }
    out
}

/// A file's weighted word counts and weighted length.
struct Doc {
    tf: HashMap<String, f64>,
    len: f64,
    weight: f64,
}

/// Whether a path names a test file.
pub fn is_test_path(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    path.starts_with("tests/")
        || path.contains("/tests/")
        || name == "tests.rs"
        || name.contains("_test.")
        || (name.starts_with("test_") && name.ends_with(".py"))
}

/// The text before a Rust file's `#[cfg(test)]` (all of it where there is none).
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |at| &text[..at])
}

/// A BM25F index over a repository's files.
pub struct Index {
    docs: Vec<Doc>,
    /// In how many files each word occurs.
    df: HashMap<String, usize>,
    avg_len: f64,
}

impl Index {
    pub fn new(files: &[RepoFile]) -> Index {
        let docs: Vec<Doc> = files
            .iter()
            .map(|f| {
                let mut tf: HashMap<String, f64> = HashMap::new();
                let mut len = 0.0;
                let mut add = |w: String, weight: f64| {
                    *tf.entry(w).or_default() += weight;
                    len += weight;
                };
                for_each_word(&f.path.replace(['/', '.'], " "), |w| add(w, PATH_WEIGHT));
                let text = if f.path.ends_with(".rs") {
                    without_tests(&f.text)
                } else {
                    &f.text
                };
                for s in symbols(text) {
                    for_each_word(s, |w| add(w, SYMBOL_WEIGHT));
                }
                for_each_word(text, |w| add(w, 1.0));
                let weight = if is_test_path(&f.path) {
                    TEST_FILE_WEIGHT
                } else {
                    1.0
                };
                Doc { tf, len, weight }
            })
            .collect();
        let mut df: HashMap<String, usize> = HashMap::new();
        for d in &docs {
            for w in d.tf.keys() {
                *df.entry(w.clone()).or_default() += 1;
            }
        }
        let avg_len = docs.iter().map(|d| d.len).sum::<f64>() / docs.len().max(1) as f64;
        Index {
            docs,
            df,
            avg_len: avg_len.max(1.0),
        }
    }

    /// Each file's BM25F score for `question` (0 for a file sharing no word with it).
    pub fn scores(&self, question: &str) -> Vec<f64> {
        let n = self.docs.len() as f64;
        let words = query_words(question);
        // The Lucene form of the IDF: never negative, so a word in most files still counts
        // a little.
        let idf: Vec<f64> = words
            .iter()
            .map(|w| {
                let df = *self.df.get(w).unwrap_or(&0) as f64;
                (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
            })
            .collect();
        self.docs
            .iter()
            .map(|d| {
                let norm = K1 * (1.0 - B + B * d.len / self.avg_len);
                let s: f64 = words
                    .iter()
                    .zip(&idf)
                    .map(|(w, idf)| {
                        let tf = *d.tf.get(w).unwrap_or(&0.0);
                        idf * tf * (K1 + 1.0) / (tf + norm)
                    })
                    .sum();
                s * d.weight
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> RepoFile {
        RepoFile {
            path: path.into(),
            text: text.into(),
        }
    }

    #[test]
    fn identifiers_split_as_programmers_write_them() {
        let mut w = vec![];
        for_each_word("merge_into RingAttention results KV", |x| w.push(x));
        assert_eq!(
            w,
            [
                "merge",
                "merge_into",
                "ring",
                "attention",
                "ringattention",
                "result",
                "kv"
            ]
        );
        assert_eq!(
            symbols("pub fn merge_into(x) {}\nstruct Kv;"),
            ["merge_into", "Kv"]
        );
    }

    /// The README's question ranks the ring and the LSE merge above files that only share
    /// common words with it, and a defined name outranks the same word in passing.
    #[test]
    fn ring_attention_merge_ranks_ring_and_merge_code_first() {
        let files = vec![
            file(
                "README.md",
                "longctx runs models. See the ring folder for more.",
            ),
            file(
                "kvstore/src/snapshot.rs",
                "Snapshots of the KV: save and load. How does a partial write fail? It is \
                 removed. The results are checked.",
            ),
            file(
                "ring/src/prefill.rs",
                "//! The prefill ring.\npub fn ring_attention(q: &[f32]) -> RankResult { \
                 attend_runs(q); merge_into(out, lse, part) }",
            ),
            file(
                "kernels/src/attention/merge.rs",
                "//! Merging partial attention results by their log-sum-exp.\npub fn \
                 merge_into(out: &mut [f32], lse: &mut [f32]) {}\npub fn merge() {}",
            ),
            file(
                "engine/src/tokenizer.rs",
                "pub struct Tokenizer; fn encode() {} fn decode() {}",
            ),
            file(
                "src/units.rs",
                "Sizes as users type them; the partial unit is refused.",
            ),
        ];
        let s = Index::new(&files).scores("How does ring attention merge partial results?");
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by(|a, b| s[*b].total_cmp(&s[*a]));
        let top: Vec<&str> = order[..2].iter().map(|i| files[*i].path.as_str()).collect();
        assert!(
            top.contains(&"ring/src/prefill.rs") && top.contains(&"kernels/src/attention/merge.rs"),
            "{top:?} from {s:?}"
        );
        assert_eq!(s[4], 0.0, "the tokenizer shares no word with the question");

        // The same word counts more where the file defines it.
        let files = vec![
            file("a.rs", "fn other() { snapshot(); }"),
            file("b.rs", "fn snapshot() {}"),
        ];
        let s = Index::new(&files).scores("snapshot");
        assert!(s[1] > s[0], "{s:?}");
        // Tests count less than the code they test, in their own files or a test module.
        let files = vec![
            file("ring/src/tests.rs", "fn merges() { merge(); merge(); }"),
            file(
                "ring/src/merge.rs",
                "fn merge() {}\n#[cfg(test)]\nmod t { fn c() { lse(); } }",
            ),
        ];
        let index = Index::new(&files);
        let s = index.scores("merge");
        assert!(s[1] > s[0], "{s:?}");
        assert_eq!(index.scores("lse")[1], 0.0);
        assert!(is_test_path("tests/cli_ask.rs") && is_test_path("a/b_test.go"));
        assert!(!is_test_path("src/attest.rs"));
        // And more in a path.
        let files = vec![
            file("src/x.rs", "the snapshot is saved"),
            file("src/snapshot.rs", "the file is saved"),
        ];
        let s = Index::new(&files).scores("snapshot");
        assert!(s[1] > s[0], "{s:?}");
    }

    #[test]
    fn an_empty_question_or_repository_scores_nothing() {
        assert!(Index::new(&[]).scores("ring").is_empty());
        let s = Index::new(&[file("a.rs", "ring")]).scores("how does the?");
        assert_eq!(s, [0.0]);
    }
}
