//! Property tests: whatever bytes a hostile peer sends, decoding never
//! panics and never buffers past the frame limit; every message survives a
//! round trip however the stream is split.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use proptest::prelude::*;
use smolvm_proto::supervisor::{
    ClientMsg, ControlError, ControlErrorKind, ControlRequest, ControlResponse, EgressPolicy,
    PortForward, ReadyInfo, SnapshotReport, SnapshotRequest, SupervisorMsg, SupervisorStatus,
    VmRunState,
};
use smolvm_proto::*;

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes)
}

fn arb_string() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn arb_error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::NotFound),
        Just(ErrorKind::PermissionDenied),
        Just(ErrorKind::InvalidRequest),
        Just(ErrorKind::Busy),
        Just(ErrorKind::Unsupported),
        Just(ErrorKind::Other),
        Just(ErrorKind::Unavailable),
        Just(ErrorKind::AlreadyExists),
        Just(ErrorKind::NotEmpty),
        Just(ErrorKind::NoSpace),
        Just(ErrorKind::FlowControl),
    ]
}

fn arb_file_kind() -> impl Strategy<Value = FileKind> {
    prop_oneof![
        Just(FileKind::File),
        Just(FileKind::Dir),
        Just(FileKind::Symlink),
        Just(FileKind::Other),
    ]
}

fn arb_file_stat() -> impl Strategy<Value = FileStat> {
    (
        arb_file_kind(),
        any::<u64>(),
        any::<u32>(),
        any::<i64>(),
        proptest::option::of(arb_string()),
    )
        .prop_map(|(kind, size, mode, mtime_ns, link_target)| FileStat {
            kind,
            size,
            mode,
            mtime_ns,
            link_target,
        })
}

fn arb_dir_entry() -> impl Strategy<Value = DirEntry> {
    (arb_string(), arb_file_stat()).prop_map(|(name, stat)| DirEntry { name, stat })
}

fn arb_exec() -> impl Strategy<Value = ExecRequest> {
    (
        proptest::collection::vec(".{0,16}", 0..4),
        ".{0,32}",
        proptest::collection::vec((".{0,8}", ".{0,8}"), 0..3),
        proptest::option::of(".{0,16}"),
        proptest::option::of(any::<u64>()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(argv, sh, env, workdir, timeout_ms, stdin, use_argv)| ExecRequest {
                command: if use_argv {
                    Command::Argv(argv)
                } else {
                    Command::Shell(sh)
                },
                env,
                workdir,
                timeout_ms,
                stdin,
                pty: None,
            },
        )
}

fn arb_op_request() -> impl Strategy<Value = OpRequest> {
    prop_oneof![
        (arb_string(), any::<bool>()).prop_map(|(path, follow)| OpRequest::Stat { path, follow }),
        arb_string().prop_map(|path| OpRequest::List { path }),
        (arb_string(), any::<bool>(), any::<u32>()).prop_map(|(path, parents, mode)| {
            OpRequest::Mkdir {
                path,
                parents,
                mode,
            }
        }),
        (arb_string(), any::<bool>())
            .prop_map(|(path, recursive)| OpRequest::Remove { path, recursive }),
        (arb_string(), arb_string()).prop_map(|(from, to)| OpRequest::Rename { from, to }),
        (arb_string(), arb_string()).prop_map(|(path, target)| OpRequest::Symlink { path, target }),
        (
            arb_string(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<i64>())
        )
            .prop_map(|(path, mode, mtime_ns)| OpRequest::SetAttrs {
                path,
                mode,
                mtime_ns
            }),
        Just(OpRequest::Sync),
        any::<u16>().prop_map(|port| OpRequest::PortOpen { port }),
        Just(OpRequest::Procs),
        (any::<u64>(), any::<i32>())
            .prop_map(|(handle, signal)| OpRequest::ProcSignal { handle, signal }),
        (any::<u64>(), arb_bytes(), any::<bool>())
            .prop_map(|(handle, data, eof)| OpRequest::ProcStdin { handle, data, eof }),
        any::<u64>().prop_map(|handle| OpRequest::ProcForget { handle }),
        (arb_string(), any::<bool>()).prop_map(|(authorized_key, new_host_key)| {
            OpRequest::SshStart {
                authorized_key,
                new_host_key,
            }
        }),
    ]
}

fn arb_proc_info() -> impl Strategy<Value = ProcInfo> {
    (
        any::<u64>(),
        any::<u32>(),
        ".{0,16}",
        proptest::option::of((
            proptest::option::of(any::<i32>()),
            any::<bool>(),
            any::<u64>(),
        )),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(handle, pid, command, exit, output_bytes, buffered_from, started_ms)| ProcInfo {
                handle,
                pid,
                command,
                exit: exit.map(|(code, timed_out, duration_ms)| ExitStatus {
                    code,
                    signal: None,
                    timed_out,
                    duration_ms,
                }),
                output_bytes,
                buffered_from,
                started_ms,
            },
        )
}

fn arb_op_reply() -> impl Strategy<Value = OpReply> {
    prop_oneof![
        Just(OpReply::Ok),
        arb_file_stat().prop_map(OpReply::Stat),
        any::<bool>().prop_map(OpReply::PortOpen),
        proptest::collection::vec(arb_proc_info(), 0..4).prop_map(OpReply::Procs),
        any::<u64>().prop_map(OpReply::Written),
        arb_string().prop_map(|host_key| OpReply::Ssh { host_key }),
    ]
}

fn arb_host() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        any::<u32>().prop_map(|version| HostMsg::Hello(HostHello { version })),
        any::<u64>().prop_map(|nonce| HostMsg::Ping { nonce }),
        arb_exec().prop_map(HostMsg::Exec),
        arb_bytes().prop_map(HostMsg::Data),
        Just(HostMsg::Eof),
        any::<i32>().prop_map(|signal| HostMsg::Signal { signal }),
        Just(HostMsg::Shutdown),
        any::<u32>().prop_map(|bytes| HostMsg::Credit { bytes }),
        Just(HostMsg::Cancel),
        arb_string().prop_map(|path| HostMsg::ReadFile(ReadFileRequest { path })),
        (
            arb_string(),
            any::<u32>(),
            proptest::option::of(any::<i64>()),
            any::<bool>()
        )
            .prop_map(|(path, mode, mtime_ns, make_dirs)| {
                HostMsg::WriteFile(WriteFileRequest {
                    path,
                    mode,
                    mtime_ns,
                    make_dirs,
                })
            }),
        arb_op_request().prop_map(HostMsg::Op),
        (any::<u16>(), any::<u16>())
            .prop_map(|(rows, cols)| HostMsg::Resize(PtySize { rows, cols })),
        arb_exec().prop_map(HostMsg::Spawn),
        (any::<u64>(), proptest::option::of(any::<u64>()))
            .prop_map(|(handle, from)| HostMsg::Attach(AttachRequest { handle, from })),
        any::<u64>().prop_map(|nonce| HostMsg::Quiesce { nonce }),
        Just(HostMsg::Thaw),
        (arb_string(), arb_bytes(), any::<u64>()).prop_map(|(hostname, entropy, unix_time_ns)| {
            HostMsg::Reinit(Identity {
                hostname,
                entropy,
                unix_time_ns,
            })
        }),
        any::<u16>().prop_map(|port| HostMsg::Connect { port }),
    ]
}

fn arb_guest_hello() -> impl Strategy<Value = GuestHello> {
    (
        any::<u32>(),
        ".{0,16}",
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(v, s, a, b, c)| GuestHello {
            version: v,
            agent_version: s,
            agent_start_ms: a,
            ready_ms: b,
            now_ms: c,
        })
}

fn arb_guest() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        arb_guest_hello().prop_map(GuestMsg::Hello),
        any::<u64>().prop_map(|nonce| GuestMsg::Pong { nonce }),
        any::<u32>().prop_map(|pid| GuestMsg::Started { pid }),
        arb_bytes().prop_map(GuestMsg::Stdout),
        arb_bytes().prop_map(GuestMsg::Stderr),
        (
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i32>()),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(code, signal, timed_out, duration_ms)| GuestMsg::Exited(
                ExitStatus {
                    code,
                    signal,
                    timed_out,
                    duration_ms
                }
            )),
        (arb_error_kind(), ".{0,64}").prop_map(|(k, m)| GuestMsg::Error(ErrorInfo::new(k, m))),
        Just(GuestMsg::ShutdownAck),
        any::<u32>().prop_map(|bytes| GuestMsg::Credit { bytes }),
        arb_file_stat().prop_map(GuestMsg::FileStart),
        arb_bytes().prop_map(GuestMsg::FileData),
        any::<u64>().prop_map(|bytes| GuestMsg::Done { bytes }),
        proptest::collection::vec(arb_dir_entry(), 0..6).prop_map(GuestMsg::Entries),
        arb_op_reply().prop_map(GuestMsg::Op),
        (any::<u64>(), any::<u32>()).prop_map(|(handle, pid)| GuestMsg::Spawned { handle, pid }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, dropped)| GuestMsg::Attached { offset, dropped }),
        any::<u64>().prop_map(|nonce| GuestMsg::Quiesced { nonce }),
        (any::<bool>(), any::<bool>()).prop_map(|(clock_set, reseeded)| GuestMsg::Reinited {
            clock_set,
            reseeded
        }),
        Just(GuestMsg::Connected),
        arb_bytes().prop_map(GuestMsg::Data),
        Just(GuestMsg::Eof),
    ]
}

fn arb_control_error_kind() -> impl Strategy<Value = ControlErrorKind> {
    prop_oneof![
        Just(ControlErrorKind::BootTimeout),
        Just(ControlErrorKind::BootFailed),
        Just(ControlErrorKind::VmmExited),
        Just(ControlErrorKind::VmmUnresponsive),
        Just(ControlErrorKind::AgentIncompatible),
        Just(ControlErrorKind::HostToolMissing),
        Just(ControlErrorKind::InvalidState),
        Just(ControlErrorKind::ShuttingDown),
        Just(ControlErrorKind::Other),
        Just(ControlErrorKind::HostUnsupported),
    ]
}

fn arb_run_state() -> impl Strategy<Value = VmRunState> {
    prop_oneof![
        Just(VmRunState::Booting),
        Just(VmRunState::Running),
        Just(VmRunState::Paused),
        Just(VmRunState::Stopping),
        Just(VmRunState::Exited),
    ]
}

fn arb_control_request() -> impl Strategy<Value = ControlRequest> {
    prop_oneof![
        Just(ControlRequest::Status),
        any::<u64>().prop_map(|timeout_ms| ControlRequest::WaitReady { timeout_ms }),
        any::<u64>().prop_map(|timeout_ms| ControlRequest::Stop { timeout_ms }),
        Just(ControlRequest::Kill),
        Just(ControlRequest::Pause),
        Just(ControlRequest::Resume),
        (arb_string(), arb_string(), any::<bool>()).prop_map(|(dir, next_disk, resume)| {
            ControlRequest::Snapshot(SnapshotRequest {
                dir: dir.into(),
                next_disk: next_disk.into(),
                resume,
            })
        }),
        arb_port_forward().prop_map(ControlRequest::PortAdd),
        any::<u16>().prop_map(|host_port| ControlRequest::PortRemove { host_port }),
        Just(ControlRequest::PortList),
        arb_egress().prop_map(ControlRequest::SetEgress),
    ]
}

fn arb_port_forward() -> impl Strategy<Value = PortForward> {
    (any::<[u8; 4]>(), any::<u16>(), any::<u16>()).prop_map(|(a, host_port, guest_port)| {
        PortForward {
            host_addr: std::net::IpAddr::from(a),
            host_port,
            guest_port,
        }
    })
}

fn arb_egress() -> impl Strategy<Value = EgressPolicy> {
    prop_oneof![
        Just(EgressPolicy::Open),
        Just(EgressPolicy::Off),
        (
            proptest::collection::vec(arb_string(), 0..4),
            proptest::collection::vec(arb_string(), 0..4)
        )
            .prop_map(|(domains, cidrs)| EgressPolicy::Allowlist { domains, cidrs }),
    ]
}

fn arb_control_response() -> impl Strategy<Value = ControlResponse> {
    prop_oneof![
        Just(ControlResponse::Ok),
        (arb_guest_hello(), any::<u64>(), any::<u64>()).prop_map(
            |(hello, vmm_start_ms, ready_ms)| ControlResponse::Ready(ReadyInfo {
                hello,
                vmm_start_ms,
                ready_ms,
            })
        ),
        (arb_run_state(), any::<u32>(), any::<bool>()).prop_map(
            |(state, vmm_pid, agent_connected)| ControlResponse::Status(SupervisorStatus {
                state,
                vmm_pid,
                agent_connected,
            })
        ),
        (
            arb_control_error_kind(),
            ".{0,32}",
            proptest::option::of(".{0,32}")
        )
            .prop_map(|(kind, message, console_tail)| ControlResponse::Error(
                ControlError {
                    kind,
                    message,
                    console_tail,
                }
            )),
        (any::<(bool, u64, u64, bool)>(), any::<(u64, u64, bool)>()).prop_map(
            |(
                (disk_switched, state_bytes, memory_bytes, memory_in_state),
                (downtime_ms, total_ms, was_running),
            )| ControlResponse::Snapshot(SnapshotReport {
                disk_switched,
                state_bytes,
                memory_bytes,
                memory_in_state,
                downtime_ms,
                total_ms,
                was_running,
            })
        ),
        arb_port_forward().prop_map(ControlResponse::Port),
        proptest::collection::vec(arb_port_forward(), 0..4).prop_map(ControlResponse::Ports),
    ]
}

fn arb_client() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        any::<u32>().prop_map(|version| ClientMsg::Hello { version }),
        arb_host().prop_map(ClientMsg::Agent),
        arb_control_request().prop_map(ClientMsg::Control),
    ]
}

fn arb_supervisor() -> impl Strategy<Value = SupervisorMsg> {
    prop_oneof![
        (any::<u32>(), ".{0,16}")
            .prop_map(|(version, vm_id)| SupervisorMsg::Hello { version, vm_id }),
        arb_guest().prop_map(SupervisorMsg::Agent),
        arb_control_response().prop_map(SupervisorMsg::Control),
    ]
}

/// Encodes `msgs` as one stream, feeds it to a decoder in `split`-byte
/// pieces and returns what came out.
fn split_round_trip<M>(msgs: &[M], split: usize) -> Vec<M>
where
    M: serde::Serialize + serde::de::DeserializeOwned + Clone,
{
    let mut wire = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        wire.extend(encode_frame(&Frame::new(i as u32, m.clone())).unwrap());
    }
    let mut d = Decoder::new();
    let mut got = Vec::new();
    for c in wire.chunks(split) {
        d.push(c);
        while let Some(f) = d.next_frame::<M>().unwrap() {
            got.push(f.msg);
        }
    }
    got
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
        let mut d = Decoder::new();
        for c in &chunks {
            d.push(c);
            loop {
                match d.next_frame::<GuestMsg>() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(CodecError::FrameTooLarge { .. }) => { d.reset(); break }
                    Err(_) => break,
                }
            }
            // Nothing but at most one partial frame plus the last push is held.
            prop_assert!(d.pending() <= HEADER_LEN + MAX_FRAME_LEN + c.len());
        }
        // The other message types too.
        for c in &chunks {
            let mut d = Decoder::new();
            d.push(c);
            let _ = d.next_frame::<HostMsg>();
            let _ = d.next_frame::<ClientMsg>();
            let _ = d.next_frame::<SupervisorMsg>();
        }
    }

    #[test]
    fn host_messages_survive_any_split(msgs in proptest::collection::vec(arb_host(), 1..8), split in 1usize..64) {
        prop_assert_eq!(split_round_trip(&msgs, split), msgs);
    }

    #[test]
    fn guest_messages_survive_any_split(msgs in proptest::collection::vec(arb_guest(), 1..8), split in 1usize..64) {
        prop_assert_eq!(split_round_trip(&msgs, split), msgs);
    }

    #[test]
    fn client_messages_survive_any_split(msgs in proptest::collection::vec(arb_client(), 1..8), split in 1usize..64) {
        prop_assert_eq!(split_round_trip(&msgs, split), msgs);
    }

    #[test]
    fn supervisor_messages_survive_any_split(msgs in proptest::collection::vec(arb_supervisor(), 1..8), split in 1usize..64) {
        prop_assert_eq!(split_round_trip(&msgs, split), msgs);
    }

    #[test]
    fn corrupted_host_frames_are_errors_not_panics(msg in arb_host(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut wire = encode_frame(&Frame::new(1, msg)).unwrap();
        let i = HEADER_LEN + pos.index(wire.len() - HEADER_LEN);
        wire[i] = byte;
        let mut d = Decoder::new();
        d.push(&wire);
        let _ = d.next_frame::<HostMsg>();
    }

    #[test]
    fn corrupted_frames_are_errors_not_panics(msg in arb_guest(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut wire = encode_frame(&Frame::new(1, msg)).unwrap();
        let i = HEADER_LEN + pos.index(wire.len() - HEADER_LEN);
        if i < wire.len() {
            wire[i] = byte;
        }
        let mut d = Decoder::new();
        d.push(&wire);
        let _ = d.next_frame::<GuestMsg>();
    }
}

/// Which variant a message is, by a `match` with no wildcard arm: a new
/// variant fails to compile here until it is given an index (and a strategy
/// above, which `strategies_cover_every_variant` then checks).
fn host_variant(m: &HostMsg) -> usize {
    match m {
        HostMsg::Hello(_) => 0,
        HostMsg::Ping { .. } => 1,
        HostMsg::Exec(_) => 2,
        HostMsg::Data(_) => 3,
        HostMsg::Eof => 4,
        HostMsg::Signal { .. } => 5,
        HostMsg::Shutdown => 6,
        HostMsg::Credit { .. } => 7,
        HostMsg::Cancel => 8,
        HostMsg::ReadFile(_) => 9,
        HostMsg::WriteFile(_) => 10,
        HostMsg::Op(_) => 11,
        HostMsg::Resize(_) => 12,
        HostMsg::Spawn(_) => 13,
        HostMsg::Attach(_) => 14,
        HostMsg::Quiesce { .. } => 15,
        HostMsg::Thaw => 16,
        HostMsg::Reinit(_) => 17,
        HostMsg::Connect { .. } => 18,
    }
}
const HOST_VARIANTS: usize = 19;

fn guest_variant(m: &GuestMsg) -> usize {
    match m {
        GuestMsg::Hello(_) => 0,
        GuestMsg::Pong { .. } => 1,
        GuestMsg::Started { .. } => 2,
        GuestMsg::Stdout(_) => 3,
        GuestMsg::Stderr(_) => 4,
        GuestMsg::Exited(_) => 5,
        GuestMsg::Error(_) => 6,
        GuestMsg::ShutdownAck => 7,
        GuestMsg::Credit { .. } => 8,
        GuestMsg::FileStart(_) => 9,
        GuestMsg::FileData(_) => 10,
        GuestMsg::Done { .. } => 11,
        GuestMsg::Entries(_) => 12,
        GuestMsg::Op(_) => 13,
        GuestMsg::Spawned { .. } => 14,
        GuestMsg::Attached { .. } => 15,
        GuestMsg::Quiesced { .. } => 16,
        GuestMsg::Reinited { .. } => 17,
        GuestMsg::Connected => 18,
        GuestMsg::Data(_) => 19,
        GuestMsg::Eof => 20,
    }
}
const GUEST_VARIANTS: usize = 21;

fn op_request_variant(m: &OpRequest) -> usize {
    match m {
        OpRequest::Stat { .. } => 0,
        OpRequest::List { .. } => 1,
        OpRequest::Mkdir { .. } => 2,
        OpRequest::Remove { .. } => 3,
        OpRequest::Rename { .. } => 4,
        OpRequest::Symlink { .. } => 5,
        OpRequest::SetAttrs { .. } => 6,
        OpRequest::Sync => 7,
        OpRequest::PortOpen { .. } => 8,
        OpRequest::Procs => 9,
        OpRequest::ProcSignal { .. } => 10,
        OpRequest::ProcStdin { .. } => 11,
        OpRequest::ProcForget { .. } => 12,
        OpRequest::SshStart { .. } => 13,
    }
}
const OP_REQUEST_VARIANTS: usize = 14;

fn op_reply_variant(m: &OpReply) -> usize {
    match m {
        OpReply::Ok => 0,
        OpReply::Stat(_) => 1,
        OpReply::PortOpen(_) => 2,
        OpReply::Procs(_) => 3,
        OpReply::Written(_) => 4,
        OpReply::Ssh { .. } => 5,
    }
}
const OP_REPLY_VARIANTS: usize = 6;

fn control_request_variant(m: &ControlRequest) -> usize {
    match m {
        ControlRequest::Status => 0,
        ControlRequest::WaitReady { .. } => 1,
        ControlRequest::Stop { .. } => 2,
        ControlRequest::Kill => 3,
        ControlRequest::Pause => 4,
        ControlRequest::Resume => 5,
        ControlRequest::Snapshot(_) => 6,
        ControlRequest::PortAdd(_) => 7,
        ControlRequest::PortRemove { .. } => 8,
        ControlRequest::PortList => 9,
        ControlRequest::SetEgress(_) => 10,
    }
}
const CONTROL_REQUEST_VARIANTS: usize = 11;

fn control_response_variant(m: &ControlResponse) -> usize {
    match m {
        ControlResponse::Ok => 0,
        ControlResponse::Ready(_) => 1,
        ControlResponse::Status(_) => 2,
        ControlResponse::Error(_) => 3,
        ControlResponse::Snapshot(_) => 4,
        ControlResponse::Port(_) => 5,
        ControlResponse::Ports(_) => 6,
    }
}
const CONTROL_RESPONSE_VARIANTS: usize = 7;

fn client_variant(m: &ClientMsg) -> usize {
    match m {
        ClientMsg::Hello { .. } => 0,
        ClientMsg::Agent(_) => 1,
        ClientMsg::Control(_) => 2,
    }
}

fn supervisor_variant(m: &SupervisorMsg) -> usize {
    match m {
        SupervisorMsg::Hello { .. } => 0,
        SupervisorMsg::Agent(_) => 1,
        SupervisorMsg::Control(_) => 2,
    }
}

/// Draws `n` values of `s` (deterministically) and returns how often each
/// variant index came up.
fn variant_counts<T: std::fmt::Debug>(
    s: impl Strategy<Value = T>,
    variants: usize,
    index: impl Fn(&T) -> Vec<usize>,
) -> Vec<usize> {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = vec![0usize; variants];
    for _ in 0..4000 {
        let v = s.new_tree(&mut runner).unwrap().current();
        for i in index(&v) {
            seen[i] += 1;
        }
    }
    seen
}

#[test]
fn strategies_cover_every_variant() {
    let host = variant_counts(arb_host(), HOST_VARIANTS, |m| vec![host_variant(m)]);
    assert!(
        host.iter().all(|&c| c > 0),
        "arb_host misses a variant: {host:?}"
    );
    let guest = variant_counts(arb_guest(), GUEST_VARIANTS, |m| vec![guest_variant(m)]);
    assert!(
        guest.iter().all(|&c| c > 0),
        "arb_guest misses a variant: {guest:?}"
    );
    let ops = variant_counts(arb_op_request(), OP_REQUEST_VARIANTS, |m| {
        vec![op_request_variant(m)]
    });
    assert!(
        ops.iter().all(|&c| c > 0),
        "arb_op_request misses a variant: {ops:?}"
    );
    let replies = variant_counts(arb_op_reply(), OP_REPLY_VARIANTS, |m| {
        vec![op_reply_variant(m)]
    });
    assert!(
        replies.iter().all(|&c| c > 0),
        "arb_op_reply misses a variant: {replies:?}"
    );
    let requests = variant_counts(arb_control_request(), CONTROL_REQUEST_VARIANTS, |m| {
        vec![control_request_variant(m)]
    });
    assert!(
        requests.iter().all(|&c| c > 0),
        "arb_control_request misses a variant: {requests:?}"
    );
    let responses = variant_counts(arb_control_response(), CONTROL_RESPONSE_VARIANTS, |m| {
        vec![control_response_variant(m)]
    });
    assert!(
        responses.iter().all(|&c| c > 0),
        "arb_control_response misses a variant: {responses:?}"
    );
    let client = variant_counts(arb_client(), 3, |m| vec![client_variant(m)]);
    assert!(
        client.iter().all(|&c| c > 0),
        "arb_client misses a variant: {client:?}"
    );
    let sup = variant_counts(arb_supervisor(), 3, |m| vec![supervisor_variant(m)]);
    assert!(
        sup.iter().all(|&c| c > 0),
        "arb_supervisor misses a variant: {sup:?}"
    );
    // The nested enums are reached through the messages too.
    let kinds = variant_counts(arb_error_kind(), 11, |k| vec![*k as usize]);
    assert!(
        kinds.iter().all(|&c| c > 0),
        "arb_error_kind misses a variant: {kinds:?}"
    );
}
