//! The RoPE crate's one error type.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RopeError {
    /// A `rope_type` this crate does not implement.
    #[error("unknown RoPE type `{0}` (known: default, linear, ntk, dynamic, yarn, llama3)")]
    UnknownType(String),
    /// A field the schedule needs is absent or not a number.
    #[error("RoPE config: `{field}` is missing or invalid for rope_type `{rope_type}`")]
    Field {
        field: &'static str,
        rope_type: String,
    },
    /// A value outside what the formulas accept.
    #[error("RoPE config: {0}")]
    Invalid(String),
    /// A buffer whose length does not match its shape.
    #[error("rope apply: buffer has {got} elements, shape [{n}, {h}, {d}] needs {}", n * h * d)]
    Shape {
        n: usize,
        h: usize,
        d: usize,
        got: usize,
    },
    #[error("config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}
