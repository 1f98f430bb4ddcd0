//! Host ↔ guest agent messages.
//!
//! Compatibility rule: variant 0 of [`HostMsg`] and [`GuestMsg`] is `Hello`,
//! and [`HostHello`] / [`GuestHello`] never change shape, so a host can
//! always read an agent's version and refuse it with a clear error.

use crate::Bytes;
use serde::{Deserialize, Serialize};

/// Messages the host sends to the agent.
///
/// Flow control: every stream has a credit window in each direction
/// ([`STREAM_WINDOW`](crate::STREAM_WINDOW) bytes when it opens). A peer
/// sends data bytes (`Data`, `Stdout`, `Stderr`, `FileData`, and entry
/// listings by [`DirEntry::wire_cost`]) only while it holds credit, and the
/// receiver hands credit back (`Credit`) as its consumer takes the bytes, so
/// a stream nobody reads stalls only itself. See docs/protocol.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    /// First message on a connection, on stream 0. FROZEN: keep variant 0.
    Hello(HostHello),
    /// Liveness check; answered by `GuestMsg::Pong` on the same stream.
    Ping { nonce: u64 },
    /// Starts a process; the stream then carries its output and exit.
    Exec(ExecRequest),
    /// Input for the stream: a process's stdin (only when
    /// `ExecRequest::stdin` is true) or the contents of a `WriteFile`.
    /// Counts against the agent's credit.
    Data(Bytes),
    /// The end of the stream's input (closes the process's stdin; commits a
    /// `WriteFile`).
    Eof,
    /// Sends a signal to the process group of the stream's process.
    Signal { signal: i32 },
    /// Syncs filesystems, ends all processes and ends the VM (the agent
    /// restarts the guest; the VMM runs with -no-reboot, so it exits).
    /// Answered by `ShutdownAck` just before the power-off.
    Shutdown,
    /// The host may take `bytes` more data bytes on this stream.
    Credit { bytes: u32 },
    /// The host stops reading this stream: the agent kills its process
    /// group (or abandons its file transfer), discards its output and ends
    /// it. Nothing more is sent on the stream, not even `Exited`.
    Cancel,
    /// Streams a guest file: `FileStart`, `FileData`..., then `Done`.
    ReadFile(ReadFileRequest),
    /// Writes a guest file from the `Data` that follows, atomically (a
    /// temporary file renamed into place at `Eof`); answered by `Done`.
    WriteFile(WriteFileRequest),
    /// A one-shot filesystem or guest request, answered by `GuestMsg::Op`
    /// (or `Entries`... then `Op(OpReply::Ok)` for `List`).
    Op(OpRequest),
    /// Resizes the terminal of the stream's process (a `pty` exec).
    Resize(PtySize),
    /// Starts a background process: it outlives the stream (and the
    /// host's connection); its output goes to a bounded buffer in the
    /// agent. Answered by `Spawned` (or `Error`).
    Spawn(ExecRequest),
    /// Streams a background process's output: `Attached`, the buffered
    /// output from `from` (or only new output when `None`), live output as
    /// it comes, then `Exited` once it ended. `Cancel` detaches (the
    /// process runs on).
    Attach(AttachRequest),
    /// On stream 0, before a snapshot: the agent answers `Quiesced` as the
    /// last frame it writes, then writes nothing more (its queues wait in
    /// guest memory) until a `Thaw`, a `Reinit` or a `Hello` arrives, or a
    /// guest-time timeout passes. The host sends nothing after it until it
    /// has the answer, so the snapshot cuts the channel between frames in
    /// both directions.
    Quiesce { nonce: u64 },
    /// Ends a `Quiesce` on the same machine (the source of a snapshot).
    Thaw,
    /// On stream 0, first thing on a restored or forked machine: become
    /// this machine (new identity, fresh entropy, host time), forget every
    /// stream of the previous connection, and answer `Reinited`. Ends a
    /// `Quiesce`.
    Reinit(Identity),
    /// Opens a TCP connection from the guest to `127.0.0.1:port` (a tunnel:
    /// a host port forward, or SSH). Answered by `Connected` (or `Error`);
    /// then `Data`/`Eof` carry bytes to the guest service and
    /// `GuestMsg::Data`/`GuestMsg::Eof` bytes back, each direction closed
    /// on its own (half-close). `Done` ends the stream once both directions
    /// ended; `Cancel` resets the connection.
    Connect { port: u16 },
}

/// Who a restored machine is now, and what it needs to be unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The VM id: the guest's new hostname.
    pub hostname: String,
    /// Fresh host entropy, mixed into the kernel's pool (credited) before
    /// the pool is reseeded.
    pub entropy: crate::Bytes,
    /// Host wall-clock time, ns since the Unix epoch, when sent.
    pub unix_time_ns: u64,
}

/// Messages the agent sends to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// Answer to `HostMsg::Hello`, on stream 0. FROZEN: keep variant 0.
    Hello(GuestHello),
    Pong {
        nonce: u64,
    },
    /// The process of an `Exec` started.
    Started {
        pid: u32,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process ended; last message of an `Exec` stream.
    Exited(ExitStatus),
    /// The request on this stream failed; last message of the stream.
    Error(ErrorInfo),
    /// The guest is about to power off.
    ShutdownAck,
    /// The agent may take `bytes` more `Data` bytes on this stream.
    Credit {
        bytes: u32,
    },
    /// First answer to `ReadFile`: what is being sent.
    FileStart(FileStat),
    /// A chunk of a `ReadFile`'s contents.
    FileData(Bytes),
    /// A file transfer finished (`bytes` moved); last message of the stream.
    Done {
        bytes: u64,
    },
    /// Directory entries of a `List` (counted against credit by
    /// [`DirEntry::wire_cost`]); `Op(OpReply::Ok)` ends the listing.
    Entries(Vec<DirEntry>),
    /// The answer to an `Op`; last message of the stream.
    Op(OpReply),
    /// A background process started; last message of a `Spawn` stream.
    Spawned {
        handle: u64,
        pid: u32,
    },
    /// First answer to `Attach`: the output offset the replay starts at,
    /// and how many bytes before it (from the requested offset) the
    /// bounded buffer had already dropped.
    Attached {
        offset: u64,
        dropped: u64,
    },
    /// Answer to `Quiesce` (its nonce: a late answer to an earlier one is
    /// told apart): the last frame before the agent's writer stops.
    Quiesced {
        nonce: u64,
    },
    /// Answer to `Reinit`: the identity was applied (`clock_set`: the
    /// guest clock was set; `reseeded`: the kernel pool took the entropy).
    Reinited {
        clock_set: bool,
        reseeded: bool,
    },
    /// A `Connect` reached its guest service.
    Connected,
    /// Bytes from a tunnel's guest service.
    Data(Bytes),
    /// A tunnel's guest service ended its side (the host may still send).
    Eof,
}

impl GuestMsg {
    /// True for the messages that end a stream (nothing follows them).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            GuestMsg::Exited(_)
                | GuestMsg::Error(_)
                | GuestMsg::Pong { .. }
                | GuestMsg::ShutdownAck
                | GuestMsg::Done { .. }
                | GuestMsg::Op(_)
                | GuestMsg::Spawned { .. }
                | GuestMsg::Quiesced { .. }
                | GuestMsg::Reinited { .. }
        )
    }

    /// What this message costs against the stream's credit: its data
    /// bytes, and [`MESSAGE_COST`] for every other message that does not
    /// end the stream, so no message a guest can repeat is free (a flood of
    /// `Started` would otherwise pile up at a paused reader). Terminal
    /// messages and `Credit` cost nothing (one ends the stream; the other
    /// is applied, never queued).
    pub fn credit_cost(&self) -> u64 {
        match self {
            // An empty chunk carries nothing but is still a frame to hold:
            // it costs like any other message (the agent never sends one).
            GuestMsg::Stdout(b)
            | GuestMsg::Stderr(b)
            | GuestMsg::FileData(b)
            | GuestMsg::Data(b) => {
                if b.is_empty() {
                    MESSAGE_COST
                } else {
                    b.len() as u64
                }
            }
            GuestMsg::Entries(e) => e.iter().map(DirEntry::wire_cost).sum::<u64>() + MESSAGE_COST,
            GuestMsg::FileStart(st) => {
                MESSAGE_COST + st.link_target.as_ref().map_or(0, |t| t.len() as u64)
            }
            GuestMsg::Credit { .. } => 0,
            m if m.is_terminal() => 0,
            _ => MESSAGE_COST,
        }
    }
}

/// FROZEN: the shape of the host's hello never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHello {
    /// The protocol version the host speaks.
    pub version: u32,
}

/// FROZEN: the shape of the agent's hello never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHello {
    /// The protocol version the agent speaks.
    pub version: u32,
    /// The agent's own version string (crate version).
    pub agent_version: String,
    /// Guest monotonic time (CLOCK_BOOTTIME, ms) when the agent started as PID 1.
    pub agent_start_ms: u64,
    /// Guest monotonic time (ms) when the agent was ready to serve.
    pub ready_ms: u64,
    /// Guest monotonic time (ms) when this hello was sent.
    pub now_ms: u64,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Executed directly, `argv[0]` looked up in `PATH`.
    Argv(Vec<String>),
    /// Run as `/bin/sh -c <string>`.
    Shell(String),
}

/// A process to start in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Command,
    /// Added to (and overriding) the agent's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub workdir: Option<String>,
    /// Kill the whole process group after this long and report `timed_out`.
    pub timeout_ms: Option<u64>,
    /// When true the host will send `Data`/`Eof`; otherwise stdin is
    /// `/dev/null`.
    pub stdin: bool,
    /// Runs the process on a new pseudo-terminal of this size (its
    /// controlling terminal; stdin, stdout and stderr all on it, so its
    /// output comes as `Stdout` only and `stdin` is implied).
    pub pty: Option<PtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    /// True when the agent killed it because its timeout ran out.
    pub timed_out: bool,
    /// Wall time from start to exit, in the guest.
    pub duration_ms: u64,
}

/// What kind of filesystem object a path names (not following a final
/// symlink unless asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Devices, sockets, FIFOs: listed, never transferred.
    Other,
}

/// Metadata of one guest path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Where a symlink points (its raw target, never followed).
    pub link_target: Option<String>,
}

/// One entry of a directory listing: a name (one path component, never
/// `.`/`..`) and its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

impl DirEntry {
    /// What an entry costs against a stream's credit: its strings plus a
    /// fixed overhead, so a listing is flow-controlled like file data.
    pub fn wire_cost(&self) -> u64 {
        let target = self.stat.link_target.as_ref().map_or(0, String::len);
        (self.name.len() + target + 64) as u64
    }
}

/// Reads one regular guest file (a symlink at `path` is followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    /// Absolute guest path.
    pub path: String,
}

/// Writes one regular guest file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits for the new file.
    pub mode: u32,
    /// Modification time to set, nanoseconds since the Unix epoch.
    pub mtime_ns: Option<i64>,
    /// Creates missing parent directories (mode 0755).
    pub make_dirs: bool,
}

/// One-shot guest requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpRequest {
    /// Metadata of `path`; `follow` follows a final symlink.
    Stat { path: String, follow: bool },
    /// The entries of the directory `path` (one level), as `Entries`.
    List { path: String },
    /// Creates a directory (`parents`: and its missing parents; an existing
    /// directory is then no error).
    Mkdir {
        path: String,
        parents: bool,
        mode: u32,
    },
    /// Removes a file, symlink or empty directory; `recursive` removes a
    /// directory tree (never following symlinks).
    Remove { path: String, recursive: bool },
    /// Renames `from` to `to` (replacing a file at `to`).
    Rename { from: String, to: String },
    /// Makes a symlink at `path` pointing to `target`.
    Symlink { path: String, target: String },
    /// Sets permission bits and, when given, the modification time of
    /// `path` (not following a final symlink for the time).
    SetAttrs {
        path: String,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
    },
    /// Flushes every guest filesystem to its disk.
    Sync,
    /// Whether something accepts TCP connections on the guest's
    /// `127.0.0.1:port` (or `[::1]:port`).
    PortOpen { port: u16 },
    /// The background processes (running, and the last finished ones).
    Procs,
    /// Signals a background process's group.
    ProcSignal { handle: u64, signal: i32 },
    /// Writes to a background process's stdin (at most one chunk;
    /// answered once written, so the caller is paced by the process),
    /// then closes it when `eof`.
    ProcStdin { handle: u64, data: Bytes, eof: bool },
    /// Forgets a finished background process (its buffered output goes).
    ProcForget { handle: u64 },
    /// Makes sure the guest's SSH server runs on its loopback (host key
    /// made when missing, or anew when `new_host_key`: a fork must not
    /// share its parent's) and lets `authorized_key` (one OpenSSH public
    /// key line) log in as root. Answered by `OpReply::Ssh`.
    SshStart {
        authorized_key: String,
        new_host_key: bool,
    },
}

/// Starts streaming a background process's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub handle: u64,
    /// Output offset (bytes of stdout + stderr since the start) to replay
    /// from; `None`: only output produced from now on.
    pub from: Option<u64>,
}

/// One background process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub handle: u64,
    pub pid: u32,
    /// The command, for people (cut to 256 bytes).
    pub command: String,
    /// How it ended; `None` while it runs.
    pub exit: Option<ExitStatus>,
    /// Output bytes produced so far (stdout + stderr).
    pub output_bytes: u64,
    /// The oldest offset still buffered (output before it was dropped).
    pub buffered_from: u64,
    /// Guest monotonic ms when it started.
    pub started_ms: u64,
}

/// Answers to [`OpRequest`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpReply {
    Ok,
    Stat(FileStat),
    PortOpen(bool),
    Procs(Vec<ProcInfo>),
    /// Bytes of a `ProcStdin` the process took (all of them unless it
    /// stopped reading).
    Written(u64),
    /// The SSH server runs; its host public key (`ssh-ed25519 AAAA...`).
    Ssh {
        host_key: String,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The program was not found or could not be executed.
    NotFound,
    PermissionDenied,
    /// The request was malformed (bad stream id, duplicate stream, ...).
    InvalidRequest,
    /// The agent refuses more work right now (too many processes).
    Busy,
    Unsupported,
    Other,
    /// Sent by the supervisor, never the agent: the agent cannot take
    /// requests now (not ready yet, the VM is stopping or gone).
    Unavailable,
    /// The path exists already.
    AlreadyExists,
    /// The directory is not empty.
    NotEmpty,
    /// The guest filesystem is full.
    NoSpace,
    /// The peer broke flow control (sent data past its credit).
    FlowControl,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    pub message: String,
}

/// What a non-data, non-terminal guest message (`Started`, `Attached`,
/// `FileStart`, an `Entries` frame) costs against credit.
pub const MESSAGE_COST: u64 = 64;

/// Longest error message a peer sends; longer ones are cut (they may quote
/// caller-supplied text such as a program name or a directory).
pub const MAX_ERROR_MESSAGE: usize = 4096;

impl ErrorInfo {
    /// An error whose message is cut to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
        .bounded()
    }

    /// The same error with its message cut to [`MAX_ERROR_MESSAGE`] bytes
    /// (for errors received from a peer, which did not go through `new`).
    pub fn bounded(mut self) -> Self {
        if self.message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE - 3;
            while !self.message.is_char_boundary(cut) {
                cut -= 1;
            }
            self.message.truncate(cut);
            self.message.push_str("...");
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_frame, CodecError, Decoder, Frame, MAX_FRAME_LEN};

    fn roundtrip<M>(m: M)
    where
        M: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Clone,
    {
        let f = Frame::new(42, m);
        let bytes = encode_frame(&f).unwrap();
        let mut d = Decoder::new();
        d.push(&bytes);
        let back: Frame<M> = d.next_frame().unwrap().unwrap();
        assert_eq!(back, f);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn host_messages_round_trip() {
        roundtrip(HostMsg::Hello(HostHello { version: 1 }));
        roundtrip(HostMsg::Ping { nonce: u64::MAX });
        roundtrip(HostMsg::Exec(ExecRequest {
            command: Command::Argv(vec!["ls".into(), "-l".into()]),
            env: vec![("A".into(), "b=c".into())],
            workdir: Some("/tmp".into()),
            timeout_ms: Some(1500),
            stdin: true,
            pty: None,
        }));
        roundtrip(HostMsg::Exec(ExecRequest {
            command: Command::Shell("echo hi | cat".into()),
            env: vec![],
            workdir: None,
            timeout_ms: None,
            stdin: false,
            pty: None,
        }));
        roundtrip(HostMsg::Data(Bytes(vec![0, 255, 10, 13])));
        roundtrip(HostMsg::Eof);
        roundtrip(HostMsg::Signal { signal: 9 });
        roundtrip(HostMsg::Shutdown);
    }

    #[test]
    fn guest_messages_round_trip() {
        roundtrip(GuestMsg::Hello(GuestHello {
            version: 1,
            agent_version: "0.1.0".into(),
            agent_start_ms: 1200,
            ready_ms: 1210,
            now_ms: 1300,
        }));
        roundtrip(GuestMsg::Pong { nonce: 7 });
        roundtrip(GuestMsg::Started { pid: 1234 });
        roundtrip(GuestMsg::Stdout(Bytes((0..=255).collect())));
        roundtrip(GuestMsg::Stderr(Bytes(vec![0xff, 0xfe])));
        roundtrip(GuestMsg::Exited(ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true,
            duration_ms: 10,
        }));
        roundtrip(GuestMsg::Error(ErrorInfo::new(
            ErrorKind::NotFound,
            "no such file",
        )));
        roundtrip(GuestMsg::ShutdownAck);
    }

    #[test]
    fn error_messages_are_bounded() {
        let e = ErrorInfo::new(ErrorKind::NotFound, "é".repeat(10_000));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE);
        assert!(e.message.ends_with("..."));
        assert_eq!(ErrorInfo::new(ErrorKind::Other, "short").message, "short");
    }

    #[test]
    fn hello_is_variant_zero_and_stable() {
        // A v1 host must be able to read any future agent's hello: variant 0,
        // then version, then agent_version. Pin the exact bytes.
        let f = Frame::new(
            0,
            GuestMsg::Hello(GuestHello {
                version: 9,
                agent_version: "x".into(),
                agent_start_ms: 1,
                ready_ms: 2,
                now_ms: 3,
            }),
        );
        let bytes = encode_frame(&f).unwrap();
        assert_eq!(&bytes[4..], &[0, 0, 9, 1, b'x', 1, 2, 3]);
        let h = encode_frame(&Frame::new(0, HostMsg::Hello(HostHello { version: 1 }))).unwrap();
        assert_eq!(&h[4..], &[0, 0, 1]);
    }

    #[test]
    fn split_and_batched_frames() {
        let frames: Vec<_> = (0..50u32)
            .map(|i| Frame::new(i, GuestMsg::Stdout(Bytes(vec![i as u8; i as usize * 3]))))
            .collect();
        let mut all = Vec::new();
        for f in &frames {
            all.extend(encode_frame(f).unwrap());
        }
        // Feed one byte at a time, then in odd-sized chunks.
        for chunk in [1usize, 7, 4096] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for c in all.chunks(chunk) {
                d.push(c);
                while let Some(f) = d.next_frame::<GuestMsg>().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn truncated_frame_waits_for_more() {
        let bytes = encode_frame(&Frame::new(3, HostMsg::Ping { nonce: 99 })).unwrap();
        let mut d = Decoder::new();
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_frame::<HostMsg>().unwrap(), None);
        d.push(&bytes[bytes.len() - 1..]);
        assert_eq!(
            d.next_frame::<HostMsg>().unwrap(),
            Some(Frame::new(3, HostMsg::Ping { nonce: 99 }))
        );
        // Header itself split.
        let mut d = Decoder::new();
        d.push(&bytes[..2]);
        assert_eq!(d.next_frame::<HostMsg>().unwrap(), None);
    }

    #[test]
    fn oversized_header_is_rejected_before_buffering() {
        let mut d = Decoder::new();
        d.push(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
        assert!(matches!(
            d.next_payload(),
            Err(CodecError::FrameTooLarge { .. })
        ));
        let mut d = Decoder::with_limit(16);
        d.push(&17u32.to_le_bytes());
        assert!(matches!(
            d.next_payload(),
            Err(CodecError::FrameTooLarge { len: 17, max: 16 })
        ));
    }

    #[test]
    fn oversized_message_is_refused_on_encode() {
        let big = Frame::new(1, GuestMsg::Stdout(Bytes(vec![0; MAX_FRAME_LEN + 1])));
        assert!(matches!(
            encode_frame(&big),
            Err(CodecError::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_payload_is_an_error_not_a_panic() {
        for payload in [
            vec![],
            vec![0xff],
            vec![2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            vec![0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ] {
            let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
            bytes.extend(&payload);
            let mut d = Decoder::new();
            d.push(&bytes);
            assert!(d.next_frame::<GuestMsg>().is_err(), "{payload:?}");
        }
        // Trailing bytes after a valid message are refused.
        let mut ok = encode_frame(&Frame::new(1, HostMsg::Eof)).unwrap();
        ok.push(0);
        let len = (ok.len() - 4) as u32;
        ok[..4].copy_from_slice(&len.to_le_bytes());
        let mut d = Decoder::new();
        d.push(&ok);
        assert!(d.next_frame::<HostMsg>().is_err());
    }
}
