//! The composition root: builds the shared pieces, serves, and owns shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::JwtVerifier;
use crate::channels::Channels;
use crate::config::Settings;
use crate::error::AppError;
use crate::server;
use crate::session::Context;

/// Serves on `listener` until `shutdown` resolves, then closes every socket (1012) and waits for
/// them, at most `settings.shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    verifier: JwtVerifier,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let shutdown_timeout = settings.shutdown_timeout;
    let ctx = Arc::new(Context {
        settings: Arc::new(settings),
        verifier: Arc::new(verifier),
        channels: Channels::local(),
        shutdown: shutdown_rx,
        alive: alive_tx,
    });
    let router = server::router(ctx.clone());
    drop(ctx);

    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new connections and closing sockets");
        let _ = shutdown_tx.send(true);
        // Keep the sender alive so sessions see `true` rather than a closed channel.
        std::mem::forget(shutdown_tx);
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .await?;

    // Every session holds the context (and with it an `alive` sender); when the last one is
    // gone, recv() returns None.
    if tokio::time::timeout(shutdown_timeout, alive_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = shutdown_timeout.as_millis() as u64,
            "shutdown deadline passed with sockets still open; exiting anyway"
        );
    }
    Ok(())
}
