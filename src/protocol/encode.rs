//! Server → client frames. Each function returns a ready [`Frame`]; fan-out code calls them once
//! per serializer and shares the result among all subscribers.

use serde::Serialize;
use serde_json::value::RawValue;

use super::binary;
use super::message::{Encoding, Ref, UserBroadcast};
use super::{Frame, Vsn};

/// Writes a frame whose payload is already JSON text. `join_ref` is omitted by V1 (the original
/// never emits it there).
fn frame(
    vsn: Vsn,
    join_ref: &Ref,
    msg_ref: &Ref,
    topic: &str,
    event: &str,
    payload: &str,
) -> Frame {
    let mut out = String::with_capacity(payload.len() + topic.len() + event.len() + 48);
    match vsn {
        Vsn::V1 => {
            out.push_str("{\"topic\":");
            out.push_str(&to_json(topic));
            out.push_str(",\"event\":");
            out.push_str(&to_json(event));
            out.push_str(",\"payload\":");
            out.push_str(payload);
            out.push_str(",\"ref\":");
            out.push_str(&to_json(msg_ref));
            out.push('}');
        }
        Vsn::V2 => {
            out.push('[');
            out.push_str(&to_json(join_ref));
            out.push(',');
            out.push_str(&to_json(msg_ref));
            out.push(',');
            out.push_str(&to_json(topic));
            out.push(',');
            out.push_str(&to_json(event));
            out.push(',');
            out.push_str(payload);
            out.push(']');
        }
    }
    Frame::Text(out.into())
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

#[derive(Serialize)]
struct ReplyPayload<'a, T: Serialize + ?Sized> {
    status: &'a str,
    response: &'a T,
}

/// `phx_reply` to a client push: `{"status": "ok"|"error", "response": ...}` with the push's refs.
pub fn reply<T: Serialize + ?Sized>(
    vsn: Vsn,
    join_ref: &Ref,
    msg_ref: &Ref,
    topic: &str,
    status: &str,
    response: &T,
) -> Frame {
    let payload = to_json(&ReplyPayload { status, response });
    frame(vsn, join_ref, msg_ref, topic, "phx_reply", &payload)
}

/// A push from a channel (`system`, `presence_state`): carries the channel's join_ref on V2.
pub fn push<T: Serialize + ?Sized>(
    vsn: Vsn,
    join_ref: &Ref,
    topic: &str,
    event: &str,
    payload: &T,
) -> Frame {
    frame(vsn, join_ref, &Ref::Null, topic, event, &to_json(payload))
}

/// A fan-out message (`broadcast`, `presence_diff`, `postgres_changes`): both refs null.
pub fn fastlane(vsn: Vsn, topic: &str, event: &str, payload: &RawValue) -> Frame {
    frame(vsn, &Ref::Null, &Ref::Null, topic, event, payload.get())
}

/// `phx_close` for a channel that stopped: `ref` is the channel's join_ref.
pub fn close(vsn: Vsn, join_ref: &Ref, topic: &str) -> Frame {
    frame(vsn, join_ref, join_ref, topic, "phx_close", "{}")
}

/// A user broadcast as this serializer delivers it: kind-4 binary on V2; on V1 the JSON form
/// `{"event","payload","type":"broadcast"[,"meta"]}`, and nothing for binary payloads (V1 has no
/// way to carry them). `None` also when a header field is too long for a binary frame.
pub fn user_broadcast(vsn: Vsn, topic: &str, ub: &UserBroadcast) -> Option<Frame> {
    match vsn {
        Vsn::V2 => binary::encode_user_broadcast(
            topic,
            &ub.event,
            ub.metadata.as_deref(),
            ub.encoding,
            &ub.payload,
        )
        .ok()
        .map(Frame::Binary),
        Vsn::V1 => {
            if ub.encoding != Encoding::Json {
                return None;
            }
            let payload = std::str::from_utf8(&ub.payload).ok()?;
            let mut body = String::with_capacity(payload.len() + ub.event.len() + 48);
            body.push_str("{\"event\":");
            body.push_str(&to_json(&ub.event));
            body.push_str(",\"payload\":");
            body.push_str(payload);
            body.push_str(",\"type\":\"broadcast\"");
            if let Some(meta) = ub
                .metadata
                .as_deref()
                .and_then(|m| std::str::from_utf8(m).ok())
            {
                body.push_str(",\"meta\":");
                body.push_str(meta);
            }
            body.push('}');
            Some(frame(
                vsn,
                &Ref::Null,
                &Ref::Null,
                topic,
                "broadcast",
                &body,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn text(f: Frame) -> String {
        match f {
            Frame::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn v1_never_emits_join_ref() {
        let f = reply(
            Vsn::V1,
            &json!("1"),
            &json!("2"),
            "realtime:a",
            "ok",
            &json!({}),
        );
        let v: serde_json::Value = serde_json::from_str(&text(f)).unwrap();
        assert_eq!(
            v,
            json!({"topic":"realtime:a","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"2"})
        );
    }

    #[test]
    fn v2_reply_and_push_shapes() {
        let f = reply(
            Vsn::V2,
            &json!("1"),
            &json!("2"),
            "realtime:a",
            "error",
            &json!({"reason":"x"}),
        );
        assert_eq!(
            text(f),
            r#"["1","2","realtime:a","phx_reply",{"status":"error","response":{"reason":"x"}}]"#
        );
        let f = push(
            Vsn::V2,
            &json!("1"),
            "realtime:a",
            "presence_state",
            &json!({}),
        );
        assert_eq!(text(f), r#"["1",null,"realtime:a","presence_state",{}]"#);
        let f = close(Vsn::V2, &json!("7"), "realtime:a");
        assert_eq!(text(f), r#"["7","7","realtime:a","phx_close",{}]"#);
    }

    #[test]
    fn user_broadcast_per_serializer() {
        let ub = UserBroadcast {
            event: "msg".into(),
            encoding: Encoding::Json,
            payload: Bytes::from_static(b"{\"a\":1}"),
            metadata: None,
        };
        let v1 = text(user_broadcast(Vsn::V1, "realtime:r", &ub).unwrap());
        let v: serde_json::Value = serde_json::from_str(&v1).unwrap();
        assert_eq!(
            v["payload"],
            json!({"event":"msg","payload":{"a":1},"type":"broadcast"})
        );
        assert!(matches!(
            user_broadcast(Vsn::V2, "realtime:r", &ub),
            Some(Frame::Binary(_))
        ));
        let bin = UserBroadcast {
            encoding: Encoding::Binary,
            ..ub
        };
        assert!(user_broadcast(Vsn::V1, "realtime:r", &bin).is_none());
    }
}
