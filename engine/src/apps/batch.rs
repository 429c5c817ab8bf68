//! Batch jobs over JSONL: parsing the jobs, and an output file that survives a kill at any
//! moment. Each result is one line written with one `write` and synced before the next job
//! starts; on start, a torn last line (a kill mid-write) is cut off and the ids already
//! present are skipped, so a rerun loses at most the job in flight and never duplicates or
//! corrupts a line.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What a job asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    Prompt(String),
    /// A document (inline or read from a path) and a question about it.
    Document {
        document: String,
        question: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: String,
    pub task: Task,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
}

/// A line that is not a job: its id (the given one, else `line:N`) and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BadJob {
    pub id: String,
    pub error: String,
}

fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parses input line `line_no` (1-based). `base` resolves relative `document_path`s.
pub fn parse_job(line: &str, line_no: usize, base: &Path) -> Result<Job, BadJob> {
    let fallback = format!("line:{line_no}");
    let v: Value = serde_json::from_str(line).map_err(|e| BadJob {
        id: fallback.clone(),
        error: format!("malformed JSON: {e}"),
    })?;
    let id = v.get("id").and_then(id_of);
    let bad = |error: String| BadJob {
        id: id.clone().unwrap_or_else(|| fallback.clone()),
        error,
    };
    let Some(obj) = v.as_object() else {
        return Err(bad("a job must be a JSON object".into()));
    };
    let id = id
        .clone()
        .ok_or_else(|| bad("missing \"id\" (a string or a number)".into()))?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(String::from);
    let task = if let Some(p) = text("prompt") {
        Task::Prompt(p)
    } else {
        let question = text("question").ok_or_else(|| {
            bad(
                "a job needs \"prompt\", or \"document\"/\"document_path\" with \"question\""
                    .into(),
            )
        })?;
        let document = match (text("document"), text("document_path")) {
            (Some(d), _) => d,
            (None, Some(p)) => {
                let path = base.join(&p);
                std::fs::read_to_string(&path)
                    .map_err(|e| bad(format!("document_path {}: {e}", path.display())))?
            }
            (None, None) => {
                return Err(bad(
                    "a question needs \"document\" or \"document_path\"".into()
                ))
            }
        };
        Task::Document { document, question }
    };
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| bad(format!("max_tokens {v} is not a positive integer")))?
                as usize,
        ),
    };
    let temperature = match obj.get("temperature") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| (0.0..=10.0).contains(t))
                .ok_or_else(|| bad(format!("temperature {v} is not within 0..=10")))?
                as f32,
        ),
    };
    Ok(Job {
        id,
        task,
        max_tokens,
        temperature,
    })
}

/// The results file, opened for appending after repairing a torn tail.
pub struct Results {
    file: File,
    path: PathBuf,
    /// Ids already answered (or failed): skipped on a rerun.
    pub done: HashSet<String>,
}

impl Results {
    pub fn open(path: &Path) -> std::io::Result<Results> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        // A kill mid-write leaves a last line without its newline: cut it off.
        let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if keep < text.len() {
            file.set_len(keep as u64)?;
            file.seek(SeekFrom::End(0))?;
        }
        let mut done = HashSet::new();
        for line in text[..keep].split(|b| *b == b'\n') {
            if let Some(id) = serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|v| v.get("id").and_then(id_of))
            {
                done.insert(id);
            }
        }
        Ok(Results {
            file,
            path: path.to_path_buf(),
            done,
        })
    }

    /// Appends one record as one line and syncs it.
    pub fn write(&mut self, record: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).expect("a JSON value serialises");
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        if let Some(id) = record.get("id").and_then(id_of) {
            self.done.insert(id);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The error record of a job.
pub fn error_record(id: &str, error: &str) -> Value {
    json!({"id": id, "error": error})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_parse_and_bad_lines_become_errors_with_ids() {
        let base = Path::new(".");
        let j = parse_job(r#"{"id": 7, "prompt": "hi", "max_tokens": 5}"#, 1, base).unwrap();
        assert_eq!(j.id, "7");
        assert_eq!(j.task, Task::Prompt("hi".into()));
        assert_eq!(j.max_tokens, Some(5));
        let j = parse_job(r#"{"id": "a", "document": "D", "question": "Q?"}"#, 2, base).unwrap();
        assert!(matches!(j.task, Task::Document { .. }));
        let e = parse_job("{not json", 3, base).unwrap_err();
        assert_eq!(e.id, "line:3");
        let e = parse_job(r#"{"id": "b"}"#, 4, base).unwrap_err();
        assert_eq!(e.id, "b");
        let e = parse_job(r#"{"id": "c", "prompt": "x", "max_tokens": -1}"#, 5, base).unwrap_err();
        assert!(e.error.contains("max_tokens"));
        let e = parse_job(
            r#"{"id": "d", "document_path": "/no/such", "question": "q"}"#,
            6,
            base,
        )
        .unwrap_err();
        assert!(e.error.contains("document_path"));
        assert_eq!(parse_job("[1]", 7, base).unwrap_err().id, "line:7");
    }

    #[test]
    fn a_torn_last_line_is_cut_and_done_ids_are_remembered() {
        let p = std::env::temp_dir().join(format!(
            "longctx-batch-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&p, "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":\"b\",\"outp").unwrap();
        let mut r = Results::open(&p).unwrap();
        assert_eq!(r.done, HashSet::from(["a".to_string()]));
        r.write(&json!({"id": "b", "output": "y"})).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":\"b\",\"output\":\"y\"}\n"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
