//! The open streams and their flow control (docs/protocol.md).
//!
//! Each stream that sends data holds a [`Credit`]: what the host still lets
//! it send. Its worker takes credit before it reads output (so a stream the
//! host does not drain stops reading its pipe and its process blocks) and
//! waits on the credit's eventfd when it has none. Each stream that takes
//! input has an [`Input`]: the host may send at most what we granted; the
//! worker hands credit back as it writes the bytes on.

use crate::writer::Outbox;
use smolvm_proto::{Bytes, ErrorInfo, ErrorKind, GuestMsg, STREAM_WINDOW};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most streams open at once (processes, transfers, listings); more get
/// `Error(Busy)`.
pub const MAX_STREAMS: usize = 256;

/// Credit is handed back in batches of at least this much (or when the
/// worker has nothing more queued), so small writes do not each cost a frame.
const GRANT_BATCH: u64 = STREAM_WINDOW as u64 / 4;

struct CreditState {
    avail: u64,
    cancelled: bool,
}

/// What the host still lets a stream send, plus a wake-up fd for its worker.
pub struct Credit {
    state: Mutex<CreditState>,
    efd: OwnedFd,
}

impl Credit {
    pub fn new() -> io::Result<Arc<Credit>> {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Credit {
            state: Mutex::new(CreditState {
                avail: u64::from(STREAM_WINDOW),
                cancelled: false,
            }),
            // SAFETY: eventfd just returned this fd; nobody else owns it.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    fn lock(&self) -> MutexGuard<'_, CreditState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd; a full
        // counter (EAGAIN) still leaves it readable, which is all we need.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Clears pending wake-ups (after poll said the fd is readable).
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; non-blocking.
        let _ = unsafe { libc::read(self.efd.as_raw_fd(), (&raw mut v).cast(), 8) };
    }

    /// The fd that becomes readable when credit arrives or the stream is
    /// cancelled.
    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Takes up to `max` bytes of credit; 0 when there is none.
    pub fn take(&self, max: usize) -> usize {
        let mut s = self.lock();
        let n = s.avail.min(max as u64);
        s.avail -= n;
        usize::try_from(n).unwrap_or(max)
    }

    /// Gives back credit taken but not used.
    pub fn untake(&self, n: usize) {
        self.lock().avail += n as u64;
    }

    pub fn available(&self) -> u64 {
        self.lock().avail
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// The host granted `n` more bytes.
    pub fn add(&self, n: u32) {
        {
            let mut s = self.lock();
            // A host granting past the window is buggy, not dangerous to us:
            // it only lets us send sooner. Never overflow.
            s.avail = s.avail.saturating_add(u64::from(n));
        }
        self.wake();
    }

    pub fn cancel(&self) {
        self.lock().cancelled = true;
        self.wake();
    }

    /// Takes exactly `n` bytes of credit, waiting for it as needed; false
    /// when the stream was cancelled first.
    pub fn spend(&self, n: u64) -> bool {
        let mut need = n;
        while need > 0 {
            if !self.wait() {
                return false;
            }
            need -= self.take(usize::try_from(need).unwrap_or(usize::MAX)) as u64;
        }
        true
    }

    /// Sends `msg` on `stream` once the credit covers what it costs; false
    /// (nothing sent) when the stream was cancelled first.
    pub fn send(&self, out: &Outbox, stream: u32, msg: GuestMsg) -> bool {
        if !self.spend(msg.credit_cost()) {
            return false;
        }
        out.send(stream, msg);
        true
    }

    /// Blocks until there is credit (true) or the stream is cancelled (false).
    pub fn wait(&self) -> bool {
        loop {
            {
                let s = self.lock();
                if s.cancelled {
                    return false;
                }
                if s.avail > 0 {
                    return true;
                }
            }
            let mut p = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, -1) };
            self.clear();
        }
    }
}

/// What a stream's input worker receives.
pub enum InMsg {
    Data(Bytes),
    Eof,
    /// The host cancelled the stream.
    Cancel,
    /// The host sent past its credit: the input is refused.
    Violation,
}

struct Input {
    tx: Sender<InMsg>,
    /// Bytes the host may still send (granted and not yet received).
    allowed: Arc<AtomicU64>,
}

/// The worker's side of a stream's input: receives, and hands credit back.
pub struct InputRx {
    pub rx: Receiver<InMsg>,
    allowed: Arc<AtomicU64>,
    stream: u32,
    out: Outbox,
    ungranted: u64,
}

impl InputRx {
    /// `n` bytes were written on: credit them back, in batches.
    pub fn consumed(&mut self, n: usize) {
        self.ungranted += n as u64;
        if self.ungranted >= GRANT_BATCH {
            self.grant();
        }
    }

    /// Hands back all consumed credit now (call before blocking for more).
    pub fn grant(&mut self) {
        while self.ungranted > 0 {
            let n = u32::try_from(self.ungranted).unwrap_or(u32::MAX);
            self.ungranted -= u64::from(n);
            self.allowed.fetch_add(u64::from(n), Ordering::AcqRel);
            self.out
                .send_control(self.stream, GuestMsg::Credit { bytes: n });
        }
    }

    /// The next message, handing back credit first when none is queued.
    pub fn recv(&mut self) -> Option<InMsg> {
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(_) => {
                self.grant();
                self.rx.recv().ok()
            }
        }
    }
}

/// One opening of a stream id, as its worker holds it: the worker's own
/// updates (`close`, `set_pgid`, ...) act on this opening only, never on a
/// later stream that reuses the id (after a `Reinit` a new host connection
/// may reuse it while the old worker is still winding down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub stream: u32,
    serial: u64,
}

/// What `open` hands the worker: its slot, its credit (a stream that
/// sends), its input (a stream that takes input).
pub type Opened = (Slot, Option<Arc<Credit>>, Option<InputRx>);

struct Entry {
    serial: u64,
    credit: Option<Arc<Credit>>,
    input: Option<Input>,
    /// Process group of an exec (= pid of its session leader); 0 otherwise.
    pgid: libc::pid_t,
    /// The terminal master of a `pty` exec (for resizes).
    pty: Option<OwnedFd>,
}

impl Entry {
    /// The worker stops; an exec's process group is killed.
    fn cancel(&mut self) {
        if let Some(c) = &self.credit {
            c.cancel();
        }
        if let Some(input) = self.input.take() {
            let _ = input.tx.send(InMsg::Cancel);
        }
        if self.pgid > 0 {
            crate::exec::kill_group(self.pgid);
        }
    }
}

/// The open streams, by stream id.
#[derive(Default)]
pub struct Streams {
    table: Mutex<HashMap<u32, Entry>>,
    /// The serial of the last opening (one per `open`).
    serials: AtomicU64,
}

impl Streams {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the entry of `slot`, if that opening is still open.
    fn with_slot(&self, slot: Slot, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.lock().get_mut(&slot.stream) {
            if e.serial == slot.serial {
                f(e);
            }
        }
    }

    /// Opens `stream`: with send credit when `sends`, with an input when
    /// `input` (returned for the worker), and the [`Slot`] the worker acts
    /// on it through.
    pub fn open(
        &self,
        stream: u32,
        sends: bool,
        input: bool,
        out: &Outbox,
    ) -> Result<Opened, ErrorInfo> {
        let mut t = self.lock();
        if t.contains_key(&stream) {
            return Err(ErrorInfo::new(
                ErrorKind::InvalidRequest,
                format!("stream {stream} is already in use"),
            ));
        }
        if t.len() >= MAX_STREAMS {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!("{MAX_STREAMS} requests are running already"),
            ));
        }
        let credit = if sends {
            Some(Credit::new().map_err(|e| {
                ErrorInfo::new(ErrorKind::Other, format!("no eventfd for the stream: {e}"))
            })?)
        } else {
            None
        };
        let (input, rx) = if input {
            let (tx, rx) = channel();
            let allowed = Arc::new(AtomicU64::new(u64::from(STREAM_WINDOW)));
            (
                Some(Input {
                    tx,
                    allowed: allowed.clone(),
                }),
                Some(InputRx {
                    rx,
                    allowed,
                    stream,
                    out: out.clone(),
                    ungranted: 0,
                }),
            )
        } else {
            (None, None)
        };
        let serial = self.serials.fetch_add(1, Ordering::Relaxed) + 1;
        t.insert(
            stream,
            Entry {
                serial,
                credit: credit.clone(),
                input,
                pgid: 0,
                pty: None,
            },
        );
        Ok((Slot { stream, serial }, credit, rx))
    }

    /// The stream's worker is done: its id is free again.
    pub fn close(&self, slot: Slot) {
        let mut t = self.lock();
        if t.get(&slot.stream).is_some_and(|e| e.serial == slot.serial) {
            t.remove(&slot.stream);
        }
    }

    pub fn set_pgid(&self, slot: Slot, pgid: libc::pid_t) {
        self.with_slot(slot, |e| e.pgid = pgid);
    }

    pub fn set_pty(&self, slot: Slot, master: OwnedFd) {
        self.with_slot(slot, |e| e.pty = Some(master));
    }

    /// Resizes the stream's terminal; ignored for streams without one.
    pub fn resize(&self, stream: u32, size: smolvm_proto::PtySize) {
        if let Some(m) = self.lock().get(&stream).and_then(|e| e.pty.as_ref()) {
            crate::exec::resize(m, size);
        }
    }

    pub fn pgid(&self, stream: u32) -> Option<libc::pid_t> {
        self.lock().get(&stream).map(|e| e.pgid).filter(|p| *p > 0)
    }

    /// Drops a stream's input (its worker sees the channel end): for an
    /// input nobody consumes (the process closed its stdin).
    pub fn drop_input(&self, slot: Slot) {
        self.with_slot(slot, |e| e.input = None);
    }

    /// `Data` from the host: passed on within its credit; past it the input
    /// is refused. Ignored for streams without input.
    pub fn data(&self, stream: u32, data: Bytes) {
        let mut t = self.lock();
        let Some(entry) = t.get_mut(&stream) else {
            return;
        };
        let Some(input) = &entry.input else {
            return;
        };
        let n = data.len() as u64;
        let ok = input
            .allowed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| a.checked_sub(n))
            .is_ok();
        if ok {
            let _ = input.tx.send(InMsg::Data(data));
        } else {
            error!("stream {stream}: the host sent input past its credit; refusing the input");
            let _ = input.tx.send(InMsg::Violation);
            entry.input = None;
        }
    }

    /// `Eof` from the host.
    pub fn eof(&self, stream: u32) {
        if let Some(e) = self.lock().get_mut(&stream) {
            if let Some(input) = e.input.take() {
                let _ = input.tx.send(InMsg::Eof);
            }
        }
    }

    pub fn credit(&self, stream: u32, bytes: u32) {
        let c = self.lock().get(&stream).and_then(|e| e.credit.clone());
        if let Some(c) = c {
            c.add(bytes);
        }
    }

    /// `Cancel` from the host: the stream's worker stops; an exec's process
    /// group is killed.
    pub fn cancel(&self, stream: u32) {
        if let Some(e) = self.lock().get_mut(&stream) {
            e.cancel();
        }
    }

    /// Cancels every open stream as `cancel` would and forgets them all
    /// (`Reinit`: they belong to a host connection that no longer exists,
    /// and the new one may reuse their ids at once; the old workers' own
    /// `close` then finds nothing). Background processes are no streams:
    /// they run on, and only their `Attach` streams end. Returns how many
    /// streams were open.
    pub fn cancel_all(&self) -> usize {
        let mut old: Vec<Entry> = self.lock().drain().map(|(_, e)| e).collect();
        for e in &mut old {
            e.cancel();
        }
        old.len()
    }

    /// SIGKILLs every running exec's process group.
    pub fn kill_all(&self) {
        for e in self.lock().values() {
            if e.pgid > 0 {
                crate::exec::kill_group(e.pgid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_all_forgets_the_streams_and_their_workers_cannot_touch_new_ones() {
        let (st, out) = (Streams::default(), Outbox::detached());
        let (old, credit, input) = st.open(1, true, true, &out).unwrap();
        let (credit, input) = (credit.unwrap(), input.unwrap());
        st.open(2, false, false, &out).unwrap();
        assert_eq!(st.cancel_all(), 2);
        // Each was cancelled as `Cancel` would.
        assert!(credit.is_cancelled());
        assert!(matches!(input.rx.try_recv(), Ok(InMsg::Cancel)));
        // The ids are free at once for the new connection ...
        let (new, _, _) = st.open(1, false, false, &out).unwrap();
        st.set_pgid(new, 4242);
        // ... and the old worker winding down cannot close or change them.
        st.close(old);
        st.set_pgid(old, 0);
        assert_eq!(st.pgid(1), Some(4242));
        let e = st.open(1, false, false, &out).err().map(|e| e.kind);
        assert_eq!(e, Some(ErrorKind::InvalidRequest));
        st.close(new);
        assert!(st.open(1, false, false, &out).is_ok());
        assert_eq!(st.cancel_all(), 1);
        assert_eq!(st.cancel_all(), 0);
    }
}
