//! The single writer of the channel, with two lanes.
//!
//! Everyone else queues frames into the [`Outbox`]. The control lane
//! (pongs, credit, one-shot replies) is always written before the data
//! lane, so no reply ever waits behind bulk output. The data lane keeps
//! each stream's frames in order (`Started`, output, `Exited`). Neither
//! lane needs a bound of its own: data enters only against the host's
//! credit (at most one window per stream), control frames are small and
//! answer requests the host made.

use crate::log::RateLimit;
use smolvm_proto::{encode_frame, Frame, GuestMsg};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The writer gathers queued frames into one write up to this size (a
/// control frame queued meanwhile waits at most for one such write).
const BATCH_BYTES: usize = 128 * 1024;

enum Item {
    Frame(Frame<GuestMsg>),
    /// Answered once everything queued before it has been written.
    Flush(SyncSender<()>),
}

#[derive(Default)]
struct Lanes {
    control: VecDeque<Item>,
    data: VecDeque<Item>,
}

#[derive(Default)]
struct Shared {
    lanes: Mutex<Lanes>,
    ready: Condvar,
}

/// What to do when writing to the host fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnWriteError {
    /// Log and drop the data (virtio-serial: the host may come back).
    Drop,
    /// The host is gone for good (stdio mode): exit the process.
    Exit,
}

/// A handle to queue frames for the host. Cheap to clone.
#[derive(Clone)]
pub struct Outbox(Arc<Shared>);

impl Outbox {
    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        self.0.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, control: bool, item: Item) {
        let mut l = self.lanes();
        if control {
            l.control.push_back(item);
        } else {
            l.data.push_back(item);
        }
        drop(l);
        self.0.ready.notify_one();
    }

    /// Queues a message in the data lane, in order with the stream's other
    /// data-lane messages.
    pub fn send(&self, stream: u32, msg: GuestMsg) {
        self.push(false, Item::Frame(Frame::new(stream, msg)));
    }

    /// Queues a message in the control lane: written before any queued
    /// data. Only for messages whose order against data does not matter.
    pub fn send_control(&self, stream: u32, msg: GuestMsg) {
        self.push(true, Item::Frame(Frame::new(stream, msg)));
    }

    /// Waits until everything queued so far (both lanes) is written, up to
    /// `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = sync_channel(1);
        // The data lane is written after the control lane: a marker at its
        // end is reached once both are written.
        self.push(false, Item::Flush(tx));
        rx.recv_timeout(timeout).is_ok()
    }

    /// Takes the next batch: all control items first, then data items up to
    /// `BATCH_BYTES` (counted roughly by payload), waiting while both lanes
    /// are empty.
    fn next_batch(&self, batch: &mut Vec<Item>) {
        let mut l = self.lanes();
        while l.control.is_empty() && l.data.is_empty() {
            l = self.0.ready.wait(l).unwrap_or_else(|e| e.into_inner());
        }
        batch.extend(l.control.drain(..));
        let mut bytes = 0usize;
        while bytes < BATCH_BYTES {
            let Some(item) = l.data.pop_front() else {
                break;
            };
            if let Item::Frame(f) = &item {
                bytes += usize::try_from(f.msg.credit_cost()).unwrap_or(usize::MAX) + 16;
            }
            batch.push(item);
        }
    }
}

/// Starts the writer thread over `out`.
pub fn start(out: File, on_error: OnWriteError) -> io::Result<Outbox> {
    let outbox = Outbox(Arc::new(Shared::default()));
    let me = outbox.clone();
    std::thread::Builder::new()
        .name("writer".into())
        .stack_size(128 * 1024)
        .spawn(move || run(out, &me, on_error))?;
    Ok(outbox)
}

fn run(mut out: File, outbox: &Outbox, on_error: OnWriteError) {
    let mut buf = Vec::with_capacity(BATCH_BYTES + 128 * 1024);
    let mut batch = Vec::new();
    let mut acks = Vec::new();
    let mut limit = RateLimit::new(Duration::from_secs(5));
    loop {
        outbox.next_batch(&mut batch);
        for item in batch.drain(..) {
            match item {
                Item::Frame(f) => match encode_frame(&f) {
                    Ok(bytes) => buf.extend_from_slice(&bytes),
                    Err(e) => error!("dropping a frame for stream {}: {e}", f.stream),
                },
                Item::Flush(ack) => acks.push(ack),
            }
        }
        if !buf.is_empty() {
            if let Err(e) = out.write_all(&buf) {
                if on_error == OnWriteError::Exit {
                    error!("host channel closed ({e}); exiting");
                    std::process::exit(0);
                }
                if let Some(n) = limit.allow() {
                    error!("write to host: {e} ({n} more failures not shown)");
                }
            }
            buf.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}
