//! Every benchmark scenario at its smallest setting, so none can rot: it must run end to end
//! against the real binary and PostgreSQL, pass its own checks (nothing lost, nothing duplicated)
//! and write its JSON and its PNG chart. Figures from these runs mean nothing and go to a temporary directory.

use std::path::PathBuf;
use std::process::Command;

fn run(scenario: &str, args: &[&str], output: &str) {
    let dir = std::env::temp_dir().join(format!(
        "walcast-bench-smoke-{}-{scenario}-{output}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let walcast = std::env::var_os("WALCAST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/walcast")
        });
    assert!(
        walcast.exists(),
        "{} missing: build walcast first",
        walcast.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_walcast-bench"))
        .arg(scenario)
        .args(args)
        .env("WALCAST_BIN", &walcast)
        .env("WALCAST_BENCH_RESULTS", &dir)
        .output()
        .expect("run walcast-bench");
    assert!(
        out.status.success(),
        "{scenario} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(dir.join(output)).expect("results JSON");
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert!(v.get("scenario").is_some(), "{json}");
    let png = dir.join(output.replace(".json", ".png"));
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000,
        "{} is not a chart",
        png.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn drain() {
    run("drain", &["--transactions", "200"], "drain.json");
}

/// The smallest chat load: 20 subscribers over 4 conversations, 50 commits/s for 1 s.
const SMALL_CHAT: [&str; 10] = [
    "--subscribers",
    "20",
    "--conversations",
    "4",
    "--rates",
    "50",
    "--seconds",
    "1",
    "--writers",
    "2",
];

#[test]
fn chat() {
    run("chat", &SMALL_CHAT, "chat.json");
}

/// The smallest chat load under RLS with `policy`, its references at 0.2 s each.
fn chat_rls_policy(policy: &str, output: &str) {
    run(
        "chat",
        &[
            &SMALL_CHAT[..],
            &["--rls", "--policy", policy, "--reference-seconds", "0.2"],
        ]
        .concat(),
        output,
    );
}

#[test]
fn chat_rls() {
    run(
        "chat",
        &[&SMALL_CHAT[..], &["--rls", "--reference-seconds", "0.2"]].concat(),
        "chat_rls.json",
    );
}

#[test]
fn chat_rls_seed() {
    chat_rls_policy("seed", "chat_rls_seed.json");
}

/// The primary alone against primary + a streaming replica (`--replica`).
#[test]
fn chat_rls_seed_replica() {
    run(
        "chat",
        &[
            &SMALL_CHAT[..],
            &[
                "--rls",
                "--policy",
                "seed",
                "--replica",
                "--reference-seconds",
                "0.2",
            ],
        ]
        .concat(),
        "chat_rls_seed_replica.json",
    );
}

#[test]
fn chat_rls_seed_fast() {
    chat_rls_policy("seed-fast", "chat_rls_seed-fast.json");
}

#[test]
fn chat_rls_claims() {
    chat_rls_policy("claims", "chat_rls_claims.json");
}

#[test]
fn chat_rls_definer() {
    chat_rls_policy("definer", "chat_rls_definer.json");
}

#[test]
fn idle() {
    run("idle", &["--sockets", "50"], "idle.json");
}

#[test]
fn joins() {
    run(
        "joins",
        &[
            "--sockets",
            "2",
            "--joins-per-socket",
            "5",
            "--members",
            "10",
        ],
        "joins.json",
    );
}

#[test]
fn stall() {
    run(
        "stall",
        &[
            "--stalled",
            "5",
            "--healthy",
            "2",
            "--rate",
            "50",
            "--seconds",
            "1",
        ],
        "stall.json",
    );
}

#[test]
fn fanout() {
    run(
        "fanout",
        &[
            "--subscribers",
            "10",
            "--topics",
            "5",
            "--rates",
            "10",
            "--many-rates",
            "20",
            "--seconds",
            "1",
        ],
        "fanout.json",
    );
}

#[test]
fn catchup() {
    run(
        "catchup",
        &[
            "--retained",
            "200",
            "--clients",
            "10",
            "--rooms",
            "2",
            "--missed",
            "3",
        ],
        "catchup.json",
    );
}

#[test]
fn cluster() {
    run(
        "cluster",
        &[
            "--subscribers",
            "6",
            "--nodes",
            "3",
            "--rates",
            "10",
            "--topics",
            "2",
            "--many-rates",
            "10",
            "--seconds",
            "1",
        ],
        "cluster.json",
    );
}

#[test]
fn slot_failover() {
    run(
        "slot-failover",
        &["--nodes", "2", "--rounds", "1"],
        "slot_failover.json",
    );
}
