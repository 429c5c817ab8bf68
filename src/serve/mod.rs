//! `longctx serve`: an OpenAI-compatible HTTP server on tokio (axum). This layer holds no
//! model logic: it checks requests, renders the chat template, tokenizes, and turns the
//! scheduler's token events into responses (whole, or server-sent events); the model runs
//! on its own thread ([`worker`]) with continuous batching over every open request.

mod openai;
mod worker;

use crate::commands::DecodeOpts;
use anyhow::Result;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use longctx_engine::generate::Sampling;
use longctx_engine::sched::{Event, Finish, Request, RequestId, SchedConfig, Usage};
use longctx_engine::{EngineError, Tokenizer};
use openai::{ApiError, Kind};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use worker::{Cmd, Worker};

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name (org/name[:FILE], from the
    /// local Hugging Face cache). Default: SmolLM2-135M-Instruct (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on; the default is this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port to listen on.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests (default: LONGCTX_API_KEY if set).
    #[arg(long)]
    api_key: Option<String>,
    /// The model's name in the API. Default: the hub name given to --model, else the file or
    /// directory name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests decoding at once.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Requests waiting for a slot; beyond it the server answers 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Rows per forward step (decode rows first, then prompt chunks): bounds how long a
    /// long prompt delays the others' next token.
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// While requests decode, a step reads only as many prompt rows as keep it within this
    /// many times the time of its decode rows alone (0: only the row budget limits it).
    #[arg(long, default_value_t = 3.0)]
    max_slowdown: f64,
    /// Reads a prompt in shared steps with the decoding requests, on every thread, instead
    /// of in a lane of its own beside them (half the threads each; the default with two or
    /// more threads).
    #[arg(long)]
    no_prompt_lane: bool,
    /// Prompt plus new tokens of one request (default: the model's trained context, at
    /// most 32768).
    #[arg(long)]
    max_context: Option<usize>,
    /// KV tokens the running requests may hold in the device tier together (whole blocks);
    /// past it the newest is preempted, its KV moved to the host tier until room frees.
    #[arg(long, default_value_t = 1 << 17)]
    kv_tokens: usize,
    /// Finished sequences kept for prefix reuse (0: none).
    #[arg(long, default_value_t = 16)]
    prefix_cache: usize,
    /// Largest request body accepted.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    #[command(flatten)]
    decode: DecodeOpts,
}

struct App {
    worker: Worker,
    tokenizer: Tokenizer,
    stop_tokens: Vec<u32>,
    served: String,
    max_context: usize,
    api_key: Option<String>,
    started: u64,
    next: AtomicU64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(args: Args) -> Result<()> {
    for (v, name) in [
        (args.max_running, "--max-running"),
        (args.step_tokens, "--step-tokens"),
        (args.kv_tokens, "--kv-tokens"),
        (args.max_body_bytes, "--max-body-bytes"),
    ] {
        anyhow::ensure!(v >= 1, "{name} must be at least 1");
    }
    let path = crate::commands::resolve_model(&args.model)?;
    let served = match (&args.served_model_name, &args.model) {
        (Some(n), _) => n.clone(),
        // A hub name (`org/name`) is what clients ask for, as vLLM serves it.
        (None, Some(typed)) if !typed.exists() => typed.display().to_string(),
        (None, _) => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let m = args.decode.open(&Some(path))?;
    let stop_tokens = m.stop_tokens();
    let max_context = args
        .max_context
        .unwrap_or(m.model.cfg.max_position.min(32768));
    anyhow::ensure!(max_context >= 2, "--max-context must be at least 2");
    let cfg = SchedConfig {
        max_running: args.max_running,
        max_waiting: args.max_waiting,
        step_tokens: args.step_tokens,
        max_context,
        kv_tokens: args.kv_tokens,
        prefix_entries: args.prefix_cache,
        max_slowdown: args.max_slowdown,
        prompt_lane: !args.no_prompt_lane,
    };
    let worker = Worker::start(m.model, args.decode.kv().with_host_tier(), cfg)?;
    let app = Arc::new(App {
        worker,
        tokenizer: m.tokenizer,
        stop_tokens,
        served: served.clone(),
        max_context,
        api_key: args.api_key.clone().or_else(|| {
            std::env::var("LONGCTX_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        }),
        started: now(),
        next: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::bad("no such endpoint", None).status(StatusCode::NOT_FOUND, "not_found_error")
        })
        .layer(DefaultBodyLimit::max(args.max_body_bytes))
        .with_state(app);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "serving {served} on http://{} (OpenAI API under /v1; /health, /metrics)",
            listener.local_addr()?
        );
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

fn authorized(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "a valid API key is required (Authorization: Bearer ...)",
            None,
        )
        .status(StatusCode::UNAUTHORIZED, "invalid_request_error")
        .with_code("invalid_api_key"))
    }
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorized(&app, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": app.served, "object": "model", "created": app.started, "owned_by": "longctx",
        "max_model_len": app.max_context,
    }]}))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = *app.worker.metrics.lock().unwrap_or_else(|p| p.into_inner());
    let s = m.stats;
    let hit = if s.prompt_tokens > 0 {
        s.cached_tokens as f64 / s.prompt_tokens as f64
    } else {
        0.0
    };
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, rows: &[(String, f64)]| {
        out.push_str(&format!(
            "# HELP longctx_{name} {help}\n# TYPE longctx_{name} {kind}\n"
        ));
        for (labels, v) in rows {
            out.push_str(&format!("longctx_{name}{labels} {v}\n"));
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    put(
        "requests_running",
        "gauge",
        "Requests decoding or reading their prompt.",
        &one(s.running as f64),
    );
    put(
        "requests_waiting",
        "gauge",
        "Requests queued for a slot.",
        &one(s.waiting as f64),
    );
    put(
        "requests_swapped",
        "gauge",
        "Requests preempted under KV pressure, their KV in the host tier.",
        &one(s.swapped as f64),
    );
    put(
        "preemptions_total",
        "counter",
        "Requests preempted so far (KV moved to the host tier, not recomputed).",
        &one(s.preemptions as f64),
    );
    put(
        "kv_swap_blocks_total",
        "counter",
        "KV blocks moved out of the device tier by preemption, and back in.",
        &[
            ("{direction=\"out\"}".into(), s.swap_out_blocks as f64),
            ("{direction=\"in\"}".into(), s.swap_in_blocks as f64),
        ],
    );
    put(
        "requests_total",
        "counter",
        "Requests ended, by outcome.",
        &[
            ("{outcome=\"finished\"}".into(), m.requests_done as f64),
            ("{outcome=\"failed\"}".into(), m.requests_failed as f64),
        ],
    );
    let tiers = ["device", "host", "disk"];
    let blocks: Vec<(String, f64)> = tiers
        .iter()
        .zip(s.kv_blocks)
        .map(|(t, b)| (format!("{{tier=\"{t}\"}}"), b as f64))
        .collect();
    put("kv_blocks", "gauge", "KV blocks held, per tier.", &blocks);
    put(
        "prefix_cache_entries",
        "gauge",
        "Finished sequences kept for reuse.",
        &one(s.prefix_entries as f64),
    );
    put(
        "prefix_cache_hit_rate",
        "gauge",
        "Prompt tokens served from the prefix cache, of all prompt tokens.",
        &one(hit),
    );
    put(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens received.",
        &one(s.prompt_tokens as f64),
    );
    put(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens whose KV was reused.",
        &one(s.cached_tokens as f64),
    );
    put(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        &one(s.generated_tokens as f64),
    );
    put(
        "prompt_tokens_per_second",
        "gauge",
        "Prompt tokens computed per second, recently.",
        &one(m.prompt_tps),
    );
    put(
        "generation_tokens_per_second",
        "gauge",
        "Tokens generated per second, recently.",
        &one(m.generation_tps),
    );
    put(
        "steps_total",
        "counter",
        "Forward steps run.",
        &one(s.steps as f64),
    );
    put(
        "prompt_lane_steps_total",
        "counter",
        "Steps that read a prompt in a lane of its own beside decode rounds.",
        &one(s.lane_steps as f64),
    );
    if let Some(e) = m.experts {
        put(
            "expert_budget_bytes",
            "gauge",
            "Bytes of routed experts kept resident at most (--expert-budget).",
            &one(e.budget_bytes as f64),
        );
        put(
            "expert_resident_peak_bytes",
            "gauge",
            "The most bytes of prepared routed experts held at once.",
            &one(e.resident_peak_bytes as f64),
        );
        put(
            "expert_bytes_read_total",
            "counter",
            "Bytes of the model file read to bring routed experts in.",
            &one(e.bytes_read as f64),
        );
        put(
            "expert_uses_total",
            "counter",
            "Uses of routed experts, by whether the expert was resident.",
            &[
                ("{result=\"hit\"}".into(), e.hits as f64),
                ("{result=\"miss\"}".into(), e.misses as f64),
            ],
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn chat(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_request(app, headers, body, Kind::Chat).await
}

async fn completion(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_request(app, headers, body, Kind::Completion).await
}

/// Ends the request in the scheduler when its response is dropped before it finished (the
/// client went away): its KV blocks are freed at once.
struct Guard {
    worker: Worker,
    id: RequestId,
    live: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.live {
            self.worker.send(Cmd::Finish(self.id));
        }
    }
}

/// Text of the tokens so far, streamed as whole characters, cut at the first stop string
/// (text that may begin one is held back until it cannot).
struct Detok {
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
    text: String,
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl Detok {
    fn new(stops: Vec<String>) -> Detok {
        Detok {
            tokens: vec![],
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
            stops,
            stopped: false,
        }
    }

    /// Adds a token; the text that may be sent now.
    fn push(&mut self, tok: &Tokenizer, t: u32) -> longctx_engine::Result<String> {
        self.tokens.push(t);
        // Decoding a short window (as vLLM does) keeps each token's cost constant.
        let before = tok.decode(&self.tokens[self.prefix..self.read])?;
        let now = tok.decode(&self.tokens[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
            }
            self.prefix = self.read;
            self.read = self.tokens.len();
        }
        let hold = self.stops.iter().map(String::len).max().unwrap_or(1) - 1;
        // From a character boundary: the held-back bytes may end inside a character.
        let mut from = self.sent.saturating_sub(hold);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
        {
            // Never before what was sent (the hold-back keeps a stop string unsent).
            let at = at.max(self.sent);
            self.text.truncate(at);
            self.stopped = true;
            return Ok(self.take(at));
        }
        let mut end = self.text.len().saturating_sub(hold).max(self.sent);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        Ok(self.take(end.max(self.sent)))
    }

    fn take(&mut self, end: usize) -> String {
        let s = self.text[self.sent..end].to_string();
        self.sent = end;
        s
    }

    /// What is left to send at the end.
    fn rest(&mut self) -> String {
        let end = self.text.len();
        self.take(end)
    }
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Stop | Finish::Cancelled => "stop",
    }
}

async fn serve_request(
    app: Arc<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Response {
    match start(&app, headers, body, kind).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn start(
    app: &Arc<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    authorized(app, &headers)?;
    let body = body.map_err(|r| {
        let status = r.status();
        ApiError::bad(
            format!("the request body could not be read: {}", r.body_text()),
            None,
        )
        .status(status, "invalid_request_error")
    })?;
    let p = openai::parse(&body, kind, &app.served)?;
    let text = match kind {
        Kind::Chat => {
            let msgs: Vec<(&str, &str)> = p
                .messages
                .iter()
                .map(|(r, c)| (r.as_str(), c.as_str()))
                .collect();
            app.tokenizer
                .render_chat(&msgs)
                .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?
        }
        Kind::Completion => p.prompt.clone(),
    };
    let ids = app
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::bad(e.to_string(), None))?;
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    let room = app.max_context.saturating_sub(ids.len());
    let max_tokens = p.max_tokens.unwrap_or(match kind {
        Kind::Chat => room,
        Kind::Completion => 16.min(room),
    });
    if room == 0 || max_tokens > room {
        return Err(ApiError::bad(
            format!(
                "this model's maximum context length is {} tokens; the prompt has {} tokens and \
                 {} new tokens were asked for",
                app.max_context,
                ids.len(),
                max_tokens
            ),
            Some("max_tokens"),
        )
        .with_code("context_length_exceeded"));
    }
    let seed = p.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let prompt_len = ids.len();
    let req = Request {
        prompt: ids,
        max_tokens,
        sampling: Sampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            seed,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            ..Sampling::default()
        },
        stop: app.stop_tokens.clone(),
    };
    let (etx, erx) = mpsc::unbounded_channel();
    let (rtx, rrx) = oneshot::channel();
    let gone = || {
        ApiError::bad("the model's thread has stopped", None)
            .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
    };
    if !app.worker.send(Cmd::Submit {
        req,
        events: etx,
        reply: rtx,
    }) {
        return Err(gone());
    }
    let id = match rrx.await.map_err(|_| gone())? {
        Ok(id) => id,
        Err(EngineError::Busy(n)) => {
            return Err(ApiError::bad(
                format!("the server is busy ({n} requests waiting); try again later"),
                None,
            )
            .status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"))
        }
        Err(e @ EngineError::PromptTooLong { .. }) => {
            return Err(ApiError::bad(e.to_string(), None).with_code("context_length_exceeded"))
        }
        Err(e) => return Err(ApiError::bad(e.to_string(), None)),
    };
    let guard = Guard {
        worker: app.worker.clone(),
        id,
        live: true,
    };
    let n = app.next.fetch_add(1, Ordering::Relaxed);
    let rid = match kind {
        Kind::Chat => format!("chatcmpl-{n:x}{:x}", app.started),
        Kind::Completion => format!("cmpl-{n:x}{:x}", app.started),
    };
    let task = Answer {
        app: app.clone(),
        kind,
        rid,
        created: now(),
        events: erx,
        guard,
        detok: Detok::new(p.stop.clone()),
        usage: Usage {
            prompt_tokens: prompt_len,
            completion_tokens: 0,
            cached_tokens: 0,
        },
        finished: None,
        over: false,
    };
    if p.stream {
        Ok(task.stream(p.include_usage))
    } else {
        task.whole().await
    }
}

/// One request's answer being received from the model's thread.
struct Answer {
    app: Arc<App>,
    kind: Kind,
    rid: String,
    created: u64,
    events: mpsc::UnboundedReceiver<Event>,
    guard: Guard,
    detok: Detok,
    usage: Usage,
    /// The finish reason, once the answer ended (sent after its last text).
    finished: Option<&'static str>,
    over: bool,
}

/// A piece of the answer: text to send, then the finish reason, or a failure.
enum Piece {
    Text(String),
    End(&'static str),
    Failed(String),
}

impl Answer {
    async fn next(&mut self) -> Option<Piece> {
        if self.over {
            return None;
        }
        if let Some(reason) = self.finished {
            self.over = true;
            return Some(Piece::End(reason));
        }
        loop {
            let Some(ev) = self.events.recv().await else {
                self.over = true;
                return Some(Piece::Failed(
                    "the model's thread dropped the request".into(),
                ));
            };
            match ev {
                Event::Admitted { cached_tokens, .. } => self.usage.cached_tokens = cached_tokens,
                Event::Token { token, .. } => {
                    self.usage.completion_tokens += 1;
                    let text = match self.detok.push(&self.app.tokenizer, token) {
                        Ok(t) => t,
                        Err(e) => {
                            self.over = true;
                            return Some(Piece::Failed(e.to_string()));
                        }
                    };
                    if self.detok.stopped {
                        // A stop string: the request ends here and its sequence is freed.
                        self.guard.worker.send(Cmd::Finish(self.guard.id));
                        self.guard.live = false;
                        self.events.close();
                        self.finished = Some("stop");
                        return Some(Piece::Text(text));
                    }
                    if !text.is_empty() {
                        return Some(Piece::Text(text));
                    }
                }
                Event::Done { finish, usage, .. } => {
                    self.guard.live = false;
                    self.usage.prompt_tokens = usage.prompt_tokens;
                    self.usage.completion_tokens = usage.completion_tokens;
                    self.finished = Some(finish_reason(finish));
                    return Some(Piece::Text(self.detok.rest()));
                }
                Event::Failed { error, .. } => {
                    self.guard.live = false;
                    self.over = true;
                    return Some(Piece::Failed(error));
                }
            }
        }
    }

    fn failed(message: String) -> ApiError {
        ApiError::bad(message, None).status(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
    }

    async fn whole(mut self) -> Result<Response, ApiError> {
        let mut text = String::new();
        while let Some(p) = self.next().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::End(reason) => {
                    let a = &self.app;
                    let body = openai::response(
                        self.kind,
                        &self.rid,
                        &a.served,
                        self.created,
                        &text,
                        reason,
                        &self.usage,
                    );
                    return Ok(Json(body).into_response());
                }
                Piece::Failed(e) => return Err(Answer::failed(e)),
            }
        }
        Err(Answer::failed("the answer ended without a finish".into()))
    }

    /// Server-sent events: chunks as text comes, the finish, the usage when asked, `[DONE]`.
    /// The events go through a channel the response body reads, so a client that goes away
    /// ends this task (and the request) at once, even while it waits for a slot.
    fn stream(mut self, include_usage: bool) -> Response {
        let (tx, mut rx) = mpsc::channel::<SseEvent>(64);
        tokio::spawn(async move {
            let (kind, served) = (self.kind, self.app.served.clone());
            let chunk = |a: &Answer,
                         delta: Option<serde_json::Value>,
                         text: Option<&str>,
                         f: Option<&str>,
                         u: Option<&Usage>| {
                let c = openai::chunk(kind, &a.rid, &served, a.created, delta, text, f, u);
                SseEvent::default().data(c.to_string())
            };
            if kind == Kind::Chat {
                let first = chunk(
                    &self,
                    Some(json!({"role": "assistant", "content": ""})),
                    None,
                    None,
                    None,
                );
                if tx.send(first).await.is_err() {
                    return;
                }
            }
            loop {
                let piece = tokio::select! {
                    p = self.next() => p,
                    _ = tx.closed() => return,
                };
                let ev = match piece {
                    None => break,
                    Some(Piece::Text(t)) if t.is_empty() => continue,
                    Some(Piece::Text(t)) => chunk(&self, None, Some(&t), None, None),
                    Some(Piece::End(reason)) => {
                        if tx
                            .send(chunk(&self, Some(json!({})), None, Some(reason), None))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if include_usage {
                            let u = self.usage;
                            if tx
                                .send(chunk(&self, None, None, None, Some(&u)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        break;
                    }
                    Some(Piece::Failed(e)) => {
                        let body = Answer::failed(e).body();
                        let _ = tx.send(SseEvent::default().data(body.to_string())).await;
                        break;
                    }
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        });
        let body = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|o| o.map(Ok::<_, std::convert::Infallible>))
        });
        Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}
