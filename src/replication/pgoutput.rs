//! Decoder for the pgoutput logical replication protocol, version 1 (what `START_REPLICATION ...
//! (proto_version '1')` streams): Begin, Commit, Origin, Relation, Type, Insert, Update, Delete,
//! Truncate and Message. Pure and total: any input gives a message or an error, never a panic
//! (fuzzed by `fuzz/fuzz_targets/pgoutput.rs`).

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    Origin {
        lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        /// `K` (key columns only) or `O` (the whole old row), when the replica identity sends one.
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    /// `pg_logical_emit_message`.
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Which old row an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity key columns (others are null).
    Key,
    /// The full old row (REPLICA IDENTITY FULL).
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    pub kind: OldKind,
    pub tuple: Tuple,
}

pub type Tuple = Vec<Datum>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value: not sent, the old value stays.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is truncated")]
    Truncated,
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("unknown tuple kind {0:#04x}")]
    UnknownTupleKind(u8),
    #[error("unknown column data kind {0:#04x}")]
    UnknownDatumKind(u8),
    #[error("string is not valid UTF-8")]
    NotUtf8,
    #[error("string is not NUL-terminated")]
    Unterminated,
    #[error("negative length {0}")]
    NegativeLength(i32),
}

struct Cursor<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.buf.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(slice)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.at;
        self.take(n)?;
        Ok(self.buf.slice(start..self.at))
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.at..).ok_or(DecodeError::Truncated)?;
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated)?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::NotUtf8)?;
        self.at += nul + 1;
        Ok(s.to_owned())
    }
    fn rest(&mut self) -> Bytes {
        let start = self.at.min(self.buf.len());
        self.at = self.buf.len();
        self.buf.slice(start..)
    }
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16()? as usize;
        // Each column takes at least one byte: never trust a count the buffer cannot hold.
        let remaining = self.buf.len().saturating_sub(self.at);
        if n > remaining {
            return Err(DecodeError::Truncated);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let datum = match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength(len))?;
                    let data = self.bytes(len)?;
                    if kind == b't' {
                        Datum::Text(data)
                    } else {
                        Datum::Binary(data)
                    }
                }
                other => return Err(DecodeError::UnknownDatumKind(other)),
            };
            out.push(datum);
        }
        Ok(out)
    }
    fn old_tuple(&mut self, kind: u8) -> Result<OldTuple, DecodeError> {
        let kind = match kind {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            other => return Err(DecodeError::UnknownTupleKind(other)),
        };
        Ok(OldTuple {
            kind,
            tuple: self.tuple()?,
        })
    }
}

/// Decodes one pgoutput message (the payload of an XLogData frame).
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let mut c = Cursor { buf, at: 0 };
    let tag = c.u8().map_err(|_| DecodeError::Empty)?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: c.u64()?,
            commit_ts: c.i64()?,
            xid: c.u32()?,
        },
        b'C' => Message::Commit {
            flags: c.u8()?,
            commit_lsn: c.u64()?,
            end_lsn: c.u64()?,
            commit_ts: c.i64()?,
        },
        b'O' => Message::Origin {
            lsn: c.u64()?,
            name: c.cstr()?,
        },
        b'R' => {
            let oid = c.u32()?;
            let namespace = c.cstr()?;
            let name = c.cstr()?;
            let replica_identity = c.u8()?;
            let n = c.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = c.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: c.cstr()?,
                    type_oid: c.u32()?,
                    type_modifier: c.i32()?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: c.u32()?,
            namespace: c.cstr()?,
            name: c.cstr()?,
        },
        b'I' => {
            let relation = c.u32()?;
            match c.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: c.tuple()?,
                },
                other => return Err(DecodeError::UnknownTupleKind(other)),
            }
        }
        b'U' => {
            let relation = c.u32()?;
            let (old, new) = match c.u8()? {
                b'N' => (None, c.tuple()?),
                kind @ (b'K' | b'O') => {
                    let old = c.old_tuple(kind)?;
                    match c.u8()? {
                        b'N' => (Some(old), c.tuple()?),
                        other => return Err(DecodeError::UnknownTupleKind(other)),
                    }
                }
                other => return Err(DecodeError::UnknownTupleKind(other)),
            };
            Message::Update { relation, old, new }
        }
        b'D' => {
            let relation = c.u32()?;
            let kind = c.u8()?;
            Message::Delete {
                relation,
                old: c.old_tuple(kind)?,
            }
        }
        b'T' => {
            let n = c.u32()? as usize;
            let options = c.u8()?;
            if n > buf.len() {
                return Err(DecodeError::Truncated);
            }
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(c.u32()?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = c.u8()?;
            let lsn = c.u64()?;
            let prefix = c.cstr()?;
            let len = c.u32()? as usize;
            let content = c.bytes(len)?;
            Message::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    })
    // Trailing bytes are ignored, as newer protocol versions may append fields.
    .inspect(|_| {
        let _ = c.rest();
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn cstr(b: &mut BytesMut, s: &str) {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }

    pub(crate) fn relation_bytes() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16388);
        cstr(&mut b, "public");
        cstr(&mut b, "items");
        b.put_u8(b'd');
        b.put_u16(2);
        b.put_u8(1);
        cstr(&mut b, "id");
        b.put_u32(23);
        b.put_i32(-1);
        b.put_u8(0);
        cstr(&mut b, "name");
        b.put_u32(25);
        b.put_i32(-1);
        b.freeze()
    }

    #[test]
    fn decodes_relation_insert_update_delete() {
        let rel = decode(&relation_bytes()).unwrap();
        let Message::Relation(r) = rel else { panic!() };
        assert_eq!(
            (r.oid, r.namespace.as_str(), r.name.as_str()),
            (16388, "public", "items")
        );
        assert!(r.columns[0].key && !r.columns[1].key);

        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(16388);
        b.put_u8(b'N');
        b.put_u16(2);
        b.put_u8(b't');
        b.put_i32(1);
        b.put_slice(b"1");
        b.put_u8(b'n');
        let m = decode(&b.freeze()).unwrap();
        assert_eq!(
            m,
            Message::Insert {
                relation: 16388,
                new: vec![Datum::Text(Bytes::from_static(b"1")), Datum::Null]
            }
        );

        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16388);
        b.put_u8(b'O');
        b.put_u16(1);
        b.put_u8(b'u');
        b.put_u8(b'N');
        b.put_u16(1);
        b.put_u8(b'n');
        let Message::Update { old: Some(old), .. } = decode(&b.freeze()).unwrap() else {
            panic!()
        };
        assert_eq!(old.kind, OldKind::Full);
        assert_eq!(old.tuple, vec![Datum::UnchangedToast]);
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            &b""[..],
            b"Z",
            b"B\x00",
            b"I\x00\x00\x00\x01X",
            b"I\x00\x00\x00\x01N\xff\xff",
            b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff",
            b"R\x00\x00\x00\x01public",
            b"T\xff\xff\xff\xff\x00",
            b"M\x01\x00\x00\x00\x00\x00\x00\x00\x00p\x00\xff\xff\xff\xff",
        ] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}
