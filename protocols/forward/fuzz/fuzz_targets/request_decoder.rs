//! Fuzzes every decoder of what a remote peer sends on a forward stream: the request frame (the
//! opener's first bytes), the reply frame (the answerer's), datagram frames and chunk headers.
//! Run: `simulations/fuzz.sh` (cargo-fuzz; on stable through RUSTC_BOOTSTRAP=1); it seeds the
//! corpus from ../tests/corpus and copies the minimised corpus back there, so the regular tests
//! replay it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren_forward::Request::decode(data);
    let _ = warren_forward::Reply::decode(data);
    let _ = futures::executor::block_on(warren_forward::read_request(&mut &data[..]));
    let _ = futures::executor::block_on(warren_forward::read_reply(&mut &data[..]));
    let mut buf = vec![0u8; warren_forward::MAX_DATAGRAM];
    let mut rest = data;
    while let Ok(Some(_)) = futures::executor::block_on(warren_forward::read_datagram(&mut rest, &mut buf)) {}
    if let Some(header) = data.get(..warren_forward::CHUNK_HEADER) {
        let _ = warren_forward::Chunk::decode(header.try_into().unwrap());
    }
});
