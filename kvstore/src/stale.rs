//! Temporary files of processes that died: snapshot writes, downloads and memo files carry
//! their writer's pid after a marker (`<marker><pid>...`), so what a `kill -9` left behind
//! can be told from what a live process is still writing.

use std::path::Path;

/// Whether a process with this pid runs (Linux: its `/proc` entry exists).
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes the entries of `dir` (files or folders) whose name holds `marker` followed by the
/// pid of a process that no longer runs; returns how many went. Entries of live processes,
/// and names without a pid after the marker, are left alone. Errors are ignored: this is
/// clean-up, never the job.
pub fn remove_stale(dir: &Path, marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(at) = name.find(marker) else {
            continue;
        };
        let digits: String = name[at + marker.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed += gone.is_ok() as usize;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_writers_files_go() {
        let dir = std::env::temp_dir().join(format!("longctx-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A pid above the kernel's pid_max (4,194,304) never runs.
        let dead = 4_194_999u32;
        let me = std::process::id();
        let names = [
            format!("kv.snapshot.tmp-{dead}-ThreadId(2)"),
            format!("kv.snapshot.tmp-{me}-ThreadId(2)"),
            "kv.snapshot.tmp-x".to_string(),
            "kv.snapshot".to_string(),
        ];
        for n in &names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        std::fs::create_dir_all(dir.join(format!("download-{dead}"))).unwrap();
        std::fs::write(dir.join(format!("download-{dead}/a.whl")), b"x").unwrap();
        assert_eq!(remove_stale(&dir, ".tmp-"), 1);
        assert_eq!(remove_stale(&dir, "download-"), 1);
        assert!(!dir.join(&names[0]).exists());
        for n in &names[1..] {
            assert!(dir.join(n).exists(), "{n}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
