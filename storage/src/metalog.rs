//! The production metadata store: one append-only file of checksummed records, replayed
//! into memory on open (`<data dir>/meta.log`).
//!
//! Why not sled (which this replaced): under the power-cut test (issue 14) sled 0.34 lost
//! entries it had flushed. It never syncs its directory (a new store's files can vanish),
//! and it makes its log durable with `sync_file_range`, which writes no metadata (a grown
//! file's size) and is no fsync; only a background thread fsyncs, every 500 ms. The
//! evidence is kept by the test `sled_loses_a_flushed_entry_in_a_power_cut`.
//!
//! The rules here are the log's own: `flush` appends what was put since the last flush and
//! fdatasyncs; a file is created with its directory synced; a damaged tail (a record cut
//! short or failing its checksum) is cut off on open and logged; compaction writes the
//! live entries to a new file, syncs it, renames it over the log and syncs the directory.
//!
//! record := payload_len u32 LE | crc32c(payload) u32 LE | payload (postcard [`Op`])
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Result, StorageError},
    meta::MetaStore,
};

/// The log is compacted once it is larger than this and than 4 times its live entries.
const COMPACT_MIN_BYTES: u64 = 4 << 20;
/// Bytes of a record besides its key and value (header and encoding, roughly).
const RECORD_OVERHEAD: u64 = 16;

/// One change.
#[derive(Debug, Serialize, Deserialize)]
enum Op {
    Put(String, #[serde(with = "serde_bytes")] Vec<u8>),
    Delete(String),
}

fn encode(op: &Op, out: &mut Vec<u8>) {
    let payload = postcard::to_stdvec(op).expect("a metadata record always encodes");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Replays `bytes` into `map`; returns where the valid records end.
fn replay(bytes: &[u8], map: &mut BTreeMap<String, Vec<u8>>) -> usize {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else { break };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        match postcard::from_bytes(payload) {
            Ok(Op::Put(k, v)) => {
                map.insert(k, v);
            }
            Ok(Op::Delete(k)) => {
                map.remove(&k);
            }
            Err(_) => break,
        }
        at += 8 + len;
    }
    at
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::io(path, e)
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[derive(Debug)]
struct State {
    map: BTreeMap<String, Vec<u8>>,
    /// Records put since the last flush, encoded.
    pending: Vec<u8>,
}

#[derive(Debug)]
struct Writer {
    file: File,
    /// Where the next record goes (the end of the valid records).
    end: u64,
}

/// The metadata log.
#[derive(Debug)]
pub struct LogMeta {
    path: PathBuf,
    state: Mutex<State>,
    /// Flushes run one at a time, outside the state's lock (puts go on during a sync).
    writer: Mutex<Writer>,
}

impl LogMeta {
    /// Opens the log at `path`, creating it (and syncing its directory) if needed.
    pub fn open(path: &Path) -> Result<LogMeta> {
        let existed = path.exists();
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io(path))?;
        if !existed {
            file.sync_all().map_err(io(path))?;
            sync_parent(path)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(path))?;
        let mut map = BTreeMap::new();
        let end = replay(&bytes, &mut map);
        if end < bytes.len() {
            tracing::warn!(path = %path.display(), valid = end, dropped = bytes.len() - end,
                "metadata log has a damaged tail (a write cut short); cutting it off");
            file.set_len(end as u64).and_then(|()| file.sync_all()).map_err(io(path))?;
        }
        Ok(LogMeta {
            path: path.to_path_buf(),
            state: Mutex::new(State { map, pending: Vec::new() }),
            writer: Mutex::new(Writer { file, end: end as u64 }),
        })
    }

    /// Opens the log at `path`; when it does not exist yet and a sled store is at
    /// `sled_dir` (a data dir of an older version), imports every entry of it once, then
    /// renames that directory to `meta.sled-imported` beside it.
    pub fn open_importing(path: &Path, sled_dir: &Path) -> Result<LogMeta> {
        if path.exists() || !sled_dir.is_dir() {
            return LogMeta::open(path);
        }
        let tmp = path.with_extension("importing");
        let _ = std::fs::remove_file(&tmp);
        let log = LogMeta::open(&tmp)?;
        let sled = crate::meta::SledMeta::open(sled_dir)?;
        let entries = sled.scan_prefix("")?;
        let count = entries.len();
        for (k, v) in entries {
            log.put(&k, &v)?;
        }
        log.flush()?;
        drop(sled);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let imported = sled_dir.with_file_name("meta.sled-imported");
        std::fs::rename(sled_dir, &imported).map_err(io(sled_dir))?;
        sync_parent(path)?;
        tracing::info!(entries = count, from = %sled_dir.display(), to = %path.display(),
            "imported the sled metadata store into the metadata log");
        LogMeta::open(path)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("metadata state lock poisoned")
    }

    /// Bytes of the log file (valid records).
    pub fn file_bytes(&self) -> u64 {
        self.writer.lock().expect("metadata writer lock poisoned").end
    }

    /// Writes the live entries to a new file and renames it over the log.
    fn compact(&self, w: &mut Writer) -> Result<()> {
        let tmp = self.path.with_extension("compacting");
        let mut bytes = Vec::new();
        for (k, v) in &self.state().map {
            encode(&Op::Put(k.clone(), v.clone()), &mut bytes);
        }
        let file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all_at(&bytes, 0).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        sync_parent(&self.path)?;
        let reopened = OpenOptions::new().read(true).write(true).open(&self.path).map_err(io(&self.path))?;
        tracing::debug!(from = w.end, to = bytes.len(), "metadata log compacted");
        *w = Writer { file: reopened, end: bytes.len() as u64 };
        Ok(())
    }
}

impl MetaStore for LogMeta {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.state().map.get(key).cloned())
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut s = self.state();
        encode(&Op::Put(key.to_string(), value.to_vec()), &mut s.pending);
        s.map.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let mut s = self.state();
        if s.map.remove(key).is_some() {
            encode(&Op::Delete(key.to_string()), &mut s.pending);
        }
        Ok(())
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(crate::meta::scan(&self.state().map, prefix))
    }

    /// Appends what was put since the last flush and fdatasyncs. A failed write is retried
    /// in full at the same position by the next flush.
    fn flush(&self) -> Result<()> {
        let mut w = self.writer.lock().expect("metadata writer lock poisoned");
        let batch = std::mem::take(&mut self.state().pending);
        if batch.is_empty() {
            return Ok(());
        }
        let written = w.file.write_all_at(&batch, w.end).and_then(|()| w.file.sync_data());
        if let Err(e) = written {
            let mut s = self.state();
            let later = std::mem::replace(&mut s.pending, batch);
            s.pending.extend(later);
            return Err(StorageError::io(&self.path, e));
        }
        w.end += batch.len() as u64;
        if w.end > COMPACT_MIN_BYTES {
            let live: u64 = self.state().map.iter().map(|(k, v)| (k.len() + v.len()) as u64 + RECORD_OVERHEAD).sum();
            if w.end > 4 * live {
                self.compact(&mut w)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_entries_survive_a_reopen_and_unflushed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.log");
        let m = LogMeta::open(&path).unwrap();
        m.put("a", b"1").unwrap();
        m.put("b", b"2").unwrap();
        m.delete("a").unwrap();
        m.flush().unwrap();
        m.put("late", b"x").unwrap();
        drop(m);
        let m = LogMeta::open(&path).unwrap();
        assert_eq!((m.get("a").unwrap(), m.get("b").unwrap()), (None, Some(b"2".to_vec())));
        assert_eq!(m.get("late").unwrap(), None);
        assert_eq!(m.scan_prefix("").unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_tail_is_cut_off_and_the_log_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.log");
        let m = LogMeta::open(&path).unwrap();
        m.put("kept", b"1").unwrap();
        m.flush().unwrap();
        let good = m.file_bytes();
        m.put("torn", b"2").unwrap();
        m.flush().unwrap();
        drop(m);
        // A write cut short: half of the last record.
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let m = LogMeta::open(&path).unwrap();
        assert_eq!((m.get("kept").unwrap(), m.get("torn").unwrap()), (Some(b"1".to_vec()), None));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        m.put("after", b"3").unwrap();
        m.flush().unwrap();
        // A flipped byte fails the checksum the same way.
        drop(m);
        let bytes = std::fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0xff;
        std::fs::write(&path, &flipped).unwrap();
        let m = LogMeta::open(&path).unwrap();
        assert_eq!((m.get("kept").unwrap().is_some(), m.get("after").unwrap()), (true, None));
    }

    #[test]
    fn compaction_keeps_exactly_the_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.log");
        let m = LogMeta::open(&path).unwrap();
        let value = vec![7u8; 64 * 1024];
        for i in 0..200 {
            m.put("cursor", &value).unwrap();
            m.put(&format!("k{}", i % 3), &[i as u8]).unwrap();
            m.flush().unwrap();
        }
        assert!(m.file_bytes() < COMPACT_MIN_BYTES + 200 * 1024, "compacted: {} bytes", m.file_bytes());
        drop(m);
        let m = LogMeta::open(&path).unwrap();
        assert_eq!(m.scan_prefix("").unwrap().len(), 4);
        assert_eq!(m.get("k2").unwrap(), Some(vec![197]));
    }

    #[test]
    fn a_sled_store_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let sled_dir = dir.path().join("meta");
        {
            let sled = crate::meta::SledMeta::open(&sled_dir).unwrap();
            sled.put("repl/config", b"wave 1").unwrap();
            sled.put("sub/t/n/x/s", b"cursor").unwrap();
            sled.flush().unwrap();
        }
        let path = dir.path().join("meta.log");
        let m = LogMeta::open_importing(&path, &sled_dir).unwrap();
        assert_eq!(m.get("repl/config").unwrap(), Some(b"wave 1".to_vec()));
        assert!(!sled_dir.exists() && dir.path().join("meta.sled-imported").is_dir());
        m.put("new", b"x").unwrap();
        m.flush().unwrap();
        drop(m);
        let m = LogMeta::open_importing(&path, &sled_dir).unwrap();
        assert_eq!(m.scan_prefix("").unwrap().len(), 3);
    }
}
