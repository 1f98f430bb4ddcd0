//! The checks behind the fuzz targets, and the seed corpus.
//!
//! Properties, for any input:
//! - decoding never panics;
//! - a decoder never holds more than one partial frame (header + limit)
//!   plus the bytes of the last push, and accounts for every byte pushed;
//! - `next_frame` is exactly `decode_payload(next_payload)`;
//! - every frame that decodes re-encodes (never longer than what was read)
//!   to bytes that decode to the same value, and that encoding is a fixed
//!   point;
//! - the helpers a receiver runs on decoded messages (`is_terminal`,
//!   `credit_cost`, `ErrorInfo::bounded`, ...) do not panic either.

use serde::{de::DeserializeOwned, Serialize};
use smolvm_proto::supervisor::{ClientMsg, ControlResponse, SupervisorMsg};
use smolvm_proto::*;
use std::collections::BTreeSet;
use std::fmt::Debug;

/// Largest chunk sizes `split_input` can choose from; the last one pushes
/// everything at once.
const MAX_CHUNKS: [usize; 8] = [1, 2, 3, 7, 64, 1024, 65536, usize::MAX];

/// The split byte of a seed that pushes everything in one chunk.
pub const SPLIT_WHOLE: u8 = 7;

/// Splits a fuzz input into the chunk sizes to push and the wire bytes.
/// The first two bytes choose the split, the rest is the wire (so a
/// mutation of the rest is a mutation of the wire bytes themselves): byte
/// 0's low 3 bits pick the largest chunk from [`MAX_CHUNKS`], and both
/// bytes seed the sizes, each between 1 and that largest.
pub fn split_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    if data.len() < 2 {
        return (Vec::new(), &[]);
    }
    let wire = &data[2..];
    let largest = MAX_CHUNKS[usize::from(data[0] & 7)];
    let mut state = (u32::from(data[0]) << 8 | u32::from(data[1])) ^ 0x9e37_79b9;
    let mut splits = Vec::new();
    let mut left = wire.len();
    while left > 0 {
        let n = if largest == usize::MAX {
            left
        } else {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            1 + (state as usize) % largest
        };
        let n = n.min(left);
        splits.push(n);
        left -= n;
    }
    (splits, wire)
}

/// Pushes `wire` into a decoder in `splits`-sized chunks and checks every
/// property above along the way. `limit`: `Decoder::with_limit`, or the
/// protocol's when `None`.
pub fn check_stream<M>(wire: &[u8], splits: &[usize], limit: Option<usize>)
where
    M: Serialize + DeserializeOwned + PartialEq + Debug + Inspect,
{
    let decoder = || match limit {
        Some(l) => Decoder::with_limit(l),
        None => Decoder::new(),
    };
    let max = limit.map_or(MAX_FRAME_LEN, |l| l.min(MAX_FRAME_LEN));
    // The same stream twice: through `next_frame` (what peers call) and
    // through `next_payload` (to account for each byte).
    let mut framed = decoder();
    let mut raw = decoder();
    let (mut pushed, mut taken) = (0usize, 0usize);
    let mut rest = wire;
    for &n in splits {
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        framed.push(chunk);
        raw.push(chunk);
        pushed += chunk.len();
        assert!(
            framed.pending() < HEADER_LEN + max + chunk.len(),
            "holds {} bytes after a {}-byte push (limit {max})",
            framed.pending(),
            chunk.len()
        );
        assert_eq!(pushed, taken + raw.pending(), "bytes lost or invented");
        loop {
            let frame = framed.next_frame::<M>();
            match (frame, raw.next_payload()) {
                (Ok(None), Ok(None)) => break,
                (Err(e), Err(e2)) => {
                    assert_eq!(e, e2);
                    assert!(
                        matches!(e, CodecError::FrameTooLarge { len, max: m } if len > m && m == max),
                        "unexpected stream error {e:?}"
                    );
                    // A peer drops the connection here; go on as a new one.
                    framed.reset();
                    raw.reset();
                    taken = pushed;
                    break;
                }
                (frame, Ok(Some(p))) => {
                    assert!(
                        p.len() <= max,
                        "a {}-byte payload past the limit {max}",
                        p.len()
                    );
                    taken += HEADER_LEN + p.len();
                    let decoded = decode_payload::<M>(&p);
                    if let Ok(f) = &decoded {
                        check_round_trip(f, p.len());
                    }
                    assert_eq!(
                        frame,
                        decoded.map(Some),
                        "next_frame != decode_payload(next_payload)"
                    );
                }
                (frame, payload) => {
                    panic!("next_frame and next_payload disagree: {frame:?} / {payload:?}")
                }
            }
        }
        // Drained: at most one partial frame is left.
        assert!(
            framed.pending() < HEADER_LEN + max,
            "holds {} bytes (limit {max})",
            framed.pending()
        );
        assert_eq!(framed.pending(), raw.pending());
        assert_eq!(pushed, taken + raw.pending(), "bytes lost or invented");
    }
}

/// A decoded frame re-encodes, never longer than the `read` bytes it came
/// from, to bytes that decode to it again and re-encode to themselves.
pub fn check_round_trip<M>(f: &Frame<M>, read: usize)
where
    M: Serialize + DeserializeOwned + PartialEq + Debug + Inspect,
{
    let bytes =
        encode_frame(f).unwrap_or_else(|e| panic!("{f:?} decoded but does not encode: {e}"));
    assert!(
        bytes.len() - HEADER_LEN <= read,
        "{f:?}: read from {read} bytes, re-encodes to {}",
        bytes.len() - HEADER_LEN
    );
    let back = decode_payload::<M>(&bytes[HEADER_LEN..])
        .unwrap_or_else(|e| panic!("{f:?} re-encodes to bytes that do not decode: {e}"));
    assert_eq!(&back, f, "re-encoding changed the value");
    assert_eq!(
        encode_frame(&back).unwrap(),
        bytes,
        "the encoding is not a fixed point"
    );
    f.msg.inspect();
}

/// Decodes one payload as each message type (see the targets).
pub fn check_payload(data: &[u8]) {
    fn one<M>(data: &[u8])
    where
        M: Serialize + DeserializeOwned + PartialEq + Debug + Inspect,
    {
        match decode_payload::<M>(data) {
            Ok(f) => check_round_trip(&f, data.len()),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    one::<HostMsg>(data);
    one::<GuestMsg>(data);
    one::<ClientMsg>(data);
    one::<SupervisorMsg>(data);
}

/// What a receiver computes from a decoded message, run so that a panic in
/// it shows up here.
pub trait Inspect {
    fn inspect(&self);
}

impl Inspect for HostMsg {
    fn inspect(&self) {}
}

impl Inspect for GuestMsg {
    fn inspect(&self) {
        let _ = self.is_terminal();
        let _ = self.credit_cost();
        match self {
            GuestMsg::Error(e) => {
                let b = e.clone().bounded();
                assert!(b.message.len() <= MAX_ERROR_MESSAGE);
                if e.message.len() <= MAX_ERROR_MESSAGE {
                    assert_eq!(&b, e);
                } else {
                    assert!(b.message.ends_with("..."));
                    assert!(e.message.starts_with(&b.message[..b.message.len() - 3]));
                }
            }
            GuestMsg::Entries(es) => {
                for e in es {
                    let _ = e.wire_cost();
                }
            }
            _ => {}
        }
    }
}

impl Inspect for ClientMsg {
    fn inspect(&self) {
        if let ClientMsg::Agent(m) = self {
            m.inspect();
        }
    }
}

impl Inspect for SupervisorMsg {
    fn inspect(&self) {
        match self {
            SupervisorMsg::Agent(m) => m.inspect(),
            SupervisorMsg::Control(ControlResponse::Error(e)) => {
                let _ = e.to_string();
                let _ = e.clone().with_console(e.console_tail.clone());
            }
            _ => {}
        }
    }
}

/// Every value of `M` that a few leading variant indices followed by zeros
/// decode to: so every variant, and every variant of the enums nested in
/// its first fields (`HostMsg::Op(OpRequest::…)`,
/// `SupervisorMsg::Control(ControlResponse::Error(kind …))`), without a list
/// to keep up to date.
pub fn every_variant<M>() -> Vec<M>
where
    M: Serialize + DeserializeOwned,
{
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for a in 0u8..24 {
        for b in 0u8..16 {
            for c in 0u8..16 {
                let mut buf = vec![a, b, c];
                buf.extend([0u8; 64]);
                if let Ok((m, _)) = postcard::take_from_bytes::<M>(&buf) {
                    if seen.insert(postcard::to_stdvec(&m).unwrap()) {
                        out.push(m);
                    }
                }
            }
        }
    }
    out
}

/// Values with real contents, next to the zero-filled ones.
pub fn rich_host() -> Vec<HostMsg> {
    vec![
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
        HostMsg::Exec(ExecRequest {
            command: Command::Argv(vec!["ls".into(), "-l".into(), "/é".into()]),
            env: vec![("PATH".into(), "/bin:/usr/bin".into())],
            workdir: Some("/tmp".into()),
            timeout_ms: Some(30_000),
            stdin: true,
            pty: None,
        }),
        HostMsg::Exec(ExecRequest {
            command: Command::Shell("echo hi | cat".into()),
            env: vec![],
            workdir: None,
            timeout_ms: None,
            stdin: false,
            pty: None,
        }),
        HostMsg::Data(Bytes((0..=255).collect())),
        HostMsg::Credit {
            bytes: STREAM_WINDOW,
        },
        HostMsg::Signal { signal: -9 },
        HostMsg::ReadFile(ReadFileRequest {
            path: "/etc/hosts".into(),
        }),
        HostMsg::WriteFile(WriteFileRequest {
            path: "/tmp/out.bin".into(),
            mode: 0o644,
            mtime_ns: Some(-1_700_000_000_000_000_000),
            make_dirs: true,
        }),
        HostMsg::Op(OpRequest::SetAttrs {
            path: "/f".into(),
            mode: Some(0o7777),
            mtime_ns: Some(i64::MIN),
        }),
        HostMsg::Op(OpRequest::PortOpen { port: u16::MAX }),
    ]
}

/// Values with real contents, next to the zero-filled ones.
pub fn rich_guest() -> Vec<GuestMsg> {
    let stat = |kind, target: Option<&str>| FileStat {
        kind,
        size: u64::MAX,
        mode: 0o755,
        mtime_ns: -1,
        link_target: target.map(Into::into),
    };
    vec![
        GuestMsg::Hello(GuestHello {
            version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            agent_start_ms: 1200,
            ready_ms: 1210,
            now_ms: 1300,
        }),
        GuestMsg::Stdout(Bytes(b"hello\n".to_vec())),
        GuestMsg::Stderr(Bytes(vec![0xff; 300])),
        GuestMsg::Exited(ExitStatus {
            code: Some(-1),
            signal: Some(9),
            timed_out: true,
            duration_ms: u64::MAX,
        }),
        GuestMsg::Error(ErrorInfo::new(ErrorKind::FlowControl, "é".repeat(100))),
        GuestMsg::FileStart(stat(FileKind::File, None)),
        GuestMsg::FileData(Bytes(vec![0; 1000])),
        GuestMsg::Entries(vec![
            DirEntry {
                name: "link".into(),
                stat: stat(FileKind::Symlink, Some("../target")),
            },
            DirEntry {
                name: "dir".into(),
                stat: stat(FileKind::Dir, None),
            },
        ]),
        GuestMsg::Op(OpReply::Stat(stat(FileKind::Other, None))),
        GuestMsg::Done { bytes: 1 << 40 },
    ]
}

fn frames<M: Serialize>(msgs: Vec<M>, is_hello: impl Fn(&M) -> bool) -> Vec<Vec<u8>> {
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let stream = if is_hello(&m) {
                CONTROL_STREAM
            } else {
                u32::try_from(i % 300).unwrap() + 1
            };
            encode_frame(&Frame::new(stream, m)).unwrap()
        })
        .collect()
}

/// The seed corpus: (target, file name, contents).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let host = {
        let mut v = every_variant::<HostMsg>();
        v.extend(rich_host());
        frames(v, |m| matches!(m, HostMsg::Hello(_)))
    };
    let guest = {
        let mut v = every_variant::<GuestMsg>();
        v.extend(rich_guest());
        frames(v, |m| matches!(m, GuestMsg::Hello(_)))
    };
    let client = {
        let mut v = every_variant::<ClientMsg>();
        v.extend(rich_host().into_iter().map(ClientMsg::Agent));
        frames(v, |m| matches!(m, ClientMsg::Hello { .. }))
    };
    let supervisor = {
        let mut v = every_variant::<SupervisorMsg>();
        v.extend(rich_guest().into_iter().map(SupervisorMsg::Agent));
        frames(v, |m| matches!(m, SupervisorMsg::Hello { .. }))
    };

    let mut out = Vec::new();
    // A frame target's input: split bytes, then the wire.
    let mut framed = |target: &'static str, name: &str, list: &[Vec<u8>]| {
        for (i, f) in list.iter().enumerate() {
            let mut input = vec![SPLIT_WHOLE, 0];
            input.extend(f);
            out.push((target, format!("seed-{name}-{i:03}"), input));
        }
        // Runs of them back to back (up to 2 KiB, so the fuzzer's inputs
        // stay small and fast), in 1..=7 or 1..=64 byte pieces.
        let mut input = Vec::new();
        let mut runs = 0usize;
        for f in list {
            if input.is_empty() {
                input = vec![[3, 4][runs % 2], 0x5a];
            }
            input.extend(f);
            if input.len() >= 2048 {
                out.push((
                    target,
                    format!("seed-{name}-run-{runs:03}"),
                    std::mem::take(&mut input),
                ));
                runs += 1;
            }
        }
        if !input.is_empty() {
            out.push((target, format!("seed-{name}-run-{runs:03}"), input));
        }
    };
    framed("frames_guest", "guest", &guest);
    framed("frames_host", "host", &host);
    framed("frames_host", "client", &client);
    for (name, list) in [
        ("host", &host),
        ("guest", &guest),
        ("client", &client),
        ("supervisor", &supervisor),
    ] {
        for (i, f) in list.iter().enumerate() {
            out.push((
                "messages",
                format!("seed-{name}-{i:03}"),
                f[HEADER_LEN..].to_vec(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds pass the targets' own checks, and cover every variant.
    #[test]
    fn seeds_pass_the_checks() {
        for (target, name, input) in seeds() {
            match target {
                "frames_guest" => {
                    let (s, w) = split_input(&input);
                    check_stream::<GuestMsg>(w, &s, Some(256 * 1024));
                }
                "frames_host" => {
                    let (s, w) = split_input(&input);
                    check_stream::<HostMsg>(w, &s, None);
                    check_stream::<ClientMsg>(w, &s, None);
                }
                "messages" => check_payload(&input),
                _ => unreachable!("{name}"),
            }
        }
        // Every top-level variant is among the seeds (a new one is found
        // without touching this crate).
        let host: std::collections::HashSet<_> = every_variant::<HostMsg>()
            .iter()
            .map(std::mem::discriminant)
            .collect();
        assert!(host.len() >= 12, "{}", host.len());
        let guest: std::collections::HashSet<_> = every_variant::<GuestMsg>()
            .iter()
            .map(std::mem::discriminant)
            .collect();
        assert!(guest.len() >= 14, "{}", guest.len());
    }

    #[test]
    fn splits_cover_the_wire() {
        for a in 0..=255u8 {
            let mut input = vec![a, a.wrapping_mul(31)];
            input.extend([1u8; 500]);
            let (s, w) = split_input(&input);
            assert_eq!(s.iter().sum::<usize>(), w.len());
            assert!(s.iter().all(|&n| n > 0));
        }
    }
}
