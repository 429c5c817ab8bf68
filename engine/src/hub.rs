//! Model names as people type them (`org/name`, `org/name:FILE`), found offline in the
//! Hugging Face hub cache that `huggingface-cli download` and transformers fill.
//!
//! The cache is laid out as `huggingface_hub` writes it: `<root>/models--org--name/` holds
//! `refs/main` (a commit hash), `snapshots/<commit>/` (the repository's files, as relative
//! symlinks) and `blobs/` (their content). The root is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`,
//! as `huggingface_hub` decides it. Nothing is downloaded.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why a hub name did not give a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    #[error(
        "model {name}: no such file, and not in the Hugging Face cache (looked for {}; set \
         HF_HUB_CACHE or HF_HOME, or run `huggingface-cli download {repo}`)",
        looked.display()
    )]
    NotCached {
        name: String,
        repo: String,
        looked: PathBuf,
    },
    #[error("model {name}: {} holds no snapshot (an unfinished download?)", dir.display())]
    NoSnapshot { name: String, dir: PathBuf },
    #[error(
        "model {name}: snapshot {} holds no .gguf file and no config.json with safetensors",
        dir.display()
    )]
    NoModel { name: String, dir: PathBuf },
    #[error(
        "model {name}: {} .gguf files in {}: {}; name one as {repo}:FILE (a file name or a \
         part of one, such as Q4_K_M)",
        found.len(), dir.display(), found.join(", ")
    )]
    Ambiguous {
        name: String,
        repo: String,
        dir: PathBuf,
        found: Vec<String>,
    },
    #[error(
        "model {name}: no .gguf file in {} matches {spec:?} (there are: {})",
        dir.display(), found.join(", ")
    )]
    NoMatch {
        name: String,
        spec: String,
        dir: PathBuf,
        found: Vec<String>,
    },
}

/// `org/name` or `org/name:FILE` split into the repository and the file wanted; `None` when
/// `s` is not shaped like a hub name (an absolute path, `./x`, three parts, odd characters).
pub fn parse_name(s: &str) -> Option<(&str, &str, Option<&str>)> {
    let (repo, spec) = match s.split_once(':') {
        Some((r, f)) if !f.is_empty() => (r, Some(f)),
        Some(_) => return None,
        None => (s, None),
    };
    let (org, name) = repo.split_once('/')?;
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part(org) && part(name)).then_some((org, name, spec))
}

/// The hub cache root, from the environment `var` gives (the process's, or a test's).
pub fn cache_root(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    if let Some(h) = set("HF_HOME") {
        return h.join("hub");
    }
    let cache = set("XDG_CACHE_HOME").unwrap_or_else(|| {
        set("HOME")
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache")
    });
    cache.join("huggingface").join("hub")
}

/// The model file or directory `name` (`org/name[:FILE]`) names in the cache at `root`.
///
/// The snapshot is the commit `refs/main` names, else the newest one. In it, `.gguf` files
/// come first (searched two directories deep): the one there is, or the one whose file name
/// is FILE or contains it (case-insensitively, so `:q4_k_m` works); several without FILE is
/// an error listing them. Else a snapshot with `config.json` and safetensors is a Hugging
/// Face model directory.
pub fn resolve(root: &Path, name: &str) -> Result<Option<PathBuf>, HubError> {
    let Some((org, repo_name, spec)) = parse_name(name) else {
        return Ok(None);
    };
    let repo = format!("{org}/{repo_name}");
    let dir = root.join(format!("models--{org}--{repo_name}"));
    if !dir.is_dir() {
        return Err(HubError::NotCached {
            name: name.into(),
            repo,
            looked: dir,
        });
    }
    let snap = snapshot(&dir).ok_or_else(|| HubError::NoSnapshot {
        name: name.into(),
        dir: dir.join("snapshots"),
    })?;
    let mut ggufs = vec![];
    find_gguf(&snap, &snap, 2, &mut ggufs);
    ggufs.sort();
    let shown = |v: &[String]| v.to_vec();
    if let Some(spec) = spec {
        let lower = spec.to_lowercase();
        let exact: Vec<&String> = ggufs
            .iter()
            .filter(|f| f.as_str() == spec || file_name(f) == spec)
            .collect();
        let hits: Vec<&String> = if exact.is_empty() {
            ggufs
                .iter()
                .filter(|f| file_name(f).to_lowercase().contains(&lower))
                .collect()
        } else {
            exact
        };
        return match hits.as_slice() {
            [one] => Ok(Some(snap.join(one))),
            [] => Err(HubError::NoMatch {
                name: name.into(),
                spec: spec.into(),
                dir: snap,
                found: shown(&ggufs),
            }),
            many => Err(HubError::Ambiguous {
                name: name.into(),
                repo,
                dir: snap,
                found: many.iter().map(|s| s.to_string()).collect(),
            }),
        };
    }
    match ggufs.as_slice() {
        [one] => return Ok(Some(snap.join(one))),
        [] => {}
        _ => {
            return Err(HubError::Ambiguous {
                name: name.into(),
                repo,
                dir: snap,
                found: ggufs,
            })
        }
    }
    let safetensors = std::fs::read_dir(&snap).into_iter().flatten().any(|e| {
        e.ok()
            .is_some_and(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
    });
    if snap.join("config.json").is_file() && safetensors {
        return Ok(Some(snap));
    }
    Err(HubError::NoModel {
        name: name.into(),
        dir: snap,
    })
}

fn file_name(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

/// The snapshot `refs/main` names if it is there, else the most recently modified one.
fn snapshot(dir: &Path) -> Option<PathBuf> {
    let snaps = dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs").join("main")) {
        let p = snaps.join(rev.trim());
        if !rev.trim().is_empty() && p.is_dir() {
            return Some(p);
        }
    }
    std::fs::read_dir(&snaps)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| (e.metadata().and_then(|m| m.modified()).ok(), e.file_name()))
        .map(|e| e.path())
}

/// `.gguf` files under `dir` (symlinks followed, as the hub's are), as paths relative to
/// `base`, `depth` directories deep at most.
fn find_gguf(base: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if depth > 0 {
                find_gguf(base, &p, depth - 1, out);
            }
        } else if p.is_file()
            && p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        {
            if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh directory under the system temp dir, removed when dropped.
    struct Temp(PathBuf);
    impl Temp {
        fn new(tag: &str) -> Temp {
            let p = std::env::temp_dir().join(format!(
                "longctx-hub-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Temp(p)
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Lays out `models--org--name` as huggingface_hub does: each file's content in
    /// `blobs/<hash>`, the snapshot's entry a relative symlink to it.
    fn repo(root: &Path, id: &str, rev: &str, files: &[&str], main: bool) -> PathBuf {
        let dir = root.join(format!("models--{}", id.replace('/', "--")));
        let snap = dir.join("snapshots").join(rev);
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        for (i, f) in files.iter().enumerate() {
            let blob = format!("{rev}{i:04}");
            std::fs::write(dir.join("blobs").join(&blob), f.as_bytes()).unwrap();
            let link = snap.join(f);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let up = "../".repeat(f.matches('/').count() + 2);
            symlink(format!("{up}blobs/{blob}"), &link).unwrap();
        }
        if main {
            std::fs::create_dir_all(dir.join("refs")).unwrap();
            std::fs::write(dir.join("refs/main"), rev).unwrap();
        }
        snap
    }

    #[test]
    fn names_are_told_from_paths() {
        assert_eq!(parse_name("org/name"), Some(("org", "name", None)));
        assert_eq!(
            parse_name("bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
            Some(("bartowski", "Llama-3.2-1B-Instruct-GGUF", Some("Q4_K_M")))
        );
        for not in [
            "/abs/path",
            "./x/y",
            "a/b/c",
            "model.gguf",
            "a/",
            "/b",
            "a/b:",
            "../x",
        ] {
            assert_eq!(parse_name(not), None, "{not}");
        }
    }

    #[test]
    fn the_root_follows_huggingface_hub() {
        let env = |pairs: &[(&str, &str)]| {
            let owned: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| {
                owned
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HF_HOME", "/b"),
            ("XDG_CACHE_HOME", "/c"),
            ("HOME", "/d"),
        ];
        assert_eq!(cache_root(env(&all)), PathBuf::from("/a"));
        assert_eq!(
            cache_root(env(&[("HF_HOME", "/b"), ("HOME", "/d")])),
            PathBuf::from("/b/hub")
        );
        assert_eq!(
            cache_root(env(&[("XDG_CACHE_HOME", "/c"), ("HOME", "/d")])),
            PathBuf::from("/c/huggingface/hub")
        );
        assert_eq!(
            cache_root(env(&[("HF_HUB_CACHE", ""), ("HOME", "/d")])),
            PathBuf::from("/d/.cache/huggingface/hub")
        );
    }

    #[test]
    fn a_single_gguf_of_the_main_snapshot_is_the_model() {
        let t = Temp::new("single");
        let old = repo(&t.0, "org/m", "aaaa", &["old.gguf"], false);
        let main = repo(&t.0, "org/m", "bbbb", &["m-Q4_K_M.gguf", "README.md"], true);
        // The older snapshot is the newer on disk: refs/main still wins over recency.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::open(&old)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let got = resolve(&t.0, "org/m").unwrap().unwrap();
        assert_eq!(got, main.join("m-Q4_K_M.gguf"));
        // Through the symlink, the blob's content.
        assert_eq!(std::fs::read_to_string(&got).unwrap(), "m-Q4_K_M.gguf");
        // Without refs/main, the newest snapshot.
        std::fs::remove_file(t.0.join("models--org--m/refs/main")).unwrap();
        assert_eq!(
            resolve(&t.0, "org/m").unwrap().unwrap(),
            old.join("old.gguf")
        );
    }

    #[test]
    fn several_ggufs_need_a_file_spec() {
        let t = Temp::new("several");
        let snap = repo(
            &t.0,
            "org/m-GGUF",
            "cccc",
            &["m-Q4_K_M.gguf", "m-Q8_0.gguf", "sub/m-f16.gguf"],
            true,
        );
        let e = resolve(&t.0, "org/m-GGUF").unwrap_err().to_string();
        assert!(
            e.contains("3 .gguf files")
                && e.contains("m-Q8_0.gguf")
                && e.contains("org/m-GGUF:FILE"),
            "{e}"
        );
        let pick = |s: &str| resolve(&t.0, &format!("org/m-GGUF:{s}"));
        assert_eq!(pick("q8_0").unwrap().unwrap(), snap.join("m-Q8_0.gguf"));
        assert_eq!(
            pick("m-Q4_K_M.gguf").unwrap().unwrap(),
            snap.join("m-Q4_K_M.gguf")
        );
        assert_eq!(pick("F16").unwrap().unwrap(), snap.join("sub/m-f16.gguf"));
        let e = pick("Q5_K").unwrap_err().to_string();
        assert!(
            e.contains("matches \"Q5_K\"") && e.contains("m-Q4_K_M.gguf"),
            "{e}"
        );
        let e = pick("m-Q").unwrap_err().to_string();
        assert!(e.contains("2 .gguf files"), "{e}");
    }

    #[test]
    fn a_safetensors_snapshot_is_a_model_directory() {
        let t = Temp::new("hf");
        let snap = repo(
            &t.0,
            "org/hf",
            "dddd",
            &["config.json", "model.safetensors", "tokenizer.json"],
            true,
        );
        assert_eq!(resolve(&t.0, "org/hf").unwrap().unwrap(), snap);
    }

    #[test]
    fn what_is_missing_is_said_with_where_it_looked() {
        let t = Temp::new("missing");
        let e = resolve(&t.0, "org/absent").unwrap_err().to_string();
        let looked = t.0.join("models--org--absent");
        assert!(
            e.contains(&looked.display().to_string()) && e.contains("HF_HUB_CACHE"),
            "{e}"
        );
        std::fs::create_dir_all(t.0.join("models--org--empty/snapshots")).unwrap();
        let e = resolve(&t.0, "org/empty").unwrap_err().to_string();
        assert!(e.contains("no snapshot"), "{e}");
        repo(&t.0, "org/readme", "eeee", &["README.md"], true);
        let e = resolve(&t.0, "org/readme").unwrap_err().to_string();
        assert!(e.contains("no .gguf file"), "{e}");
        assert!(resolve(&t.0, "/not/a/name").unwrap().is_none());
    }
}
