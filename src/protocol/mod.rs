//! The Phoenix channel wire format as supabase-js speaks it. Pure: bytes in, typed messages out,
//! and typed messages to shared frames; no I/O and no clocks.
//!
//! Two serializers exist, chosen per socket by the `vsn` query parameter:
//! - [`Vsn::V1`] (`1.0.0`): JSON objects `{topic, event, payload, ref}`; the server never emits
//!   `join_ref`.
//! - [`Vsn::V2`] (`2.0.0`): JSON arrays `[join_ref, ref, topic, event, payload]`, plus binary
//!   frames for user broadcasts (kind 3 in, kind 4 out; see [`binary`]).
//!
//! A decoded [`Inbound`] is told apart into a typed [`event::ClientEvent`] (heartbeat, join,
//! leave, broadcast, presence track/untrack, access_token, unknown), which the session
//! dispatches on; [`join`] parses the `phx_join` payload and [`encode`] makes the server's frames.

pub mod binary;
pub mod encode;
pub mod event;
pub mod join;
pub mod message;
pub mod v1;
pub mod v2;

pub use message::{DecodeError, Encoding, Inbound, InboundPayload, Ref, UserBroadcast};

/// The topic prefix every channel topic has.
pub const TOPIC_PREFIX: &str = "realtime:";

/// Close code for server shutdown, as the original (1012 "Service Restart").
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

/// Most bytes of client-supplied text echoed in an error message or written to the log per
/// field: a 4.5 MB filter echoed whole by 100 refused joins wrote 450 MB of log.
pub const MAX_ECHO_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes (at a character boundary), saying how much was left out.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} more bytes)", &s[..end], s.len() - end))
}

/// One outgoing WebSocket frame. Cloning shares the encoded bytes.
pub type Frame = axum::extract::ws::Message;

/// The serializer a socket negotiated with the `vsn` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    /// `None` (absent) means 1.0.0, as in Phoenix. Versions are matched as Phoenix's
    /// `~> 1.0.0` / `~> 2.0.0` requirements: any patch release of 1.0 or 2.0; anything else is
    /// refused.
    pub fn negotiate(param: Option<&str>) -> Option<Vsn> {
        let Some(v) = param else {
            return Some(Vsn::V1);
        };
        let mut parts = v.split('.');
        let (Some(major), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if minor != "0" || patch.is_empty() || !patch.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        match major {
            "1" => Some(Vsn::V1),
            "2" => Some(Vsn::V2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        }
    }

    /// Decodes a text frame with this serializer.
    pub fn decode_text(self, text: &str) -> Result<Inbound, DecodeError> {
        match self {
            Vsn::V1 => v1::decode(text),
            Vsn::V2 => v2::decode_text(text),
        }
    }

    /// Decodes a binary frame. Only V2 has binary frames.
    pub fn decode_binary(self, bytes: &[u8]) -> Result<Inbound, DecodeError> {
        match self {
            Vsn::V1 => Err(DecodeError::BinaryOnV1),
            Vsn::V2 => binary::decode(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_cuts_at_a_character_boundary_and_says_how_much() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc… (3 more bytes)");
        // 'é' is two bytes: the cut moves back rather than split it.
        assert_eq!(clip("aéb", 2), "a… (3 more bytes)");
    }

    use super::Vsn;

    #[test]
    fn negotiation_follows_phoenix_requirements() {
        assert_eq!(Vsn::negotiate(None), Some(Vsn::V1));
        assert_eq!(Vsn::negotiate(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::negotiate(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::negotiate(Some("2.0.3")), Some(Vsn::V2));
        for bad in ["", "3.0.0", "2.1.0", "2.0", "2.0.0.0", "2.0.x", "v2.0.0"] {
            assert_eq!(Vsn::negotiate(Some(bad)), None, "{bad}");
        }
    }

    /// CONFIG.md and ERROR_CODES.md say what `negotiate` does (patch releases are accepted),
    /// with examples that hold.
    #[test]
    fn the_docs_describe_the_negotiation() {
        for (name, doc) in [
            ("CONFIG.md", include_str!("../../CONFIG.md")),
            ("ERROR_CODES.md", include_str!("../../ERROR_CODES.md")),
        ] {
            assert!(doc.contains("`~> 2.0.0`"), "{name} names the rule");
            for stale in ["neither `1.0.0` nor `2.0.0`", "or `2.0.0`; anything else"] {
                assert!(!doc.contains(stale), "{name} still says {stale}");
            }
        }
        assert_eq!(Vsn::negotiate(Some("2.0.1")), Some(Vsn::V2));
        assert_eq!(Vsn::negotiate(Some("1.0.7")), Some(Vsn::V1));
        for refused in ["2.1.0", "3.0.0", "2.0"] {
            assert_eq!(Vsn::negotiate(Some(refused)), None, "{refused}");
        }
    }
}
