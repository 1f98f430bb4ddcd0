//! The queue of frames towards one client, bounded in bytes.
//!
//! The agent reader must never be held hostage by one client: a client
//! that reads slowly gets back-pressure (the reader waits, so the guest's
//! output slows down), but one that makes no progress for `STALL_LIMIT`
//! while over its budget is disconnected, its processes killed, and
//! everyone else carries on.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Bytes queued towards one client before senders wait for it.
pub const CLIENT_BUDGET: usize = 16 * 1024 * 1024;
/// How long a client over budget may make no progress before it is cut off.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

struct Inner {
    queued: AtomicUsize,
    /// Bytes written so far (progress marker).
    written: AtomicU64,
    kicked: AtomicBool,
    kick: Notify,
}

/// Sending side; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    inner: Arc<Inner>,
}

/// Receiving side, owned by the connection's writer task.
pub struct OutboxRx {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    inner: Arc<Inner>,
}

pub fn outbox() -> (Outbox, OutboxRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        queued: AtomicUsize::new(0),
        written: AtomicU64::new(0),
        kicked: AtomicBool::new(false),
        kick: Notify::new(),
    });
    (
        Outbox {
            tx,
            inner: inner.clone(),
        },
        OutboxRx { rx, inner },
    )
}

/// What became of a frame given to [`Outbox::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The client was already gone or cut off (nothing new to report).
    Gone,
    /// This send found the client stalled past the limit and cut it off.
    CutOff,
}

impl Outbox {
    /// Queues a frame, waiting while the client is over its budget.
    pub async fn send(&self, buf: Vec<u8>) -> Sent {
        let n = buf.len();
        let mut last = self.inner.written.load(Ordering::Acquire);
        let mut since = tokio::time::Instant::now();
        loop {
            if self.inner.kicked.load(Ordering::Acquire) || self.tx.is_closed() {
                return Sent::Gone;
            }
            let queued = self.inner.queued.load(Ordering::Acquire);
            if queued == 0 || queued + n <= CLIENT_BUDGET {
                self.inner.queued.fetch_add(n, Ordering::AcqRel);
                return if self.tx.send(buf).is_ok() {
                    Sent::Queued
                } else {
                    Sent::Gone
                };
            }
            let written = self.inner.written.load(Ordering::Acquire);
            if written != last {
                last = written;
                since = tokio::time::Instant::now();
            } else if since.elapsed() > STALL_LIMIT {
                // Only the send that cuts the client off reports it.
                return if self.inner.kicked.swap(true, Ordering::AcqRel) {
                    Sent::Gone
                } else {
                    self.inner.kick.notify_one();
                    Sent::CutOff
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Queues a small frame without waiting (control replies); false when
    /// the client is gone, cut off, or far over budget.
    pub fn send_now(&self, buf: Vec<u8>) -> bool {
        if self.inner.kicked.load(Ordering::Acquire)
            || self.inner.queued.load(Ordering::Acquire) > 2 * CLIENT_BUDGET
        {
            return false;
        }
        self.inner.queued.fetch_add(buf.len(), Ordering::AcqRel);
        self.tx.send(buf).is_ok()
    }

    /// Cuts the client off: pending and future sends fail, and the
    /// connection's reader is woken to close it.
    pub fn kick(&self) {
        if !self.inner.kicked.swap(true, Ordering::AcqRel) {
            self.inner.kick.notify_one();
        }
    }

    /// Resolves once the client was cut off.
    pub async fn kicked(&self) {
        if self.inner.kicked.load(Ordering::Acquire) {
            return;
        }
        self.inner.kick.notified().await;
    }
}

impl OutboxRx {
    /// The next frame to write, `None` when all senders are gone.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }

    /// Marks `n` bytes as written to the client.
    pub fn done(&self, n: usize) {
        self.inner.queued.fetch_sub(n, Ordering::AcqRel);
        self.inner.written.fetch_add(n as u64, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_client_is_cut_off_and_a_slow_one_is_not() {
        let (tx, mut rx) = outbox();
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..16 {
            assert_eq!(tx.send(chunk.clone()).await, Sent::Queued);
        }
        // Slow but alive: a reader draining one frame a second keeps it on.
        let slow = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let b = rx.recv().await.unwrap();
                rx.done(b.len());
            }
            rx
        });
        for _ in 0..20 {
            assert_eq!(
                tx.send(chunk.clone()).await,
                Sent::Queued,
                "a slow reader is not cut off"
            );
        }
        let _rx = slow.await.unwrap();
        // Stalled: nothing drains any more.
        let t = tokio::time::Instant::now();
        let mut last = Sent::Queued;
        for _ in 0..64 {
            last = tx.send(chunk.clone()).await;
            if last != Sent::Queued {
                break;
            }
        }
        assert_eq!(last, Sent::CutOff, "a stalled reader is cut off");
        assert!(t.elapsed() >= STALL_LIMIT);
        tx.kicked().await;
        assert!(!tx.send_now(vec![1]));
        // Later frames for it are dropped without another report.
        assert_eq!(tx.send(chunk.clone()).await, Sent::Gone);
    }
}
