//! Fuzzes every decoder of what a remote peer sends on a forward stream: the request frame (the
//! opener's first bytes), the reply frame (the answerer's), datagram frames and chunk headers,
//! all driven by `warren_forward::decode_everything`, which the corpus test replays too.
//! Run: `simulations/fuzz.sh` (cargo-fuzz; on stable through RUSTC_BOOTSTRAP=1); it seeds the
//! corpus from ../tests/corpus and copies the minimised corpus back there.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren_forward::decode_everything(data));
