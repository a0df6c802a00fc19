//! Micro-benchmarks of the hot paths (criterion): pgoutput decode, value conversion, filter
//! matching, V1/V2 encoding. `cargo bench --bench hot_paths`; BENCHMARKS.md has the figures.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::value::RawValue;

use walcast::postgres_changes::filter;
use walcast::protocol::{encode, Vsn};
use walcast::replication::{pgoutput, values};

/// A pgoutput Insert of a support-chat message row: id, conversation_id, sender, body, created_at.
fn chat_insert() -> Bytes {
    let cols: [&[u8]; 5] = [
        b"1234567",
        b"42",
        b"8c7e3d1a-4f7b-4b8e-9a55-3f0e2c1d9b77",
        b"Hello! I have a question about my last invoice, could you help?",
        b"2026-11-26 16:45:23.123456+00",
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16_384);
    b.put_u8(b'N');
    b.put_u16(cols.len() as u16);
    for c in cols {
        b.put_u8(b't');
        b.put_u32(c.len() as u32);
        b.put_slice(c);
    }
    b.freeze()
}

fn decode(c: &mut Criterion) {
    let msg = chat_insert();
    c.bench_function("pgoutput decode (5-column insert)", |b| {
        b.iter(|| pgoutput::decode(black_box(&msg)))
    });
}

fn convert(c: &mut Criterion) {
    let row = [
        (values::Conv::Integer, "1234567"),
        (values::Conv::Integer, "42"),
        (values::Conv::Text, "8c7e3d1a-4f7b-4b8e-9a55-3f0e2c1d9b77"),
        (
            values::Conv::Text,
            "Hello! I have a question about my last invoice, could you help?",
        ),
        (values::Conv::Timestamptz, "2026-11-26 16:45:23.123456+00"),
    ];
    c.bench_function("values to JSON (5-column chat row)", |b| {
        b.iter(|| {
            let mut out = String::with_capacity(256);
            for (conv, text) in &row {
                values::push_json(&mut out, conv, black_box(text));
            }
            out
        })
    });
    let jsonb =
        r#"{"plan": "pro", "seats": 12, "tags": ["vip", "eu"], "address": {"city": "Lyon"}}"#;
    c.bench_function("values to JSON (jsonb object)", |b| {
        b.iter(|| values::to_json(&values::Conv::Jsonb, black_box(jsonb)))
    });
}

fn filters(c: &mut Criterion) {
    c.bench_function("filter parse (conversation_id=eq.42)", |b| {
        b.iter(|| filter::parse(black_box("conversation_id=eq.42")))
    });
    c.bench_function("filter compare int", |b| {
        b.iter(|| filter::Kind::Int.compare(black_box("1234567"), black_box("1234568")))
    });
    c.bench_function("filter compare timestamp", |b| {
        b.iter(|| {
            filter::Kind::Timestamp.compare(
                black_box("2026-11-26 16:45:23.123456"),
                black_box("2026-11-26 16:45:24"),
            )
        })
    });
    c.bench_function("filter like (%invoice%)", |b| {
        b.iter(|| {
            filter::like(
                black_box("Hello! I have a question about my last invoice, could you help?"),
                black_box("%invoice%"),
                false,
            )
        })
    });
}

fn encoding(c: &mut Criterion) {
    let payload = RawValue::from_string(
        r#"{"ids":[31415926],"data":{"schema":"public","table":"messages","commit_timestamp":"2026-11-26T16:45:23.123Z","eventType":"INSERT","new":{"id":1234567,"conversation_id":42,"body":"Hello! I have a question about my last invoice, could you help?"},"old":{},"errors":null}}"#
            .to_string(),
    )
    .expect("valid JSON");
    for vsn in [Vsn::V1, Vsn::V2] {
        c.bench_function(&format!("encode postgres_changes push ({vsn:?})"), |b| {
            b.iter(|| {
                encode::fastlane(
                    vsn,
                    black_box("realtime:conversation-42"),
                    "postgres_changes",
                    black_box(&payload),
                )
            })
        });
    }
}

criterion_group!(hot_paths, decode, convert, filters, encoding);
criterion_main!(hot_paths);
