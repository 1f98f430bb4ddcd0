//! The single writer of the channel, with two lanes.
//!
//! Everyone else queues frames into the [`Outbox`]. The control lane
//! (pongs, credit, one-shot replies) is always written before the data
//! lane, so no reply ever waits behind bulk output. The data lane keeps
//! each stream's frames in order (`Started`, output, `Exited`). Neither
//! lane needs a bound of its own: data enters only against the host's
//! credit (at most one window per stream), control frames are small and
//! answer requests the host made.
//!
//! Snapshots (docs/protocol.md): after a `Quiesce` the writer writes
//! `Quiesced` as the last bytes of a write and then nothing at all until a
//! thaw (or [`QUIESCE_TIMEOUT`]); frames queued meanwhile wait in guest
//! memory. After a `Reinit` the frames of the previous host connection's
//! streams are dropped, queued or still to come.

use crate::log::RateLimit;
use smolvm_proto::{encode_frame, Frame, GuestMsg, CONTROL_STREAM};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The writer gathers queued frames into one write up to this size (a
/// control frame queued meanwhile waits at most for one such write).
const BATCH_BYTES: usize = 128 * 1024;

/// A quiesce nobody thaws ends by itself after this long (CLOCK_MONOTONIC,
/// which stands still while the VM is stopped: this only fires when the
/// host went away mid-snapshot).
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

enum Item {
    Frame(Frame<GuestMsg>),
    /// Answered once everything queued before it has been written.
    Flush(SyncSender<()>),
    /// `Quiesced` for the quiesce with this number: the writer writes it
    /// as the last frame of its write, then stops until that quiesce is
    /// released.
    Quiesce(u64, u64),
}

impl Item {
    /// Frames of a stream other than 0 belong to one host connection.
    fn of_a_connection(&self) -> bool {
        matches!(self, Item::Frame(f) if f.stream != CONTROL_STREAM)
    }
}

#[derive(Default)]
struct Lanes {
    control: VecDeque<Item>,
    data: VecDeque<Item>,
    /// The current host connection (bumped by [`Outbox::new_connection`]).
    conn: u64,
    /// Quiesces asked for so far, and the number up to which they are
    /// released (thawed): the writer stops at a `Quiesce(n)` only when
    /// `n > released`, so a thaw that overtakes its `Quiesced` still counts.
    quiesces: u64,
    released: u64,
    /// Since when the writer stands still (it took a `Quiesce`).
    stopped: Option<Instant>,
}

struct Shared {
    lanes: Mutex<Lanes>,
    ready: Condvar,
    quiesce_timeout: Duration,
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
///
/// The handle `start` returns (the server's) always queues for the current
/// host connection. A clone of it is bound to the connection of the moment
/// (clones are made when a stream opens, for its workers; a clone of a
/// clone keeps the binding): once a `Reinit` started a new connection, the
/// frames it queues on streams other than 0 are dropped, so a worker of the
/// previous connection that is still winding down can never write into a
/// stream of the new one that reuses its id.
pub struct Outbox {
    shared: Arc<Shared>,
    /// The connection this handle queues for; `None`: always the current.
    conn: Option<u64>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        Outbox {
            shared: Arc::clone(&self.shared),
            conn: Some(self.conn.unwrap_or_else(|| self.lanes().conn)),
        }
    }
}

impl Outbox {
    fn new(quiesce_timeout: Duration) -> Outbox {
        Outbox {
            shared: Arc::new(Shared {
                lanes: Mutex::default(),
                ready: Condvar::new(),
                quiesce_timeout,
            }),
            conn: None,
        }
    }

    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        self.shared.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, control: bool, item: Item) {
        let mut l = self.lanes();
        if self.conn.is_some_and(|c| c != l.conn) && item.of_a_connection() {
            return; // for a stream of a connection that is gone
        }
        if control {
            l.control.push_back(item);
        } else {
            l.data.push_back(item);
        }
        drop(l);
        self.shared.ready.notify_one();
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

    /// `Quiesce`: queues `Quiesced` on stream 0 in the control lane (after
    /// the control frames queued so far); once the writer wrote it, it
    /// writes nothing more until [`thaw`](Self::thaw).
    pub fn quiesce(&self, nonce: u64) {
        let mut l = self.lanes();
        l.quiesces += 1;
        let n = l.quiesces;
        l.control.push_back(Item::Quiesce(n, nonce));
        drop(l);
        self.shared.ready.notify_one();
    }

    /// Ends every quiesce asked for so far (one whose `Quiesced` is still
    /// queued too: it is written, and the writer goes on). True when there
    /// was one.
    pub fn thaw(&self) -> bool {
        let mut l = self.lanes();
        let was = l.stopped.take().is_some() || l.released < l.quiesces;
        l.released = l.quiesces;
        drop(l);
        self.shared.ready.notify_one();
        was
    }

    /// `Reinit`: a new host connection. Drops every queued frame of a
    /// stream other than 0 (and whatever handles of the old connection
    /// still queue); stream 0's frames, flushes and quiesces stay. Returns
    /// how many frames were dropped.
    pub fn new_connection(&self) -> usize {
        let mut l = self.lanes();
        l.conn += 1;
        let before = l.control.len() + l.data.len();
        l.control.retain(|i| !i.of_a_connection());
        l.data.retain(|i| !i.of_a_connection());
        before - l.control.len() - l.data.len()
    }

    /// Takes the next batch: control items first, then data items up to
    /// `BATCH_BYTES` (counted roughly by payload), waiting while both lanes
    /// are empty or the writer is quiesced. A `Quiesce` that stops the
    /// writer ends the batch: nothing follows it in the same write.
    fn next_batch(&self, batch: &mut Vec<Item>) {
        let mut l = self.lanes();
        loop {
            if let Some(since) = l.stopped {
                let left = self.shared.quiesce_timeout.saturating_sub(since.elapsed());
                if left.is_zero() {
                    error!(
                        "no thaw {:?} after the quiesce: writing again",
                        self.shared.quiesce_timeout
                    );
                    l.stopped = None;
                    l.released = l.quiesces;
                    continue;
                }
                l = self
                    .shared
                    .ready
                    .wait_timeout(l, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            } else if l.control.is_empty() && l.data.is_empty() {
                l = self.shared.ready.wait(l).unwrap_or_else(|e| e.into_inner());
            } else {
                break;
            }
        }
        while let Some(item) = l.control.pop_front() {
            let stop = matches!(item, Item::Quiesce(n, _) if n > l.released);
            batch.push(item);
            if stop {
                l.stopped = Some(Instant::now());
                return;
            }
        }
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
    start_with(out, on_error, QUIESCE_TIMEOUT)
}

fn start_with(out: File, on_error: OnWriteError, quiesce_timeout: Duration) -> io::Result<Outbox> {
    let outbox = Outbox::new(quiesce_timeout);
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
                Item::Quiesce(_, nonce) => {
                    match encode_frame(&Frame::new(CONTROL_STREAM, GuestMsg::Quiesced { nonce })) {
                        Ok(bytes) => buf.extend_from_slice(&bytes),
                        Err(e) => error!("cannot encode Quiesced: {e}"),
                    }
                }
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

#[cfg(test)]
impl Outbox {
    /// An outbox without a writer thread (tests take its batches by hand).
    pub fn detached() -> Outbox {
        Outbox::new(QUIESCE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smolvm_proto::{Bytes, Decoder};
    use std::io::Read;
    use std::sync::mpsc::{channel, Receiver};

    fn out(s: u32, b: &[u8]) -> (u32, GuestMsg) {
        (s, GuestMsg::Stdout(Bytes(b.to_vec())))
    }

    fn pong(s: u32, nonce: u64) -> (u32, GuestMsg) {
        (s, GuestMsg::Pong { nonce })
    }

    /// The frames of a batch as written (a `Quiesce` is its `Quiesced`).
    fn frames(batch: &[Item]) -> Vec<(u32, GuestMsg)> {
        batch
            .iter()
            .filter_map(|i| match i {
                Item::Frame(f) => Some((f.stream, f.msg.clone())),
                Item::Quiesce(_, nonce) => {
                    Some((CONTROL_STREAM, GuestMsg::Quiesced { nonce: *nonce }))
                }
                Item::Flush(_) => None,
            })
            .collect()
    }

    fn take(o: &Outbox) -> Vec<(u32, GuestMsg)> {
        let mut batch = Vec::new();
        o.next_batch(&mut batch);
        frames(&batch)
    }

    fn stopped(o: &Outbox) -> bool {
        o.lanes().stopped.is_some()
    }

    /// A writer thread on a pipe, and a thread that decodes what it writes.
    fn piped(quiesce_timeout: Duration) -> (Outbox, Receiver<(u32, GuestMsg)>) {
        let (r, w) = crate::sys::pipe().unwrap();
        let o = start_with(File::from(w), OnWriteError::Drop, quiesce_timeout).unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut r = File::from(r);
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    return;
                }
                dec.push(&buf[..n]);
                while let Ok(Some(f)) = dec.next_frame::<GuestMsg>() {
                    if tx.send((f.stream, f.msg)).is_err() {
                        return;
                    }
                }
            }
        });
        (o, rx)
    }

    #[test]
    fn quiesced_ends_its_batch_and_nothing_follows_until_thaw() {
        let o = Outbox::detached();
        let (a, b, c) = (out(1, b"a"), out(1, b"b"), out(2, b"c"));
        o.send(a.0, a.1.clone());
        o.send_control(0, pong(0, 1).1);
        o.quiesce(9);
        o.send_control(0, pong(0, 2).1);
        o.send(b.0, b.1.clone());
        o.send(c.0, c.1.clone());
        // Control frames queued before the quiesce go first; the data lane
        // waits, and so does everything queued after it.
        assert_eq!(
            take(&o),
            vec![pong(0, 1), (0, GuestMsg::Quiesced { nonce: 9 })]
        );
        assert!(stopped(&o));
        assert!(o.thaw());
        assert!(!stopped(&o));
        assert_eq!(take(&o), vec![pong(0, 2), a, b, c]);
        assert!(!o.thaw());
    }

    #[test]
    fn a_thaw_that_overtakes_its_quiesced_does_not_stop_the_writer() {
        let o = Outbox::detached();
        o.quiesce(9);
        assert!(o.thaw());
        o.send(1, out(1, b"x").1);
        assert_eq!(
            take(&o),
            vec![(0, GuestMsg::Quiesced { nonce: 9 }), out(1, b"x")]
        );
        assert!(!stopped(&o));
    }

    #[test]
    fn a_new_connection_drops_the_old_streams_frames_but_not_stream_0s() {
        let o = Outbox::detached();
        let old = o.clone(); // a worker of the first connection
        o.send_control(0, pong(0, 1).1);
        old.send_control(3, GuestMsg::Credit { bytes: 10 });
        old.send(3, out(3, b"old").1);
        o.send(0, out(0, b"zero").1);
        o.quiesce(9);
        assert_eq!(o.new_connection(), 2);
        // What the old worker still sends is dropped too, but not on stream 0.
        old.send(3, out(3, b"late").1);
        old.send_control(0, pong(0, 2).1);
        // Handles made now, and the server's own, belong to the new one.
        let new = o.clone();
        new.send(3, out(3, b"new").1);
        o.send(4, out(4, b"root").1);
        assert_eq!(
            take(&o),
            vec![pong(0, 1), (0, GuestMsg::Quiesced { nonce: 9 })],
            "the quiesce is kept"
        );
        o.thaw();
        assert_eq!(
            take(&o),
            vec![pong(0, 2), out(0, b"zero"), out(3, b"new"), out(4, b"root")]
        );
        // A clone of a bound handle keeps its binding.
        let old2 = old.clone();
        old2.send(5, out(5, b"x").1);
        assert!(o.lanes().data.is_empty());
    }

    #[test]
    fn the_writer_writes_nothing_after_quiesced_until_thawed() {
        let (o, rx) = piped(QUIESCE_TIMEOUT);
        o.send(1, out(1, b"before").1);
        o.quiesce(9);
        for i in 0..50u8 {
            o.send(1, out(1, &[i]).1);
            o.send_control(7, pong(7, u64::from(i)).1);
        }
        let mut got = Vec::new();
        loop {
            let m = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let last = m.1 == GuestMsg::Quiesced { nonce: 9 };
            got.push(m);
            if last {
                break;
            }
        }
        assert!(
            got.len() == 1 || got == vec![out(1, b"before"), (0, GuestMsg::Quiesced { nonce: 9 })],
            "{got:?}"
        );
        // Flushing waits too (its marker is queued behind the stop).
        assert!(!o.flush(Duration::from_millis(300)));
        assert!(rx.try_recv().is_err(), "a frame came after Quiesced");
        assert!(o.thaw());
        let mut rest = Vec::new();
        while rest.len() < 100 + 2 - got.len() {
            rest.push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        // In order: the control lane first, each lane in queue order.
        let mut want: Vec<_> = (0..50u8).map(|i| pong(7, u64::from(i))).collect();
        if got.len() == 1 {
            want.push(out(1, b"before"));
        }
        want.extend((0..50u8).map(|i| out(1, &[i])));
        assert_eq!(rest, want);
        assert!(o.flush(Duration::from_secs(10)));
    }

    #[test]
    fn a_quiesce_nobody_thaws_ends_by_itself() {
        let (o, rx) = piped(Duration::from_millis(200));
        let at = Instant::now();
        o.quiesce(9);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            (0, GuestMsg::Quiesced { nonce: 9 })
        );
        o.send(1, out(1, b"later").1);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            out(1, b"later")
        );
        assert!(
            at.elapsed() >= Duration::from_millis(100),
            "{:?}",
            at.elapsed()
        );
        // It is over: the next frame goes at once, and a thaw finds nothing.
        assert!(!o.thaw());
        o.send(1, out(1, b"now").1);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            out(1, b"now")
        );
    }
}
