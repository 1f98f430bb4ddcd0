//! The single writer of the channel. Everyone else queues frames into a
//! bounded channel ([`Outbox`]); a full queue blocks the sender, so a fast
//! command waits for the host instead of filling guest memory.

use crate::log::RateLimit;
use smolvm_proto::{encode_frame, Frame, GuestMsg};
use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Duration;

/// Frames queued before senders block (each at most one 64 KiB chunk).
const QUEUE_FRAMES: usize = 64;
/// The writer gathers queued frames into one write up to this size.
const BATCH_BYTES: usize = 256 * 1024;

enum Out {
    Frame(Frame<GuestMsg>),
    /// Answered once everything queued before it has been written.
    Flush(SyncSender<()>),
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
pub struct Outbox(SyncSender<Out>);

impl Outbox {
    /// Queues one message on a stream; blocks while the queue is full.
    pub fn send(&self, stream: u32, msg: GuestMsg) {
        // A closed queue means the writer is gone and the agent is ending.
        let _ = self.0.send(Out::Frame(Frame::new(stream, msg)));
    }

    /// Waits until everything queued so far is written, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = sync_channel(1);
        if self.0.send(Out::Flush(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

/// Starts the writer thread over `out`.
pub fn start(out: File, on_error: OnWriteError) -> io::Result<Outbox> {
    let (tx, rx) = sync_channel(QUEUE_FRAMES);
    std::thread::Builder::new()
        .name("writer".into())
        .stack_size(128 * 1024)
        .spawn(move || run(out, rx, on_error))?;
    Ok(Outbox(tx))
}

fn run(mut out: File, rx: Receiver<Out>, on_error: OnWriteError) {
    let mut buf = Vec::with_capacity(BATCH_BYTES + 64 * 1024);
    let mut acks = Vec::new();
    let mut limit = RateLimit::new(Duration::from_secs(5));
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Out::Frame(f) => match encode_frame(&f) {
                    Ok(bytes) => buf.extend_from_slice(&bytes),
                    Err(e) => error!("dropping a frame for stream {}: {e}", f.stream),
                },
                Out::Flush(ack) => acks.push(ack),
            }
            if buf.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
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
