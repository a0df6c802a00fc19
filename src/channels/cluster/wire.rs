//! What nodes send each other over NATS, and the subjects they send it on.
//!
//! One subject per topic (`<prefix>.t.<o|p>.<topic in hex>`: public and private topics apart,
//! hex so that any topic is one valid subject token) carries the topic's broadcasts, presence
//! diffs, presence snapshots and snapshot requests, so that what one node publishes on a topic
//! reaches every other node in publish order. `<prefix>.hb` carries each node's heartbeat, `<prefix>.pg` the change stream and
//! `<prefix>.cu` the nodes' catch-up positions.
//!
//! A message is a tag byte, a JSON header, a newline, and a body of raw bytes: a broadcast's
//! payload travels as the bytes the publisher received, node-neutral (each receiving node
//! encodes it once per serializer for its own sockets).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::channels::hub::{Fanout, FanoutPayload};
use crate::channels::TopicKey;
use crate::protocol::{Encoding, UserBroadcast};

/// Topics longer than this travel on a subject named by their digest: NATS servers refuse a
/// control line over 4 KiB by default (and close the connection), so a client joining a very
/// long topic must not decide the subject's length.
const MAX_HEX_TOPIC: usize = 200;

/// The subject of a topic's messages: `<prefix>.t.<o|p>.<topic in hex>`, or for a long topic
/// `<prefix>.t.<oh|ph>.<SHA-256 of the topic in hex>`.
pub fn topic_subject(prefix: &str, key: &TopicKey) -> String {
    let mut s = String::with_capacity(prefix.len() + 6 + key.topic.len().min(MAX_HEX_TOPIC) * 2);
    s.push_str(prefix);
    let long = key.topic.len() > MAX_HEX_TOPIC;
    s.push_str(match (key.private, long) {
        (false, false) => ".t.o.",
        (true, false) => ".t.p.",
        (false, true) => ".t.oh.",
        (true, true) => ".t.ph.",
    });
    if long {
        push_hex(&mut s, &Sha256::digest(key.topic.as_bytes()));
    } else {
        push_hex(&mut s, key.topic.as_bytes());
    }
    s
}

/// A topic's short id in heartbeats (the first 16 bytes of the SHA-256 of its kind and name,
/// in hex): a heartbeat's size does not grow with topic names.
pub fn topic_id(key: &TopicKey) -> String {
    let mut h = Sha256::new();
    h.update([u8::from(key.private)]);
    h.update(key.topic.as_bytes());
    let mut s = String::with_capacity(32);
    push_hex(&mut s, &h.finalize()[..16]);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The heartbeat subject.
pub fn heartbeat_subject(prefix: &str) -> String {
    format!("{prefix}.hb")
}

/// The subject of the nodes' catch-up positions (`<prefix>.cu`).
pub fn positions_subject(prefix: &str) -> String {
    format!("{prefix}.cu")
}

/// The subject of the change stream the slot holder publishes (`<prefix>.pg`).
pub fn changes_subject(prefix: &str) -> String {
    format!("{prefix}.pg")
}

/// One message between nodes.
#[derive(Debug)]
pub enum Message {
    /// A broadcast (client, REST, database) or a system notice for the topic's subscribers.
    Broadcast(Broadcast),
    /// A presence diff of `origin`'s own presences; `seq` is its number, `prev` the number of
    /// `origin`'s previous presence message on this topic (0: none), so a receiver sees a gap.
    Diff {
        origin: u64,
        seq: u64,
        prev: u64,
        diff: Vec<u8>,
    },
    /// All of `origin`'s presences on the topic, as of its message `seq`.
    Snapshot {
        origin: u64,
        seq: u64,
        state: Vec<u8>,
    },
    /// `origin` asks every node for a snapshot of its presences on the topic.
    SyncRequest { origin: u64 },
    /// A node is alive; `topics` are the topics it has presences on (by [`topic_id`]), with
    /// its last presence message number on each.
    Heartbeat {
        origin: u64,
        node: String,
        topics: Vec<(String, u64)>,
        /// How far the node has delivered the change stream (`None`: it does not stream
        /// changes, no database).
        position: Option<u64>,
    },
    /// A pgoutput message (or a chunk of one: `more`) the slot holder `origin` streamed at
    /// `lsn`; `seq` numbers the holder's change messages from 1.
    Wal {
        origin: u64,
        seq: u64,
        lsn: u64,
        more: bool,
        data: Bytes,
    },
    /// The slot holder has published everything before `lsn`.
    Position {
        origin: u64,
        seq: u64,
        lsn: u64,
        node: String,
    },
    /// A node is shutting down: its presences leave now, not after the node timeout.
    Bye { origin: u64 },
    /// Catch-up positions of `origin` (RELIABILITY.md, "Several nodes"): `reset` replaces
    /// what receivers hold of it, `bye` says they are its last (it is shutting down). The body
    /// is JSON: `[[key, [commit LSN, LSN, gap, last ref] or null], ...]`.
    Positions {
        origin: u64,
        reset: bool,
        bye: bool,
        body: Bytes,
    },
}

/// A broadcast as it travels.
#[derive(Debug)]
pub struct Broadcast {
    pub event: String,
    /// `None`: a JSON event (`FanoutPayload::Json`); else a user broadcast with this encoding.
    pub encoding: Option<Encoding>,
    pub metadata: Option<Bytes>,
    pub message_id: Option<String>,
    pub payload: Bytes,
}

#[derive(Serialize, Deserialize, Default)]
struct Header {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    /// User broadcast encoding: 0 binary, 1 JSON; absent for a JSON event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enc: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default)]
    o: u64,
    #[serde(default)]
    s: u64,
    #[serde(default)]
    p: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    t: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    l: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    c: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    b: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

const BROADCAST: u8 = b'B';
const DIFF: u8 = b'D';
const SNAPSHOT: u8 = b'S';
const SYNC: u8 = b'R';
const HEARTBEAT: u8 = b'H';
const BYE: u8 = b'X';
const WAL: u8 = b'W';
const POSITION: u8 = b'P';
const POSITIONS: u8 = b'C';

fn frame(tag: u8, header: &Header, body: &[u8]) -> Bytes {
    let head = serde_json::to_vec(header).unwrap_or_default();
    let mut out = BytesMut::with_capacity(2 + head.len() + body.len());
    out.put_u8(tag);
    out.put_slice(&head);
    out.put_u8(b'\n');
    out.put_slice(body);
    out.freeze()
}

/// A fan-out as a broadcast message; `None` for what has no cross-node form.
pub fn encode_fanout(msg: &Fanout) -> Option<Bytes> {
    let (header, body): (Header, &[u8]) = match msg.payload() {
        FanoutPayload::Json { event, payload } => (
            Header {
                e: Some((*event).to_owned()),
                ..Header::default()
            },
            payload.get().as_bytes(),
        ),
        FanoutPayload::User(ub) => (
            Header {
                e: Some(ub.event.clone()),
                enc: Some(ub.encoding.wire_byte()),
                m: ub
                    .metadata
                    .as_ref()
                    .map(|m| String::from_utf8_lossy(m).into_owned()),
                ..Header::default()
            },
            &ub.payload,
        ),
    };
    let header = Header {
        id: msg.message_id().map(str::to_owned),
        ..header
    };
    Some(frame(BROADCAST, &header, body))
}

pub fn encode(msg: &Message) -> Bytes {
    match msg {
        Message::Broadcast(_) => Bytes::new(),
        Message::Diff {
            origin,
            seq,
            prev,
            diff,
        } => frame(
            DIFF,
            &Header {
                o: *origin,
                s: *seq,
                p: *prev,
                ..Header::default()
            },
            diff,
        ),
        Message::Snapshot { origin, seq, state } => frame(
            SNAPSHOT,
            &Header {
                o: *origin,
                s: *seq,
                ..Header::default()
            },
            state,
        ),
        Message::SyncRequest { origin } => frame(
            SYNC,
            &Header {
                o: *origin,
                ..Header::default()
            },
            &[],
        ),
        Message::Heartbeat {
            origin,
            node,
            topics,
            position,
        } => frame(
            HEARTBEAT,
            &Header {
                o: *origin,
                n: Some(node.clone()),
                t: topics.clone(),
                w: *position,
                ..Header::default()
            },
            &[],
        ),
        Message::Wal {
            origin,
            seq,
            lsn,
            more,
            data,
        } => frame(
            WAL,
            &Header {
                o: *origin,
                s: *seq,
                l: *lsn,
                c: *more,
                ..Header::default()
            },
            data,
        ),
        Message::Position {
            origin,
            seq,
            lsn,
            node,
        } => frame(
            POSITION,
            &Header {
                o: *origin,
                s: *seq,
                l: *lsn,
                n: Some(node.clone()),
                ..Header::default()
            },
            &[],
        ),
        Message::Bye { origin } => frame(
            BYE,
            &Header {
                o: *origin,
                ..Header::default()
            },
            &[],
        ),
        Message::Positions {
            origin,
            reset,
            bye,
            body,
        } => frame(
            POSITIONS,
            &Header {
                o: *origin,
                c: *reset,
                b: *bye,
                ..Header::default()
            },
            body,
        ),
    }
}

/// Decodes a message; `None` for anything malformed (logged by the caller, never fatal).
pub fn decode(bytes: &Bytes) -> Option<Message> {
    let tag = *bytes.first()?;
    let rest = bytes.slice(1..);
    let nl = memchr::memchr(b'\n', &rest)?;
    let header: Header = serde_json::from_slice(&rest[..nl]).ok()?;
    let body = rest.slice(nl + 1..);
    Some(match tag {
        BROADCAST => Message::Broadcast(Broadcast {
            event: header.e?,
            encoding: match header.enc {
                None => None,
                Some(0) => Some(Encoding::Binary),
                Some(1) => Some(Encoding::Json),
                Some(_) => return None,
            },
            metadata: header.m.map(Bytes::from),
            message_id: header.id,
            payload: body,
        }),
        DIFF => Message::Diff {
            origin: header.o,
            seq: header.s,
            prev: header.p,
            diff: body.to_vec(),
        },
        SNAPSHOT => Message::Snapshot {
            origin: header.o,
            seq: header.s,
            state: body.to_vec(),
        },
        SYNC => Message::SyncRequest { origin: header.o },
        HEARTBEAT => Message::Heartbeat {
            origin: header.o,
            node: header.n?,
            topics: header.t,
            position: header.w,
        },
        WAL => Message::Wal {
            origin: header.o,
            seq: header.s,
            lsn: header.l,
            more: header.c,
            data: body,
        },
        POSITION => Message::Position {
            origin: header.o,
            seq: header.s,
            lsn: header.l,
            node: header.n?,
        },
        BYE => Message::Bye { origin: header.o },
        POSITIONS => Message::Positions {
            origin: header.o,
            reset: header.c,
            bye: header.b,
            body,
        },
        _ => return None,
    })
}

/// The JSON events a node accepts from another (the `&'static` names the hub knows).
fn static_event(event: &str) -> Option<&'static str> {
    match event {
        "broadcast" => Some("broadcast"),
        "system" => Some("system"),
        _ => None,
    }
}

impl Broadcast {
    /// The fan-out this broadcast makes on a receiving node; `None` when malformed.
    pub fn into_fanout(self, key: &TopicKey) -> Option<Fanout> {
        let payload = match self.encoding {
            None => {
                let text = String::from_utf8(self.payload.to_vec()).ok()?;
                FanoutPayload::Json {
                    event: static_event(&self.event)?,
                    payload: RawValue::from_string(text).ok()?,
                }
            }
            Some(encoding) => {
                if encoding == Encoding::Json && std::str::from_utf8(&self.payload).is_err() {
                    return None;
                }
                FanoutPayload::User(UserBroadcast {
                    event: self.event,
                    encoding,
                    payload: self.payload,
                    metadata: self.metadata,
                })
            }
        };
        let fanout = Fanout::new(key.topic.clone(), payload);
        Some(match self.message_id {
            Some(id) => fanout.with_message_id(id),
            None => fanout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_topic_and_keep_public_and_private_apart() {
        let public = TopicKey::new("realtime:a.b *>", false);
        let private = TopicKey::new("realtime:a.b *>", true);
        let s = topic_subject("walcast", &public);
        assert!(s.starts_with("walcast.t.o."));
        assert_eq!(s.split('.').count(), 4);
        assert_ne!(s, topic_subject("walcast", &private));
        // A long topic gets a subject of bounded length, still apart from the private one.
        let long = TopicKey::new(&format!("realtime:{}", "x".repeat(100_000)), false);
        let long_private = TopicKey::new(&long.topic, true);
        let s = topic_subject("walcast", &long);
        assert!(s.len() < 100 && s.starts_with("walcast.t.oh."), "{s}");
        assert_ne!(s, topic_subject("walcast", &long_private));
        assert_ne!(topic_id(&public), topic_id(&private));
        assert_eq!(topic_id(&long).len(), 32);
    }

    #[test]
    fn round_trips() {
        let key = TopicKey::new("realtime:room", false);
        let ub = Fanout::new(
            key.topic.clone(),
            FanoutPayload::User(UserBroadcast {
                event: "e\n\"x".into(),
                encoding: Encoding::Binary,
                payload: Bytes::from_static(b"\x00\n\xff"),
                metadata: Some(Bytes::from_static(b"{\"id\":\"1\"}")),
            }),
        )
        .with_message_id("1".into());
        let bytes = encode_fanout(&ub).unwrap();
        let Some(Message::Broadcast(b)) = decode(&bytes) else {
            panic!("a broadcast")
        };
        let back = b.into_fanout(&key).unwrap();
        assert_eq!(back.message_id(), Some("1"));
        let FanoutPayload::User(u) = back.payload() else {
            panic!("a user broadcast")
        };
        assert_eq!(u.event, "e\n\"x");
        assert_eq!(&u.payload[..], b"\x00\n\xff");

        let hb = Message::Heartbeat {
            origin: 9,
            node: "n".into(),
            topics: vec![("ab".into(), 4)],
            position: Some(7),
        };
        let Some(Message::Heartbeat {
            origin,
            topics,
            position,
            ..
        }) = decode(&encode(&hb))
        else {
            panic!("a heartbeat")
        };
        assert_eq!((origin, topics[0].1, position), (9, 4, Some(7)));
        let wal = Message::Wal {
            origin: 3,
            seq: 2,
            lsn: 99,
            more: true,
            data: Bytes::from_static(b"I\n\x00"),
        };
        let Some(Message::Wal {
            seq,
            lsn,
            more,
            data,
            ..
        }) = decode(&encode(&wal))
        else {
            panic!("a change message")
        };
        assert_eq!((seq, lsn, more, &data[..]), (2, 99, true, &b"I\n\x00"[..]));
        let positions = Message::Positions {
            origin: 5,
            reset: true,
            bye: true,
            body: Bytes::from_static(b"[[\"k\",[1,2,false,3]]]"),
        };
        let Some(Message::Positions {
            origin,
            reset,
            bye,
            body,
        }) = decode(&encode(&positions))
        else {
            panic!("positions")
        };
        assert_eq!(
            (origin, reset, bye, &body[..]),
            (5, true, true, &b"[[\"k\",[1,2,false,3]]]"[..])
        );
        assert!(decode(&Bytes::from_static(b"Bnot json")).is_none());
        assert!(decode(&Bytes::new()).is_none());
    }
}
