//! The v2 chunk codec on its own: round trips, the cutter's budget, and corruption that
//! must fail exactly the part it hit (design: "a record whose own CRC fails quarantines
//! only itself"; a damaged header quarantines the chunk).

use proptest::prelude::*;
use spool::chunk::{
    cut, decode_chunk, decode_header, decode_record, encode_chunk, encode_group, encode_header,
    BitmapError, ChunkError, ReadError, RecordBody, RecordFault, SettleBitmap, CHUNK_TARGET_BYTES,
};
use spool::{Meta, MetaValue};

fn body(meta_n: i64, payload: Vec<u8>) -> RecordBody {
    let mut meta = Meta::new();
    meta.insert("n".into(), MetaValue::Int(meta_n));
    meta.insert("tenant".into(), MetaValue::Str("acme".into()));
    RecordBody { meta, payload }
}

fn sample(n: usize) -> Vec<RecordBody> {
    (0..n)
        .map(|i| body(i as i64, format!("message {i}").into_bytes()))
        .collect()
}

fn meta_value() -> impl Strategy<Value = MetaValue> {
    prop_oneof![
        Just(MetaValue::Null),
        any::<bool>().prop_map(MetaValue::Bool),
        any::<i64>().prop_map(MetaValue::Int),
        any::<f64>()
            .prop_filter("NaN never equals itself", |f| !f.is_nan())
            .prop_map(MetaValue::Float),
        ".{0,12}".prop_map(MetaValue::Str),
        ".{0,12}".prop_map(MetaValue::Json),
    ]
}

fn record() -> impl Strategy<Value = RecordBody> {
    (
        prop::collection::btree_map(".{0,8}", meta_value(), 0..4),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(meta, payload)| RecordBody { meta, payload })
}

fn refs(records: &[RecordBody]) -> Vec<spool::chunk::RecordRef<'_>> {
    records.iter().map(RecordBody::as_ref).collect()
}

proptest! {
    #[test]
    fn chunk_header_and_each_record_round_trip(
        records in prop::collection::vec(record(), 1..40),
        first_id in 0u64..1 << 62,
        created_ms: u64,
    ) {
        let chunk = encode_chunk(first_id, created_ms, &refs(&records)).unwrap();
        prop_assert_eq!(chunk.head().to_vec(), encode_header(&chunk.header));
        prop_assert_eq!(decode_header(chunk.head()).unwrap(), chunk.header.clone());
        prop_assert_eq!(chunk.header.first_id, first_id);
        prop_assert_eq!(chunk.header.created_ms, created_ms);
        prop_assert_eq!(usize::from(chunk.header.count), records.len());
        let decoded = decode_chunk(&chunk.value).unwrap();
        prop_assert_eq!(decoded.trailing_bytes, 0);
        prop_assert_eq!(&decoded.header, &chunk.header);
        for (i, original) in records.iter().enumerate() {
            prop_assert_eq!(decoded.records[i].as_ref().unwrap(), original);
            prop_assert_eq!(&decode_record(&chunk.value, i).unwrap(), original);
        }
    }

    #[test]
    fn a_group_is_cut_within_budget_with_consecutive_ids(
        records in prop::collection::vec(record(), 1..200),
        budget in 64usize..8192,
    ) {
        let chunks = encode_group(1000, 7, &refs(&records), budget).unwrap();
        let mut next = 0usize;
        for chunk in &chunks {
            prop_assert_eq!(chunk.header.first_id, 1000 + next as u64);
            let n = usize::from(chunk.header.count);
            prop_assert!(chunk.value.len() <= budget || n == 1,
                "a chunk of {} records is {} bytes, over {}", n, chunk.value.len(), budget);
            for (i, got) in decode_chunk(&chunk.value).unwrap().records.into_iter().enumerate() {
                prop_assert_eq!(&got.unwrap(), &records[next + i]);
            }
            next += n;
        }
        prop_assert_eq!(next, records.len());
        // Greedy: no chunk could have taken the next chunk's first record within budget.
        for pair in chunks.windows(2) {
            let first_next = pair[1].header.record_range(0).unwrap().len();
            // Each record adds its two header sizes (8 bytes) besides its framed body.
            prop_assert!(pair[0].value.len() + 8 + first_next > budget);
        }
    }

    #[test]
    fn bitmaps_round_trip(len in 1u16..2000, picks in prop::collection::vec(any::<prop::sample::Index>(), 0..300)) {
        let mut map = SettleBitmap::new(len);
        let mut set = std::collections::BTreeSet::new();
        for pick in picks {
            let i = pick.index(usize::from(len));
            prop_assert_eq!(map.set(i), set.insert(i));
        }
        prop_assert_eq!(usize::from(map.count()), set.len());
        prop_assert_eq!(map.all_settled(), set.len() == usize::from(len));
        let back = SettleBitmap::decode(&map.encode(), len).unwrap();
        for i in 0..usize::from(len) {
            prop_assert_eq!(back.test(i), set.contains(&i));
        }
        prop_assert_eq!(back, map);
    }
}

#[test]
fn flipping_any_record_byte_fails_exactly_that_record() {
    let records = sample(5);
    let chunk = encode_chunk(500, 1, &refs(&records)).unwrap();
    for victim in 0..records.len() {
        let range = chunk.header.record_range(victim).unwrap();
        for at in range.clone() {
            for bit in 0..8 {
                let mut bad = chunk.value.clone();
                bad[at] ^= 1 << bit;
                let decoded = decode_chunk(&bad).unwrap();
                for (i, got) in decoded.records.iter().enumerate() {
                    if i == victim {
                        let err = got.as_ref().expect_err("the damaged record must fail");
                        assert_eq!((err.first_id, err.index, err.offset), (500, i, range.start));
                    } else {
                        assert_eq!(got.as_ref().unwrap(), &records[i], "flip at {at}:{bit}");
                    }
                }
                assert!(matches!(
                    decode_record(&bad, victim),
                    Err(ReadError::Record(_))
                ));
                let other = (victim + 1) % records.len();
                assert_eq!(decode_record(&bad, other).unwrap(), records[other]);
            }
        }
    }
}

#[test]
fn flipping_any_header_byte_fails_the_header() {
    let chunk = encode_chunk(9, 2, &refs(&sample(4))).unwrap();
    for at in 0..chunk.header.encoded_len() {
        for bit in 0..8 {
            let mut bad = chunk.value.clone();
            bad[at] ^= 1 << bit;
            assert!(decode_header(&bad).is_err(), "header flip at {at}:{bit}");
            assert!(decode_chunk(&bad).is_err(), "chunk flip at {at}:{bit}");
            assert!(matches!(decode_record(&bad, 0), Err(ReadError::Chunk(_))));
        }
    }
}

#[test]
fn truncation_at_every_offset_never_yields_a_wrong_record() {
    let records = sample(6);
    let chunk = encode_chunk(1, 1, &refs(&records)).unwrap();
    for len in 0..chunk.value.len() {
        let cut_value = &chunk.value[..len];
        match decode_chunk(cut_value) {
            Err(ChunkError::Truncated { .. }) => assert!(len < chunk.header.encoded_len()),
            Err(other) => panic!("cut at {len}: unexpected {other}"),
            Ok(decoded) => {
                for (i, got) in decoded.records.iter().enumerate() {
                    let whole = chunk.header.record_range(i).unwrap().end <= len;
                    match got {
                        Ok(r) => assert!(whole && r == &records[i], "cut at {len}, record {i}"),
                        Err(e) => assert!(
                            !whole && matches!(e.fault, RecordFault::Truncated { .. }),
                            "cut at {len}, record {i}: {e}"
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn trailing_bytes_are_counted_and_records_still_decode() {
    let records = sample(2);
    let mut value = encode_chunk(1, 1, &refs(&records)).unwrap().value;
    value.extend_from_slice(b"junk");
    let decoded = decode_chunk(&value).unwrap();
    assert_eq!(decoded.trailing_bytes, 4);
    assert_eq!(decoded.records[1].as_ref().unwrap(), &records[1]);
}

#[test]
fn a_message_over_the_budget_gets_a_chunk_of_its_own() {
    let records = vec![
        body(0, vec![1; 100]),
        body(1, vec![2; CHUNK_TARGET_BYTES + 1]),
        body(2, vec![3; 100]),
    ];
    let chunks = encode_group(10, 1, &refs(&records), CHUNK_TARGET_BYTES).unwrap();
    let counts: Vec<u16> = chunks.iter().map(|c| c.header.count).collect();
    assert_eq!(counts, [1, 1, 1]);
    assert_eq!(chunks[1].header.first_id, 11);
    assert!(chunks[1].value.len() > CHUNK_TARGET_BYTES);
    // Small records share a chunk, up to the record cap.
    let one = cut(&[10; 3], CHUNK_TARGET_BYTES);
    assert_eq!((one.len(), &one[0]), (1, &(0..3)));
    assert_eq!(cut(&[0; 70_000], usize::MAX), [0..65_535, 65_535..70_000]);
    assert_eq!(cut(&[], CHUNK_TARGET_BYTES), []);
}

#[test]
fn a_record_index_past_the_chunk_is_an_error() {
    let chunk = encode_chunk(1, 1, &refs(&sample(2))).unwrap();
    let err = decode_record(&chunk.value, 2).unwrap_err();
    assert!(matches!(
        err,
        ReadError::Record(ref e) if e.fault == RecordFault::NoSuchIndex { count: 2 }
    ));
    assert!(
        err.to_string().contains("record 2 (id 3) of chunk 1"),
        "{err}"
    );
}

#[test]
fn a_huge_count_in_a_short_value_is_truncation_not_allocation() {
    let mut head = encode_header(&encode_chunk(1, 1, &refs(&sample(1))).unwrap().header);
    head[5..7].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(
        decode_header(&head),
        Err(ChunkError::Truncated { need, .. }) if need == 23 + 8 * 65_535 + 4
    ));
}

#[test]
fn a_damaged_bitmap_is_an_error_never_a_wrong_bitmap() {
    let mut map = SettleBitmap::new(20);
    map.set(3);
    let raw = map.encode();
    for at in 0..raw.len() {
        for bit in 0..8 {
            let mut bad = raw.clone();
            bad[at] ^= 1 << bit;
            assert!(
                SettleBitmap::decode(&bad, 20).is_err(),
                "flip at {at}:{bit}"
            );
        }
    }
    for len in 0..raw.len() {
        assert!(matches!(
            SettleBitmap::decode(&raw[..len], 20),
            Err(BitmapError::Length { .. })
        ));
    }
    assert_eq!(
        SettleBitmap::decode(&raw, 21),
        Err(BitmapError::Count {
            found: 20,
            expected: 21
        })
    );
}
