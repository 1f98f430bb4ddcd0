//! One payload (no header), decoded as each message type: never a panic,
//! and whatever decodes re-encodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smolvm_proto_fuzz::check_payload(data);
});
