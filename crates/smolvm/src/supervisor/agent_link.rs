//! The supervisor's side of the agent channel: the hello, and every frame
//! from the (untrusted) guest, routed to the client that owns its stream.

use super::outbox::Lane;
use super::server::{frame, lock, AgentTx, SharedRef, VmCmd};
use crate::state::{Store, VmState};
use smolvm_proto::supervisor::{ControlError, ControlErrorKind};
use smolvm_proto::supervisor::{ReadyInfo, SupervisorMsg, VmRunState};
use smolvm_proto::{Decoder, Frame, GuestMsg, HostHello, HostMsg, PROTOCOL_VERSION};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

const HELLO_RESEND: Duration = Duration::from_millis(200);
const AGENT_READ_BUF: usize = 64 * 1024;
/// No guest message legitimately comes near this (data chunks are at most
/// 64 KiB, error messages 4 KiB); a larger frame is a protocol violation.
const AGENT_FRAME_LIMIT: usize = 256 * 1024;
/// Longest agent version string kept from a guest.
const MAX_AGENT_VERSION: usize = 64;

/// Sends the host hello until the agent answers (the guest opens its port
/// only once booted; earlier bytes may be lost).
pub(super) async fn hello_sender(agent_tx: AgentTx, shared: SharedRef) {
    let Some(buf) = frame(
        smolvm_proto::CONTROL_STREAM,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    ) else {
        return;
    };
    loop {
        let (restored, id) = {
            let s = lock(&shared);
            if s.hello.is_some() || s.fatal.is_some() {
                return;
            }
            (s.restored, s.id.clone())
        };
        if restored {
            // A restored machine becomes this VM before it answers the
            // hello (the agent handles frames in order): nothing runs in it
            // before its identity, entropy and clock are its own.
            let Some(reinit) = frame(smolvm_proto::CONTROL_STREAM, HostMsg::Reinit(identity(&id)))
            else {
                return;
            };
            if agent_tx.send(reinit, Lane::Control).await.is_err() {
                return;
            }
        }
        if agent_tx.send(buf.clone(), Lane::Control).await.is_err() {
            return;
        }
        tokio::time::sleep(HELLO_RESEND).await;
    }
}

/// Bytes of host entropy a restored guest gets.
const REINIT_ENTROPY: usize = 64;

/// Who a restored machine is now: this VM's id, fresh entropy, host time.
fn identity(id: &str) -> smolvm_proto::Identity {
    let mut entropy = vec![0u8; REINIT_ENTROPY];
    if getrandom::fill(&mut entropy).is_err() {
        // Never send a predictable seed as if it were one: the guest then
        // reports it could not reseed, and the start fails.
        entropy.clear();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    smolvm_proto::Identity {
        hostname: id.to_string(),
        entropy: smolvm_proto::Bytes(entropy),
        unix_time_ns: now,
    }
}

pub(super) async fn agent_reader(
    mut r: tokio::net::unix::OwnedReadHalf,
    shared: SharedRef,
    ready_tx: watch::Sender<()>,
    vm_tx: mpsc::Sender<VmCmd>,
) {
    let mut bad_frames = 0u64;
    let mut dec = Decoder::with_limit(AGENT_FRAME_LIMIT);
    let mut buf = vec![0u8; AGENT_READ_BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        loop {
            let f = match dec.next_frame::<GuestMsg>() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(smolvm_proto::CodecError::FrameTooLarge { len, max }) => {
                    // The framing itself is broken: nothing after this can
                    // be trusted.
                    let why = format!("a {len}-byte frame; the limit is {max}");
                    return violation(&why, &shared, &ready_tx, &vm_tx).await;
                }
                Err(e) => {
                    // One undecodable message (say, from a newer agent):
                    // the frame was consumed whole, so skip it and go on.
                    // Log sparingly so a guest cannot grow our log forever.
                    bad_frames += 1;
                    if bad_frames <= 10 || bad_frames.is_multiple_of(10_000) {
                        log!("bad frame #{bad_frames} from the guest agent skipped: {e}");
                    }
                    continue;
                }
            };
            if let Err(why) = handle_guest_frame(f, &shared, &ready_tx).await {
                return violation(&why, &shared, &ready_tx, &vm_tx).await;
            }
        }
    }
}

/// The guest broke the protocol: nothing it sends can be trusted any more.
/// The VM is killed and recorded as `error` with the reason.
async fn violation(
    why: &str,
    shared: &SharedRef,
    ready_tx: &watch::Sender<()>,
    vm_tx: &mpsc::Sender<VmCmd>,
) {
    let msg = format!("the guest agent broke the protocol ({why}); the VM was stopped");
    log!("{msg}");
    {
        let mut s = lock(shared);
        s.violation = Some(msg.clone());
        s.fatal = Some(ControlError::new(ControlErrorKind::BootFailed, msg));
    }
    let _ = ready_tx.send(());
    let (t, _r) = oneshot::channel();
    let _ = vm_tx.send(VmCmd::Kill(t)).await;
}

/// Printable ASCII only, at most `max` characters: text from the guest goes
/// into logs, errors and tables.
pub(super) fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push_str("...");
    }
    out
}

/// Takes the agent's hello: `None` when it is a late duplicate (ignored),
/// else `Some(id to record as running)` (`Some(None)` when nothing is to be
/// recorded: a bad version, or unit tests).
fn accept_hello(h: smolvm_proto::GuestHello, shared: &SharedRef) -> Option<Option<String>> {
    let mut record_running = None;
    let mut s = lock(shared);
    if s.hello.is_some() || s.fatal.is_some() {
        return None;
    }
    let mut h = h;
    h.agent_version = sanitize(&h.agent_version, MAX_AGENT_VERSION);
    if h.version != PROTOCOL_VERSION {
        let msg = format!(
            "the guest agent speaks protocol v{} but this host speaks v{PROTOCOL_VERSION}; \
             rebuild the image's initramfs with `smolvm image build` (agent {})",
            h.version, h.agent_version
        );
        log!("{msg}");
        s.fatal = Some(ControlError::new(ControlErrorKind::AgentIncompatible, msg));
    } else if s.restored && s.reinited.is_none_or(|(_, reseeded)| !reseeded) {
        // Two forks must never share their random pool: a restored guest
        // that could not reseed is never handed out.
        let msg = "the restored guest could not reseed its random pool (its agent answered the \
                   hello without taking the new identity); the VM was not started"
            .to_string();
        log!("{msg}");
        s.fatal = Some(ControlError::new(ControlErrorKind::BootFailed, msg));
    } else {
        let ready_ms = crate::sys::millis(s.launched.elapsed());
        log!("agent {} ready after {ready_ms} ms", h.agent_version);
        s.ready = Some(ReadyInfo {
            hello: h.clone(),
            vmm_start_ms: s.vmm_start_ms,
            ready_ms,
        });
        s.hello = Some(h);
        if s.run_state == VmRunState::Booting {
            s.run_state = VmRunState::Running;
        }
        if s.record_state {
            record_running = Some(s.id.clone());
        }
    }
    Some(record_running)
}

/// Routes one frame from the guest to the client that owns its stream.
/// `Err` when the guest broke flow control (sent past a stream's credit).
pub(super) async fn handle_guest_frame(
    f: Frame<GuestMsg>,
    shared: &SharedRef,
    ready_tx: &watch::Sender<()>,
) -> Result<(), String> {
    if f.stream == smolvm_proto::CONTROL_STREAM {
        match f.msg {
            GuestMsg::Quiesced { nonce } => {
                // Only the answer to the quiesce being waited for: a late
                // one (from a quiesce that timed out) releases nothing.
                let mut s = lock(shared);
                if s.quiesce_waiter.as_ref().is_some_and(|(n, _)| *n == nonce) {
                    if let Some((_, t)) = s.quiesce_waiter.take() {
                        let _ = t.send(());
                    }
                }
                return Ok(());
            }
            GuestMsg::Reinited {
                clock_set,
                reseeded,
            } => {
                let mut s = lock(shared);
                if s.restored && s.hello.is_none() {
                    log!("restored guest re-initialised (clock set: {clock_set}, pool reseeded: {reseeded})");
                    s.reinited = Some((clock_set, reseeded));
                }
                return Ok(());
            }
            _ => {}
        }
        if let GuestMsg::Hello(h) = f.msg {
            let Some(record_running) = accept_hello(h, shared) else {
                return Ok(());
            };
            // Record it here too, not only in the starting client: a start
            // killed mid-boot must not leave a running VM that the store
            // calls `created` or `stopped`. (Outside the lock: SQLite may wait.)
            if let Some(id) = record_running {
                let _ = tokio::task::spawn_blocking(move || {
                    if let Ok(store) = Store::open() {
                        let _ = store.transition(
                            &id,
                            &[VmState::Created, VmState::Stopped],
                            VmState::Running,
                            None,
                        );
                    }
                })
                .await;
            }
            let _ = ready_tx.send(());
        }
        return Ok(());
    }
    let cost = f.msg.credit_cost();
    let lane = match f.msg {
        GuestMsg::Credit { .. } | GuestMsg::Pong { .. } => Lane::Control,
        _ => Lane::Data,
    };
    let target = {
        let mut s = lock(shared);
        if let Err(over) = s.routes.spend(f.stream, cost) {
            return Err(format!(
                "{} data bytes on a stream with {} bytes of credit",
                over.sent, over.credit
            ));
        }
        let route = if f.msg.is_terminal() {
            s.routes.close(f.stream)
        } else {
            s.routes.lookup(f.stream)
        };
        route.and_then(|r| s.clients.get(&r.client).cloned().map(|tx| (r, tx)))
    };
    // Never waits: what a client can have queued is bounded by its streams'
    // credit. Frames for a client that is gone are dropped silently (a
    // chatty guest must not grow our log).
    if let Some((route, tx)) = target {
        if let Some(buf) = frame(route.stream, SupervisorMsg::Agent(f.msg)) {
            tx.send(buf, lane);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::server::Shared;
    use smolvm_proto::GuestHello;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    fn shared() -> SharedRef {
        let mut s = Shared::new("t".into(), 1, Instant::now(), 1);
        s.record_state = false; // never touch the user's state store
        Arc::new(Mutex::new(s))
    }

    fn hello(version: u32) -> Frame<GuestMsg> {
        Frame::new(
            smolvm_proto::CONTROL_STREAM,
            GuestMsg::Hello(GuestHello {
                version,
                agent_version: "9.9.9".into(),
                agent_start_ms: 1,
                ready_ms: 2,
                now_ms: 3,
            }),
        )
    }

    #[tokio::test]
    async fn incompatible_agent_is_a_clear_error() {
        let s = shared();
        let (tx, _rx) = watch::channel(());
        handle_guest_frame(hello(PROTOCOL_VERSION + 1), &s, &tx)
            .await
            .unwrap();
        let g = lock(&s);
        assert!(g.ready.is_none() && g.hello.is_none());
        let fatal = g.fatal.clone().expect("fatal");
        assert_eq!(fatal.kind, ControlErrorKind::AgentIncompatible);
        let fatal = fatal.message;
        assert!(
            fatal.contains(&format!("protocol v{}", PROTOCOL_VERSION + 1))
                && fatal.contains("smolvm image build"),
            "{fatal}"
        );
    }

    #[tokio::test]
    async fn compatible_hello_makes_the_vm_ready_once() {
        let s = shared();
        let (tx, _rx) = watch::channel(());
        handle_guest_frame(hello(PROTOCOL_VERSION), &s, &tx)
            .await
            .unwrap();
        handle_guest_frame(hello(PROTOCOL_VERSION + 7), &s, &tx)
            .await
            .unwrap();
        let g = lock(&s);
        assert!(g.fatal.is_none(), "a late second hello is ignored");
        assert_eq!(g.run_state, VmRunState::Running);
        assert_eq!(
            g.ready.as_ref().map(|r| r.hello.agent_version.as_str()),
            Some("9.9.9")
        );
    }

    #[tokio::test]
    async fn only_the_awaited_quiesce_answer_releases_a_snapshot() {
        let s = shared();
        let (tx, _rx) = watch::channel(());
        let (t, mut r) = oneshot::channel();
        lock(&s).quiesce_waiter = Some((42, t));
        let quiesced =
            |nonce| Frame::new(smolvm_proto::CONTROL_STREAM, GuestMsg::Quiesced { nonce });
        // A late answer to an earlier quiesce (or a forged one).
        handle_guest_frame(quiesced(41), &s, &tx).await.unwrap();
        assert!(r.try_recv().is_err(), "a stale Quiesced released the wait");
        assert!(lock(&s).quiesce_waiter.is_some());
        handle_guest_frame(quiesced(42), &s, &tx).await.unwrap();
        assert!(
            r.try_recv().is_ok(),
            "the awaited Quiesced did not release the wait"
        );
    }

    #[tokio::test]
    async fn guest_frames_for_unknown_streams_are_dropped() {
        let s = shared();
        let (tx, _rx) = watch::channel(());
        for stream in [1, 7, u32::MAX] {
            handle_guest_frame(
                Frame::new(stream, GuestMsg::Stdout(vec![1; 10].into())),
                &s,
                &tx,
            )
            .await
            .unwrap();
            handle_guest_frame(Frame::new(stream, GuestMsg::ShutdownAck), &s, &tx)
                .await
                .unwrap();
        }
        assert!(lock(&s).fatal.is_none());
    }

    #[tokio::test]
    async fn data_past_credit_is_a_violation() {
        let s = shared();
        let (tx, _rx) = watch::channel(());
        let g = lock(&s).routes.open(5, 1).unwrap();
        let chunk = GuestMsg::Stdout(vec![0; 64 * 1024].into());
        for _ in 0..(smolvm_proto::STREAM_WINDOW / (64 * 1024)) {
            handle_guest_frame(Frame::new(g, chunk.clone()), &s, &tx)
                .await
                .unwrap();
        }
        let e = handle_guest_frame(Frame::new(g, chunk), &s, &tx).await;
        assert!(e.unwrap_err().contains("0 bytes of credit"));
    }

    /// A hostile agent on the other end of the channel, speaking the wire
    /// protocol: garbage is skipped, floods on many streams are held to
    /// their credit without stalling anyone, and an oversized frame or data
    /// past credit ends the VM (a `Kill` to the VMM loop) with the reason.
    mod hostile_peer {
        use super::*;
        use crate::supervisor::outbox::{outbox, OutboxRx};
        use smolvm_proto::supervisor::SupervisorMsg;
        use smolvm_proto::{encode_frame, Bytes, Decoder, STREAM_WINDOW};
        use tokio::io::AsyncWriteExt;

        struct Rig {
            shared: SharedRef,
            peer: tokio::net::UnixStream,
            vm_rx: mpsc::Receiver<VmCmd>,
            client_rx: OutboxRx,
            _ready: watch::Receiver<()>,
        }

        async fn rig() -> Rig {
            let shared = shared();
            let (ours, peer) = tokio::net::UnixStream::pair().unwrap();
            let (r, _w) = ours.into_split();
            std::mem::forget(_w); // keep the socket's write side open
            let (ready_tx, ready_rx) = watch::channel(());
            let (vm_tx, vm_rx) = mpsc::channel(4);
            let (tx, client_rx) = outbox();
            lock(&shared).clients.insert(7, tx);
            tokio::spawn(agent_reader(r, shared.clone(), ready_tx, vm_tx));
            Rig {
                shared,
                peer,
                vm_rx,
                client_rx,
                _ready: ready_rx,
            }
        }

        async fn send(peer: &mut tokio::net::UnixStream, stream: u32, msg: GuestMsg) {
            let b = encode_frame(&Frame::new(stream, msg)).unwrap();
            peer.write_all(&b).await.unwrap();
        }

        /// The frames the client got, decoded.
        async fn client_frames(rx: &mut OutboxRx, n: usize) -> Vec<Frame<SupervisorMsg>> {
            let mut dec = Decoder::new();
            let mut out = Vec::new();
            while out.len() < n {
                let b = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("the client got its frames")
                    .unwrap();
                rx.done(b.len());
                dec.push(&b);
                while let Some(f) = dec.next_frame::<SupervisorMsg>().unwrap() {
                    out.push(f);
                }
            }
            out
        }

        #[tokio::test]
        async fn garbage_and_floods_within_credit_leave_the_vm_healthy() {
            let mut r = rig().await;
            send(&mut r.peer, 0, hello(smolvm_proto::PROTOCOL_VERSION).msg).await;
            // Garbage with intact framing: skipped.
            for junk in [vec![0xff; 40], vec![13, 0xee, 0xee], vec![]] {
                let mut b = u32::try_from(junk.len()).unwrap().to_le_bytes().to_vec();
                b.extend(junk);
                r.peer.write_all(&b).await.unwrap();
            }
            // 16 streams each flooding their whole window, the client never
            // granting: all of it is taken without waiting on the client.
            let globals: Vec<u32> = (1..=16)
                .map(|s| lock(&r.shared).routes.open(7, s).unwrap())
                .collect();
            let chunk = GuestMsg::Stdout(Bytes(vec![b'x'; 64 * 1024]));
            for g in &globals {
                for _ in 0..(STREAM_WINDOW / (64 * 1024)) {
                    send(&mut r.peer, *g, chunk.clone()).await;
                }
            }
            // A pong on another stream still comes through.
            let pg = lock(&r.shared).routes.open(7, 999).unwrap();
            send(&mut r.peer, pg, GuestMsg::Pong { nonce: 5 }).await;
            let n = globals.len() * (STREAM_WINDOW as usize / (64 * 1024)) + 1;
            let frames = client_frames(&mut r.client_rx, n).await;
            assert!(frames
                .iter()
                .any(|f| f.stream == 999
                    && f.msg == SupervisorMsg::Agent(GuestMsg::Pong { nonce: 5 })));
            assert!(r.vm_rx.try_recv().is_err(), "the VM lives on");
            assert!(lock(&r.shared).violation.is_none());
        }

        #[tokio::test]
        async fn data_past_credit_ends_the_vm_with_the_reason() {
            let mut r = rig().await;
            let g = lock(&r.shared).routes.open(7, 1).unwrap();
            let chunk = GuestMsg::Stdout(Bytes(vec![0; 64 * 1024]));
            for _ in 0..=(STREAM_WINDOW / (64 * 1024)) {
                send(&mut r.peer, g, chunk.clone()).await;
            }
            let cmd = tokio::time::timeout(Duration::from_secs(10), r.vm_rx.recv())
                .await
                .expect("the VM is ended")
                .unwrap();
            assert!(matches!(cmd, VmCmd::Kill(_)));
            let why = lock(&r.shared).violation.clone().unwrap();
            assert!(why.contains("credit"), "{why}");
        }

        #[tokio::test]
        async fn an_oversized_frame_ends_the_vm() {
            let mut r = rig().await;
            r.peer
                .write_all(&(u32::try_from(AGENT_FRAME_LIMIT).unwrap() + 1).to_le_bytes())
                .await
                .unwrap();
            let cmd = tokio::time::timeout(Duration::from_secs(10), r.vm_rx.recv())
                .await
                .expect("the VM is ended")
                .unwrap();
            assert!(matches!(cmd, VmCmd::Kill(_)));
            assert!(lock(&r.shared).violation.clone().unwrap().contains("frame"));
        }
    }
}
