//! The v2 chunk codec (`spool::chunk`) against damage it must isolate.
//!
//! Structure-aware: the input builds 1–12 records (metadata of every kind, payloads of any
//! bytes), encodes them as one chunk, and checks the untouched chunk round-trips exactly.
//! Then it applies up to 6 mutations (flip bits of a byte, truncate, insert bytes) and,
//! tracking where each byte came from, asserts:
//! - decoding never panics;
//! - while the header's bytes are untouched the chunk decodes, and every record whose own
//!   bytes are untouched decodes to exactly its original, by `decode_chunk` and
//!   `decode_record` alike (damage elsewhere never spreads);
//! - a record that decodes Ok is byte-identical to the original at its index unless the
//!   mutations hit it or the header (a CRC forged by the fuzzer is allowed, nothing else).
//!
//! The input's leftover bytes go to `SettleBitmap::decode`: it fails or re-encodes exactly.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use spool::chunk::{decode_chunk, decode_header, decode_record, encode_chunk, RecordBody};
use spool::chunk::{ReadError, SettleBitmap};
use spool::{Meta, MetaValue};

const KEYS: [&str; 4] = ["tenant", "topic", "", "k"];

fn meta_value(u: &mut Unstructured) -> Result<MetaValue> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => MetaValue::Null,
        1 => MetaValue::Bool(u.arbitrary()?),
        2 => MetaValue::Int(u.arbitrary()?),
        3 => {
            let f: f64 = u.arbitrary()?;
            MetaValue::Float(if f.is_nan() { 0.5 } else { f })
        }
        4 => MetaValue::Str(u.arbitrary()?),
        _ => MetaValue::Json(u.arbitrary()?),
    })
}

fn record(u: &mut Unstructured) -> Result<RecordBody> {
    let mut meta = Meta::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        let key = match u.int_in_range(0..=4usize)? {
            4 => u.arbitrary()?,
            i => KEYS[i].to_string(),
        };
        meta.insert(key, meta_value(u)?);
    }
    let len = u.int_in_range(0..=200usize)?;
    let payload = u.bytes(len.min(u.len()))?.to_vec();
    Ok(RecordBody { meta, payload })
}

/// Applies the mutations; `origin[p]` is `Some(q)` while byte `p` is original byte `q`
/// unchanged, `None` once it was flipped or inserted.
fn mutate(
    u: &mut Unstructured,
    value: &mut Vec<u8>,
    origin: &mut Vec<Option<usize>>,
) -> Result<()> {
    for _ in 0..u.int_in_range(0..=6u8)? {
        match u.int_in_range(0..=2u8)? {
            0 if !value.is_empty() => {
                let at = u.choose_index(value.len())?;
                value[at] ^= u.int_in_range(1..=255u8)?;
                origin[at] = None;
            }
            1 => {
                let len = u.int_in_range(0..=value.len())?;
                value.truncate(len);
                origin.truncate(len);
            }
            _ => {
                let at = u.int_in_range(0..=value.len())?;
                let n = u.int_in_range(1..=8usize)?;
                let bytes = u.bytes(n.min(u.len()))?.to_vec();
                origin.splice(at..at, std::iter::repeat_n(None, bytes.len()));
                value.splice(at..at, bytes);
            }
        }
    }
    Ok(())
}

fn untouched(origin: &[Option<usize>], range: std::ops::Range<usize>) -> bool {
    origin
        .get(range.clone())
        .is_some_and(|o| o.iter().zip(range).all(|(got, want)| *got == Some(want)))
}

fn run(u: &mut Unstructured) -> Result<()> {
    let n = u.int_in_range(1..=12usize)?;
    let records = (0..n).map(|_| record(u)).collect::<Result<Vec<_>>>()?;
    let first_id = u.int_in_range(0..=1u64 << 62)?;
    let refs: Vec<_> = records.iter().map(RecordBody::as_ref).collect();
    let chunk = encode_chunk(first_id, u.arbitrary()?, &refs).expect("a valid group encodes");
    let header = &chunk.header;

    let clean = decode_chunk(&chunk.value).expect("an unmutated chunk decodes");
    assert_eq!(&clean.header, header);
    assert_eq!(clean.trailing_bytes, 0);
    assert_eq!(decode_header(chunk.head()).as_ref(), Ok(header));
    for (i, got) in clean.records.iter().enumerate() {
        assert_eq!(got.as_ref(), Ok(&records[i]), "clean record {i}");
    }

    let mut value = chunk.value.clone();
    let mut origin: Vec<Option<usize>> = (0..value.len()).map(Some).collect();
    mutate(u, &mut value, &mut origin)?;
    let header_whole = untouched(&origin, 0..header.encoded_len());
    match decode_chunk(&value) {
        Err(e) => assert!(!header_whole, "untouched header failed: {e}"),
        Ok(decoded) => {
            for (i, got) in decoded.records.iter().enumerate() {
                let whole = header_whole && untouched(&origin, header.record_range(i).unwrap());
                if whole {
                    assert_eq!(got.as_ref(), Ok(&records[i]), "untouched record {i}");
                }
                // A hit record may still decode if the fuzzer forged its CRC: allowed.
                let single = decode_record(&value, i);
                match (&single, got) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "record {i}: the two decoders disagree"),
                    (Err(ReadError::Record(a)), Err(b)) => assert_eq!(a, b),
                    _ => panic!("record {i}: decode_record {single:?} vs decode_chunk {got:?}"),
                }
            }
        }
    }

    let rest = u.bytes(u.len())?;
    if let Ok(map) = SettleBitmap::decode(rest, header.count) {
        assert_eq!(map.encode(), rest);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
