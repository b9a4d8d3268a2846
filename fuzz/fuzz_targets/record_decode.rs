//! Arbitrary bytes as a spool record: decoding must fail cleanly or round-trip, never
//! panic, and never allocate beyond the input (the decoder's byte limit).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool::record::{decode, encode};
use spool::{Message, QuarantineEntry};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<Message>(data) {
        assert_eq!(decode::<Message>(&encode(&msg)).ok(), Some(msg));
    }
    let _ = decode::<QuarantineEntry>(data);
    // The same bytes behind a valid header, so the body decoder is reached every time.
    let mut framed = encode(&());
    framed.truncate(1);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[1]);
    hasher.update(data);
    framed.extend_from_slice(&hasher.finalize().to_le_bytes());
    framed.extend_from_slice(data);
    let _ = decode::<Message>(&framed);
});
