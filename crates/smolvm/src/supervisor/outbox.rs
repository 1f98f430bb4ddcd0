//! The queue of frames towards one client: two lanes, never blocking.
//!
//! Sending never waits: the agent reader must never be held hostage by a
//! client. What a client can have queued is bounded by flow control (each
//! of its streams has at most one window of guest data outstanding, see
//! docs/protocol.md), so the queue needs no blocking bound. The control lane
//! (lifecycle replies, pongs, credit) is written before the data lane. A
//! client that holds more than `CLIENT_BUDGET` unread and makes no progress
//! for `STALL_LIMIT` is not reading its socket at all (the library always
//! does, whatever its caller does): it is cut off, its processes cancelled.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Bytes queued towards a client above which it must keep making progress.
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
    control: mpsc::UnboundedSender<Vec<u8>>,
    data: mpsc::UnboundedSender<Vec<u8>>,
    inner: Arc<Inner>,
}

/// Receiving side, owned by the connection's writer task.
pub struct OutboxRx {
    control: mpsc::UnboundedReceiver<Vec<u8>>,
    data: mpsc::UnboundedReceiver<Vec<u8>>,
    inner: Arc<Inner>,
}

pub fn outbox() -> (Outbox, OutboxRx) {
    let (ctx, crx) = mpsc::unbounded_channel();
    let (dtx, drx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        queued: AtomicUsize::new(0),
        written: AtomicU64::new(0),
        kicked: AtomicBool::new(false),
        kick: Notify::new(),
    });
    (
        Outbox {
            control: ctx,
            data: dtx,
            inner: inner.clone(),
        },
        OutboxRx {
            control: crx,
            data: drx,
            inner,
        },
    )
}

/// Which lane a frame travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Written first; for frames whose order against data does not matter.
    Control,
    /// In order with the stream's other data-lane frames.
    Data,
}

impl Outbox {
    /// Queues a frame; false when the client is gone or cut off.
    pub fn send(&self, buf: Vec<u8>, lane: Lane) -> bool {
        if self.inner.kicked.load(Ordering::Acquire) {
            return false;
        }
        self.inner.queued.fetch_add(buf.len(), Ordering::AcqRel);
        let tx = match lane {
            Lane::Control => &self.control,
            Lane::Data => &self.data,
        };
        tx.send(buf).is_ok()
    }

    /// Cuts the client off: later sends fail, and the connection's reader
    /// is woken to close it.
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

    /// Watches the client: cuts it off when it stays over budget without
    /// progress for `STALL_LIMIT`. Returns when it was cut off (true) or the
    /// client is gone (false).
    pub async fn watch_stall(&self) -> bool {
        let step = STALL_LIMIT / 6;
        let mut last = self.inner.written.load(Ordering::Acquire);
        let mut stalled_for = Duration::ZERO;
        loop {
            tokio::time::sleep(step).await;
            if self.control.is_closed() || self.inner.kicked.load(Ordering::Acquire) {
                return false;
            }
            let written = self.inner.written.load(Ordering::Acquire);
            let over = self.inner.queued.load(Ordering::Acquire) > CLIENT_BUDGET;
            if written != last || !over {
                last = written;
                stalled_for = Duration::ZERO;
                continue;
            }
            stalled_for += step;
            if stalled_for >= STALL_LIMIT {
                self.kick();
                return true;
            }
        }
    }
}

impl OutboxRx {
    /// The next frame to write, control first; `None` when all senders are
    /// gone and both lanes are empty.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        if let Ok(b) = self.control.try_recv() {
            return Some(b);
        }
        tokio::select! {
            biased;
            Some(b) = self.control.recv() => Some(b),
            Some(b) = self.data.recv() => Some(b),
            else => None,
        }
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
    async fn control_goes_first_and_a_stalled_client_is_cut_off() {
        let (tx, mut rx) = outbox();
        for i in 0..3u8 {
            assert!(tx.send(vec![i], Lane::Data));
        }
        assert!(tx.send(vec![9], Lane::Control));
        assert_eq!(rx.recv().await, Some(vec![9]), "control overtakes data");
        for i in 0..3u8 {
            let b = rx.recv().await.unwrap();
            assert_eq!(b, vec![i], "data keeps its order");
            rx.done(b.len());
        }
        rx.done(1);
        // Over budget and draining slowly: kept.
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..20 {
            assert!(tx.send(chunk.clone(), Lane::Data));
        }
        let watch = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.watch_stall().await })
        };
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let b = rx.recv().await.unwrap();
            rx.done(b.len());
        }
        assert!(!watch.is_finished(), "a slow reader is not cut off");
        // Stalled: nothing drains any more.
        let t = tokio::time::Instant::now();
        assert!(watch.await.unwrap(), "a stalled reader is cut off");
        assert!(t.elapsed() >= STALL_LIMIT);
        tx.kicked().await;
        assert!(!tx.send(vec![1], Lane::Control));
    }
}
