//! V2 binary frames. supabase-js sends kind 3 ("user broadcast push") for every `send()` and
//! decodes only kind 4 ("user broadcast"); the other Phoenix kinds (0 push, 1 reply, 2 broadcast)
//! must never be sent to it, so the encoder here only makes kind 4.
//!
//! Every length is one byte, so each header field is at most 255 bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::message::{DecodeError, Encoding, Inbound, InboundPayload, UserBroadcast};

const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;
/// The longest topic, event or metadata a binary header can describe.
pub const MAX_FIELD: usize = 255;

/// Decodes a client binary frame. Only kind 3 is accepted.
pub fn decode(frame: &[u8]) -> Result<Inbound, DecodeError> {
    let (&kind, rest) = frame.split_first().ok_or(DecodeError::EmptyBinary)?;
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(DecodeError::UnknownKind(kind));
    }
    const HEADER: usize = 6;
    if rest.len() < HEADER {
        return Err(DecodeError::Truncated {
            expected: HEADER + 1,
            actual: frame.len(),
        });
    }
    let lens = [rest[0], rest[1], rest[2], rest[3], rest[4]].map(usize::from);
    let encoding = match rest[5] {
        0 => Encoding::Binary,
        _ => Encoding::Json,
    };
    let body = &rest[HEADER..];
    let fixed: usize = lens.iter().sum();
    if body.len() < fixed {
        return Err(DecodeError::Truncated {
            expected: 1 + HEADER + fixed,
            actual: frame.len(),
        });
    }
    let mut at = 0;
    let mut take = |len: usize| {
        let field = &body[at..at + len];
        at += len;
        field
    };
    let join_ref = utf8(take(lens[0]), "join_ref")?;
    let msg_ref = utf8(take(lens[1]), "ref")?;
    let topic = utf8(take(lens[2]), "topic")?;
    let event = utf8(take(lens[3]), "event")?;
    let metadata = take(lens[4]);
    let payload = &body[fixed..];

    let metadata = if metadata.is_empty() {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(metadata) {
            Ok(serde_json::Value::Object(_)) => Some(Bytes::copy_from_slice(metadata)),
            _ => return Err(DecodeError::MetadataNotJson),
        }
    };
    if encoding == Encoding::Json {
        super::message::check_depth(payload)?;
    }
    if encoding == Encoding::Json
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_err()
    {
        return Err(DecodeError::PayloadNotJson);
    }
    Ok(Inbound {
        join_ref: serde_json::Value::String(join_ref.to_owned()),
        msg_ref: serde_json::Value::String(msg_ref.to_owned()),
        topic: topic.to_owned(),
        event: "broadcast".to_owned(),
        payload: InboundPayload::UserBroadcast(UserBroadcast {
            event: event.to_owned(),
            encoding,
            payload: Bytes::copy_from_slice(payload),
            metadata,
        }),
    })
}

fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8(field))
}

/// A header field too long for a one-byte length.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{field}` is {len} bytes; binary frames allow at most 255")]
pub struct FieldTooLong {
    pub field: &'static str,
    pub len: usize,
}

/// Encodes a kind-4 server broadcast: `[4][topic_len][event_len][meta_len][enc]` then the fields.
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    metadata: Option<&[u8]>,
    encoding: Encoding,
    payload: &[u8],
) -> Result<Bytes, FieldTooLong> {
    let metadata = metadata.unwrap_or_default();
    let len = |field: &'static str, bytes: &[u8]| {
        u8::try_from(bytes.len()).map_err(|_| FieldTooLong {
            field,
            len: bytes.len(),
        })
    };
    let topic_len = len("topic", topic.as_bytes())?;
    let event_len = len("event", event.as_bytes())?;
    let meta_len = len("metadata", metadata)?;
    let mut out =
        BytesMut::with_capacity(5 + topic.len() + event.len() + metadata.len() + payload.len());
    out.put_u8(KIND_USER_BROADCAST);
    out.put_u8(topic_len);
    out.put_u8(event_len);
    out.put_u8(meta_len);
    out.put_u8(encoding.wire_byte());
    out.put_slice(topic.as_bytes());
    out.put_slice(event.as_bytes());
    out.put_slice(metadata);
    out.put_slice(payload);
    Ok(out.freeze())
}

/// Encodes a kind-3 client push. The server never sends this; tests and load generators do.
pub fn encode_user_broadcast_push(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    event: &str,
    metadata: &[u8],
    encoding: Encoding,
    payload: &[u8],
) -> Result<Bytes, FieldTooLong> {
    let len = |field: &'static str, bytes: &[u8]| {
        u8::try_from(bytes.len()).map_err(|_| FieldTooLong {
            field,
            len: bytes.len(),
        })
    };
    let header = [
        KIND_USER_BROADCAST_PUSH,
        len("join_ref", join_ref.as_bytes())?,
        len("ref", msg_ref.as_bytes())?,
        len("topic", topic.as_bytes())?,
        len("event", event.as_bytes())?,
        len("metadata", metadata)?,
        encoding.wire_byte(),
    ];
    let mut out = BytesMut::new();
    out.put_slice(&header);
    for field in [
        join_ref.as_bytes(),
        msg_ref.as_bytes(),
        topic.as_bytes(),
        event.as_bytes(),
        metadata,
        payload,
    ] {
        out.put_slice(field);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_supabase_js_sends() {
        // Observed: 03 01 02 0e 03 00 01 "9" "10" "realtime:room2" "msg" {"hello":"world"}
        let mut f = vec![3, 1, 2, 14, 3, 0, 1];
        f.extend_from_slice(b"910realtime:room2msg{\"hello\":\"world\"}");
        let m = decode(&f).unwrap();
        assert_eq!(m.topic, "realtime:room2");
        assert_eq!(m.event, "broadcast");
        assert_eq!(m.join_ref, serde_json::json!("9"));
        assert_eq!(m.msg_ref, serde_json::json!("10"));
        let InboundPayload::UserBroadcast(ub) = m.payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(ub.event, "msg");
        assert_eq!(ub.encoding, Encoding::Json);
        assert_eq!(&ub.payload[..], b"{\"hello\":\"world\"}");
        assert!(ub.metadata.is_none());
    }

    #[test]
    fn round_trips_through_the_push_encoder() {
        let f = encode_user_broadcast_push(
            "1",
            "2",
            "realtime:t",
            "ev",
            b"{\"persist\":true}",
            Encoding::Binary,
            &[0, 1, 255],
        )
        .unwrap();
        let m = decode(&f).unwrap();
        let InboundPayload::UserBroadcast(ub) = m.payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(ub.encoding, Encoding::Binary);
        assert_eq!(&ub.payload[..], &[0, 1, 255]);
        assert_eq!(ub.metadata.as_deref(), Some(&b"{\"persist\":true}"[..]));
    }

    #[test]
    fn lengths_past_the_end_are_errors() {
        assert_eq!(
            decode(&[3, 200, 0, 0, 0, 0, 1, b'x']).unwrap_err(),
            DecodeError::Truncated {
                expected: 207,
                actual: 8
            }
        );
        assert!(matches!(
            decode(&[3, 1]).unwrap_err(),
            DecodeError::Truncated { .. }
        ));
        assert_eq!(decode(&[]).unwrap_err(), DecodeError::EmptyBinary);
        assert_eq!(
            decode(&[4, 0, 0, 0, 0]).unwrap_err(),
            DecodeError::UnknownKind(4)
        );
    }

    #[test]
    fn json_payloads_and_metadata_are_validated() {
        let bad =
            encode_user_broadcast_push("1", "2", "t", "e", b"", Encoding::Json, b"{nope").unwrap();
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::PayloadNotJson);
        let bad =
            encode_user_broadcast_push("1", "2", "t", "e", b"[1]", Encoding::Json, b"{}").unwrap();
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::MetadataNotJson);
        let bad = encode_user_broadcast_push("1", "2", "\u{ff}", "e", b"", Encoding::Json, b"{}")
            .unwrap();
        let mut bad = bad.to_vec();
        bad[9] = 0xff; // corrupt the topic byte
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::NotUtf8("topic"));
    }

    #[test]
    fn kind_four_layout() {
        let f = encode_user_broadcast("realtime:room2", "msg", None, Encoding::Json, b"{\"a\":1}")
            .unwrap();
        assert_eq!(&f[..5], &[4, 14, 3, 0, 1]);
        assert_eq!(&f[5..], b"realtime:room2msg{\"a\":1}");
        let long = "x".repeat(256);
        assert_eq!(
            encode_user_broadcast(&long, "e", None, Encoding::Json, b"{}").unwrap_err(),
            FieldTooLong {
                field: "topic",
                len: 256
            }
        );
    }
}
