//! Inputs as people give them: `--model org/name` from the local Hugging Face cache,
//! `--prompt -` (stdin) and `--file PATH`, `--system`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_longctx");

/// The default model's file (fetched on first use).
fn default_model() -> PathBuf {
    let out = Command::new(BIN)
        .args(["fetch-model", "smollm2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("longctx-inputs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn run(args: &[&str], env: &[(&str, &Path)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"] {
        if !env.iter().any(|(n, _)| *n == k) {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `error:` line of a failed run (there must be exactly one).
fn error_line(o: &Output) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert!(!o.status.success() && lines.len() == 1, "{err}");
    lines[0].to_string()
}

/// The hub cache as huggingface_hub lays it out: the snapshot's file a relative symlink to
/// its blob (here the blob itself a symlink to the fetched model, to copy nothing).
#[test]
fn a_hub_name_resolves_from_the_huggingface_cache_offline() {
    let model = default_model();
    let root = scratch("hub");
    let repo = root.join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    std::os::unix::fs::symlink(&model, repo.join("blobs/5e1f")).unwrap();
    let file = repo
        .join("snapshots")
        .join(rev)
        .join("smollm2-135m-instruct-q8_0.gguf");
    std::os::unix::fs::symlink("../../blobs/5e1f", &file).unwrap();

    let name = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    let gen = ["generate", "--prompt", "Hi", "--max-tokens", "2", "--model"];
    let out = run(
        &[&gen[..], &[name]].concat(),
        &[("HF_HUB_CACHE", &root)],
        None,
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("model {name}: {}", file.display())),
        "{err}"
    );
    // HF_HOME/hub when HF_HUB_CACHE is not set; the :FILE form picks by part of a name.
    let home = scratch("hfhome");
    std::os::unix::fs::symlink(&root, home.join("hub")).unwrap();
    let out = run(
        &[&gen[..], &[&format!("{name}:Q8_0")]].concat(),
        &[("HF_HOME", &home)],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // `serve` answers to the hub name, as vLLM does.
    let mut server = Command::new(BIN)
        .args(["serve", "--port", "0", "--model", name])
        .env("HF_HUB_CACHE", &root)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("serving "));
    let _ = server.kill();
    let _ = server.wait();
    let serving = serving.expect("a serving line");
    assert!(
        serving.starts_with(&format!("serving {name} on ")),
        "{serving}"
    );

    // Nothing there: one line saying where it looked.
    let out = run(
        &[&gen[..], &["org/absent-model"]].concat(),
        &[("HF_HUB_CACHE", &root)],
        None,
    );
    let err = error_line(&out);
    let looked = root.join("models--org--absent-model");
    assert!(
        err.starts_with(
            "error: model org/absent-model: no such file, and not in the Hugging Face cache"
        ) && err.contains(&looked.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&home);
}

/// `--prompt -` reads stdin and `--file` a file: the same greedy text as `--prompt TEXT`.
#[test]
fn the_prompt_comes_from_stdin_or_a_file() {
    let prompt = "The capital of France is";
    let gen = |extra: &[&str], stdin: Option<&str>| {
        let out = run(
            &[&["generate", "--max-tokens", "4"][..], extra].concat(),
            &[],
            stdin,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = gen(&["--prompt", prompt], None);
    assert!(!want.trim().is_empty());
    assert_eq!(gen(&["--prompt", "-"], Some(prompt)), want);
    let dir = scratch("file");
    let f = dir.join("prompt.txt");
    std::fs::write(&f, prompt).unwrap();
    assert_eq!(gen(&["--file", f.to_str().unwrap()], None), want);
    assert_eq!(gen(&["--file", "-"], Some(prompt)), want);

    let out = run(
        &["generate", "--file", "/nonexistent/prompt.txt"],
        &[],
        None,
    );
    let err = error_line(&out);
    assert!(
        err.contains("reading the prompt from /nonexistent/prompt.txt"),
        "{err}"
    );
    let out = run(
        &["generate", "--prompt", "a", "--file", f.to_str().unwrap()],
        &[],
        None,
    );
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    let out = run(&["generate"], &[], None);
    assert!(stderr(&out).contains("--prompt"), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--system` puts a system message before the prompt in the chat template (and implies
/// `--chat`): more prompt tokens than the bare prompt or the template's default.
#[test]
fn generate_takes_a_system_message() {
    let prompt_tokens = |extra: &[&str]| -> usize {
        let out = run(
            &[
                &["generate", "--prompt", "Hi", "--max-tokens", "1", "--json"][..],
                extra,
            ]
            .concat(),
            &[],
            None,
        );
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        let last = err.trim().lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|_| panic!("{err}"));
        v["prompt_tokens"].as_u64().unwrap() as usize
    };
    let bare = prompt_tokens(&[]);
    let chat = prompt_tokens(&["--chat"]);
    let sys = "You answer every question in one short sentence, politely and precisely.";
    let system = prompt_tokens(&["--system", sys]);
    assert!(bare < chat, "{bare} {chat}");
    assert_ne!(system, chat, "--system changed nothing");
    assert!(system > bare, "{bare} {system}");
}

/// `batch --input -` reads the jobs from stdin.
#[test]
fn batch_reads_jobs_from_stdin() {
    let dir = scratch("batch");
    let output = dir.join("results.jsonl");
    let jobs = "{\"id\": \"a\", \"prompt\": \"Hello\", \"max_tokens\": 2}\n\
                {\"id\": \"b\", \"prompt\": \"The sky is\", \"max_tokens\": 2}\n";
    let out = run(
        &[
            "batch",
            "--input",
            "-",
            "--output",
            output.to_str().unwrap(),
        ],
        &[],
        Some(jobs),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&output).unwrap();
    let mut ids: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"], "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ask ... -` reads the question from stdin; `ask --system` adds instructions.
#[test]
fn ask_reads_the_question_from_stdin() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/rope_scaling/src");
    let ask = [
        "ask",
        "--repo",
        src,
        "--include",
        "lib.rs",
        "--no-cache",
        "--max-tokens",
        "1",
        "-",
    ];
    let out = run(&ask, &[], Some("What does this crate do?\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    // --system adds to ask's own system message: a longer prompt.
    let tokens = |extra: &[&str]| -> u64 {
        let args = [&ask[..ask.len() - 1], extra, &["--json", "What is this?"]].concat();
        let out = run(&args, &[], None);
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_str(err.trim().lines().last().unwrap())
            .unwrap_or_else(|_| panic!("{err}"));
        v["prompt_tokens"].as_u64().unwrap() + v["cached_tokens"].as_u64().unwrap()
    };
    assert!(tokens(&["--system", "Answer in one short sentence."]) > tokens(&[]));
    let out = run(&ask, &[], Some("  \n"));
    assert!(
        error_line(&out).contains("the question is empty"),
        "{}",
        stderr(&out)
    );
}
