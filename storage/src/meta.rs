//! The metadata store: small records keyed by string (dedup snapshots, subscription
//! cursors, node identity), behind a trait so that the simulation can use an in-memory
//! store whose unflushed writes vanish on a crash.
//!
//! Costs and atomicity: `put` is atomic per key and cheap; nothing is durable until
//! `flush` returns. Everything here is either derived from the log (and rebuilt after a
//! crash) or tolerates losing the latest writes (a cursor that falls back redelivers).
use std::{collections::BTreeMap, fmt, path::Path, sync::Mutex};

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Result, StorageError};

/// A key-value store for metadata.
pub trait MetaStore: Send + Sync + fmt::Debug {
    /// The value under `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Sets `key` to `value` (durable after the next `flush`).
    fn put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Removes `key`.
    fn delete(&self, key: &str) -> Result<()>;
    /// All entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// Makes all writes so far durable. The costly call.
    fn flush(&self) -> Result<()>;
}

/// Reads and decodes a postcard record.
pub fn get_record<T: DeserializeOwned>(meta: &dyn MetaStore, key: &str) -> Result<Option<T>> {
    meta.get(key)?
        .map(|bytes| postcard::from_bytes(&bytes))
        .transpose()
        .map_err(|e| StorageError::MetaCorrupt { key: key.to_string(), reason: e.to_string() })
}

/// Encodes and writes a postcard record.
pub fn put_record<T: Serialize>(meta: &dyn MetaStore, key: &str, value: &T) -> Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(|e| StorageError::Meta(format!("encoding {key}: {e}")))?;
    meta.put(key, &bytes)
}

/// The production store: sled.
#[derive(Debug)]
pub struct SledMeta {
    db: sled::Db,
}

impl SledMeta {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        // sled flushes by itself every 500 ms as well; the node also flushes at checkpoints.
        let db = sled::Config::new().path(dir).flush_every_ms(Some(500)).open().map_err(|e| match e {
            sled::Error::Io(source) => StorageError::Io { path: dir.to_path_buf(), source },
            other => StorageError::Meta(format!("opening {}: {other}", dir.display())),
        })?;
        Ok(SledMeta { db })
    }
}

fn sled_err(e: sled::Error) -> StorageError {
    StorageError::Meta(e.to_string())
}

impl MetaStore for SledMeta {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.db.insert(key, value).map_err(sled_err).map(drop)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.db.remove(key).map_err(sled_err).map(drop)
    }
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }
    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(sled_err).map(drop)
    }
}

/// Key-value pairs in key order.
pub(crate) type Entries = BTreeMap<String, Vec<u8>>;

/// The entries whose key starts with `prefix`, in key order (for in-memory stores).
pub(crate) fn scan(entries: &Entries, prefix: &str) -> Vec<(String, Vec<u8>)> {
    entries
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// An in-memory store: `flush` copies the working state to the durable state, and
/// [`MemMeta::crash`] throws away what was not flushed.
#[derive(Debug, Default)]
pub struct MemMeta {
    /// (working state, durable state)
    state: Mutex<(Entries, Entries)>,
}

impl MemMeta {
    /// Forgets every write since the last flush, as a crash would.
    pub fn crash(&self) {
        let mut s = self.state.lock().expect("MemMeta lock poisoned");
        s.0 = s.1.clone();
    }
}

impl MetaStore for MemMeta {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.state.lock().expect("MemMeta lock poisoned").0.get(key).cloned())
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.state.lock().expect("MemMeta lock poisoned").0.insert(key.to_string(), value.to_vec());
        Ok(())
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.state.lock().expect("MemMeta lock poisoned").0.remove(key);
        Ok(())
    }
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(scan(&self.state.lock().expect("MemMeta lock poisoned").0, prefix))
    }
    fn flush(&self) -> Result<()> {
        let mut s = self.state.lock().expect("MemMeta lock poisoned");
        s.1 = s.0.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(m: &dyn MetaStore) {
        m.put("sub/a/x", b"1").unwrap();
        m.put("sub/a/y", b"2").unwrap();
        m.put("sub/b/x", b"3").unwrap();
        assert_eq!(m.get("sub/a/x").unwrap().as_deref(), Some(&b"1"[..]));
        let keys: Vec<String> = m.scan_prefix("sub/a/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["sub/a/x", "sub/a/y"]);
        m.delete("sub/a/x").unwrap();
        assert_eq!(m.get("sub/a/x").unwrap(), None);
        put_record(m, "rec", &(7u64, "seven".to_string())).unwrap();
        assert_eq!(get_record::<(u64, String)>(m, "rec").unwrap(), Some((7, "seven".into())));
        m.put("bad", &[0xff]).unwrap();
        assert!(get_record::<(u64, String)>(m, "bad").unwrap_err().to_string().contains("bad"));
        m.flush().unwrap();
    }

    #[test]
    fn log_store() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&crate::metalog::LogMeta::open(&dir.path().join("meta.log")).unwrap());
    }

    #[test]
    fn sled_store() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&SledMeta::open(dir.path()).unwrap());
    }

    #[test]
    fn mem_store_loses_unflushed_writes_on_crash() {
        let m = MemMeta::default();
        exercise(&m);
        m.put("late", b"x").unwrap();
        m.crash();
        assert_eq!(m.get("late").unwrap(), None);
        assert!(m.get("sub/a/y").unwrap().is_some());
    }
}
