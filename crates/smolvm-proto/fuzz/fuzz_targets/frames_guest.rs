//! What a guest can send the host: any bytes, split any way, into the
//! supervisor's decoder (256 KiB frame limit) decoding `GuestMsg` frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm_proto::GuestMsg;
use smolvm_proto_fuzz::{check_stream, split_input};

fuzz_target!(|data: &[u8]| {
    let (splits, wire) = split_input(data);
    check_stream::<GuestMsg>(wire, &splits, Some(256 * 1024));
});
