//! Fuzzes every decoder of what a peer sends in a birthday punch: message bodies, length-prefixed
//! frames and UDP probes, all driven by `warren_punch::decode_everything`, which the corpus test
//! replays too. Run: `simulations/fuzz.sh punch` (cargo-fuzz; on stable through
//! RUSTC_BOOTSTRAP=1); it seeds the corpus from ../tests/corpus and copies the minimised corpus
//! back there.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren_punch::decode_everything(data));
