//! The bounded outbound queue of one socket.
//!
//! Fan-out pushes encoded frames here without waiting; the socket's writer task drains it. The
//! queue is bounded in bytes: a client that stops reading is disconnected when its backlog passes
//! the cap (policy: disconnect the slow consumer with a reason), never buffered without limit, and
//! never allowed to slow down the publisher or other subscribers.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::protocol::Frame;

/// Bookkeeping cost charged per queued frame on top of its payload, so that a flood of tiny
/// frames is bounded too.
const FRAME_OVERHEAD: usize = 64;

/// A drained batch at least this long marks a busy socket, whose next batch gets its buffer
/// allocated up front.
const BUSY_BATCH: usize = 16;

/// Why the socket is being closed, sent to the client as the WebSocket close frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

impl CloseReason {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Close code sent to a client whose outbound queue overflowed (1013 "Try Again Later").
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    close: Option<CloseReason>,
    overflowed: bool,
}

pub struct Outbound {
    state: Mutex<State>,
    wake: Notify,
    cap_bytes: usize,
}

/// What the writer should do next.
pub enum Drain {
    Frames(VecDeque<Frame>),
    Close(VecDeque<Frame>, CloseReason),
}

/// A push that was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The socket is closing; the frame was dropped.
    Closed,
    /// This push overflowed the queue; the socket is now being closed.
    Overflow,
}

impl Outbound {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            cap_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent (every update is a
        // single push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame. Never blocks.
    pub fn push(&self, frame: Frame) -> Result<(), Rejected> {
        let size = frame_size(&frame);
        let mut st = self.lock();
        if st.close.is_some() {
            return Err(Rejected::Closed);
        }
        if st.bytes + size > self.cap_bytes {
            // Free the backlog now: the client will not read it.
            st.frames.clear();
            st.bytes = 0;
            st.overflowed = true;
            st.close = Some(CloseReason::new(
                CLOSE_SLOW_CONSUMER,
                "slow consumer: outbound queue full",
            ));
            drop(st);
            self.wake.notify_one();
            return Err(Rejected::Overflow);
        }
        self.enqueue(st, frame, size);
        Ok(())
    }

    /// Adds an admitted frame and releases the lock. Only the push that makes the queue
    /// non-empty wakes the writer: until the writer takes the queue, that wake-up is pending (a
    /// stored permit or a woken task), and the writer takes everything queued by then. Under
    /// load this saves a wake-up per frame.
    fn enqueue(&self, mut st: std::sync::MutexGuard<'_, State>, frame: Frame, size: usize) {
        st.bytes += size;
        let was_empty = st.frames.is_empty();
        st.frames.push_back(frame);
        drop(st);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Queues a frame whose size the client did not choose and the server bounds (a topic's
    /// presence state for a joiner): it is admitted whenever the queue is within its cap before
    /// it, so it never overflows the queue by itself. The queue may then hold up to the cap plus
    /// this frame; the next push that finds it over the cap overflows as usual.
    pub fn push_unchosen(&self, frame: Frame) -> Result<(), Rejected> {
        let size = frame_size(&frame);
        let st = self.lock();
        if st.close.is_some() {
            return Err(Rejected::Closed);
        }
        if st.bytes > self.cap_bytes {
            drop(st);
            return self.push(frame);
        }
        self.enqueue(st, frame, size);
        Ok(())
    }

    /// Asks the writer to send what is queued, then close with `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.lock();
        if st.close.is_none() {
            st.close = Some(reason);
        }
        drop(st);
        self.wake.notify_one();
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// True once a push has overflowed the queue.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Bytes currently queued (for tests and metrics).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Waits until there is something to write. Only the socket's writer calls this.
    pub async fn drain(&self) -> Drain {
        loop {
            {
                let mut st = self.lock();
                if !st.frames.is_empty() || st.close.is_some() {
                    // Take the queue whole: no copy under the lock. A busy socket gets a buffer
                    // as big as the batch it just had (one allocation, not a doubling series
                    // with copies); an idle one keeps none.
                    let next = match st.frames.len() {
                        n if n >= BUSY_BATCH => VecDeque::with_capacity(n),
                        _ => VecDeque::new(),
                    };
                    let frames = std::mem::replace(&mut st.frames, next);
                    st.bytes = 0;
                    return match st.close.clone() {
                        Some(reason) => Drain::Close(frames, reason),
                        None => Drain::Frames(frames),
                    };
                }
            }
            // notify_one stores a permit when no one is waiting, so a push between the check
            // above and this await is not lost.
            self.wake.notified().await;
        }
    }
}

fn frame_size(frame: &Frame) -> usize {
    use axum::extract::ws::Message;
    FRAME_OVERHEAD
        + match frame {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            Message::Ping(b) | Message::Pong(b) => b.len(),
            Message::Close(_) => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        Frame::Text("x".repeat(n).into())
    }

    #[tokio::test]
    async fn queues_and_drains_in_order() {
        let q = Outbound::new(10_000);
        q.push(text(1)).unwrap();
        q.push(text(2)).unwrap();
        match q.drain().await {
            Drain::Frames(f) => assert_eq!(f.len(), 2),
            Drain::Close(..) => panic!("not closing"),
        }
        assert_eq!(q.queued_bytes(), 0);
    }

    /// Pushes from another thread while the writer drains: only the push into an empty queue
    /// wakes the writer, and still every frame arrives, in order, with nothing left behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_writer_gets_every_frame_in_order() {
        let q = std::sync::Arc::new(Outbound::new(usize::MAX));
        const N: usize = 20_000;
        let writer = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut seen = Vec::with_capacity(N);
                while seen.len() < N {
                    match q.drain().await {
                        Drain::Frames(frames) => {
                            for f in frames {
                                if let Frame::Text(t) = f {
                                    seen.push(t.as_str().parse::<usize>().unwrap());
                                }
                            }
                        }
                        Drain::Close(..) => break,
                    }
                    // A writer busy with its socket now and then.
                    if seen.len() % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                seen
            })
        };
        let pusher = {
            let q = q.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    q.push(Frame::Text(i.to_string().into())).unwrap();
                    if i % 13 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        pusher.await.unwrap();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(10), writer)
            .await
            .expect("the writer was left waiting with frames queued")
            .unwrap();
        assert_eq!(seen, (0..N).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn overflow_drops_the_backlog_and_closes() {
        let q = Outbound::new(1_000);
        q.push(text(500)).unwrap();
        assert_eq!(q.push(text(500)), Err(Rejected::Overflow));
        assert!(q.overflowed());
        assert_eq!(q.queued_bytes(), 0);
        assert_eq!(q.push(text(1)), Err(Rejected::Closed));
        match q.drain().await {
            Drain::Close(frames, reason) => {
                assert!(frames.is_empty());
                assert_eq!(reason.code, CLOSE_SLOW_CONSUMER);
            }
            Drain::Frames(_) => panic!("expected close"),
        }
    }

    #[tokio::test]
    async fn an_unchosen_frame_may_pass_the_cap_once() {
        let q = Outbound::new(1_000);
        q.push(text(500)).unwrap();
        // Larger than the room left (and than the cap): admitted all the same.
        q.push_unchosen(text(2_000)).unwrap();
        assert!(!q.is_closing());
        // The queue is now over its cap: the next push overflows.
        assert_eq!(q.push(text(1)), Err(Rejected::Overflow));
    }

    #[tokio::test]
    async fn close_flushes_what_was_queued_first() {
        let q = Outbound::new(10_000);
        q.push(text(3)).unwrap();
        q.close(CloseReason::new(1012, "restart"));
        q.close(CloseReason::new(1000, "ignored"));
        match q.drain().await {
            Drain::Close(frames, reason) => {
                assert_eq!(frames.len(), 1);
                assert_eq!(reason.code, 1012);
            }
            Drain::Frames(_) => panic!("expected close"),
        }
    }
}
