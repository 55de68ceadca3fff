//! Fuzzes the decoder of forward request frames: the bytes a remote peer sends first.
//! Run: `cargo +nightly fuzz run request_decoder` in protocols/forward (needs cargo-fuzz);
//! copy interesting inputs into ../tests/corpus so the regular tests replay them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren_forward::Request::decode(data);
    let _ = futures::executor::block_on(warren_forward::read_request(&mut &data[..]));
    let _ = warren_forward::Reply::decode(data);
});
