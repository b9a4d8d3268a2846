//! Operator settings kept with the spool: small named values in the `meta` tree, under
//! `"setting/" <name>`, written through the commit thread like everything else (durable
//! when the call returns, ordered with the messages' commits).
//!
//! The spool does not interpret them. The daemon keeps its queue suspensions here
//! (`suspend/<queue>` -> JSON), so they survive a restart; the recovery scan ignores these
//! keys. Values are meant to be small (a few hundred bytes): they are read whole.

use crate::commit::{Job, Op, TreeId};
use crate::error::Result;
use crate::Spool;

/// The meta-tree prefix of every setting.
const SETTING_PREFIX: &[u8] = b"setting/";

fn setting_key(name: &str) -> Vec<u8> {
    [SETTING_PREFIX, name.as_bytes()].concat()
}

impl Spool {
    /// Stores `value` under `name` (replacing any), durably.
    pub async fn put_setting(&self, name: &str, value: &[u8]) -> Result<()> {
        self.write_setting(Op::Put(TreeId::Meta, setting_key(name), value.to_vec()))
            .await
    }

    /// Removes the setting `name` (nothing if there is none), durably.
    pub async fn delete_setting(&self, name: &str) -> Result<()> {
        self.write_setting(Op::Del(TreeId::Meta, setting_key(name)))
            .await
    }

    /// Every setting whose name starts with `prefix`, in name order, with the names whole.
    pub fn settings(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let tree = &self.inner.trees[TreeId::Meta as usize];
        let mut out = Vec::new();
        for item in tree.scan_prefix(setting_key(prefix)) {
            let (key, value) = item.map_err(|e| self.storage(e))?;
            let name = String::from_utf8_lossy(&key[SETTING_PREFIX.len()..]).into_owned();
            out.push((name, value.to_vec()));
        }
        Ok(out)
    }

    async fn write_setting(&self, op: Op) -> Result<()> {
        let mut job = Job::with_capacity(1);
        job.ops.push(op);
        self.await_commit(self.submit(job)?).await
    }
}
