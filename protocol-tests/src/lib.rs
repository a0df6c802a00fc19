//! Harness for black-box tests: start the real `walcast` binary on a free port, connect real
//! WebSocket clients, and read frames with a timeout. Nothing here sleeps to synchronise: waits
//! are for a frame (or a close) with a deadline, and "nothing arrived" is proven with a
//! heartbeat barrier (a socket's frames are delivered in order, so once the heartbeat reply is
//! read, anything queued before it has been read too).
//!
//! One file on purpose (about 740 lines): the server handle and the raw client are the test
//! vocabulary every test file imports; PostgreSQL helpers are in `pg.rs`.

pub mod nats;
pub mod pg;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "walcast-test-secret-with-at-least-32-characters";
/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The walcast binary: `WALCAST_BIN`, or the workspace's debug build (built once per test run).
pub fn walcast_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("WALCAST_BIN") {
            return PathBuf::from(path);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "walcast", "--bin", "walcast"])
            .current_dir(&root)
            .status()
            .expect("run cargo build for the walcast binary");
        assert!(status.success(), "cargo build of walcast failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        target.join("debug").join("walcast")
    })
    .clone()
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token signed with [`SECRET`].
pub fn sign(claims: Value) -> String {
    sign_with(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

pub fn sign_with(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).expect("sign token")
}

/// A valid token for `role` that expires in an hour.
pub fn token(role: &str) -> String {
    sign(json!({"role": role, "exp": now() + 3600, "sub": format!("{role}-user")}))
}

/// A running walcast. Killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Defaults for tests: no error back-off, the test secret.
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts walcast against a test database (plus extra settings).
    pub async fn start_with_db(db: &pg::TestDb, extra: &[(&str, &str)]) -> Server {
        let env = db.env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        Self::start_with(&all).await
    }

    pub async fn start_with(env: &[(&str, &str)]) -> Server {
        let stderr = if std::env::var_os("WALCAST_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        Self::start_inner(env, stderr).await
    }

    /// Starts walcast with its log (stderr) written to `log`.
    pub async fn start_logging_to(env: &[(&str, &str)], log: &std::path::Path) -> Server {
        let file = std::fs::File::create(log).expect("log file");
        Self::start_inner(env, Stdio::from(file)).await
    }

    async fn start_inner(env: &[(&str, &str)], stderr: Stdio) -> Server {
        let mut cmd = Command::new(walcast_bin());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("WALCAST_BIND", "127.0.0.1")
            .env("API_JWT_SECRET", SECRET)
            .env("CONNECT_ERROR_BACKOFF_MS", "0")
            .env("CHANNEL_ERROR_BACKOFF_MS", "0")
            .env("STARTUP_GRACE_MS", "0")
            .env("LOG_LEVEL", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(stderr).kill_on_drop(true);
        let mut child = cmd.spawn().expect("start walcast");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("walcast did not start in time")
            .expect("read walcast stdout")
            .expect("walcast exited before listening");
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected start line: {line}"));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, port }
    }

    /// `GET /metrics` with `bearer` (a JWT signed with `METRICS_JWT_SECRET`), which must answer
    /// 200; the Prometheus text.
    pub async fn metrics(&self, bearer: &str) -> String {
        let (status, head, body) = http(
            "GET",
            &self.http("/metrics"),
            &[("authorization", &format!("Bearer {bearer}"))],
            b"",
        )
        .await;
        assert_eq!(status, 200, "{head}");
        String::from_utf8(body).expect("metrics are text")
    }

    /// The value of one series of `/metrics` (name with labels, exactly as exported), 0 when
    /// absent; the server must run with `METRICS_JWT_SECRET` = [`SECRET`].
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics(&token("anon")).await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn ws_url(&self, path: &str, query: &str) -> String {
        format!("ws://127.0.0.1:{}{}?{}", self.port, path, query)
    }

    /// Connects with `apikey=<token>` and the given vsn on `/socket/websocket`.
    pub async fn connect(&self, vsn: Vsn, token: &str) -> Client {
        let query = match vsn.param() {
            Some(v) => format!("apikey={token}&vsn={v}"),
            None => format!("apikey={token}"),
        };
        self.connect_url(vsn, &self.ws_url("/socket/websocket", &query), &[])
            .await
            .expect("websocket connect")
    }

    /// Connects to a full URL with extra headers. `Err` carries the HTTP status and body.
    pub async fn connect_url(
        &self,
        vsn: Vsn,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, (u16, String)> {
        let mut req = url.into_client_request().expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await {
            Err(_) => panic!("connect timed out"),
            Ok(Ok((ws, _))) => Ok(Client::new(ws, vsn)),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((status, body))
            }
            Ok(Err(e)) => panic!("connect failed: {e}"),
        }
    }

    /// Kills the process (SIGKILL): a crash.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill walcast");
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("walcast pid")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("walcast pid");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("walcast did not exit in time")
            .expect("wait for walcast")
    }
}

/// The serializer a test client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vsn {
    /// vsn=1.0.0 given explicitly.
    V1,
    V2,
    /// No vsn parameter at all (means 1.0.0).
    Default,
}

impl Vsn {
    pub fn param(self) -> Option<&'static str> {
        match self {
            Vsn::V1 => Some("1.0.0"),
            Vsn::V2 => Some("2.0.0"),
            Vsn::Default => None,
        }
    }
    pub fn is_v2(self) -> bool {
        self == Vsn::V2
    }
}

/// Both serializers, for tests that run under each.
pub const BOTH: [Vsn; 2] = [Vsn::V1, Vsn::V2];

/// A decoded server frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A JSON message. `join_ref` is `None` when the frame had no join_ref field at all (V1).
    Msg {
        join_ref: Option<Value>,
        msg_ref: Value,
        topic: String,
        event: String,
        payload: Value,
    },
    /// A kind-4 binary user broadcast.
    Binary {
        topic: String,
        event: String,
        meta: Option<Value>,
        json: bool,
        payload: Vec<u8>,
    },
    Close(Option<(u16, String)>),
}

impl Frame {
    pub fn event(&self) -> &str {
        match self {
            Frame::Msg { event, .. } => event,
            Frame::Binary { .. } => "broadcast(binary)",
            Frame::Close(_) => "close",
        }
    }
    pub fn payload(&self) -> &Value {
        match self {
            Frame::Msg { payload, .. } => payload,
            other => panic!("not a JSON message: {other:?}"),
        }
    }
    pub fn msg_ref(&self) -> &Value {
        match self {
            Frame::Msg { msg_ref, .. } => msg_ref,
            other => panic!("not a JSON message: {other:?}"),
        }
    }
    pub fn join_ref(&self) -> Option<&Value> {
        match self {
            Frame::Msg { join_ref, .. } => join_ref.as_ref(),
            other => panic!("not a JSON message: {other:?}"),
        }
    }
    pub fn topic(&self) -> &str {
        match self {
            Frame::Msg { topic, .. } | Frame::Binary { topic, .. } => topic,
            Frame::Close(_) => "",
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub vsn: Vsn,
    next_ref: u64,
    /// The raw text of every JSON frame read, for shape assertions.
    pub raw: Vec<String>,
}

impl Client {
    pub fn new(ws: Ws, vsn: Vsn) -> Self {
        Self {
            ws,
            vsn,
            next_ref: 1,
            raw: Vec::new(),
        }
    }

    /// The ref the next message will carry.
    pub fn next_ref(&self) -> u64 {
        self.next_ref
    }

    /// Numbers the next messages from `n`: supabase-js keeps counting its message refs across
    /// its own reconnects (a rejoin continues the old socket's refs); a new page starts at 1.
    pub fn set_next_ref(&mut self, n: u64) {
        self.next_ref = n;
    }

    pub fn make_ref(&mut self) -> String {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        r
    }

    /// Encodes and sends a JSON message with this client's serializer.
    pub async fn send(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) {
        let text = match self.vsn {
            Vsn::V2 => json!([join_ref, msg_ref, topic, event, payload]).to_string(),
            Vsn::V1 | Vsn::Default => {
                let mut obj =
                    json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref});
                if let Some(jr) = join_ref {
                    obj["join_ref"] = json!(jr);
                }
                obj.to_string()
            }
        };
        self.send_text(text).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send text");
    }

    /// Sends a text frame; the server may close the socket before the send completes.
    pub async fn try_send_text(&mut self, text: String) -> Result<(), String> {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send binary");
    }

    /// The next frame, or a panic after [`WAIT`].
    pub async fn recv(&mut self) -> Frame {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            let msg = match next {
                None => return Frame::Close(None),
                Some(Err(_)) => return Frame::Close(None),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Text(t) => {
                    let text = t.to_string();
                    self.raw.push(text.clone());
                    return decode_text(self.vsn, &text);
                }
                Message::Binary(b) => return decode_binary(&b),
                Message::Close(frame) => {
                    return Frame::Close(
                        frame.map(|CloseFrame { code, reason }| {
                            (u16::from(code), reason.to_string())
                        }),
                    )
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    /// Reads until a frame matches, returning it; panics on close or timeout.
    pub async fn recv_until(&mut self, what: &str, pred: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let f = self.recv().await;
            if pred(&f) {
                return f;
            }
            if let Frame::Close(c) = f {
                panic!("socket closed ({c:?}) while waiting for {what}");
            }
        }
    }

    /// The reply to `msg_ref`.
    pub async fn reply(&mut self, msg_ref: &str) -> Frame {
        let r = json!(msg_ref);
        self.recv_until(&format!("reply to ref {msg_ref}"), |f| {
            matches!(f, Frame::Msg { event, msg_ref, .. } if event == "phx_reply" && *msg_ref == r)
        })
        .await
    }

    /// Sends a heartbeat and returns every frame that arrived before its reply.
    pub async fn barrier(&mut self) -> Vec<Frame> {
        let r = self.make_ref();
        self.send(None, Some(&r), "phoenix", "heartbeat", json!({}))
            .await;
        let want = json!(r);
        let mut before = Vec::new();
        loop {
            let f = self.recv().await;
            match &f {
                Frame::Msg {
                    event,
                    msg_ref,
                    topic,
                    ..
                } if event == "phx_reply" && *msg_ref == want && topic == "phoenix" => {
                    return before
                }
                Frame::Close(c) => panic!("socket closed ({c:?}) before the heartbeat reply"),
                _ => before.push(f),
            }
        }
    }

    /// Asserts that nothing is waiting on the socket.
    /// Asserts that no `event` frame arrived before a round trip (other frames may have);
    /// `who` names the client in the failure.
    pub async fn assert_no_more(&mut self, event: &str, who: &str) {
        let before = self.barrier().await;
        assert!(
            before.iter().all(|f| f.event() != event),
            "{who} got more {event}: {before:?}"
        );
    }

    pub async fn assert_quiet(&mut self) {
        let before = self.barrier().await;
        assert!(before.is_empty(), "expected no frames, got {before:?}");
    }

    /// Joins `topic` with `payload`; returns (join_ref, reply frame).
    pub async fn join(&mut self, topic: &str, payload: Value) -> (String, Frame) {
        let r = self.make_ref();
        self.send(Some(&r), Some(&r), topic, "phx_join", payload)
            .await;
        let reply = self.reply(&r).await;
        (r, reply)
    }

    /// Joins and asserts success; returns the join_ref.
    pub async fn join_ok(&mut self, topic: &str, config: Value) -> String {
        let (jr, reply) = self.join(topic, json!({ "config": config })).await;
        assert_eq!(
            reply.payload()["status"],
            "ok",
            "join of {topic} failed: {reply:?}"
        );
        jr
    }

    /// Waits for the socket to close; returns the close code and reason.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        loop {
            if let Frame::Close(c) = self.recv().await {
                return c;
            }
        }
    }
}

fn decode_text(vsn: Vsn, text: &str) -> Frame {
    let v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("server sent invalid JSON ({e}): {text}"));
    match vsn {
        Vsn::V2 => {
            let a = v
                .as_array()
                .unwrap_or_else(|| panic!("V2 frame is not an array: {text}"));
            assert_eq!(a.len(), 5, "V2 frame must have 5 elements: {text}");
            Frame::Msg {
                join_ref: Some(a[0].clone()),
                msg_ref: a[1].clone(),
                topic: a[2].as_str().expect("topic").to_owned(),
                event: a[3].as_str().expect("event").to_owned(),
                payload: a[4].clone(),
            }
        }
        Vsn::V1 | Vsn::Default => {
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("V1 frame is not an object: {text}"));
            Frame::Msg {
                join_ref: o.get("join_ref").cloned(),
                msg_ref: o.get("ref").cloned().expect("V1 frames always carry ref"),
                topic: o["topic"].as_str().expect("topic").to_owned(),
                event: o["event"].as_str().expect("event").to_owned(),
                payload: o["payload"].clone(),
            }
        }
    }
}

fn decode_binary(b: &[u8]) -> Frame {
    assert_eq!(b[0], 4, "the server must only send kind-4 binary frames");
    let (tl, el, ml, enc) = (b[1] as usize, b[2] as usize, b[3] as usize, b[4]);
    let mut at = 5;
    let topic = String::from_utf8(b[at..at + tl].to_vec()).unwrap();
    at += tl;
    let event = String::from_utf8(b[at..at + el].to_vec()).unwrap();
    at += el;
    let meta = (ml > 0).then(|| serde_json::from_slice(&b[at..at + ml]).expect("meta JSON"));
    at += ml;
    Frame::Binary {
        topic,
        event,
        meta,
        json: enc == 1,
        payload: b[at..].to_vec(),
    }
}

/// A kind-3 frame as supabase-js builds it.
pub fn kind3(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    event: &str,
    meta: &[u8],
    json: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![
        3,
        join_ref.len() as u8,
        msg_ref.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        meta.len() as u8,
        u8::from(json),
    ];
    for part in [
        join_ref.as_bytes(),
        msg_ref.as_bytes(),
        topic.as_bytes(),
        event.as_bytes(),
        meta,
        payload,
    ] {
        out.extend_from_slice(part);
    }
    out
}

/// A minimal HTTP/1.1 client (no extra dependency): returns (status, headers, body).
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = TcpStream::connect(host).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("http timeout")
        .expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("http head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

pub fn json_body(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// splitmix64: small, seedable, good enough to pick cases (the property tests print the seed so
/// that a run can be replayed).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Runs `walcast serve` with the test defaults and `env`, expects it to refuse to start (exit
/// non-zero within 30 s, not wait), and returns everything it printed.
pub async fn refuses_to_start(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(walcast_bin());
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("WALCAST_BIND", "127.0.0.1")
        .env("API_JWT_SECRET", SECRET)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        cmd.spawn().expect("start walcast").wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{env:?}: walcast should refuse to start, not wait"))
    .expect("walcast's output");
    assert!(!out.status.success(), "{env:?}: started");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `walcast migrate [args]` against `db` with `env`, which must succeed; returns what it printed.
pub async fn migrate_db(db: &pg::TestDb, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(walcast_bin())
        .arg("migrate")
        .args(args)
        .env("DATABASE_URL", db.url())
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run walcast migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
