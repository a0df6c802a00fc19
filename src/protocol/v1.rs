//! vsn 1.0.0: every frame is a JSON object.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::message::{DecodeError, Inbound, InboundPayload, Ref};

#[derive(Deserialize)]
struct Wire {
    topic: Box<RawValue>,
    event: Box<RawValue>,
    payload: Box<RawValue>,
    // Required, but may be null (Phoenix `Message.from_map!`).
    #[serde(rename = "ref")]
    msg_ref: Ref,
    #[serde(default)]
    join_ref: Ref,
}

/// Decodes `{"topic","event","payload","ref"[, "join_ref"]}`.
pub fn decode(text: &str) -> Result<Inbound, DecodeError> {
    super::message::check_depth(text.as_bytes())?;
    let first = text.trim_start().as_bytes().first().copied();
    if first != Some(b'{') {
        // Not an object at all: say so rather than report a serde type error.
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| DecodeError::Json(e.to_string()))?;
        return Err(DecodeError::NotV1Object);
    }
    let wire: Wire = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            DecodeError::NotV1Object
        } else {
            DecodeError::Json(e.to_string())
        }
    })?;
    Ok(Inbound {
        join_ref: wire.join_ref,
        msg_ref: wire.msg_ref,
        topic: string_field(&wire.topic, "topic")?,
        event: string_field(&wire.event, "event")?,
        payload: InboundPayload::Json(wire.payload),
    })
}

pub(super) fn string_field(raw: &RawValue, name: &'static str) -> Result<String, DecodeError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| DecodeError::NotAString(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_join() {
        let m = decode(r#"{"topic":"realtime:a","event":"phx_join","payload":{"x":1},"ref":"1","join_ref":"1"}"#).unwrap();
        assert_eq!(m.topic, "realtime:a");
        assert_eq!(m.event, "phx_join");
        assert_eq!(m.msg_ref, serde_json::json!("1"));
        assert_eq!(m.join_ref, serde_json::json!("1"));
    }

    #[test]
    fn ref_is_required_but_may_be_null() {
        assert!(decode(r#"{"topic":"t","event":"e","payload":{},"ref":null}"#).is_ok());
        assert_eq!(
            decode(r#"{"topic":"t","event":"e","payload":{}}"#).unwrap_err(),
            DecodeError::NotV1Object
        );
    }

    #[test]
    fn rejects_arrays_garbage_and_non_string_topics() {
        assert_eq!(
            decode(r#"[null,"1","t","e",{}]"#).unwrap_err(),
            DecodeError::NotV1Object
        );
        assert!(matches!(decode("{nope").unwrap_err(), DecodeError::Json(_)));
        assert_eq!(
            decode(r#"{"topic":1,"event":"e","payload":{},"ref":null}"#).unwrap_err(),
            DecodeError::NotAString("topic")
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            r#"{{"topic":"t","event":"e","payload":{}{},"ref":null}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(decode(&deep).unwrap_err(), DecodeError::TooDeep);
        assert!(super::super::message::check_depth(br#"{"a":"[[[[[[[[[[\\"]]]"}"#).is_ok());
    }
}
