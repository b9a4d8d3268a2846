//! The vendored sled's two leaf changes (`vendor/sled/PATCHES.md`): leaves of big values
//! merge only once small, and a page whose base is a blob takes up to 40 deltas before it
//! is rewritten. Both change when sled writes what, never what a read returns: this holds
//! sled to a plain map through fills, deletes in and out of key order, and reopens (which
//! page in every leaf from its blob and its chain of deltas).

mod common;

use std::collections::BTreeMap;

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

fn value(id: u64, round: u64) -> Vec<u8> {
    // 20-60 KiB: a leaf of them is a blob, and one to three of them are over 16 KiB.
    let len = 20 * 1024 + (id * 7919 % 40) as usize * 1024;
    let mut v = vec![(id ^ round) as u8; len];
    v[..8].copy_from_slice(&id.to_be_bytes());
    v
}

fn assert_same(db: &sled::Db, model: &BTreeMap<u64, Vec<u8>>, when: &str) {
    let got: Vec<(u64, sled::IVec)> = db
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (u64::from_be_bytes(k.as_ref().try_into().unwrap()), v)
        })
        .collect();
    assert_eq!(got.len(), model.len(), "{when}: key count");
    for ((k, v), (mk, mv)) in got.iter().zip(model) {
        assert_eq!(k, mk, "{when}: keys differ");
        assert!(
            v.as_ref() == mv.as_slice(),
            "{when}: value of key {k} differs"
        );
    }
}

#[test]
fn leaves_of_big_values_read_back_through_drains_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut model = BTreeMap::new();
    let mut db = common::bare_sled(dir.path());
    let mut next = 0u64;
    for round in 0..6u64 {
        for _ in 0..60 {
            let mut batch = sled::Batch::default();
            for _ in 0..rng.gen_range(1..4) {
                let v = value(next, round);
                batch.insert(&next.to_be_bytes(), v.clone());
                model.insert(next, v);
                next += 1;
            }
            db.apply_batch(batch).unwrap();
        }
        // Drain most of it: in key order (as the spool settles chunks) on even rounds,
        // at random on odd ones, a few keys per batch as settle writes do.
        let mut keys: Vec<u64> = model.keys().copied().collect();
        if round % 2 == 1 {
            keys.shuffle(&mut rng);
        }
        keys.truncate(keys.len() * 4 / 5);
        for group in keys.chunks(3) {
            let mut batch = sled::Batch::default();
            for k in group {
                batch.remove(&k.to_be_bytes());
                model.remove(k);
            }
            db.apply_batch(batch).unwrap();
        }
        assert_same(&db, &model, &format!("round {round}, before reopen"));
        db.flush().unwrap();
        drop(db);
        db = common::bare_sled(dir.path());
        assert_same(&db, &model, &format!("round {round}, after reopen"));
    }
}
