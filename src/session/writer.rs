//! The writer task: drains the socket's bounded outbound queue into the WebSocket, and closes it
//! with the queue's close reason. Also what the reader needs to know about frame sizes: a
//! frame's length and whether a read failed because a frame was too large (close 1009).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;

use crate::channels::outbound::{CloseReason, Drain, Outbound};
use crate::telemetry;

/// Close code for a frame over `WEBSOCKET_MAX_FRAME_BYTES` (1009 "Message Too Big").
pub(super) const CLOSE_TOO_BIG: u16 = 1009;
/// How long a connection stays open after a close 1009 for a frame that could not be read.
pub(super) const LINGER_AFTER_TOO_BIG: Duration = Duration::from_secs(1);

/// Whether a failed read was a frame or message over the transport's size limits (close 1009),
/// told by the error's type: axum wraps tungstenite's error, and `Capacity` is that case
/// (`MessageTooLong` for a frame or message past `max_frame_size`/`max_message_size`). The
/// `tungstenite` dependency must be the version axum uses, or the downcast never matches (the
/// protocol test `an_unreadable_frame_still_gets_1009` catches that).
pub(super) fn is_capacity_error(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    matches!(
        e.downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

pub(super) fn frame_len(frame: &Message) -> usize {
    match frame {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) => 0,
    }
}

pub(super) async fn write_loop(mut sink: SplitSink<WebSocket, Message>, queue: Arc<Outbound>) {
    loop {
        match queue.drain().await {
            Drain::Frames(frames) => {
                let bytes: usize = frames.iter().map(frame_len).sum();
                let (frames_out, bytes_out) = telemetry::frames_and_bytes_out();
                frames_out.increment(frames.len() as u64);
                bytes_out.increment(bytes as u64);
                for frame in frames {
                    if sink.feed(frame).await.is_err() {
                        queue.close(CloseReason::new(1011, "write failed"));
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    queue.close(CloseReason::new(1011, "write failed"));
                    return;
                }
            }
            Drain::Close(frames, reason) => {
                if queue.overflowed() {
                    metrics::counter!(telemetry::SLOW_CONSUMER_DISCONNECTS).increment(1);
                    tracing::warn!(code = reason.code, "disconnecting slow consumer");
                }
                for frame in frames {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                let close = Message::Close(Some(CloseFrame {
                    code: reason.code,
                    reason: reason.reason.into(),
                }));
                let _ = sink.send(close).await;
                let _ = sink.close().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::error::{CapacityError, ProtocolError};

    #[test]
    fn capacity_errors_are_told_by_type() {
        let too_long = axum::Error::new(tungstenite::Error::Capacity(
            CapacityError::MessageTooLong {
                size: 11,
                max_size: 10,
            },
        ));
        assert!(is_capacity_error(&*too_long.into_inner()));
        let headers = axum::Error::new(tungstenite::Error::Capacity(CapacityError::TooManyHeaders));
        assert!(is_capacity_error(&*headers.into_inner()));
        for other in [
            tungstenite::Error::ConnectionClosed,
            tungstenite::Error::Protocol(ProtocolError::ControlFrameTooBig),
            tungstenite::Error::Io(std::io::Error::other("too long")),
        ] {
            assert!(!is_capacity_error(&*axum::Error::new(other).into_inner()));
        }
    }
}
