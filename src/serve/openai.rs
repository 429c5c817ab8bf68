//! The OpenAI API's shapes: request fields checked into one [`Params`], errors as the API
//! writes them (`{"error": {"message", "type", "param", "code"}}`), response and stream
//! chunk objects.

use axum::http::StatusCode;
use serde_json::{json, Value};

/// A request's error: its status and the API's error object.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, s: StatusCode, kind: &'static str) -> ApiError {
        self.status = s;
        self.kind = kind;
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A request's fields, checked.
#[derive(Debug)]
pub struct Params {
    /// The chat's messages (role, content) or the completion's prompt.
    pub messages: Vec<(String, String)>,
    pub prompt: String,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    /// Sampler penalties and min-p (OpenAI's two penalties; `repetition_penalty` and
    /// `min_p` as vLLM takes them); neutral when absent.
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn number(v: &Value, name: &'static str) -> Result<Option<f64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("'{name}' must be a number"), Some(name))),
    }
}

fn integer(v: &Value, name: &'static str) -> Result<Option<i64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("'{name}' must be an integer"), Some(name))),
    }
}

fn boolean(v: &Value, name: &'static str) -> Result<bool, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(
            format!("'{name}' must be a boolean"),
            Some(name),
        )),
    }
}

/// A message's content: a string, or an array of `{"type": "text", "text": ...}` parts.
fn content(c: &Value) -> Result<String, ApiError> {
    match c {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => s.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            "only text content parts are supported",
                            Some("messages"),
                        ))
                    }
                }
            }
            Ok(s)
        }
        _ => Err(ApiError::bad(
            "a message's content must be a string or an array of text parts",
            Some("messages"),
        )),
    }
}

/// Checks a request body against the API: every field's type and range, `model` against
/// the one served.
pub fn parse(body: &[u8], kind: Kind, served: &str) -> Result<Params, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::bad("the body must be a JSON object", None));
    }
    match v.get("model").and_then(Value::as_str) {
        Some(m) if m == served => {}
        Some(m) => {
            return Err(ApiError::bad(
                format!("the model '{m}' does not exist; this server serves '{served}'"),
                Some("model"),
            )
            .with_code("model_not_found"))
        }
        None => return Err(ApiError::bad("'model' is required", Some("model"))),
    }
    let mut messages = vec![];
    let mut prompt = String::new();
    match kind {
        Kind::Chat => {
            let msgs = v
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    ApiError::bad("'messages' must be a non-empty array", Some("messages"))
                })?;
            for m in msgs {
                let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::bad("every message needs a string 'role'", Some("messages"))
                })?;
                if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
                    return Err(ApiError::bad(
                        format!("unknown message role '{role}'"),
                        Some("messages"),
                    ));
                }
                let role = if role == "developer" { "system" } else { role };
                messages.push((
                    role.to_string(),
                    content(m.get("content").unwrap_or(&Value::Null))?,
                ));
            }
        }
        Kind::Completion => {
            prompt = match v.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                Some(Value::Array(_)) => {
                    return Err(ApiError::bad(
                        "'prompt' must be one string (batches of prompts are not supported)",
                        Some("prompt"),
                    ))
                }
                _ => return Err(ApiError::bad("'prompt' must be a string", Some("prompt"))),
            };
        }
    }
    let max_tokens = match integer(&v, "max_completion_tokens")?.or(integer(&v, "max_tokens")?) {
        None => None,
        Some(n) if n >= 1 => Some(n as usize),
        Some(_) => {
            return Err(ApiError::bad(
                "'max_tokens' must be at least 1",
                Some("max_tokens"),
            ))
        }
    };
    let temperature = number(&v, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "'temperature' must be within [0, 2]",
            Some("temperature"),
        ));
    }
    let top_p = number(&v, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "'top_p' must be within (0, 1]",
            Some("top_p"),
        ));
    }
    let top_k = match integer(&v, "top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(_) => {
            return Err(ApiError::bad(
                "'top_k' must be -1, 0 or positive",
                Some("top_k"),
            ))
        }
    };
    let seed = integer(&v, "seed")?.map(|s| s as u64);
    let ranged = |name: &'static str, default: f64, ok: fn(f64) -> bool, range: &str| {
        let x = number(&v, name)?.unwrap_or(default);
        if ok(x) {
            Ok(x as f32)
        } else {
            Err(ApiError::bad(
                format!("'{name}' must be {range}"),
                Some(name),
            ))
        }
    };
    let min_p = ranged("min_p", 0.0, |x| (0.0..=1.0).contains(&x), "within [0, 1]")?;
    let repetition_penalty = ranged(
        "repetition_penalty",
        1.0,
        |x| x > 0.0 && x <= 10.0,
        "within (0, 10]",
    )?;
    let frequency_penalty = ranged(
        "frequency_penalty",
        0.0,
        |x| (-2.0..=2.0).contains(&x),
        "within [-2, 2]",
    )?;
    let presence_penalty = ranged(
        "presence_penalty",
        0.0,
        |x| (-2.0..=2.0).contains(&x),
        "within [-2, 2]",
    )?;
    if let Some(n) = integer(&v, "n")? {
        if n != 1 {
            return Err(ApiError::bad("only 'n' = 1 is supported", Some("n")));
        }
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(_) => {
            return Err(ApiError::bad(
                "'stop' must be a string or an array of at most 4 strings",
                Some("stop"),
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "a stop sequence must not be empty",
            Some("stop"),
        ));
    }
    let stream = boolean(&v, "stream")?;
    let include_usage = match v.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(o) if o.is_object() => boolean(o, "include_usage")?,
        Some(_) => {
            return Err(ApiError::bad(
                "'stream_options' must be an object",
                Some("stream_options"),
            ))
        }
    };
    Ok(Params {
        messages,
        prompt,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        min_p,
        repetition_penalty,
        frequency_penalty,
        presence_penalty,
        stop,
        stream,
        include_usage,
    })
}

/// The API's `usage` object.
pub fn usage(u: &longctx_engine::sched::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// A whole (non-streamed) response.
pub fn response(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: &str,
    u: &longctx_engine::sched::Usage,
) -> Value {
    match kind {
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": finish}],
            "usage": usage(u),
        }),
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            "usage": usage(u),
        }),
    }
}

/// One streamed chunk: a chat `delta` (or `text` as the delta's content), a completion's
/// `text`, `finish` on the last; `usage` alone (empty choices) for the usage chunk.
#[allow(clippy::too_many_arguments)]
pub fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    delta: Option<Value>,
    text: Option<&str>,
    finish: Option<&str>,
    usage_of: Option<&longctx_engine::sched::Usage>,
) -> Value {
    let (object, choices) = match kind {
        Kind::Chat => {
            let delta = delta.unwrap_or_else(|| json!({"content": text.unwrap_or("")}));
            (
                "chat.completion.chunk",
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
            )
        }
        Kind::Completion => (
            "text_completion",
            json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                    "finish_reason": finish}]),
        ),
    };
    let mut c = json!({"id": id, "object": object, "created": created, "model": model,
                       "choices": choices});
    if let Some(u) = usage_of {
        c["choices"] = json!([]);
        c["usage"] = usage(u);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(body: &str) -> String {
        let e = parse(body.as_bytes(), Kind::Chat, "m").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        e.message
    }

    #[test]
    fn fields_are_checked() {
        let ok = r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
        let p = parse(ok.as_bytes(), Kind::Chat, "m").unwrap();
        assert_eq!(p.messages, vec![("user".into(), "hi".into())]);
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.stream),
            (1.0, 1.0, 0, false)
        );
        // Every penalty neutral unless asked for.
        assert_eq!(
            (
                p.min_p,
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty
            ),
            (0.0, 1.0, 0.0, 0.0)
        );
        let p = parse(
            r#"{"model": "m", "prompt": "hi", "min_p": 0.05, "repetition_penalty": 1.1,
                "frequency_penalty": 0.5, "presence_penalty": -0.5}"#
                .as_bytes(),
            Kind::Completion,
            "m",
        )
        .unwrap();
        assert_eq!(
            (
                p.min_p,
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty
            ),
            (0.05, 1.1, 0.5, -0.5)
        );
        assert!(bad("{").contains("not valid JSON"));
        assert!(bad("[1]").contains("JSON object"));
        assert!(bad(r#"{"model": "x", "messages": []}"#).contains("does not exist"));
        assert!(bad(r#"{"model": "m", "messages": []}"#).contains("non-empty"));
        let with = |extra: &str| {
            format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], {extra}}}"#
            )
        };
        for (field, want) in [
            (r#""temperature": 3"#, "temperature"),
            (r#""temperature": "hot""#, "number"),
            (r#""top_p": 0"#, "top_p"),
            (r#""top_k": -3"#, "top_k"),
            (r#""max_tokens": 0"#, "at least 1"),
            (r#""max_tokens": 1.5"#, "integer"),
            (r#""n": 2"#, "'n'"),
            (r#""stop": ["a", "b", "c", "d", "e"]"#, "stop"),
            (r#""stop": [""]"#, "empty"),
            (r#""stream": "yes""#, "boolean"),
            (r#""stream_options": 1"#, "object"),
            (r#""min_p": 1.5"#, "'min_p' must be within [0, 1]"),
            (r#""min_p": "x""#, "'min_p' must be a number"),
            (r#""repetition_penalty": 0"#, "'repetition_penalty' must be"),
            (
                r#""repetition_penalty": -1.1"#,
                "'repetition_penalty' must be",
            ),
            (r#""frequency_penalty": 2.5"#, "'frequency_penalty' must be"),
            (r#""presence_penalty": -3"#, "'presence_penalty' must be"),
        ] {
            let m = bad(&with(field));
            assert!(m.contains(want), "{field}: {m}");
        }
        let p = parse(
            with(r#""stop": "\n", "stream": true, "stream_options": {"include_usage": true}, "seed": 3, "top_k": 40, "max_tokens": 7"#)
                .as_bytes(),
            Kind::Chat,
            "m",
        )
        .unwrap();
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert!(p.stream && p.include_usage);
        assert_eq!((p.seed, p.top_k, p.max_tokens), (Some(3), 40, Some(7)));
        let e = parse(
            br#"{"model": "m", "prompt": [1, 2]}"#,
            Kind::Completion,
            "m",
        )
        .unwrap_err();
        assert!(e.message.contains("prompt"));
        let p = parse(
            br#"{"model": "m", "prompt": ["once"]}"#,
            Kind::Completion,
            "m",
        )
        .unwrap();
        assert_eq!(p.prompt, "once");
    }
}
