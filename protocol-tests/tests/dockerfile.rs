//! The image cannot drift from what is tested: the Dockerfile's build step is the script CI runs,
//! and its entrypoint, command, port and health check match the binary.

use protocol_tests::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Dockerfile instructions, with continuation lines joined.
fn instructions() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (op, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

fn json_array(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not an exec-form array ({e}): {s}"))
}

#[tokio::test]
async fn dockerfile_builds_with_the_ci_command_and_runs_the_tested_binary() {
    let ins = instructions();
    let get = |op: &str| {
        ins.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
    };

    // Build: the same script CI runs, and that script is the release build of the binary.
    assert!(
        get("RUN").iter().any(|r| r == "scripts/build-release"),
        "{ins:?}"
    );
    assert!(
        read(".ci/run")
            .lines()
            .any(|l| l.trim() == "scripts/build-release"),
        ".ci/run must run scripts/build-release"
    );
    assert!(read("scripts/build-release").contains("cargo build --release --locked --bin walcast"));

    // Run: the built binary is the entrypoint, as a non-root user, `serve` by default.
    let copy = get("COPY")
        .into_iter()
        .find(|c| c.starts_with("--from=build"))
        .expect("COPY --from=build");
    let parts: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(parts[1], "/src/target/release/walcast");
    let entrypoint = json_array(&get("ENTRYPOINT")[0]);
    assert_eq!(entrypoint, vec![parts[2].to_owned()]);
    let cmd = json_array(&get("CMD")[0]);
    assert_eq!(cmd, vec!["serve".to_owned()]);
    let user = get("USER");
    assert!(!user.is_empty() && user[0] != "root" && user[0] != "0");
    // `walcast serve` is a real command of the tested binary.
    let help = std::process::Command::new(walcast_bin())
        .args(&cmd)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("API_JWT_SECRET"));

    // Port: EXPOSE and ENV PORT match walcast's default.
    assert_eq!(
        get("EXPOSE"),
        vec![walcast::config::DEFAULT_PORT.to_string()]
    );
    assert!(get("ENV")
        .iter()
        .any(|e| e == &format!("PORT={}", walcast::config::DEFAULT_PORT)));

    // Health check: curl (installed in the image) on a path walcast serves.
    let hc = get("HEALTHCHECK").join(" ");
    assert!(get("RUN")
        .iter()
        .any(|r| r.contains("install") && r.contains("curl")));
    let path = hc
        .split("${PORT}")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("health check URL");
    let server = Server::start().await;
    let (status, _, _) = http("GET", &server.http(path), &[], b"").await;
    assert_eq!(status, 200, "health check path {path}");
}
