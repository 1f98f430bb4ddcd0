//! What a host (or a supervisor client) can send: any bytes, split any way,
//! into a default-limit decoder decoding `HostMsg` frames (the agent's side)
//! and `ClientMsg` frames (the supervisor's side).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_proto::supervisor::ClientMsg;
use smolvm_proto::HostMsg;
use smolvm_proto_fuzz::{check_stream, split_input};

fuzz_target!(|data: &[u8]| {
    let (splits, wire) = split_input(data);
    check_stream::<HostMsg>(wire, &splits, None);
    check_stream::<ClientMsg>(wire, &splits, None);
});
