//! Model files whose header counts are lies, crafted here as sparse files (100 MB long, a
//! few bytes on disk): `generate` refuses each in one line, quickly and within a small
//! address space, where it once aborted on an allocation sized by the count or spent
//! seconds and gigabytes before its error.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const LEN: u64 = 100 << 20;

fn sparse_gguf(path: &Path, n_tensors: u64, meta: &[u8], n_kv: u64) {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(meta);
    std::fs::write(path, &b).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(LEN)
        .unwrap();
}

/// Runs `generate` on `model` under an address-space limit of `limit_mib`; its last stderr
/// line, after checking it failed with an error (exit 1, not an abort or a panic).
fn refused(model: &Path, limit_mib: u64) -> String {
    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {} && exec \"$0\" generate --model \"$1\" --prompt hi --max-tokens 1",
            limit_mib * 1024
        ))
        .arg(env!("CARGO_BIN_EXE_longctx"))
        .arg(model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    eprintln!("refused in {:.2} s: {err}", t.elapsed().as_secs_f64());
    let last = err.lines().last().unwrap_or("").to_string();
    // One line, the file named once.
    let name = model.display().to_string();
    assert_eq!(last.matches(&name).count(), 1, "{last}");
    last
}

#[test]
fn header_counts_that_cannot_be_true_are_refused_before_allocating() {
    let dir = std::env::temp_dir().join(format!("longctx-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 90M tensors: fewer bytes than 90M tensor infos take. Once a 5.8 GB `with_capacity`.
    let f = dir.join("tensors.gguf");
    sparse_gguf(&f, 90_000_000, &[], 0);
    let e = refused(&f, 4096);
    assert!(
        e.contains("90000000 tensors") && e.contains("cannot fit"),
        "{e}"
    );
    // A token_type array of 90M u8 items: it fits the file, but is past any real vocabulary.
    // Once 2.9 GB and 11.7 s of parsing before the error.
    let mut meta = vec![];
    let key = b"tokenizer.ggml.token_type";
    meta.extend((key.len() as u64).to_le_bytes());
    meta.extend(key);
    meta.extend(9u32.to_le_bytes()); // array
    meta.extend(0u32.to_le_bytes()); // of u8
    meta.extend(90_000_000u64.to_le_bytes());
    let f = dir.join("array.gguf");
    sparse_gguf(&f, 0, &meta, 1);
    let e = refused(&f, 1024);
    assert!(e.contains("metadata array items"), "{e}");
    // The same count of u32 items needs 360 MB: more than the file holds.
    meta.truncate(meta.len() - 12);
    meta.extend(4u32.to_le_bytes());
    meta.extend(90_000_000u64.to_le_bytes());
    sparse_gguf(&f, 0, &meta, 1);
    let e = refused(&f, 1024);
    assert!(e.contains("array of 90000000 items"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
