//! `longctx serve` on the default model, over raw HTTP: the OpenAI shapes of answers
//! (whole and streamed) and of errors, limits, authentication, and a client that leaves
//! mid-stream freeing its KV blocks; the expert cache's metrics on a Llama 4 model.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: String,
    model: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a server on a free port and waits for its "serving" line.
fn serve(extra: &[&str]) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["serve", "--port", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed and waited for on drop, whatever happens below.
    let mut s = Server {
        child,
        addr: String::new(),
        model: String::new(),
    };
    let mut err = BufReader::new(s.child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "server exited: {seen}"
        );
        seen.push_str(&line);
        if let Some(rest) = line.strip_prefix("serving ") {
            s.model = rest.split(" on ").next().unwrap().to_string();
            let addr = rest
                .split("http://")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            s.addr = addr.to_string();
            // Keep draining stderr so the server never blocks on it.
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return s;
        }
    }
}

/// One HTTP/1.1 request: status and body (chunked bodies joined).
fn http(s: &Server, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    let mut raw = vec![];
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (st, b) = http(s, "POST", path, &[], &body.to_string());
    (
        st,
        serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}")),
    )
}

/// The `data:` payloads of an event stream.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

fn metric(s: &Server, name: &str) -> f64 {
    let (_, text) = http(s, "GET", "/metrics", &[], "");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

/// Opens a streamed greedy completion of "Once upon a time", `max_tokens` long.
fn open_stream(s: &Server, max_tokens: usize) -> TcpStream {
    let body = json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": max_tokens,
                      "temperature": 0, "stream": true})
    .to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    c
}

/// Reads `c` into `seen` until `n` more server-sent events have come.
fn read_events(c: &mut TcpStream, seen: &mut String, n: usize) {
    let mut got = [0u8; 4096];
    let want = seen.matches("data: ").count() + n;
    while seen.matches("data: ").count() < want {
        let k = c.read(&mut got).unwrap();
        assert!(k > 0, "the stream ended");
        seen.push_str(&String::from_utf8_lossy(&got[..k]));
    }
}

#[test]
fn answers_whole_and_streamed_have_the_api_s_shape() {
    let s = serve(&["--prefix-cache", "0"]);
    let m = s.model.clone();
    let chat = json!({"model": m, "messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": 8, "temperature": 0});
    let (st, v) = post(&s, "/v1/chat/completions", &chat);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let u = &v["usage"];
    assert_eq!(
        u["completion_tokens"].as_u64().unwrap() + u["prompt_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        c["finish_reason"],
        if u["completion_tokens"] == 8 {
            "length"
        } else {
            "stop"
        }
    );
    // The same request streamed: the deltas join to the same text; the finish, the usage
    // chunk, then [DONE].
    let mut sc = chat.clone();
    sc["stream"] = json!(true);
    sc["stream_options"] = json!({"include_usage": true});
    let (st, body) = http(&s, "POST", "/v1/chat/completions", &[], &sc.to_string());
    assert_eq!(st, 200);
    let ev = events(&body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text);
    let n = chunks.len();
    assert_eq!(
        chunks[n - 2]["choices"][0]["finish_reason"],
        c["finish_reason"]
    );
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"], v["usage"]);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    // Completions, and a stop string that cuts the text (and is not part of it).
    let comp = json!({"model": m, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0});
    let (st, v) = post(&s, "/v1/completions", &comp);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(full.contains(" 6"), "{full}");
    let mut cut = comp.clone();
    cut["stop"] = json!([" 6", "never"]);
    let (_, v) = post(&s, "/v1/completions", &cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        &full[..full.find(" 6").unwrap()]
    );
    cut["stream"] = json!(true);
    let (_, body) = http(&s, "POST", "/v1/completions", &[], &cut.to_string());
    let joined: String = events(&body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(joined, &full[..full.find(" 6").unwrap()]);
    // Several at once: each answer as it is alone.
    let answers: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| sc.spawn(|| post(&s, "/v1/completions", &comp).1))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in answers {
        assert_eq!(a["choices"][0]["text"].as_str().unwrap(), full);
    }
    assert_eq!(http(&s, "POST", "/v1/models", &[], "{}").0, 405);
    let (st, b) = http(&s, "GET", "/v1/models", &[], "");
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["data"][0]["id"],
        json!(m)
    );
    assert_eq!(http(&s, "GET", "/health", &[], "").0, 200);
}

#[test]
fn bad_requests_get_the_api_s_errors() {
    let s = serve(&[
        "--max-context",
        "64",
        "--max-body-bytes",
        "2000",
        "--api-key",
        "sesame",
    ]);
    let key = "Authorization: Bearer sesame";
    let m = s.model.clone();
    let call = |body: &str| {
        let (st, b) = http(&s, "POST", "/v1/chat/completions", &[key], body);
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}"));
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {v}"))
            .to_string();
        (st, msg, v["error"]["code"].clone())
    };
    let msg = |c: &str| json!({"model": m, "messages": [{"role": "user", "content": c}]});
    assert_eq!(call("{not json").0, 400);
    let (st, _, code) = call(
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    );
    assert_eq!((st, code), (400, json!("model_not_found")));
    let mut long = msg(&"word ".repeat(80));
    long["max_tokens"] = json!(4);
    let (st, text, code) = call(&long.to_string());
    assert_eq!(
        (st, code),
        (400, json!("context_length_exceeded")),
        "{text}"
    );
    let mut hot = msg("hi");
    hot["temperature"] = json!(9);
    assert_eq!(call(&hot.to_string()).0, 400);
    let mut many = msg("hi");
    many["max_tokens"] = json!(1000);
    assert_eq!(call(&many.to_string()).2, json!("context_length_exceeded"));
    let (st, text, _) = call(&msg(&"x".repeat(3000)).to_string());
    assert_eq!(st, 413, "{text}");
    // Without the key, or with another: 401; the health check needs none.
    let (st, b) = http(
        &s,
        "POST",
        "/v1/chat/completions",
        &[],
        &msg("hi").to_string(),
    );
    assert_eq!(st, 401, "{b}");
    assert!(b.contains("invalid_api_key"));
    assert_eq!(
        http(&s, "GET", "/v1/models", &["Authorization: Bearer nope"], "").0,
        401
    );
    assert_eq!(http(&s, "GET", "/health", &[], "").0, 200);
    let (st, b) = http(&s, "GET", "/v2/anything", &[], "");
    assert_eq!(st, 404);
    assert!(b.contains("\"error\""));
    // And a good request still works after all of that.
    let mut ok = msg("hi");
    ok["max_tokens"] = json!(3);
    let (st, b) = http(&s, "POST", "/v1/chat/completions", &[key], &ok.to_string());
    assert_eq!(st, 200, "{b}");
}

/// A client that leaves mid-stream ends its request: nothing running, no KV block held.
/// With one slot and one waiting place, a third request is told 429.
#[test]
fn a_client_that_leaves_frees_its_blocks_and_a_full_queue_is_429() {
    let s = serve(&[
        "--prefix-cache",
        "0",
        "--max-running",
        "1",
        "--max-waiting",
        "1",
    ]);
    let mut c = open_stream(&s, 4000);
    // Read until the first tokens have come.
    let mut seen = String::new();
    read_events(&mut c, &mut seen, 3);
    assert!(metric(&s, "longctx_kv_blocks{tier=\"device\"}") > 0.0);
    // One waits, the next is refused.
    let waiting = std::thread::spawn({
        let addr = s.addr.clone();
        let model = s.model.clone();
        move || {
            let b = json!({"model": model, "prompt": "Hi", "max_tokens": 2}).to_string();
            let mut w = TcpStream::connect(addr).unwrap();
            write!(w, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{b}", b.len()).unwrap();
            let mut out = String::new();
            w.read_to_string(&mut out).unwrap();
            out
        }
    });
    let t0 = Instant::now();
    while metric(&s, "longctx_requests_waiting") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the second request never queued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, v) = post(
        &s,
        "/v1/completions",
        &json!({"model": s.model, "prompt": "Hi"}),
    );
    assert_eq!(st, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("busy"));
    drop(c);
    // The stream's request ends, the waiting one runs and answers.
    let answer = waiting.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let t0 = Instant::now();
    while metric(&s, "longctx_requests_running") > 0.0
        || metric(&s, "longctx_kv_blocks{tier=\"device\"}") > 0.0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "blocks still held after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(&s, "longctx_generation_tokens_total") < 4000.0);
}

/// Under KV pressure (`--kv-tokens` for two prompts, blocks of 256) the newer of two
/// requests is preempted: its KV moves to the host tier and back (`/metrics` counts both
/// ways), and each answer is the one it gets alone. On the exact path with fixed row
/// budgets (no pacing by time): the fast path's bf16 tiles round differently for chunks of
/// different sizes, which can flip a greedy near-tie, so it promises no bit-equal answers.
#[test]
fn kv_pressure_swaps_a_request_out_and_back_without_changing_its_answer() {
    let s = serve(&[
        "--prefix-cache",
        "0",
        "--kv-tokens",
        "512",
        "--max-slowdown",
        "0",
        "--exact",
    ]);
    let body = |word: &str| {
        json!({"model": s.model, "prompt": format!("{word} ").repeat(240), "max_tokens": 40,
               "temperature": 0})
    };
    let (a, b) = std::thread::scope(|t| {
        let a = t.spawn(|| post(&s, "/v1/completions", &body("apple")));
        let b = t.spawn(|| post(&s, "/v1/completions", &body("river")));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a.1, b.1);
    assert!(metric(&s, "longctx_preemptions_total") >= 1.0);
    let out = metric(&s, "longctx_kv_swap_blocks_total{direction=\"out\"}");
    assert!(out > 0.0);
    assert_eq!(
        metric(&s, "longctx_kv_swap_blocks_total{direction=\"in\"}"),
        out
    );
    assert_eq!(metric(&s, "longctx_kv_blocks{tier=\"host\"}"), 0.0);
    for (got, word) in [(a, "apple"), (b, "river")] {
        let (st, alone) = post(&s, "/v1/completions", &body(word));
        assert_eq!(st, 200, "{alone}");
        assert_eq!(
            got["choices"][0]["text"], alone["choices"][0]["text"],
            "{word}"
        );
        assert_eq!(got["usage"], alone["usage"], "{word}");
    }
}

/// Under `--expert-budget` (a Llama 4 model), `/metrics` shows what the expert cache did.
#[test]
fn metrics_show_the_expert_cache_under_a_budget() {
    let dir = common::tiny_llama4_with_tokenizer("serve");
    let model = dir.display().to_string();
    let s = serve(&["--model", &model, "--expert-budget", "0"]);
    let body = json!({"model": s.model, "prompt": "w5 w6 w7 w8", "max_tokens": 4,
                      "temperature": 0});
    let (st, v) = post(&s, "/v1/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(metric(&s, "longctx_expert_budget_bytes"), 0.0);
    assert!(metric(&s, "longctx_expert_bytes_read_total") > 0.0);
    // Nothing is kept under a budget of 0: every use reads its expert.
    assert!(metric(&s, "longctx_expert_uses_total{result=\"miss\"}") > 0.0);
    assert_eq!(metric(&s, "longctx_expert_uses_total{result=\"hit\"}"), 0.0);
    drop(s);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A long prompt arriving while a request streams is read in a lane of its own: the stream
/// keeps getting tokens meanwhile (each decode round's as it ends), `/metrics` counts the
/// lane's steps, and the long prompt's answer is the one it gets alone. The exact path: its
/// products give a row the same bits in any chunk.
#[test]
fn a_long_prompt_is_read_in_its_lane_while_a_stream_goes_on() {
    let s = serve(&["--prefix-cache", "0", "--exact"]);
    let mut c = open_stream(&s, 3000);
    let mut seen = String::new();
    read_events(&mut c, &mut seen, 3);
    let long = json!({"model": s.model, "prompt": "the river runs by the old mill ".repeat(150),
                      "max_tokens": 3, "temperature": 0});
    let (st, with_stream) = std::thread::scope(|t| {
        let reader = t.spawn(|| post(&s, "/v1/completions", &long));
        // The stream goes on while the prompt is read.
        while !reader.is_finished() {
            read_events(&mut c, &mut seen, 1);
        }
        reader.join().unwrap()
    });
    assert_eq!(st, 200, "{with_stream}");
    assert!(metric(&s, "longctx_prompt_lane_steps_total") >= 1.0);
    drop(c);
    let (st, alone) = post(&s, "/v1/completions", &long);
    assert_eq!(st, 200, "{alone}");
    assert_eq!(
        with_stream["choices"][0]["text"],
        alone["choices"][0]["text"]
    );
}
