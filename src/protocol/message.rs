//! The decoded form of a client frame, shared by both serializers.

use bytes::Bytes;
use serde_json::value::RawValue;

/// A `ref` or `join_ref` as the client sent it (normally a string, `null` when absent). It is
/// echoed back verbatim, so it is kept as JSON.
pub type Ref = serde_json::Value;

/// One client message after framing has been removed.
#[derive(Debug)]
pub struct Inbound {
    pub join_ref: Ref,
    pub msg_ref: Ref,
    pub topic: String,
    pub event: String,
    pub payload: InboundPayload,
}

/// The payload of a client message. JSON payloads stay unparsed until a handler needs them, so
/// a broadcast is relayed without being re-encoded.
#[derive(Debug)]
pub enum InboundPayload {
    Json(Box<RawValue>),
    /// A V2 kind-3 "user broadcast push" (what supabase-js sends for every `send()` on vsn 2).
    UserBroadcast(UserBroadcast),
}

/// How a user broadcast's payload bytes are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Binary,
    Json,
}

impl Encoding {
    pub fn wire_byte(self) -> u8 {
        match self {
            Encoding::Binary => 0,
            Encoding::Json => 1,
        }
    }
}

/// A broadcast whose event name and payload travel outside the JSON envelope.
#[derive(Clone, Debug)]
pub struct UserBroadcast {
    pub event: String,
    pub encoding: Encoding,
    /// The payload bytes: UTF-8 JSON text when `encoding` is `Json` (validated on decode).
    pub payload: Bytes,
    /// Client metadata (JSON object text), kept for future use; never forwarded.
    pub metadata: Option<Bytes>,
}

/// Why a frame could not be decoded. The frame is dropped and logged; the socket stays up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("expected a JSON object with topic, event, payload and ref")]
    NotV1Object,
    #[error("expected a JSON array [join_ref, ref, topic, event, payload]")]
    NotV2Array,
    #[error("`{0}` must be a string")]
    NotAString(&'static str),
    #[error("binary frames are not part of vsn 1.0.0")]
    BinaryOnV1,
    #[error("empty binary frame")]
    EmptyBinary,
    #[error("unsupported binary frame kind {0}")]
    UnknownKind(u8),
    #[error("binary frame is truncated: header says {expected} bytes, frame has {actual}")]
    Truncated { expected: usize, actual: usize },
    #[error("binary frame field `{0}` is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("binary frame payload is declared JSON but is not valid JSON")]
    PayloadNotJson,
    #[error("binary frame metadata is not a JSON object")]
    MetadataNotJson,
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// The deepest JSON nesting a frame may have. serde_json stops at 128 when building values but
/// not when skipping over raw ones, so frames are checked up front.
pub const MAX_DEPTH: usize = 128;

/// Fails when `json` nests arrays/objects deeper than [`MAX_DEPTH`]. A linear scan that skips
/// strings; it does not validate the JSON (the parser does that).
pub fn check_depth(json: &[u8]) -> Result<(), DecodeError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}
