//! What a client message asks for: the typed event a session dispatches on, told apart from the
//! decoded [`Inbound`] (its event name and, for the events that need it, its payload). Pure: no
//! state, no I/O. Unknown events and malformed payloads are values here (the session answers
//! them as the original does), never errors.

use serde_json::{Map, Value};

use super::message::{Inbound, InboundPayload};

/// The Phoenix socket's own topic, the one heartbeats are answered on.
pub const PHOENIX_TOPIC: &str = "phoenix";

/// One client event.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// `heartbeat` on the `phoenix` topic: answered `ok`. On any other topic it is handled as
    /// that topic's unknown event ([`ClientEvent::Unknown`]) but still counted as a heartbeat.
    Heartbeat,
    /// `phx_join`.
    Join,
    /// `phx_leave`.
    Leave,
    /// `broadcast` (JSON, or a V2 binary user broadcast). The payload stays in the [`Inbound`]:
    /// it is relayed as it came.
    Broadcast,
    /// `presence`, with what its payload asks for.
    Presence(PresenceEvent),
    /// `access_token`: the pushed token when the payload has a string `access_token` (anything
    /// else is ignored, and never answered).
    AccessToken(Option<String>),
    /// Any other event (the name is the [`Inbound`]'s `event`).
    Unknown,
}

/// What a `presence` push asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceEvent {
    /// No `event` in the payload (or a payload that is not an object): accepted and ignored
    /// (`ok`), as the original does.
    NoEvent,
    /// `track` (in any case), with its `payload` meta: an absent or null meta is an empty map;
    /// `Err` when it is there but not a map.
    Track(Result<Map<String, Value>, NotAMap>),
    /// `untrack` (in any case).
    Untrack,
    /// Any other `event`, as JSON text (for the log).
    Unknown(String),
}

/// A presence `track` whose `payload` is not a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAMap;

impl ClientEvent {
    /// Tells the event of a decoded client message.
    pub fn parse(m: &Inbound) -> ClientEvent {
        match m.event.as_str() {
            "heartbeat" if m.topic == PHOENIX_TOPIC => ClientEvent::Heartbeat,
            "phx_join" => ClientEvent::Join,
            "phx_leave" => ClientEvent::Leave,
            "broadcast" => ClientEvent::Broadcast,
            "presence" => ClientEvent::Presence(PresenceEvent::parse(&json_payload(&m.payload))),
            "access_token" => {
                ClientEvent::AccessToken(match json_payload(&m.payload).get_mut("access_token") {
                    Some(Value::String(token)) => Some(std::mem::take(token)),
                    _ => None,
                })
            }
            _ => ClientEvent::Unknown,
        }
    }

    /// The `kind` label of `walcast_messages_in_total` for a message with this event name.
    pub fn metric_kind(event: &str) -> &'static str {
        match event {
            "heartbeat" => "heartbeat",
            "phx_join" => "join",
            "phx_leave" => "leave",
            "broadcast" => "broadcast",
            "presence" => "presence",
            "access_token" => "access_token",
            _ => "other",
        }
    }
}

impl PresenceEvent {
    /// Reads a `presence` payload (`{"event": "track"|"untrack", "payload": {...}}`).
    pub fn parse(payload: &Value) -> PresenceEvent {
        let Some(event) = payload.get("event") else {
            return PresenceEvent::NoEvent;
        };
        match event.as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("track") => PresenceEvent::Track(match payload.get("payload") {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(meta)) => Ok(meta.clone()),
                Some(_) => Err(NotAMap),
            }),
            Some("untrack") => PresenceEvent::Untrack,
            _ => PresenceEvent::Unknown(event.to_string()),
        }
    }
}

/// A JSON payload parsed (`null` when it does not parse; a binary user broadcast has none).
fn json_payload(payload: &InboundPayload) -> Value {
    match payload {
        InboundPayload::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
        InboundPayload::UserBroadcast(_) => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Vsn;
    use serde_json::json;

    fn event(frame: &str) -> ClientEvent {
        ClientEvent::parse(&Vsn::V2.decode_text(frame).unwrap())
    }

    #[test]
    fn socket_and_channel_events() {
        assert_eq!(
            event(r#"[null,"1","phoenix","heartbeat",{}]"#),
            ClientEvent::Heartbeat
        );
        // A heartbeat on a channel topic is that topic's unknown event, counted as a heartbeat.
        assert_eq!(
            event(r#"[null,"1","realtime:a","heartbeat",{}]"#),
            ClientEvent::Unknown
        );
        assert_eq!(ClientEvent::metric_kind("heartbeat"), "heartbeat");
        assert_eq!(
            event(r#"["1","1","realtime:a","phx_join",{}]"#),
            ClientEvent::Join
        );
        assert_eq!(
            event(r#"["1","2","realtime:a","phx_leave",{}]"#),
            ClientEvent::Leave
        );
        assert_eq!(
            event(r#"["1","2","realtime:a","broadcast",{"event":"e"}]"#),
            ClientEvent::Broadcast
        );
        // Event names are matched exactly.
        assert_eq!(
            event(r#"["1","2","realtime:a","PHX_JOIN",{}]"#),
            ClientEvent::Unknown
        );
        assert_eq!(
            event(r#"["1","2","realtime:a","whatever",{}]"#),
            ClientEvent::Unknown
        );
        assert_eq!(ClientEvent::metric_kind("whatever"), "other");
        assert_eq!(ClientEvent::metric_kind("phx_join"), "join");
    }

    #[test]
    fn binary_broadcasts_are_broadcasts() {
        let f = crate::protocol::binary::encode_user_broadcast_push(
            "1",
            "2",
            "realtime:a",
            "e",
            b"",
            crate::protocol::Encoding::Json,
            b"{}",
        )
        .unwrap();
        let m = Vsn::V2.decode_binary(&f).unwrap();
        assert_eq!(ClientEvent::parse(&m), ClientEvent::Broadcast);
    }

    #[test]
    fn access_tokens() {
        assert_eq!(
            event(r#"["1","2","realtime:a","access_token",{"access_token":"t"}]"#),
            ClientEvent::AccessToken(Some("t".into()))
        );
        for payload in [r#"{"access_token":5}"#, "{}", "[]", "null", r#""t""#] {
            assert_eq!(
                event(&format!(
                    r#"["1","2","realtime:a","access_token",{payload}]"#
                )),
                ClientEvent::AccessToken(None),
                "{payload}"
            );
        }
    }

    #[test]
    fn presence_events() {
        let p = |payload: Value| PresenceEvent::parse(&payload);
        assert_eq!(p(json!({})), PresenceEvent::NoEvent);
        assert_eq!(p(json!([1])), PresenceEvent::NoEvent);
        assert_eq!(p(Value::Null), PresenceEvent::NoEvent);
        assert_eq!(
            p(json!({"event":"track","payload":{"a":1}})),
            PresenceEvent::Track(Ok(json!({"a":1}).as_object().unwrap().clone()))
        );
        assert_eq!(
            p(json!({"event":"TRACK"})),
            PresenceEvent::Track(Ok(Map::new()))
        );
        assert_eq!(
            p(json!({"event":"track","payload":null})),
            PresenceEvent::Track(Ok(Map::new()))
        );
        assert_eq!(
            p(json!({"event":"track","payload":[1]})),
            PresenceEvent::Track(Err(NotAMap))
        );
        assert_eq!(p(json!({"event":"Untrack"})), PresenceEvent::Untrack);
        assert_eq!(
            p(json!({"event":"wave"})),
            PresenceEvent::Unknown("\"wave\"".into())
        );
        assert_eq!(p(json!({"event":3})), PresenceEvent::Unknown("3".into()));
        assert_eq!(
            event(r#"["1","2","realtime:a","presence",{"event":"untrack"}]"#),
            ClientEvent::Presence(PresenceEvent::Untrack)
        );
        // A payload that is not an object has no event.
        assert_eq!(
            event(r#"["1","2","realtime:a","presence","x"]"#),
            ClientEvent::Presence(PresenceEvent::NoEvent)
        );
    }
}
