//! Blobs: immutable byte strings (WebAssembly modules, later ONNX models) stored once per
//! node under `<data_dir>/blobs/<sha256 in hex>`, named by the SHA-256 of their contents
//! (DESIGN section 8). The catalogue and the Hello name blobs by hash, never carry them.
//!
//! A blob is written to its final name, synced, and its directory synced; there is no
//! rename, so a crash mid-write can leave a torn file under the right name. The name is
//! the hash, so every read checks it: a file whose contents do not match is removed and
//! reported as missing, and the node fetches the blob again.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    error::{Result, StorageError},
    fs::{FileSystem, create_dir_durably},
    hex,
};

/// The SHA-256 of a blob's bytes.
pub type Hash = [u8; 32];

/// The hash of `bytes`.
pub fn hash(bytes: &[u8]) -> Hash {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The blob store of one node.
#[derive(Debug, Clone)]
pub struct Blobs {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
}

impl Blobs {
    /// Opens (creating, durably) `<data_dir>/blobs`.
    pub fn open(fs: Arc<dyn FileSystem>, data_dir: &Path) -> Result<Blobs> {
        let dir = data_dir.join("blobs");
        create_dir_durably(fs.as_ref(), &dir)?;
        Ok(Blobs { fs, dir })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hex::encode(hash))
    }

    /// Stores `bytes` durably; returns their hash. Storing a blob already held is a no-op.
    pub fn put(&self, bytes: &[u8]) -> Result<Hash> {
        let hash = hash(bytes);
        if self.get(&hash)?.is_some() {
            return Ok(hash);
        }
        let path = self.path(&hash);
        let io = |e| StorageError::io(&path, e);
        let file = self.fs.open(&path, true).map_err(io)?;
        file.set_len(0).map_err(io)?;
        file.write_all_at(bytes, 0).map_err(io)?;
        file.sync_data().map_err(io)?;
        self.fs.sync_dir(&self.dir).map_err(|e| StorageError::io(&self.dir, e))?;
        Ok(hash)
    }

    /// The blob with this hash, if this node holds it whole. A torn or damaged file is
    /// removed (logged) and reported as missing.
    pub fn get(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let path = self.path(hash);
        let io = |e| StorageError::io(&path, e);
        let Some(file) = self.open_held(&path)? else { return Ok(None) };
        let len = file.len().map_err(io)?;
        let mut bytes = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
        let mut at = 0;
        while at < bytes.len() {
            match file.read_at(&mut bytes[at..], at as u64).map_err(io)? {
                0 => break,
                n => at += n,
            }
        }
        bytes.truncate(at);
        if self::hash(&bytes) != *hash {
            tracing::warn!(path = %path.display(), "blob contents do not match its name (torn by a crash?); removed");
            self.fs.remove_file(&path).map_err(io)?;
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Up to `len` bytes of a blob from `offset`, and the blob's length; `None` when it is
    /// not held. Unchecked (a peer checks the whole blob against its hash).
    pub fn read_range(&self, hash: &Hash, offset: u64, len: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let path = self.path(hash);
        let io = |e| StorageError::io(&path, e);
        let Some(file) = self.open_held(&path)? else { return Ok(None) };
        let total = file.len().map_err(io)?;
        let end = offset.saturating_add(len).min(total);
        let mut bytes = vec![0; usize::try_from(end.saturating_sub(offset)).unwrap_or(0)];
        let mut at = 0;
        while at < bytes.len() {
            match file.read_at(&mut bytes[at..], offset + at as u64).map_err(io)? {
                0 => break,
                n => at += n,
            }
        }
        bytes.truncate(at);
        Ok(Some((total, bytes)))
    }

    /// The blob file at `path` opened for reading; `None` when there is none.
    fn open_held(&self, path: &Path) -> Result<Option<Arc<dyn crate::fs::LogFile>>> {
        match self.fs.open(path, false) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io(path, e)),
        }
    }

    /// The hashes of the blobs held (whole or not: [`Blobs::get`] checks).
    pub fn list(&self) -> Result<Vec<Hash>> {
        let entries = self.fs.read_dir(&self.dir).map_err(|e| StorageError::io(&self.dir, e))?;
        let hash_named = |p: &PathBuf| hex::decode(&p.file_name()?.to_string_lossy())?.try_into().ok();
        Ok(entries.iter().filter_map(hash_named).collect())
    }

    /// Removes a blob (nothing names it any more).
    pub fn remove(&self, hash: &Hash) -> Result<()> {
        let path = self.path(hash);
        match self.fs.remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::io(&path, e)),
            _ => self.fs.sync_dir(&self.dir).map_err(|e| StorageError::io(&self.dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{StdFs, TestFs};

    #[test]
    fn a_blob_round_trips_under_its_hash_and_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(Arc::new(StdFs), dir.path()).unwrap();
        let h = blobs.put(b"(module)").unwrap();
        // sha256sum of the same bytes:
        assert_eq!(hex::encode(&h), "1885772b94ca41b360d9bd07535547f4c8ef16cbe7e49d2c8e9780247e26c4de");
        assert_eq!(blobs.get(&h).unwrap().as_deref(), Some(&b"(module)"[..]));
        assert_eq!(blobs.put(b"(module)").unwrap(), h);
        assert_eq!(blobs.list().unwrap(), vec![h]);
        assert_eq!(blobs.get(&hash(b"other")).unwrap(), None);
        blobs.remove(&h).unwrap();
        assert_eq!(blobs.get(&h).unwrap(), None);
        blobs.remove(&h).unwrap();
    }

    #[test]
    fn a_range_of_a_blob_is_read_up_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(Arc::new(StdFs), dir.path()).unwrap();
        let hash = blobs.put(b"0123456789").unwrap();
        assert_eq!(blobs.read_range(&hash, 2, 3).unwrap(), Some((10, b"234".to_vec())));
        assert_eq!(blobs.read_range(&hash, 8, 100).unwrap(), Some((10, b"89".to_vec())));
        assert_eq!(blobs.read_range(&hash, 12, 1).unwrap(), Some((10, Vec::new())));
        assert_eq!(blobs.read_range(&[0; 32], 0, 1).unwrap(), None);
    }

    #[test]
    fn a_torn_blob_counts_as_missing_and_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(Arc::new(StdFs), dir.path()).unwrap();
        let h = blobs.put(&[7; 10_000]).unwrap();
        let path = dir.path().join("blobs").join(hex::encode(&h));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(4096).unwrap();
        assert_eq!(blobs.get(&h).unwrap(), None);
        assert!(!path.exists(), "the torn file is removed");
        assert_eq!(blobs.put(&[7; 10_000]).unwrap(), h);
        assert_eq!(blobs.get(&h).unwrap().map(|b| b.len()), Some(10_000));
    }

    #[test]
    fn a_put_is_synced_with_its_directory_and_a_failing_disk_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(TestFs::default());
        let blobs = Blobs::open(Arc::new(TestFs::root(&fs)), dir.path()).unwrap();
        blobs.put(b"a").unwrap();
        assert!(fs.dir_syncs.lock().unwrap().iter().any(|d| d.ends_with("blobs")));
        fs.set_failing(true);
        let err = blobs.put(b"b").unwrap_err().to_string();
        assert!(err.contains(&hex::encode(&hash(b"b"))), "{err}");
    }
}
