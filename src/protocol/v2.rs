//! vsn 2.0.0 text frames: `[join_ref, ref, topic, event, payload, ...]`.

use serde_json::value::RawValue;

use super::message::{DecodeError, Inbound, InboundPayload};
use super::v1::string_field;

/// Decodes a V2 text frame. Extra trailing elements are ignored, as the original does; maps and
/// short arrays are refused.
pub fn decode_text(text: &str) -> Result<Inbound, DecodeError> {
    super::message::check_depth(text.as_bytes())?;
    let first = text.trim_start().as_bytes().first().copied();
    if first != Some(b'[') {
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| DecodeError::Json(e.to_string()))?;
        return Err(DecodeError::NotV2Array);
    }
    let mut parts: Vec<Box<RawValue>> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            DecodeError::NotV2Array
        } else {
            DecodeError::Json(e.to_string())
        }
    })?;
    if parts.len() < 5 {
        return Err(DecodeError::NotV2Array);
    }
    parts.truncate(5);
    let payload = parts.pop().ok_or(DecodeError::NotV2Array)?;
    let event = string_field(&parts[3], "event")?;
    let topic = string_field(&parts[2], "topic")?;
    let msg_ref =
        serde_json::from_str(parts[1].get()).map_err(|e| DecodeError::Json(e.to_string()))?;
    let join_ref =
        serde_json::from_str(parts[0].get()).map_err(|e| DecodeError::Json(e.to_string()))?;
    Ok(Inbound {
        join_ref,
        msg_ref,
        topic,
        event,
        payload: InboundPayload::Json(payload),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_heartbeat() {
        let m = decode_text(r#"[null,"18","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(m.topic, "phoenix");
        assert!(m.join_ref.is_null());
        assert_eq!(m.msg_ref, serde_json::json!("18"));
    }

    #[test]
    fn ignores_trailing_elements() {
        assert!(decode_text(r#"["1","2","t","e",{},"extra"]"#).is_ok());
    }

    #[test]
    fn refuses_maps_and_short_arrays() {
        assert_eq!(
            decode_text(r#"{"topic":"t","event":"e","payload":{},"ref":null}"#).unwrap_err(),
            DecodeError::NotV2Array
        );
        assert_eq!(
            decode_text(r#"["1","2","t","e"]"#).unwrap_err(),
            DecodeError::NotV2Array
        );
        assert_eq!(
            decode_text(r#"["1","2",3,"e",{}]"#).unwrap_err(),
            DecodeError::NotAString("topic")
        );
    }
}
