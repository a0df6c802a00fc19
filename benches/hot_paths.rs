//! Micro-benchmarks of the hot paths (criterion): pgoutput decode, value conversion, filter
//! matching, V1/V2 encoding. `cargo bench --bench hot_paths`; BENCHMARKS.md has the figures.
//!
//! `hot_paths --instructions <case> <n>` runs one case n times and nothing else:
//! `scripts/callgrind-hot-paths` counts its instructions under callgrind, a figure that does
//! not move with the machine's load the way wall time does.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{black_box, Criterion};
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

/// One operation of a hot path, run once per call.
type Case = Box<dyn FnMut()>;

fn cases() -> Vec<(String, Case)> {
    let mut out: Vec<(String, Case)> = Vec::new();

    let msg = chat_insert();
    out.push((
        "pgoutput decode (5-column insert)".into(),
        Box::new(move || {
            black_box(pgoutput::decode(black_box(&msg)).ok());
        }),
    ));

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
    out.push((
        "values to JSON (5-column chat row)".into(),
        Box::new(move || {
            let mut json = String::with_capacity(256);
            for (conv, text) in &row {
                values::push_json(&mut json, conv, black_box(text));
            }
            black_box(json);
        }),
    ));
    let jsonb =
        r#"{"plan": "pro", "seats": 12, "tags": ["vip", "eu"], "address": {"city": "Lyon"}}"#;
    out.push((
        "values to JSON (jsonb object)".into(),
        Box::new(move || {
            black_box(values::to_json(&values::Conv::Jsonb, black_box(jsonb)));
        }),
    ));

    out.push((
        "filter parse (conversation_id=eq.42)".into(),
        Box::new(|| {
            black_box(filter::parse(black_box("conversation_id=eq.42")).ok());
        }),
    ));
    out.push((
        "filter compare int".into(),
        Box::new(|| {
            black_box(filter::Kind::Int.compare(black_box("1234567"), black_box("1234568")));
        }),
    ));
    out.push((
        "filter compare timestamp".into(),
        Box::new(|| {
            black_box(filter::Kind::Timestamp.compare(
                black_box("2026-11-26 16:45:23.123456"),
                black_box("2026-11-26 16:45:24"),
            ));
        }),
    ));
    out.push((
        "filter like (%invoice%)".into(),
        Box::new(|| {
            black_box(filter::like(
                black_box("Hello! I have a question about my last invoice, could you help?"),
                black_box("%invoice%"),
                false,
            ));
        }),
    ));

    for vsn in [Vsn::V1, Vsn::V2] {
        let payload = RawValue::from_string(
            r#"{"ids":[31415926],"data":{"schema":"public","table":"messages","commit_timestamp":"2026-11-26T16:45:23.123Z","eventType":"INSERT","new":{"id":1234567,"conversation_id":42,"body":"Hello! I have a question about my last invoice, could you help?"},"old":{},"errors":null}}"#
                .to_string(),
        )
        .expect("valid JSON");
        out.push((
            format!("encode postgres_changes push ({vsn:?})"),
            Box::new(move || {
                black_box(encode::fastlane(
                    vsn,
                    black_box("realtime:conversation-42"),
                    "postgres_changes",
                    black_box(&payload),
                ));
            }),
        ));
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list-cases") {
        for (name, _) in cases() {
            println!("{name}");
        }
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--instructions") {
        let (Some(name), Some(n)) = (args.get(at + 1), args.get(at + 2)) else {
            eprintln!("usage: hot_paths --instructions <case> <n>");
            std::process::exit(2);
        };
        let Ok(n) = n.parse::<u64>() else {
            eprintln!("n must be a number: {n}");
            std::process::exit(2);
        };
        let Some((_, mut case)) = cases().into_iter().find(|(c, _)| c == name) else {
            eprintln!("no case named {name:?}; see --list-cases");
            std::process::exit(2);
        };
        for _ in 0..n {
            case();
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    for (name, mut case) in cases() {
        c.bench_function(&name, |b| b.iter(&mut case));
    }
    c.final_summary();
}
