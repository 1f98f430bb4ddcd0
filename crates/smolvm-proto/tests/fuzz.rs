//! Property tests: whatever bytes a hostile peer sends, decoding never
//! panics and never buffers past the frame limit; every message survives a
//! round trip however the stream is split.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use proptest::prelude::*;
use smolvm_proto::supervisor::{ClientMsg, SupervisorMsg};
use smolvm_proto::*;

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes)
}

fn arb_host() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        any::<u32>().prop_map(|version| HostMsg::Hello(HostHello { version })),
        any::<u64>().prop_map(|nonce| HostMsg::Ping { nonce }),
        (
            proptest::collection::vec(".{0,16}", 0..4),
            ".{0,32}",
            proptest::collection::vec((".{0,8}", ".{0,8}"), 0..3),
            proptest::option::of(".{0,16}"),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(argv, sh, env, workdir, timeout_ms, stdin, use_argv)| {
                HostMsg::Exec(ExecRequest {
                    command: if use_argv {
                        Command::Argv(argv)
                    } else {
                        Command::Shell(sh)
                    },
                    env,
                    workdir,
                    timeout_ms,
                    stdin,
                })
            }),
        arb_bytes().prop_map(HostMsg::Stdin),
        Just(HostMsg::Eof),
        any::<i32>().prop_map(|signal| HostMsg::Signal { signal }),
        Just(HostMsg::Shutdown),
    ]
}

fn arb_guest() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        (
            any::<u32>(),
            ".{0,16}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(v, s, a, b, c)| {
                GuestMsg::Hello(GuestHello {
                    version: v,
                    agent_version: s,
                    agent_start_ms: a,
                    ready_ms: b,
                    now_ms: c,
                })
            }),
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
        ".{0,64}".prop_map(|m| GuestMsg::Error(ErrorInfo::new(ErrorKind::Other, m))),
        Just(GuestMsg::ShutdownAck),
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
