//! Batch jobs over JSONL: parsing the jobs, and an output file that survives a kill at any
//! moment. Each result is one line written with one `write` and synced as its job ends (jobs
//! run concurrently: lines come in the order jobs finish); on start, a torn last line (a
//! kill mid-write) is cut off (a complete record that only lacks its newline is kept) and the
//! ids already present are skipped, so a rerun loses at most the jobs in flight and never
//! duplicates or corrupts a line. The output is locked
//! for the run: a second process on the same file is refused.
//!
//! Ids are keyed by their JSON text, so the number `7` and the string `"7"` are two jobs.

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
    /// The id's key (its JSON text); [`id_value`] gives the value.
    pub id: String,
    pub task: Task,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    /// `"chat"`: wrap the job's text in the model's chat template. Absent, the command's
    /// default applies (a prompt as `generate` takes it, without the template; a document
    /// question with it, as `ask`).
    pub chat: Option<bool>,
}

/// A line that is not a job: its id key (the given one, else `"line:N"`) and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BadJob {
    pub id: String,
    pub error: String,
}

/// The key of an id: its JSON text (`"7"` with quotes for a string, `7` for a number).
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(v.to_string()),
        Value::Number(_) => Some(v.to_string()),
        _ => None,
    }
}

/// The key of the id given to a line that has none of its own: `"line:N"`.
pub fn line_id(line_no: usize) -> String {
    Value::String(format!("line:{line_no}")).to_string()
}

/// The JSON value of an id key, as records carry it.
pub fn id_value(key: &str) -> Value {
    serde_json::from_str(key).unwrap_or_else(|_| Value::String(key.to_string()))
}

/// Parses input line `line_no` (1-based). `base` resolves relative `document_path`s.
pub fn parse_job(line: &str, line_no: usize, base: &Path) -> Result<Job, BadJob> {
    let fallback = line_id(line_no);
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
    let chat = match obj.get("chat") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => return Err(bad(format!("chat {v} is not true or false"))),
    };
    Ok(Job {
        id,
        task,
        max_tokens,
        temperature,
        chat,
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
        // One writer per file: two processes would each run (and write) every job.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another process (a second `longctx batch`?) is writing to it",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let mut keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if keep < text.len() {
            // A last line without its newline: a whole record (the newline is all a kill
            // took) is kept and terminated; a torn one (a kill mid-write) is cut off.
            let tail = &text[keep..];
            let whole = serde_json::from_slice::<Value>(tail)
                .ok()
                .is_some_and(|v| v.get("id").and_then(id_of).is_some());
            if whole {
                file.write_all(b"\n")?;
                file.sync_data()?;
                text.push(b'\n');
                keep = text.len();
            } else {
                file.set_len(keep as u64)?;
                file.seek(SeekFrom::End(0))?;
            }
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

/// The error record of a job whose id key is `id`.
pub fn error_record(id: &str, error: &str) -> Value {
    json!({"id": id_value(id), "error": error})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_parse_and_bad_lines_become_errors_with_ids() {
        let base = Path::new(".");
        let j = parse_job(r#"{"id": 7, "prompt": "hi", "max_tokens": 5}"#, 1, base).unwrap();
        assert_eq!(j.id, "7");
        // The string "7" is another id than the number 7.
        let s = parse_job(r#"{"id": "7", "prompt": "hi"}"#, 1, base).unwrap();
        assert_eq!(s.id, "\"7\"");
        assert_eq!(id_value(&s.id), json!("7"));
        assert_eq!(j.task, Task::Prompt("hi".into()));
        assert_eq!(j.chat, None);
        let c = parse_job(r#"{"id": 1, "prompt": "hi", "chat": true}"#, 1, base).unwrap();
        assert_eq!(c.chat, Some(true));
        let e = parse_job(r#"{"id": 1, "prompt": "hi", "chat": "yes"}"#, 1, base).unwrap_err();
        assert!(e.error.contains("not true or false"), "{}", e.error);
        assert_eq!(j.max_tokens, Some(5));
        let j = parse_job(r#"{"id": "a", "document": "D", "question": "Q?"}"#, 2, base).unwrap();
        assert!(matches!(j.task, Task::Document { .. }));
        let e = parse_job("{not json", 3, base).unwrap_err();
        assert_eq!(e.id, line_id(3));
        assert_eq!(id_value(&e.id), json!("line:3"));
        let e = parse_job(r#"{"id": "b"}"#, 4, base).unwrap_err();
        assert_eq!(e.id, "\"b\"");
        let e = parse_job(r#"{"id": "c", "prompt": "x", "max_tokens": -1}"#, 5, base).unwrap_err();
        assert!(e.error.contains("max_tokens"));
        let e = parse_job(
            r#"{"id": "d", "document_path": "/no/such", "question": "q"}"#,
            6,
            base,
        )
        .unwrap_err();
        assert!(e.error.contains("document_path"));
        assert_eq!(parse_job("[1]", 7, base).unwrap_err().id, line_id(7));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_done_ids_are_remembered() {
        let p = tmp();
        std::fs::write(&p, "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":\"b\",\"outp").unwrap();
        let mut r = Results::open(&p).unwrap();
        assert_eq!(r.done, HashSet::from(["\"a\"".to_string()]));
        r.write(&json!({"id": "b", "output": "y"})).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":\"b\",\"output\":\"y\"}\n"
        );
        std::fs::remove_file(&p).unwrap();
    }

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!(
            "longctx-batch-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ))
    }

    /// A complete last record that only lacks its newline is kept, not recomputed.
    #[test]
    fn a_whole_unterminated_last_record_is_kept() {
        let p = tmp();
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":7,\"output\":\"y\"}",
        )
        .unwrap();
        let mut r = Results::open(&p).unwrap();
        assert_eq!(
            r.done,
            HashSet::from(["\"a\"".to_string(), "7".to_string()])
        );
        r.write(&json!({"id": "7", "output": "z"})).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "{\"id\":\"a\",\"output\":\"x\"}\n{\"id\":7,\"output\":\"y\"}\n{\"id\":\"7\",\"output\":\"z\"}\n"
        );
        std::fs::remove_file(&p).unwrap();
    }

    /// While one `Results` holds the file, a second open is refused.
    #[test]
    fn a_second_writer_is_refused() {
        let p = tmp();
        let first = Results::open(&p).unwrap();
        let e = Results::open(&p).err().expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(first);
        Results::open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}
