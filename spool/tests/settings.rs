//! Operator settings live in the spool's meta tree: what was put is there after a reopen,
//! what was deleted is not, a prefix selects, and messages are not disturbed.

mod common;

use common::{lease_all, msg, open};

#[tokio::test]
async fn settings_survive_a_reopen_and_deletes_stick() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("q", b"m")]).await.unwrap();
        spool.put_setting("suspend/a", b"{\"x\":1}").await.unwrap();
        spool.put_setting("suspend/b", b"two").await.unwrap();
        spool.put_setting("other", b"3").await.unwrap();
        spool.put_setting("suspend/b", b"2").await.unwrap();
    }
    {
        let spool = open(dir.path());
        assert_eq!(
            spool.settings("suspend/").unwrap(),
            vec![
                ("suspend/a".to_string(), b"{\"x\":1}".to_vec()),
                ("suspend/b".to_string(), b"2".to_vec()),
            ]
        );
        spool.delete_setting("suspend/a").await.unwrap();
        spool.delete_setting("never-set").await.unwrap();
    }
    let spool = open(dir.path());
    assert_eq!(
        spool.settings("").unwrap(),
        vec![
            ("other".to_string(), b"3".to_vec()),
            ("suspend/b".to_string(), b"2".to_vec()),
        ]
    );
    assert_eq!(lease_all(&spool, "q").len(), 1, "the message is untouched");
}
