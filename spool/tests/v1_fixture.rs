//! A spool written by a v1 build, read back by this one.
//!
//! `tests/fixtures/v1/spool/` is a small spool that the v1 storage format (one sled key per
//! message, record format v1) wrote through its ordinary paths: imports, a retry, a
//! dead-letter, an ack, a record damaged on disk and quarantined at the next open, a queue
//! suspension and the ledger. [`v1_spool_reads_back_exactly`] copies it to a temporary
//! directory (the committed files are never opened in place: an open writes to them) and
//! checks everything a later version must read back from it. When the storage format
//! changes, this is the migration test: its assertions stay, only the open may grow a
//! migration step.
//!
//! [`generate_v1_fixture`] wrote the fixture. Regenerate it only with a build whose spool
//! still writes format v1 (check out such a commit), never with a later one: the point is
//! bytes written by the old code. If it is regenerated, update [`QUARANTINED_AT_MS`] (the
//! generator prints it) and check `du -sh` and `git count-objects -vH` stay small.

mod common;

use std::path::{Path, PathBuf};

use common::all_queued;
use common::dirs::copy_dir;
use spool::{
    keys, Message, MessageId, Meta, MetaValue, NewMessage, QuarantineEntry, Spool, SpoolOptions,
};

/// KumoMTA-style queue names: `campaign:tenant@domain`, with a routing domain, tenant only
/// and domain only.
const CAMPAIGN: &str = "campaign:tenant@example.com";
const ROUTED: &str = "campaign:tenant@example.com!smarthost.example.net";
const TENANT: &str = "tenant@example.net";
const DOMAIN: &str = "example.org";
const LARGE: &str = "large@example.com";

/// Creation times are fixed (the messages were imported with them), so the fixture's
/// contents are known exactly.
const CREATED: u64 = 1_764_000_000_000;
/// The retried message's next attempt: 2100-01-01, in the future for any test run.
const FUTURE_DUE: u64 = 4_102_444_800_000;
/// The large payload's size: above sled's blob threshold (about 128 KiB), so sled keeps it
/// in a file of its own under `data/blobs/`, and above the spool's large-record marker.
const LARGE_LEN: usize = 200 * 1024;
/// The id of the record damaged on disk before the last v1 open (quarantined by it).
const DAMAGED_ID: u64 = 9;
/// What the damaged record held: version 1, a zero checksum, a body that does not match.
const DAMAGED_RAW: &[u8] = b"\x01\0\0\0\0damaged on disk";
/// The message enqueued and acked by the generator: the highest id the v1 spool handed out.
const ACKED_ID: u64 = 8;
/// When the v1 open quarantined the damaged record (printed by the generator).
const QUARANTINED_AT_MS: u64 = 1_796_076_269_539;
/// The queue suspension the v1 daemon would have stored (`suspend/<queue>` -> JSON).
const SUSPENSION: (&str, &str) = (
    "suspend/campaign:tenant@example.com",
    r#"{"reason":"tenant paused by ops","since_ms":1764000000500,"until_ms":null}"#,
);

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/spool")
}

/// The large payload: a pattern, so its bytes are known without storing them twice.
fn large_payload() -> Vec<u8> {
    (0..LARGE_LEN).map(|i| (i * 31 % 251) as u8).collect()
}

fn meta(pairs: &[(&str, MetaValue)]) -> Meta {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn message(id: u64, queue: &str, meta: Meta, payload: &[u8]) -> Message {
    Message {
        id: MessageId(id),
        queue: queue.into(),
        created_ms: CREATED + id,
        attempts: 0,
        due_ms: CREATED + id,
        last_error: None,
        meta,
        payload: payload.to_vec(),
    }
}

/// The messages as the generator imported them (before the retry and the dead-letter).
fn imported() -> Vec<Message> {
    let recipient = |r: &str| ("recipient", MetaValue::Str(r.into()));
    let first = message(
        1,
        CAMPAIGN,
        meta(&[
            ("sender", MetaValue::Str("bounce@tenant.example.com".into())),
            recipient("alice@example.com"),
            ("priority", MetaValue::Int(-5)),
            ("tracked", MetaValue::Bool(true)),
            ("score", MetaValue::Float(0.25)),
            ("note", MetaValue::Null),
            (
                "headers",
                MetaValue::Json(r#"{"X-Campaign":["spring",2]}"#.into()),
            ),
        ]),
        b"Subject: one\r\n\r\nhello alice\r\n",
    );
    let retried = Message {
        attempts: 2,
        last_error: Some("451 4.3.0 mailbox busy".into()),
        ..message(2, CAMPAIGN, meta(&[recipient("bob@example.com")]), b"bob")
    };
    let dead = Message {
        attempts: 1,
        last_error: Some("451 earlier".into()),
        ..message(6, DOMAIN, meta(&[recipient("eve@example.org")]), b"eve")
    };
    vec![
        first,
        retried,
        message(
            3,
            ROUTED,
            meta(&[recipient("dan@example.com")]),
            b"\0\xff\r\n",
        ),
        message(4, TENANT, Meta::new(), b""),
        message(
            5,
            LARGE,
            meta(&[recipient("carol@example.com")]),
            &large_payload(),
        ),
        dead,
        message(7, DOMAIN, meta(&[recipient("frank@example.org")]), b"frank"),
    ]
}

/// What any version must read back as queued, in id order.
fn expected_queued() -> Vec<Message> {
    let mut queued = imported();
    queued.retain(|m| m.id.0 != 6);
    let retried = &mut queued[1];
    retried.attempts = 3;
    retried.due_ms = FUTURE_DUE;
    retried.last_error = Some("451 4.7.1 greylisted, try again later".into());
    queued
}

/// What any version must read back as dead-lettered.
fn expected_dead() -> Vec<Message> {
    let mut dead = imported().swap_remove(5);
    dead.last_error = Some("550 5.1.1 user unknown".into());
    vec![dead]
}

fn copy_of_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = fixture_dir();
    assert!(
        fixture.join("data").is_dir(),
        "fixture missing at {}: is it committed (not ignored by .gitignore)?",
        fixture.display()
    );
    copy_dir(&fixture, &tmp.path().join("spool"));
    tmp
}

fn open(dir: &Path) -> (Spool, spool::RecoveryReport) {
    Spool::open(dir, SpoolOptions::default()).expect("the v1 spool opens")
}

#[tokio::test]
async fn v1_spool_reads_back_exactly() {
    let tmp = copy_of_fixture();
    let dir = tmp.path().join("spool");
    assert!(dir.join("ledger").is_file(), "the fixture has its ledger");
    let (spool, report) = open(&dir);
    assert_eq!(report.lost_writes, None, "the ledger agrees with sled");
    assert!(report.lost_large.is_empty(), "{:?}", report.lost_large);
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!((report.quarantined_now, report.quarantine_total), (0, 1));

    let queued = expected_queued();
    assert_eq!(all_queued(&spool), queued);
    let mut names: Vec<String> = queued.iter().map(|m| m.queue.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(spool.queue_names(), names);
    let bytes: u64 = queued.iter().map(|m| m.payload.len() as u64).sum();
    assert_eq!(spool.queued_bytes(), bytes);

    assert_eq!(spool.dead_letters().unwrap(), expected_dead());
    let damaged_key = keys::message_key(DOMAIN, MessageId(DAMAGED_ID));
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let QuarantineEntry {
        tree,
        key,
        raw,
        reason,
        at_ms,
    } = &quarantined[0];
    assert_eq!(
        (tree.as_str(), key, raw.as_slice()),
        ("Messages", &damaged_key, DAMAGED_RAW)
    );
    assert!(reason.starts_with("checksum mismatch"), "{reason}");
    assert_eq!(*at_ms, QUARANTINED_AT_MS);
    let stats = spool.stats(spool::now_ms());
    assert_eq!((stats.dead_letter, stats.quarantine), (1, 1));

    let (name, json) = SUSPENSION;
    assert_eq!(
        spool.settings("suspend/").unwrap(),
        vec![(name.to_string(), json.as_bytes().to_vec())]
    );
}

#[tokio::test]
async fn v1_spool_leases_acks_and_continues_its_ids() {
    let tmp = copy_of_fixture();
    let dir = tmp.path().join("spool");
    {
        let (spool, report) = open(&dir);
        let highest = ACKED_ID.max(DAMAGED_ID);
        assert!(report.highest_id >= highest, "{}", report.highest_id);
        // Only the first campaign message is due: the retried one waits until 2100.
        let leased = spool.lease(CAMPAIGN, 10, spool::now_ms()).unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].message, expected_queued()[0]);
        spool.ack(&leased[0].lease).unwrap();
        let large = spool.lease(LARGE, 10, spool::now_ms()).unwrap();
        assert_eq!(large.len(), 1);
        assert!(
            large[0].message.payload == large_payload(),
            "blob read back"
        );
        spool.release(&large[0].lease);
        let new = spool
            .enqueue(vec![NewMessage {
                queue: CAMPAIGN.into(),
                meta: Meta::new(),
                payload: b"new".to_vec(),
            }])
            .await
            .unwrap();
        assert!(
            new[0].0 > highest,
            "new id {} must continue above the fixture's {highest}",
            new[0]
        );
        spool.sync().await.unwrap();
    }
    let (spool, report) = open(&dir);
    assert!(report.lost_large.is_empty(), "{:?}", report.lost_large);
    let mut want = expected_queued();
    want.remove(0);
    let got = all_queued(&spool);
    assert_eq!(&got[..want.len()], &want[..], "the ack survived a reopen");
    assert_eq!(got.len(), want.len() + 1, "the new message is kept too");
}

/// Writes the fixture with the *current* code. Run it only on a build that writes format v1:
/// `cargo test -p spool --test v1_fixture -- --ignored --nocapture generate_v1_fixture`
/// (it replaces `tests/fixtures/v1/spool/`).
#[tokio::test]
#[ignore = "writes the committed fixture; only with a v1 build"]
async fn generate_v1_fixture() {
    let target = fixture_dir();
    let _ = std::fs::remove_dir_all(&target);
    {
        let (spool, _) = open(&target);
        spool.import(imported(), vec![]).await.unwrap();
        // The retry and the dead-letter go through the ordinary settlement paths.
        let campaign = spool.lease(CAMPAIGN, 10, u64::MAX / 2).unwrap();
        let retried = campaign.iter().find(|l| l.lease.id().0 == 2).unwrap();
        spool
            .retry(retried, "451 4.7.1 greylisted, try again later", FUTURE_DUE)
            .await
            .unwrap();
        let ids = spool
            .enqueue(vec![NewMessage {
                queue: DOMAIN.into(),
                meta: Meta::new(),
                payload: b"delivered".to_vec(),
            }])
            .await
            .unwrap();
        assert_eq!(ids, vec![MessageId(ACKED_ID)]);
        for l in spool.lease(DOMAIN, 10, u64::MAX / 2).unwrap() {
            match l.lease.id().0 {
                6 => spool
                    .dead_letter(&l, "550 5.1.1 user unknown")
                    .await
                    .unwrap(),
                ACKED_ID => spool.ack(&l.lease).unwrap(),
                _ => spool.release(&l.lease),
            }
        }
        let (name, json) = SUSPENSION;
        spool.put_setting(name, json.as_bytes()).await.unwrap();
        spool.sync().await.unwrap();
    }
    damage_a_record(&target.join("data"));
    let (spool, report) = open(&target);
    assert_eq!(report.quarantined_now, 1, "{report:?}");
    let at = spool.quarantined().unwrap()[0].at_ms;
    drop(spool);
    println!("QUARANTINED_AT_MS = {at}");
}

/// Puts a record that fails its checksum straight into sled, as a damaged disk would leave
/// it, so the next open quarantines it.
fn damage_a_record(sled_dir: &Path) {
    let db = sled::open(sled_dir).unwrap();
    let messages = db.open_tree("messages").unwrap();
    messages
        .insert(
            keys::message_key(DOMAIN, MessageId(DAMAGED_ID)),
            DAMAGED_RAW,
        )
        .unwrap();
    db.flush().unwrap();
}
