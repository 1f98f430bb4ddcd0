//! Wire stability: the exact bytes of one sample of every variant of every
//! enum on the wire, and the protocol constants, pinned.
//!
//! postcard encodes an enum variant as its *index* (a varint), and fields by
//! *position and type* (varint integers, zigzag for signed ones, strings and
//! byte buffers as a varint length then the bytes, `Option` as 0 / 1 + value,
//! `bool` as 0 / 1). So reordering variants, inserting one anywhere but at
//! the end, reordering fields or changing a field's type silently changes
//! what the other side reads. Such a change fails here; when it is
//! deliberate, bump the protocol version and update the pins (see `BUMP_*`).
//!
//! Exhaustiveness, two ways:
//! - each `*_sample` fn matches its enum with no wildcard arm, so a new
//!   variant does not compile until it has a sample and pinned bytes;
//! - `variants::<E>()` counts an enum's variants at run time (postcard
//!   accepts a variant index below the count and refuses the count itself),
//!   and every variant found is checked, so none can be skipped.

use serde::{de::DeserializeOwned, Serialize};
use smolvm_proto::supervisor::{
    ClientMsg, ControlError, ControlErrorKind, ControlRequest, ControlResponse, EgressPolicy,
    PortForward, ReadyInfo, SnapshotReport, SnapshotRequest, SupervisorMsg, SupervisorStatus,
    VmRunState, SUPERVISOR_PROTOCOL_VERSION,
};
use smolvm_proto::*;
use std::fmt::Debug;

const BUMP_AGENT: &str = "the host<->agent wire encoding changed. If that is deliberate, \
bump PROTOCOL_VERSION (crates/smolvm-proto/src/lib.rs) and SUPERVISOR_PROTOCOL_VERSION \
(src/supervisor.rs; the supervisor link carries agent messages), keep variant 0 (Hello) of \
every message enum and its struct unchanged, then update the pinned bytes in \
tests/wire_stability.rs (each failure above prints the new encoding) and docs/protocol.md. \
If it is not deliberate, undo it: new variants and fields go at the end, types never change.";

const BUMP_SUPERVISOR: &str = "the client<->supervisor wire encoding changed. If that is \
deliberate, bump SUPERVISOR_PROTOCOL_VERSION (crates/smolvm-proto/src/supervisor.rs), keep \
variant 0 (Hello) unchanged, then update the pinned bytes in tests/wire_stability.rs (each \
failure above prints the new encoding). If it is not deliberate, undo it: new variants go at \
the end, types never change.";

/// The stream of every sample that is not a connection-level message
/// (hello, quiesce, reinit: those travel on `CONTROL_STREAM`).
const S: u32 = 5;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A frame as pinned: header, a space, payload.
fn show(frame: &[u8]) -> String {
    format!(
        "{} {}",
        hex(&frame[..HEADER_LEN]),
        hex(&frame[HEADER_LEN..])
    )
}

/// One value of every variant of `E`, found by decoding a variant index
/// followed by zeros (which every field type here accepts: integer 0,
/// empty string or sequence, `None`, `false`, variant 0), for indices
/// 0, 1, ... until postcard refuses the index as out of range.
fn variants<E: DeserializeOwned + Debug>(name: &str) -> Vec<E> {
    let mut out = Vec::new();
    for tag in 0u8..128 {
        let mut buf = vec![tag];
        buf.extend([0u8; 256]);
        match postcard::take_from_bytes::<E>(&buf) {
            Ok((v, _)) => out.push(v),
            // serde's "invalid variant index" is a custom error.
            Err(postcard::Error::SerdeDeCustom) => return out,
            Err(e) => panic!("{name}: variant {tag} does not decode from zeros: {e}"),
        }
    }
    panic!("{name}: 128 variants or more?");
}

/// Checks the sample of every variant of `E` (from `sample`, which returns
/// it with its pinned frame in hex), framed by `frame`, against its pin,
/// and that the pinned bytes decode back to the same frame.
fn check<E, M>(
    name: &str,
    bump: &str,
    sample: impl Fn(&E) -> (E, &'static str),
    frame: impl Fn(E) -> Frame<M>,
) where
    E: DeserializeOwned + Debug,
    M: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut failures = Vec::new();
    for (tag, skeleton) in variants::<E>(name).iter().enumerate() {
        let (value, pinned) = sample(skeleton);
        assert_eq!(
            std::mem::discriminant(&value),
            std::mem::discriminant(skeleton),
            "{name}: the sample for variant {tag} ({skeleton:?}) is another variant: {value:?}"
        );
        let desc = format!("{name} variant {tag}: {value:?}");
        let f = frame(value);
        let got = encode_frame(&f).unwrap();
        let pinned_bytes: Vec<u8> = {
            let h: String = pinned.split_whitespace().collect();
            (0..h.len() / 2)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("pinned hex"))
                .collect()
        };
        if got != pinned_bytes {
            failures.push(format!(
                "{desc}\n    pinned:     \"{pinned}\"\n    encodes to: \"{}\"",
                show(&got)
            ));
            continue;
        }
        let back: Frame<M> = decode_payload(&pinned_bytes[HEADER_LEN..])
            .unwrap_or_else(|e| panic!("{desc}: the pinned bytes no longer decode: {e}\n{bump}"));
        assert_eq!(
            back, f,
            "{desc}: the pinned bytes decode to something else\n{bump}"
        );
    }
    assert!(failures.is_empty(), "\n{}\n\n{bump}\n", failures.join("\n"));
}

fn stat(kind: FileKind) -> FileStat {
    FileStat {
        kind,
        size: 1,
        mode: 0o644,
        mtime_ns: 1,
        link_target: None,
    }
}

fn guest_hello() -> GuestHello {
    GuestHello {
        version: 3,
        agent_version: "0.1.0".into(),
        agent_start_ms: 1200,
        ready_ms: 1210,
        now_ms: 1300,
    }
}

fn host_sample(m: &HostMsg) -> (HostMsg, &'static str) {
    match m {
        HostMsg::Hello(_) => (HostMsg::Hello(HostHello { version: 3 }), "03000000 000003"),
        HostMsg::Ping { .. } => (HostMsg::Ping { nonce: 300 }, "04000000 0501ac02"),
        HostMsg::Exec(_) => (
            HostMsg::Exec(ExecRequest {
                command: Command::Argv(vec!["ls".into(), "-l".into()]),
                env: vec![("K".into(), "v".into())],
                workdir: Some("/tmp".into()),
                timeout_ms: Some(1500),
                stdin: true,
                pty: None,
            }),
            "1a000000 05020002026c73022d6c01014b017601042f746d7001dc0b0100",
        ),
        HostMsg::Data(_) => (
            HostMsg::Data(Bytes(vec![0, 1, 0xff])),
            "06000000 0503030001ff",
        ),
        HostMsg::Eof => (HostMsg::Eof, "02000000 0504"),
        HostMsg::Signal { .. } => (HostMsg::Signal { signal: -15 }, "03000000 05051d"),
        HostMsg::Shutdown => (HostMsg::Shutdown, "02000000 0506"),
        HostMsg::Credit { .. } => (HostMsg::Credit { bytes: 65536 }, "05000000 0507808004"),
        HostMsg::Cancel => (HostMsg::Cancel, "02000000 0508"),
        HostMsg::ReadFile(_) => (
            HostMsg::ReadFile(ReadFileRequest {
                path: "/etc/hosts".into(),
            }),
            "0d000000 05090a2f6574632f686f737473",
        ),
        HostMsg::WriteFile(_) => (
            HostMsg::WriteFile(WriteFileRequest {
                path: "/tmp/f".into(),
                mode: 0o644,
                mtime_ns: Some(-1),
                make_dirs: true,
            }),
            "0e000000 050a062f746d702f66a403010101",
        ),
        HostMsg::Op(_) => (
            HostMsg::Op(OpRequest::Stat {
                path: "/".into(),
                follow: true,
            }),
            "06000000 050b00012f01",
        ),
        HostMsg::Resize(_) => (
            HostMsg::Resize(PtySize {
                rows: 50,
                cols: 132,
            }),
            "05000000 050c328401",
        ),
        HostMsg::Spawn(_) => (
            HostMsg::Spawn(ExecRequest {
                command: Command::Shell("sleep 9".into()),
                env: vec![],
                workdir: None,
                timeout_ms: None,
                stdin: false,
                pty: None,
            }),
            "10000000 050d0107736c65657020390000000000",
        ),
        HostMsg::Attach(_) => (
            HostMsg::Attach(AttachRequest {
                handle: 3,
                from: Some(300),
            }),
            "06000000 050e0301ac02",
        ),
        HostMsg::Quiesce { .. } => (HostMsg::Quiesce { nonce: 300 }, "04000000 000fac02"),
        HostMsg::Thaw => (HostMsg::Thaw, "02000000 0010"),
        HostMsg::Reinit(_) => (
            HostMsg::Reinit(Identity {
                hostname: "vm2".into(),
                entropy: Bytes(vec![0xaa, 0x55, 0, 0xff]),
                unix_time_ns: 1_700_000_000_000_000_000,
            }),
            "14000000 001103766d3204aa5500ff8080a8b1e39fe7cb17",
        ),
        HostMsg::Connect { .. } => (HostMsg::Connect { port: 8080 }, "04000000 0512903f"),
    }
}

fn guest_sample(m: &GuestMsg) -> (GuestMsg, &'static str) {
    match m {
        GuestMsg::Hello(_) => (
            GuestMsg::Hello(guest_hello()),
            "0f000000 00000305302e312e30b009ba09940a",
        ),
        GuestMsg::Pong { .. } => (GuestMsg::Pong { nonce: 300 }, "04000000 0501ac02"),
        GuestMsg::Started { .. } => (GuestMsg::Started { pid: 1234 }, "04000000 0502d209"),
        GuestMsg::Stdout(_) => (
            GuestMsg::Stdout(Bytes(b"out\n".to_vec())),
            "07000000 0503046f75740a",
        ),
        GuestMsg::Stderr(_) => (
            GuestMsg::Stderr(Bytes(b"err\n".to_vec())),
            "07000000 0504046572720a",
        ),
        GuestMsg::Exited(_) => (
            GuestMsg::Exited(ExitStatus {
                code: Some(-2),
                signal: Some(9),
                timed_out: true,
                duration_ms: 1500,
            }),
            "09000000 05050103011201dc0b",
        ),
        GuestMsg::Error(_) => (
            GuestMsg::Error(ErrorInfo::new(ErrorKind::NotFound, "no such file")),
            "10000000 0506000c6e6f20737563682066696c65",
        ),
        GuestMsg::ShutdownAck => (GuestMsg::ShutdownAck, "02000000 0507"),
        GuestMsg::Credit { .. } => (GuestMsg::Credit { bytes: 262144 }, "05000000 0508808010"),
        GuestMsg::FileStart(_) => (
            GuestMsg::FileStart(FileStat {
                kind: FileKind::File,
                size: 4096,
                mode: 0o644,
                mtime_ns: 1_700_000_000_000_000_000,
                link_target: None,
            }),
            "11000000 0509008020a4038080d0e2c6bfce972f00",
        ),
        GuestMsg::FileData(_) => (
            GuestMsg::FileData(Bytes(b"\0data".to_vec())),
            "08000000 050a050064617461",
        ),
        GuestMsg::Done { .. } => (GuestMsg::Done { bytes: 4096 }, "04000000 050b8020"),
        GuestMsg::Entries(_) => (
            GuestMsg::Entries(vec![
                DirEntry {
                    name: "a".into(),
                    stat: FileStat {
                        kind: FileKind::Symlink,
                        size: 1,
                        mode: 0o777,
                        mtime_ns: -5,
                        link_target: Some("b".into()),
                    },
                },
                DirEntry {
                    name: "d".into(),
                    stat: FileStat {
                        kind: FileKind::Dir,
                        size: 0,
                        mode: 0o755,
                        mtime_ns: 0,
                        link_target: None,
                    },
                },
            ]),
            "15000000 050c0201610201ff030901016201640100ed030000",
        ),
        GuestMsg::Op(_) => (GuestMsg::Op(OpReply::PortOpen(true)), "04000000 050d0201"),
        GuestMsg::Spawned { .. } => (
            GuestMsg::Spawned {
                handle: 4,
                pid: 300,
            },
            "05000000 050e04ac02",
        ),
        GuestMsg::Attached { .. } => (
            GuestMsg::Attached {
                offset: 1,
                dropped: 2,
            },
            "04000000 050f0102",
        ),
        GuestMsg::Quiesced { .. } => (GuestMsg::Quiesced { nonce: 300 }, "04000000 0010ac02"),
        GuestMsg::Reinited { .. } => (
            GuestMsg::Reinited {
                clock_set: true,
                reseeded: false,
            },
            "04000000 00110100",
        ),
        GuestMsg::Connected => (GuestMsg::Connected, "02000000 0512"),
        GuestMsg::Data(_) => (GuestMsg::Data(Bytes(b"hi".to_vec())), "05000000 0513026869"),
        GuestMsg::Eof => (GuestMsg::Eof, "02000000 0514"),
    }
}

fn client_sample(m: &ClientMsg) -> (ClientMsg, &'static str) {
    match m {
        ClientMsg::Hello { .. } => (ClientMsg::Hello { version: 4 }, "03000000 000004"),
        ClientMsg::Agent(_) => (ClientMsg::Agent(HostMsg::Cancel), "03000000 050108"),
        ClientMsg::Control(_) => (
            ClientMsg::Control(ControlRequest::Stop { timeout_ms: 5000 }),
            "05000000 0502028827",
        ),
    }
}

fn supervisor_sample(m: &SupervisorMsg) -> (SupervisorMsg, &'static str) {
    match m {
        SupervisorMsg::Hello { .. } => (
            SupervisorMsg::Hello {
                version: 4,
                vm_id: "vm1".into(),
            },
            "07000000 00000403766d31",
        ),
        SupervisorMsg::Agent(_) => (
            SupervisorMsg::Agent(GuestMsg::Done { bytes: 7 }),
            "04000000 05010b07",
        ),
        SupervisorMsg::Control(_) => (
            SupervisorMsg::Control(ControlResponse::Ok),
            "03000000 050200",
        ),
    }
}

fn control_request_sample(r: &ControlRequest) -> (ControlRequest, &'static str) {
    match r {
        ControlRequest::Status => (ControlRequest::Status, "03000000 050200"),
        ControlRequest::WaitReady { .. } => (
            ControlRequest::WaitReady { timeout_ms: 30_000 },
            "06000000 050201b0ea01",
        ),
        ControlRequest::Stop { .. } => (
            ControlRequest::Stop { timeout_ms: 5000 },
            "05000000 0502028827",
        ),
        ControlRequest::Kill => (ControlRequest::Kill, "03000000 050203"),
        ControlRequest::Pause => (ControlRequest::Pause, "03000000 050204"),
        ControlRequest::Resume => (ControlRequest::Resume, "03000000 050205"),
        ControlRequest::Snapshot(_) => (
            ControlRequest::Snapshot(SnapshotRequest {
                dir: "/s".into(),
                next_disk: "/d.qcow2".into(),
                resume: true,
            }),
            "10000000 050206022f73082f642e71636f773201",
        ),
        ControlRequest::PortAdd(_) => (
            ControlRequest::PortAdd(PortForward {
                host_addr: std::net::Ipv4Addr::LOCALHOST.into(),
                host_port: 0,
                guest_port: 22,
            }),
            "0a000000 050207007f0000010016",
        ),
        ControlRequest::PortRemove { .. } => (
            ControlRequest::PortRemove { host_port: 300 },
            "05000000 050208ac02",
        ),
        ControlRequest::PortList => (ControlRequest::PortList, "03000000 050209"),
        ControlRequest::SetEgress(_) => (
            ControlRequest::SetEgress(EgressPolicy::Allowlist {
                domains: vec!["a".into()],
                cidrs: vec![],
            }),
            "08000000 05020a0201016100",
        ),
    }
}

fn control_response_sample(r: &ControlResponse) -> (ControlResponse, &'static str) {
    match r {
        ControlResponse::Ok => (ControlResponse::Ok, "03000000 050200"),
        ControlResponse::Ready(_) => (
            ControlResponse::Ready(ReadyInfo {
                hello: guest_hello(),
                vmm_start_ms: 40,
                ready_ms: 250,
            }),
            "13000000 0502010305302e312e30b009ba09940a28fa01",
        ),
        ControlResponse::Status(_) => (
            ControlResponse::Status(SupervisorStatus {
                state: VmRunState::Running,
                vmm_pid: 4242,
                agent_connected: true,
            }),
            "07000000 05020201922101",
        ),
        ControlResponse::Error(_) => (
            ControlResponse::Error(ControlError {
                kind: ControlErrorKind::BootTimeout,
                message: "late".into(),
                console_tail: Some("tail".into()),
            }),
            "0f000000 05020300046c61746501047461696c",
        ),
        ControlResponse::Snapshot(_) => (
            ControlResponse::Snapshot(SnapshotReport {
                disk_switched: true,
                state_bytes: 300,
                memory_bytes: 1 << 30,
                memory_in_state: false,
                downtime_ms: 120,
                total_ms: 1500,
                was_running: true,
            }),
            "10000000 05020401ac0280808080040078dc0b01",
        ),
        ControlResponse::Port(_) => (
            ControlResponse::Port(PortForward {
                host_addr: std::net::Ipv4Addr::LOCALHOST.into(),
                host_port: 40000,
                guest_port: 22,
            }),
            "0c000000 050205007f000001c0b80216",
        ),
        ControlResponse::Ports(_) => (ControlResponse::Ports(vec![]), "04000000 05020600"),
    }
}

fn control_error_kind_sample(k: &ControlErrorKind) -> (ControlErrorKind, &'static str) {
    use ControlErrorKind as K;
    match k {
        K::BootTimeout => (K::BootTimeout, "07000000 05020300016d00"),
        K::BootFailed => (K::BootFailed, "07000000 05020301016d00"),
        K::VmmExited => (K::VmmExited, "07000000 05020302016d00"),
        K::VmmUnresponsive => (K::VmmUnresponsive, "07000000 05020303016d00"),
        K::AgentIncompatible => (K::AgentIncompatible, "07000000 05020304016d00"),
        K::HostToolMissing => (K::HostToolMissing, "07000000 05020305016d00"),
        K::InvalidState => (K::InvalidState, "07000000 05020306016d00"),
        K::ShuttingDown => (K::ShuttingDown, "07000000 05020307016d00"),
        K::Other => (K::Other, "07000000 05020308016d00"),
        K::HostUnsupported => (K::HostUnsupported, "07000000 05020309016d00"),
    }
}

fn run_state_sample(s: &VmRunState) -> (VmRunState, &'static str) {
    match s {
        VmRunState::Booting => (VmRunState::Booting, "06000000 050202000100"),
        VmRunState::Running => (VmRunState::Running, "06000000 050202010100"),
        VmRunState::Paused => (VmRunState::Paused, "06000000 050202020100"),
        VmRunState::Stopping => (VmRunState::Stopping, "06000000 050202030100"),
        VmRunState::Exited => (VmRunState::Exited, "06000000 050202040100"),
    }
}

fn op_request_sample(r: &OpRequest) -> (OpRequest, &'static str) {
    match r {
        OpRequest::Stat { .. } => (
            OpRequest::Stat {
                path: "/etc".into(),
                follow: false,
            },
            "09000000 050b00042f65746300",
        ),
        OpRequest::List { .. } => (OpRequest::List { path: "/".into() }, "05000000 050b01012f"),
        OpRequest::Mkdir { .. } => (
            OpRequest::Mkdir {
                path: "/a/b".into(),
                parents: true,
                mode: 0o755,
            },
            "0b000000 050b02042f612f6201ed03",
        ),
        OpRequest::Remove { .. } => (
            OpRequest::Remove {
                path: "/a".into(),
                recursive: true,
            },
            "07000000 050b03022f6101",
        ),
        OpRequest::Rename { .. } => (
            OpRequest::Rename {
                from: "/a".into(),
                to: "/b".into(),
            },
            "09000000 050b04022f61022f62",
        ),
        OpRequest::Symlink { .. } => (
            OpRequest::Symlink {
                path: "/l".into(),
                target: "t".into(),
            },
            "08000000 050b05022f6c0174",
        ),
        OpRequest::SetAttrs { .. } => (
            OpRequest::SetAttrs {
                path: "/f".into(),
                mode: Some(0o600),
                mtime_ns: None,
            },
            "0a000000 050b06022f6601800300",
        ),
        OpRequest::Sync => (OpRequest::Sync, "03000000 050b07"),
        OpRequest::PortOpen { .. } => (OpRequest::PortOpen { port: 8080 }, "05000000 050b08903f"),
        OpRequest::Procs => (OpRequest::Procs, "03000000 050b09"),
        OpRequest::ProcSignal { .. } => (
            OpRequest::ProcSignal {
                handle: 2,
                signal: 15,
            },
            "05000000 050b0a021e",
        ),
        OpRequest::ProcStdin { .. } => (
            OpRequest::ProcStdin {
                handle: 2,
                data: Bytes(b"hi".to_vec()),
                eof: true,
            },
            "08000000 050b0b0202686901",
        ),
        OpRequest::ProcForget { .. } => (OpRequest::ProcForget { handle: 2 }, "04000000 050b0c02"),
        OpRequest::SshStart { .. } => (
            OpRequest::SshStart {
                authorized_key: "k".into(),
                new_host_key: true,
            },
            "06000000 050b0d016b01",
        ),
    }
}

fn op_reply_sample(r: &OpReply) -> (OpReply, &'static str) {
    match r {
        OpReply::Ok => (OpReply::Ok, "03000000 050d00"),
        OpReply::Stat(_) => (
            OpReply::Stat(FileStat {
                kind: FileKind::Symlink,
                size: 5,
                mode: 0o777,
                mtime_ns: 1_000_000_000,
                link_target: Some("/tmp".into()),
            }),
            "12000000 050d010205ff0380a8d6b90701042f746d70",
        ),
        OpReply::PortOpen(_) => (OpReply::PortOpen(false), "04000000 050d0200"),
        OpReply::Procs(_) => (
            OpReply::Procs(vec![ProcInfo {
                handle: 1,
                pid: 77,
                command: "sleep 9".into(),
                exit: None,
                output_bytes: 10,
                buffered_from: 0,
                started_ms: 5,
            }]),
            "12000000 050d0301014d07736c6565702039000a0005",
        ),
        OpReply::Written(_) => (OpReply::Written(300), "05000000 050d04ac02"),
        OpReply::Ssh { .. } => (
            OpReply::Ssh {
                host_key: "k".into(),
            },
            "05000000 050d05016b",
        ),
    }
}

fn error_kind_sample(k: &ErrorKind) -> (ErrorKind, &'static str) {
    use ErrorKind as K;
    match k {
        K::NotFound => (K::NotFound, "05000000 050600016d"),
        K::PermissionDenied => (K::PermissionDenied, "05000000 050601016d"),
        K::InvalidRequest => (K::InvalidRequest, "05000000 050602016d"),
        K::Busy => (K::Busy, "05000000 050603016d"),
        K::Unsupported => (K::Unsupported, "05000000 050604016d"),
        K::Other => (K::Other, "05000000 050605016d"),
        K::Unavailable => (K::Unavailable, "05000000 050606016d"),
        K::AlreadyExists => (K::AlreadyExists, "05000000 050607016d"),
        K::NotEmpty => (K::NotEmpty, "05000000 050608016d"),
        K::NoSpace => (K::NoSpace, "05000000 050609016d"),
        K::FlowControl => (K::FlowControl, "05000000 05060a016d"),
    }
}

fn file_kind_sample(k: &FileKind) -> (FileKind, &'static str) {
    match k {
        FileKind::File => (FileKind::File, "08000000 05090001a4030200"),
        FileKind::Dir => (FileKind::Dir, "08000000 05090101a4030200"),
        FileKind::Symlink => (FileKind::Symlink, "08000000 05090201a4030200"),
        FileKind::Other => (FileKind::Other, "08000000 05090301a4030200"),
    }
}

fn command_sample(c: &Command) -> (Command, &'static str) {
    match c {
        Command::Argv(_) => (
            Command::Argv(vec!["true".into()]),
            "0e000000 0502000104747275650000000000",
        ),
        Command::Shell(_) => (
            Command::Shell("echo hi".into()),
            "10000000 050201076563686f2068690000000000",
        ),
    }
}

#[test]
fn host_messages_are_pinned() {
    check("HostMsg", BUMP_AGENT, host_sample, |m| {
        let stream = if matches!(
            m,
            HostMsg::Hello(_) | HostMsg::Quiesce { .. } | HostMsg::Thaw | HostMsg::Reinit(_)
        ) {
            CONTROL_STREAM
        } else {
            S
        };
        Frame::new(stream, m)
    });
}

#[test]
fn guest_messages_are_pinned() {
    check("GuestMsg", BUMP_AGENT, guest_sample, |m| {
        let stream = if matches!(
            m,
            GuestMsg::Hello(_) | GuestMsg::Quiesced { .. } | GuestMsg::Reinited { .. }
        ) {
            CONTROL_STREAM
        } else {
            S
        };
        Frame::new(stream, m)
    });
}

#[test]
fn client_messages_are_pinned() {
    check("ClientMsg", BUMP_SUPERVISOR, client_sample, |m| {
        let stream = if matches!(m, ClientMsg::Hello { .. }) {
            CONTROL_STREAM
        } else {
            S
        };
        Frame::new(stream, m)
    });
}

#[test]
fn supervisor_messages_are_pinned() {
    check("SupervisorMsg", BUMP_SUPERVISOR, supervisor_sample, |m| {
        let stream = if matches!(m, SupervisorMsg::Hello { .. }) {
            CONTROL_STREAM
        } else {
            S
        };
        Frame::new(stream, m)
    });
}

#[test]
fn control_requests_are_pinned() {
    check(
        "ControlRequest",
        BUMP_SUPERVISOR,
        control_request_sample,
        |r| Frame::new(S, ClientMsg::Control(r)),
    );
}

#[test]
fn control_responses_are_pinned() {
    check(
        "ControlResponse",
        BUMP_SUPERVISOR,
        control_response_sample,
        |r| Frame::new(S, SupervisorMsg::Control(r)),
    );
}

#[test]
fn control_error_kinds_are_pinned() {
    check(
        "ControlErrorKind",
        BUMP_SUPERVISOR,
        control_error_kind_sample,
        |kind| {
            Frame::new(
                S,
                SupervisorMsg::Control(ControlResponse::Error(ControlError {
                    kind,
                    message: "m".into(),
                    console_tail: None,
                })),
            )
        },
    );
}

#[test]
fn run_states_are_pinned() {
    check("VmRunState", BUMP_SUPERVISOR, run_state_sample, |state| {
        Frame::new(
            S,
            SupervisorMsg::Control(ControlResponse::Status(SupervisorStatus {
                state,
                vmm_pid: 1,
                agent_connected: false,
            })),
        )
    });
}

#[test]
fn op_requests_are_pinned() {
    check("OpRequest", BUMP_AGENT, op_request_sample, |r| {
        Frame::new(S, HostMsg::Op(r))
    });
}

#[test]
fn op_replies_are_pinned() {
    check("OpReply", BUMP_AGENT, op_reply_sample, |r| {
        Frame::new(S, GuestMsg::Op(r))
    });
}

#[test]
fn error_kinds_are_pinned() {
    check("ErrorKind", BUMP_AGENT, error_kind_sample, |kind| {
        Frame::new(
            S,
            GuestMsg::Error(ErrorInfo {
                kind,
                message: "m".into(),
            }),
        )
    });
}

#[test]
fn file_kinds_are_pinned() {
    check("FileKind", BUMP_AGENT, file_kind_sample, |kind| {
        Frame::new(S, GuestMsg::FileStart(stat(kind)))
    });
}

#[test]
fn commands_are_pinned() {
    check("Command", BUMP_AGENT, command_sample, |command| {
        Frame::new(
            S,
            HostMsg::Exec(ExecRequest {
                command,
                env: vec![],
                workdir: None,
                timeout_ms: None,
                stdin: false,
                pty: None,
            }),
        )
    });
}

#[test]
fn protocol_constants_are_pinned() {
    // Bumping a version is a deliberate act: it comes with new pinned bytes
    // above, so it must come with a change here too.
    assert_eq!(
        PROTOCOL_VERSION, 4,
        "PROTOCOL_VERSION changed: {BUMP_AGENT}"
    );
    assert_eq!(
        SUPERVISOR_PROTOCOL_VERSION, 5,
        "SUPERVISOR_PROTOCOL_VERSION changed: {BUMP_SUPERVISOR}"
    );
    assert_eq!(
        STREAM_WINDOW,
        1024 * 1024,
        "STREAM_WINDOW changed: {BUMP_AGENT}"
    );
    assert_eq!(HEADER_LEN, 4, "HEADER_LEN changed: {BUMP_AGENT}");
    assert_eq!(
        MAX_FRAME_LEN,
        1024 * 1024,
        "MAX_FRAME_LEN changed: {BUMP_AGENT}"
    );
    assert_eq!(CONTROL_STREAM, 0, "CONTROL_STREAM changed: {BUMP_AGENT}");
}

/// The pins above came from the encoder; these few are spelled out from
/// postcard's format by hand, so the table is known to pin the real format
/// and not whatever the encoder happened to do.
#[test]
fn pins_follow_postcard_format_by_hand() {
    fn pinned(s: &str) -> String {
        s.split_whitespace().collect()
    }
    fn frame(payload: &[u8]) -> String {
        let mut b = u32::try_from(payload.len()).unwrap().to_le_bytes().to_vec();
        b.extend(payload);
        hex(&b)
    }

    // HostMsg::Ping { nonce: 300 } on stream 5: stream varint 5; variant
    // index 1; 300 = 0b10_0101100 as a varint, low 7 bits first with the
    // continuation bit: 0xac, 0x02.
    let (m, pin) = host_sample(&HostMsg::Ping { nonce: 0 });
    assert_eq!(m, HostMsg::Ping { nonce: 300 });
    assert_eq!(pinned(pin), frame(&[5, 1, 0xac, 0x02]));

    // HostMsg::Signal { signal: -15 }: i32 is zigzag then varint:
    // -15 -> 2*15-1 = 29 = 0x1d.
    let (m, pin) = host_sample(&HostMsg::Signal { signal: 0 });
    assert_eq!(m, HostMsg::Signal { signal: -15 });
    assert_eq!(pinned(pin), frame(&[5, 5, 29]));

    // HostMsg::Exec: variant 2, then ExecRequest's fields in order.
    let (_, pin) = host_sample(&HostMsg::Exec(ExecRequest {
        command: Command::Shell(String::new()),
        env: vec![],
        workdir: None,
        timeout_ms: None,
        stdin: false,
        pty: None,
    }));
    #[rustfmt::skip]
    let exec = [
        5, 2,                  // stream 5, HostMsg::Exec
        0,                     // Command::Argv
        2,                     //   Vec of 2 strings
        2, b'l', b's',         //   "ls": length, bytes
        2, b'-', b'l',         //   "-l"
        1,                     // env: Vec of 1 pair
        1, b'K', 1, b'v',      //   ("K", "v")
        1, 4, b'/', b't', b'm', b'p', // workdir: Some("/tmp")
        1, 0xdc, 0x0b,         // timeout_ms: Some(1500): 1500 = 11*128 + 92
        1,                     // stdin: true
        0,                     // pty: None
    ];
    assert_eq!(pinned(pin), frame(&exec));

    // GuestMsg::Hello (frozen): stream 0, variant 0, version 3,
    // agent_version "0.1.0", then three u64 varints 1200 = 9*128 + 48,
    // 1210 = 9*128 + 58, 1300 = 10*128 + 20.
    let (_, pin) = guest_sample(&GuestMsg::Hello(guest_hello()));
    #[rustfmt::skip]
    let hello = [
        0, 0, 3,
        5, b'0', b'.', b'1', b'.', b'0',
        0x80 | 48, 9, 0x80 | 58, 9, 0x80 | 20, 10,
    ];
    assert_eq!(pinned(pin), frame(&hello));

    // GuestMsg::Entries: variant 12, a Vec of 2 DirEntry, each a name then
    // a FileStat (kind as a variant index, size, mode, zigzag mtime,
    // Option target).
    let (_, pin) = guest_sample(&GuestMsg::Entries(vec![]));
    #[rustfmt::skip]
    let entries = [
        5, 12, 2,
        1, b'a', 2, 1, 0xff, 0x03, 9, 1, 1, b'b', // "a": Symlink, 1, 0o777, -5, Some("b")
        1, b'd', 1, 0, 0xed, 0x03, 0, 0,          // "d": Dir, 0, 0o755, 0, None
    ];
    assert_eq!(pinned(pin), frame(&entries));

    // GuestMsg::Reinited on stream 0: variant 17, then two bools
    // (clock_set true, reseeded false).
    let (_, pin) = guest_sample(&GuestMsg::Reinited {
        clock_set: false,
        reseeded: false,
    });
    assert_eq!(pinned(pin), frame(&[0, 17, 1, 0]));

    // ControlRequest::Snapshot: ClientMsg::Control (2), variant 6, then a
    // PathBuf is its string (length, UTF-8 bytes), then the bool.
    let (_, pin) = control_request_sample(&ControlRequest::Snapshot(SnapshotRequest {
        dir: "".into(),
        next_disk: "".into(),
        resume: false,
    }));
    let mut snapshot = vec![5, 2, 6, 2];
    snapshot.extend(b"/s");
    snapshot.push(8);
    snapshot.extend(b"/d.qcow2");
    snapshot.push(1);
    assert_eq!(pinned(pin), frame(&snapshot));
}
