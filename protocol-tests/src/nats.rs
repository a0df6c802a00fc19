//! A real nats-server for cluster tests (`apt-get install nats-server`; `.ci/run` installs it),
//! on a free loopback port, and a TCP proxy in front of it that can cut one node off (a
//! partition) and let it back.

use std::process::Stdio;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::WAIT;

fn binary() -> &'static str {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nats-server not found: apt-get install nats-server")
}

/// A running nats-server. Killed when dropped.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
}

impl Nats {
    pub async fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut n = Nats { child: None, port };
        n.restart().await;
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// Starts the server (again) on its port, and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.stop().await;
        let started = tokio::time::Instant::now();
        loop {
            let mut child = Command::new(binary())
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start nats-server");
            loop {
                if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                    self.child = Some(child);
                    return;
                }
                // The port may still be held by the previous process for a moment: retry.
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                assert!(started.elapsed() < WAIT, "nats-server did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(started.elapsed() < WAIT, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A TCP proxy to a NATS server: a node connected through it can be cut off from NATS (every
/// connection closed, new ones refused) and let back.
pub struct Proxy {
    pub port: u16,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (open, open_rx) = watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*open_rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut rx = open_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Proxy { port, open, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection through the proxy and refuses new ones.
    pub fn partition(&self) {
        self.open.send_replace(false);
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
