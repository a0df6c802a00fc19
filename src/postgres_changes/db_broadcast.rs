//! Broadcast from the database: rows inserted into `realtime.messages` (or its daily
//! partitions) become user broadcasts on their topic.

use crate::replication::pgoutput::{Datum, Tuple};

use super::catalog::TableInfo;

/// Fans out a row inserted into `realtime.messages` (by `realtime.send`, `send_binary`,
/// `broadcast_changes`, or directly) to the channels of its topic, public or private by the
/// row's `private`, as a user broadcast with `meta: {"id": ...}`.
pub(super) fn broadcast_stored(
    table: &TableInfo,
    row: &Tuple,
    channels: &crate::channels::Channels,
    max_payload_bytes: usize,
) {
    let text = |name: &str| -> Option<String> {
        let i = table.column_index(name)?;
        match row.get(i)? {
            Datum::Text(b) | Datum::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    };
    if text("extension").as_deref() != Some("broadcast") {
        return;
    }
    let (Some(topic), Some(id)) = (text("topic"), text("id")) else {
        return;
    };
    let event = text("event").unwrap_or_default();
    let private = text("private").as_deref() == Some("t");
    let (encoding, payload) = match (text("payload"), text("binary_payload")) {
        (Some(json), _) => (crate::protocol::Encoding::Json, bytes::Bytes::from(json)),
        (None, Some(hex)) => {
            let Some(bin) = decode_bytea_hex(&hex) else {
                tracing::warn!(%topic, %id, "UnableToBroadcastChanges: binary_payload is not hex bytea");
                return;
            };
            (crate::protocol::Encoding::Binary, bytes::Bytes::from(bin))
        }
        (None, None) => (
            crate::protocol::Encoding::Json,
            bytes::Bytes::from_static(b"{}"),
        ),
    };
    if payload.len() > max_payload_bytes {
        tracing::warn!(%topic, %id, size = payload.len(), "UnableToBroadcastChanges: payload over the size limit, dropped");
        return;
    }
    let key = crate::channels::TopicKey::new(
        &format!("{}{topic}", crate::protocol::TOPIC_PREFIX),
        private,
    );
    let metadata = serde_json::json!({ "id": id }).to_string();
    let fanout = crate::channels::Fanout::new(
        key.topic.clone(),
        crate::channels::FanoutPayload::User(crate::protocol::UserBroadcast {
            event,
            encoding,
            payload,
            metadata: Some(bytes::Bytes::from(metadata)),
        }),
    )
    .with_message_id(id);
    channels.broker.publish(&key, fanout, None);
}

/// `\x0102ff` → bytes.
fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}
